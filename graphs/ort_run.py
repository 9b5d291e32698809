#!/usr/bin/env python3
"""Run ONNX Runtime (CPU) on a model with inputs from a safetensors file.

    python3 graphs/ort_run.py MODEL.onnx INPUTS.safetensors OUT.safetensors

Only the tensors whose names are graph inputs are fed (extra tensors, such as
reference outputs stored in the same file, are ignored); a graph input missing
from the file is an error. Every graph output is written to OUT.safetensors
under its graph output name. Needs onnxruntime, numpy and safetensors only.
"""
import sys

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    model_path, inputs_path, out_path = argv
    tensors = load_file(inputs_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    feeds = {}
    missing = []
    for inp in sess.get_inputs():
        if inp.name in tensors:
            feeds[inp.name] = tensors[inp.name]
        else:
            missing.append(inp.name)
    if missing:
        print(f"error: inputs missing from {inputs_path}: {', '.join(missing)}", file=sys.stderr)
        return 1
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    save_file({n: np.ascontiguousarray(v) for n, v in zip(names, outs)}, out_path)
    for n, v in zip(names, outs):
        print(f"{n}: {v.dtype} {list(v.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
