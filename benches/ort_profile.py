"""Where ONNX Runtime (CPU) spends a train step: milliseconds per op type and the slowest nodes.

The counterpart of tract_profile.rs. Runs a bundle's train_step.onnx with ORT's own profiler (2 intra-op threads,
memory pattern off, as pfxrun opens it) on random ids and a small random prefix, and sums the kernel times.

    python benches/ort_profile.py BUNDLE_DIR [--steps 4] [--top 25] [--graph decode]

BUNDLE_DIR is a bundle compiled by train_step_cpu (PFX_BENCH_BUNDLE=DIR keeps it). Needs numpy and onnxruntime.
Kernel times add up to less than a step's wall time (no session overhead, no state copies).
"""

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def feeds_for(session, vocab, rng):
    feeds = {}
    for i in session.get_inputs():
        shape = i.shape
        if "int64" in i.type:
            if i.name == "step":
                feeds[i.name] = np.array(1, np.int64)
            elif "mask" in i.name:
                feeds[i.name] = np.ones(shape, np.int64)
            elif "position" in i.name:
                feeds[i.name] = rng.integers(0, 100, size=shape).astype(np.int64)
            else:
                feeds[i.name] = rng.integers(0, vocab, size=shape).astype(np.int64)
        elif i.name == "lr":
            feeds[i.name] = np.array(1e-4, np.float32)
        else:
            feeds[i.name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    return feeds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graph", default="train_step", help="which of the bundle's graphs (e.g. decode)")
    args = ap.parse_args()
    manifest = json.load(open(os.path.join(args.bundle, "manifest.json")))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.enable_mem_pattern = False
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="pfx-ort-profile-"), "profile")
    path = os.path.join(args.bundle, manifest["graphs"][args.graph])
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = feeds_for(session, manifest.get("vocab") or 50257, np.random.default_rng(0))
    session.run(None, feeds)  # warm-up, profiled too: subtracted below by counting runs
    for _ in range(args.steps):
        session.run(None, feeds)
    events = json.load(open(session.end_profiling()))
    runs = args.steps + 1
    by_op, by_node, shapes = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[(node, e["args"]["op_name"])] += e["dur"]
            shapes[node] = e["args"].get("output_type_shape")
    total = sum(by_op.values()) / runs
    print(f"ORT {args.graph}: {total / 1000:.1f} ms of kernel time per step ({runs} runs incl. warm-up, averaged)")
    print(f"{'op':<24} {'ms/step':>9} {'share':>7}")
    for op, us in by_op.most_common(args.top):
        print(f"{op:<24} {us / runs / 1000:9.1f} {100 * us / runs / total:6.1f}%")
    print("slowest nodes:")
    for (node, op), us in by_node.most_common(args.top):
        print(f"  {us / runs / 1000:7.1f} ms  {node} ({op}) {json.dumps(shapes[node])[:60]}")


if __name__ == "__main__":
    main()
