#!/usr/bin/env python3
"""Runs the PyTorch + PEFT peer (peft_step.py, which has no thread option) with torch limited to N threads,
then prints one more JSON line: this process's peak RSS, and the wall and CPU seconds of each timed step.

The per-step times come from the peer's own clock calls: `time.perf_counter` is wrapped so that each call made
from the peer script's own code (the start and end of each timed step) also records this process's CPU time
(all threads). The values the peer sees are unchanged.

    python benches/peft_step_threads.py --threads 2 /work/shared/tools/gpu/peft_step.py --size gpt2 --device cpu ...

Everything after the peer's path goes to the peer unchanged.
"""
import os
import sys


def main():
    args = sys.argv[1:]
    threads = 2
    if len(args) >= 2 and args[0] == "--threads":
        threads = int(args[1])
        args = args[2:]
    if not args:
        sys.exit(__doc__)
    peer, peer_args = args[0], args[1:]
    # Before torch is imported: its OpenMP pool sizes itself from these.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import json
    import runpy

    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    sys.argv = [peer, *peer_args]
    import time

    wall_clock, marks, peer_file = time.perf_counter, [], os.path.abspath(peer)

    def perf_counter():
        now = wall_clock()
        if os.path.abspath(sys._getframe(1).f_code.co_filename) == peer_file:
            marks.append((now, time.process_time()))
        return now

    time.perf_counter = perf_counter
    t = os.times()
    runpy.run_path(peer, run_name="__main__")
    t2 = os.times()
    time.perf_counter = wall_clock
    pairs = list(zip(marks[0::2], marks[1::2]))
    status = open("/proc/self/status").read()
    hwm_kb = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
    print(json.dumps(dict(wrapper="peft_step_threads", torch_threads=torch.get_num_threads(),
                          peak_rss_mib=round(hwm_kb / 1024, 1),
                          step_s=[round(b[0] - a[0], 4) for a, b in pairs],
                          step_cpu_s=[round(b[1] - a[1], 4) for a, b in pairs],
                          process_cpu_s=round((t2.user - t.user) + (t2.system - t.system), 2),
                          process_wall_s=round(t2.elapsed - t.elapsed, 2))), flush=True)


if __name__ == "__main__":
    main()
