#!/usr/bin/env python3
"""Tiny hand-made ONNX graphs for the pfx-runtime tests, with numpy reference outputs.

Needs only `onnx` and `numpy`. Run from anywhere:  python3 graphs/unit/make_unit_graphs.py
Writes, next to this script:
  matmul_softmax.onnx                  x[batch,4] -> logits = x@W+b, probs = softmax(logits)   (symbolic batch)
  embed_external.onnx (+ embed_external.weights.bin, external data)
                                       ids[batch,seq] int64, mask[batch,seq] bool
                                       -> hidden = tanh(E[ids] @ W) * mask, n_tokens = sum(mask) int64
  <graph>.<case>.inputs.safetensors    inputs by graph input name
  <graph>.<case>.expected.safetensors  outputs computed in numpy (float64, stored as float32)
The output is deterministic (fixed seed), so rerunning it reproduces the committed files.
"""
import json
import os
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 17
IR_VERSION = 8

ST_DTYPES = {
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def save_safetensors(path, tensors):
    """Minimal safetensors writer (the format is an 8-byte header length, a JSON header, raw data)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def finish(model, name, external=None):
    model.ir_version = IR_VERSION
    path = os.path.join(HERE, name + ".onnx")
    if external:
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=external, size_threshold=64)
        stale = os.path.join(HERE, external)
        if os.path.exists(stale):
            os.remove(stale)
    onnx.save_model(model, path)
    onnx.checker.check_model(path, full_check=True)
    return path


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def write_case(graph, case, inputs, expected):
    save_safetensors(os.path.join(HERE, f"{graph}.{case}.inputs.safetensors"), inputs)
    save_safetensors(os.path.join(HERE, f"{graph}.{case}.expected.safetensors"), expected)


def matmul_softmax(rng):
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((3,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["logits"], name="add"),
            helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        ],
        "matmul_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    finish(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pfx-unit"), "matmul_softmax")
    for case, batch in (("b2", 2), ("b5", 5)):
        x = rng.standard_normal((batch, 4)).astype(np.float32)
        logits = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
        write_case(
            "matmul_softmax",
            case,
            {"x": x},
            {"logits": logits.astype(np.float32), "probs": softmax(logits).astype(np.float32)},
        )


def embed_external(rng):
    vocab, d = 10, 8
    emb = rng.standard_normal((vocab, d)).astype(np.float32)
    w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "ids"], ["emb"], name="gather", axis=0),
            helper.make_node("MatMul", ["emb", "W"], ["proj"], name="matmul"),
            helper.make_node("Tanh", ["proj"], ["act"], name="tanh"),
            helper.make_node("Cast", ["mask"], ["mask_f"], name="cast_f", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "last_axis"], ["mask_u"], name="unsqueeze"),
            helper.make_node("Mul", ["act", "mask_u"], ["hidden"], name="mul"),
            helper.make_node("Cast", ["mask"], ["mask_i"], name="cast_i", to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["mask_i", "seq_axis"], ["n_tokens"], name="count", keepdims=0),
        ],
        "embed_external",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", d]),
            helper.make_tensor_value_info("n_tokens", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(emb, "E"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pfx-unit")
    # E and W (not the tiny axes, which shape inference must read) go to external data, under a
    # location name nobody would guess, so that a loader must read it from the model.
    finish(model, "embed_external", external="embed_external.weights.bin")
    for case, (batch, seq) in (("b2s3", (2, 3)), ("b1s4", (1, 4))):
        ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int64)
        mask = rng.random((batch, seq)) < 0.7
        mask[:, 0] = True
        act = np.tanh(emb.astype(np.float64)[ids] @ w.astype(np.float64))
        hidden = act * mask[..., None]
        write_case(
            "embed_external",
            case,
            {"ids": ids, "mask": mask},
            {"hidden": hidden.astype(np.float32), "n_tokens": mask.sum(axis=1).astype(np.int64)},
        )


def main():
    rng = np.random.default_rng(20261)
    matmul_softmax(rng)
    embed_external(rng)
    print("wrote", ", ".join(sorted(f for f in os.listdir(HERE) if not f.endswith(".py"))))


if __name__ == "__main__":
    main()
