#!/usr/bin/env python3
"""Carry a GPT-2 export to the GPU machine without its weights, and give it random ones there.

The GPU machine has its own torch and transformers (other versions than the reference venv here), so an export
made there is a graph this project's compiler has never seen; and a 1.4 GB gpt2-medium export cannot be
carried (a device call carries 64 MiB). Timing does not depend on the weight values, so:

    # here, after benches/make_gpt2_export.py --size gpt2-medium:
    python3 benches/gpt2_skeleton.py strip /tmp/pfx-bench/gpt2-medium gpu-carry/gpt2-medium.skeleton.onnx
    # there (numpy and onnx only):
    python3 benches/gpt2_skeleton.py fill gpu-carry/gpt2-medium.skeleton.onnx /tmp/pfx-bench/gpt2-medium

`strip` keeps the graph and every small or non-float tensor, and replaces each large float tensor's bytes by its
mean and standard deviation; `fill` writes `model.onnx` + `model.onnx.data` with normal values of those
statistics (LayerNorm gains stay near 1, biases near 0, as in the export). The graph is then exactly the one
the tests and benchmarks here compiled.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

STATS_KEY = "pfx.skeleton.stats"
DATA_FILE = "model.onnx.data"


def external_fields(t):
    return {e.key: e.value for e in t.external_data}


def strip(export_dir, out_path):
    model_path = os.path.join(export_dir, "model.onnx")
    m = onnx.load(model_path, load_external_data=False)
    stats = {}
    kept = 0
    for t in m.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        f = external_fields(t)
        with open(os.path.join(export_dir, f["location"]), "rb") as fh:
            fh.seek(int(f.get("offset", 0)))
            raw = fh.read(int(f["length"]))
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        if t.data_type == TensorProto.FLOAT:
            values = np.frombuffer(raw, dtype=np.float32).astype(np.float64)
            stats[t.name] = [float(values.mean()), float(values.std())]
            # The dims stay; the bytes come back in `fill`.
        else:
            t.raw_data = raw  # indices, positions: their values matter, and they are small
            kept += 1
    m.metadata_props.add(key=STATS_KEY, value=json.dumps(stats))
    onnx.save_model(m, out_path)
    print(f"{out_path}: {os.path.getsize(out_path) / 1e6:.2f} MB, {len(stats)} float tensors to fill, "
          f"{kept} other tensors kept inline")


def fill(skeleton_path, out_dir):
    t0 = time.perf_counter()
    m = onnx.load(skeleton_path, load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if STATS_KEY not in meta:
        sys.exit(f"{skeleton_path} is not a skeleton (no {STATS_KEY} metadata): make it with `strip`")
    stats = json.loads(meta.pop(STATS_KEY))
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20261128)
    offset = 0
    with open(os.path.join(out_dir, DATA_FILE), "wb") as data:
        for t in m.graph.initializer:
            if t.name not in stats:
                continue
            mean, std = stats[t.name]
            n = int(np.prod(t.dims, dtype=np.int64))
            values = rng.standard_normal(n, dtype=np.float32)
            values *= np.float32(std)
            values += np.float32(mean)
            raw = values.tobytes()
            data.write(raw)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
            offset += len(raw)
    missing = set(stats) - {t.name for t in m.graph.initializer}
    if missing:
        sys.exit(f"{skeleton_path}: statistics for tensors the graph does not have: {sorted(missing)[:5]}")
    onnx.save_model(m, os.path.join(out_dir, "model.onnx"))
    print(f"{out_dir}/model.onnx + {DATA_FILE} ({offset / 1e6:.1f} MB of random weights) "
          f"in {time.perf_counter() - t0:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strip", help="export folder (model.onnx + external data) -> skeleton .onnx")
    s.add_argument("export_dir")
    s.add_argument("out")
    f = sub.add_parser("fill", help="skeleton .onnx -> export folder with random weights")
    f.add_argument("skeleton")
    f.add_argument("out_dir")
    a = ap.parse_args()
    if a.cmd == "strip":
        strip(a.export_dir, a.out)
    else:
        fill(a.skeleton, a.out_dir)


if __name__ == "__main__":
    main()
