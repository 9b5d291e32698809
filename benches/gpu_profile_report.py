#!/usr/bin/env python3
"""Sums what benches/gpu_profile.sh brings back: where a training step's time goes on the GPU.

    python3 benches/gpu_profile_report.py ortprof.json.gz [ncu.csv.gz] [--top 30]

ortprof.json.gz: ONNX Runtime's profile of a train step (runs with CUDA_LAUNCH_BLOCKING=1, so a node's time is its
GPU time plus one launch). The first run is the warm-up and is left out; times are per step (the mean over the
runs kept). ncu.csv.gz: Nsight Compute's gpu__time_duration per kernel (one warm-up, one step): the second half
of the kernels, by kernel name. Standard library only.
"""
import argparse
import collections
import csv
import gzip
import io
import json
import re


def ort_report(path, top):
    events = json.load(gzip.open(path))
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[1:] or runs
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in kept]
    per_op = collections.defaultdict(lambda: [0.0, 0])
    per_node = collections.defaultdict(float)
    providers = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in windows):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        per_op[op][0] += e["dur"]
        per_op[op][1] += 1
        per_node[(e["name"][: -len("_kernel_time")], op)] += e["dur"]
        providers[args.get("provider", "?")] += 1
    n = len(kept)
    total = sum(v[0] for v in per_op.values()) / n
    wall = sum(r["dur"] for r in kept) / n
    print(f"ORT profile: {n} runs kept; per step: nodes {total / 1e3:.2f} ms of {wall / 1e3:.2f} ms run time; "
          f"providers {dict((k, v // n) for k, v in providers.items())}")
    print(f"| op | nodes | ms per step | share |")
    print("|---|---|---|---|")
    for op, (us, cnt) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {op} | {cnt // n} | {us / n / 1e3:.3f} | {us / n / total:.1%} |")
    print(f"\nslowest nodes (ms per step):")
    for (name, op), us in sorted(per_node.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / n / 1e3:8.3f}  {op:<12} {name}")


def short(kernel):
    k = re.sub(r"\(.*", "", kernel)  # drop argument lists
    k = re.sub(r"<.*>", "<>", k)  # and template arguments
    return k[:90]


def ncu_report(path, top):
    text = gzip.open(path, "rt").read()
    lines = text[text.index('"ID"'):] if '"ID"' in text else text
    rows = [r for r in csv.DictReader(io.StringIO(lines)) if r.get("Metric Name") == "gpu__time_duration.sum"]
    rows = rows[len(rows) // 2:]  # the step, not the warm-up
    per = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        v = float(r["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(r.get("Metric Unit", "nsecond"), 1e-3)
        k = per[short(r["Kernel Name"])]
        k[0] += v * scale
        k[1] += 1
    total = sum(v[0] for v in per.values())
    print(f"\nncu: {len(rows)} kernels in the step, {total / 1e3:.2f} ms of GPU time")
    print("| kernel | launches | ms | share |")
    print("|---|---|---|---|")
    for k, (us, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {k} | {cnt} | {us / 1e3:.3f} | {us / total:.1%} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ortprof")
    ap.add_argument("ncu", nargs="?")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    ort_report(a.ortprof, a.top)
    if a.ncu:
        ncu_report(a.ncu, a.top)


if __name__ == "__main__":
    main()
