#!/usr/bin/env python3
"""Make the tiny random-weight HF models and the torch.onnx (dynamo) fixtures.

Runs in the reference venv (transformers 5.x, torch, onnx, onnxscript, onnxruntime):

    /root/.cache/pfx/ref/bin/python graphs/make_fixtures.py [--skip-hf]

Writes (relative to this file's folder):
    gpt2-tiny/hf/          tiny GPT-2, random weights (shared by every GPT-2 fixture)
    bart-enc-deep/hf/      tiny BART, 3 encoder / 2 decoder layers, gelu
    bart-dec-deep/hf/      tiny BART, 1 encoder / 2 decoder layers, relu
    gpt2-dynamo/           model.onnx + model.onnx.data (all weights external), reference.safetensors
    gpt2-dynamo-past/      model.onnx (weights inline) with past inputs, reference.safetensors

The HF folders are written first: graphs/make_optimum_fixtures.py (transformers 4.x venv) loads them.
--skip-hf reuses existing HF folders instead of re-creating them.
"""
import argparse
import os
import sys

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import onnxruntime as ort
import torch
import transformers
from safetensors.numpy import save_file
from fixture_common import NoPast, WithPast, add_noise, strip_node_metadata
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261127
TOL = 1e-4

# Shared test inputs: batch 2, sequence 5; row 1 right-padded.
IDS = torch.tensor([[95, 17, 42, 8, 63], [95, 5, 77, 30, 30]], dtype=torch.int64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
# With past: 3 past tokens (their K/V computed by the model itself), 5 new tokens, full mask.
PAST_PREFIX_IDS = torch.tensor([[95, 11, 12], [95, 60, 61]], dtype=torch.int64)
PAST_LEN = 3


def gpt2_config():
    return GPT2Config(
        vocab_size=96,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=95,
        eos_token_id=95,
    )


def bart_config(encoder_layers, decoder_layers, activation):
    return BartConfig(
        vocab_size=96,
        max_position_embeddings=64,
        d_model=32,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        activation_function=activation,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )


def make_hf():
    torch.manual_seed(SEED)
    gpt2 = GPT2LMHeadModel(gpt2_config()).eval()
    add_noise(gpt2, SEED + 1)
    gpt2.save_pretrained(os.path.join(HERE, "gpt2-tiny", "hf"))

    for i, (name, enc, dec, act) in enumerate(
        [("bart-enc-deep", 3, 2, "gelu"), ("bart-dec-deep", 1, 2, "relu")]
    ):
        torch.manual_seed(SEED + 10 + i)
        bart = BartForConditionalGeneration(bart_config(enc, dec, act)).eval()
        add_noise(bart, SEED + 20 + i)
        with torch.no_grad():  # a buffer, zeros at init: perturb it too so the logits bias is exercised
            g = torch.Generator().manual_seed(SEED + 30 + i)
            bart.final_logits_bias.add_(torch.randn(bart.final_logits_bias.shape, generator=g) * 0.02)
        bart.save_pretrained(os.path.join(HERE, name, "hf"))


def load_gpt2():
    # eager attention would give the plain MatMul/Softmax pattern too, but we keep the library default
    # (sdpa) because that is what a user's export gets; torch.onnx decomposes it at this opset.
    m = GPT2LMHeadModel.from_pretrained(os.path.join(HERE, "gpt2-tiny", "hf"), dtype=torch.float32)
    return m.eval()


def ort_check(path, feeds, expected):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    assert sorted(in_names) == sorted(feeds), (in_names, list(feeds))
    out_names = [o.name for o in sess.get_outputs()]
    assert sorted(out_names) == sorted(expected), (out_names, list(expected))
    outs = sess.run(out_names, feeds)
    worst = 0.0
    for n, v in zip(out_names, outs):
        assert v.shape == expected[n].shape, (n, v.shape, expected[n].shape)
        d = float(np.max(np.abs(v - expected[n])))
        worst = max(worst, d)
        print(f"    {n:28s} {str(list(v.shape)):16s} max|ort-torch| = {d:.3g}")
        assert d < TOL, f"{path}: {n} differs by {d}"
    return worst


def describe(path):
    m = onnx.load(path, load_external_data=False)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    print(f"  {os.path.relpath(path, HERE)}: ir={m.ir_version} opset={opset} nodes={len(m.graph.node)} "
          f"initializers={len(m.graph.initializer)} functions={len(m.functions)}")


def save_weights_external(proto, path, location):
    """Save with every floating-point initializer (all the weights, however small) in one external file.

    Integer initializers (shape, axes, slice bounds: what shape inference reads) stay inline, because
    onnx.checker.check_model(full_check=True) cannot do data propagation through external tensors and
    fails with "Cannot parse data from external tensors" when they are external.
    """
    data_path = os.path.join(os.path.dirname(path), location)
    for f in (path, data_path):
        if os.path.exists(f):
            os.remove(f)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    n = 0
    for t in proto.graph.initializer:
        if t.data_type in floats:
            if not t.HasField("raw_data"):
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
            onnx.external_data_helper.set_external_data(t, location)
            n += 1
    onnx.save_model(proto, path)
    print(f"  {n} float initializers written to {location}")


def np_dict(d):
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in d.items()}


def export_gpt2_dynamo(model):
    out_dir = os.path.join(HERE, "gpt2-dynamo")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    wrapper = NoPast(model).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    prog = torch.onnx.export(
        wrapper,
        (IDS, MASK),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    proto = strip_node_metadata(prog.model_proto)
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    save_weights_external(proto, path, "model.onnx.data")
    with torch.no_grad():
        logits = wrapper(IDS, MASK)
    feeds = np_dict({"input_ids": IDS, "attention_mask": MASK})
    expected = np_dict({"logits": logits})
    save_file({**feeds, **expected}, os.path.join(out_dir, "reference.safetensors"))
    onnx.checker.check_model(path, full_check=True)
    describe(path)
    ort_check(path, feeds, expected)

    # Batch 1: row 1 alone, without its padding (its logits must equal row 1's first 3 rows above).
    ids1, mask1 = IDS[1:, :3], MASK[1:, :3]
    with torch.no_grad():
        logits1 = wrapper(ids1, mask1)
    assert torch.allclose(logits1[0], logits[1, :3], atol=1e-5)
    feeds1 = np_dict({"input_ids": ids1, "attention_mask": mask1})
    expected1 = np_dict({"logits": logits1})
    save_file({**feeds1, **expected1}, os.path.join(out_dir, "reference_bs1.safetensors"))
    print("  reference_bs1")
    ort_check(path, feeds1, expected1)


def export_gpt2_dynamo_past(model):
    out_dir = os.path.join(HERE, "gpt2-dynamo-past")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    n_layer = model.config.n_layer
    wrapper = WithPast(model).eval()

    # Past K/V come from the model itself run on 3 earlier tokens (realistic values, not noise).
    with torch.no_grad():
        first = model(input_ids=PAST_PREFIX_IDS, attention_mask=torch.ones_like(PAST_PREFIX_IDS), use_cache=True)
    past = []
    for layer in first.cache.layers:
        past += [layer.keys.clone(), layer.values.clone()]
    mask = torch.ones((IDS.shape[0], PAST_LEN + IDS.shape[1]), dtype=torch.int64)

    past_names = []
    for i in range(n_layer):
        past_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    present_names = []
    for i in range(n_layer):
        present_names += [f"present.{i}.key", f"present.{i}.value"]

    # torch.export cannot express mask_len = past + seq (a sum of two free dims), and the model never
    # relates them by a guard, so the mask length is its own dim.
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence")
    past_len = torch.export.Dim("past_sequence")
    total = torch.export.Dim("past_sequence_plus_sequence")
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past": tuple({0: batch, 2: past_len} for _ in past_names),
    }
    prog = torch.onnx.export(
        wrapper,
        (IDS, mask, *past),
        dynamo=True,
        input_names=["input_ids", "attention_mask", *past_names],
        output_names=["logits", *present_names],
        dynamic_shapes=dyn,
    )
    if os.path.exists(path):
        os.remove(path)
    onnx.save_model(strip_node_metadata(prog.model_proto), path)  # weights inline

    with torch.no_grad():
        outs = wrapper(IDS, mask, *[p.clone() for p in past])
    feeds = np_dict({"input_ids": IDS, "attention_mask": mask, **dict(zip(past_names, past))})
    expected = np_dict(dict(zip(["logits", *present_names], outs)))
    save_file({**feeds, **expected}, os.path.join(out_dir, "reference.safetensors"))
    onnx.checker.check_model(path, full_check=True)
    describe(path)
    ort_check(path, feeds, expected)

    # Batch 1: row 1 alone, 2 new tokens after its 3 past tokens.
    ids1, mask1, past1 = IDS[1:, :2], mask[1:, : PAST_LEN + 2], [p[1:] for p in past]
    with torch.no_grad():
        outs1 = wrapper(ids1, mask1, *[p.clone() for p in past1])
    assert torch.allclose(outs1[0][0], outs[0][1, :2], atol=1e-5)
    feeds1 = np_dict({"input_ids": ids1, "attention_mask": mask1, **dict(zip(past_names, past1))})
    expected1 = np_dict(dict(zip(["logits", *present_names], outs1)))
    save_file({**feeds1, **expected1}, os.path.join(out_dir, "reference_bs1.safetensors"))
    print("  reference_bs1")
    ort_check(path, feeds1, expected1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-hf", action="store_true", help="reuse the existing hf/ folders")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}")
    torch.set_grad_enabled(False)
    if not args.skip_hf:
        make_hf()
    model = load_gpt2()
    print("gpt2-dynamo")
    export_gpt2_dynamo(model)
    print("gpt2-dynamo-past")
    export_gpt2_dynamo_past(model)
    print("done")


if __name__ == "__main__":
    sys.exit(main())
