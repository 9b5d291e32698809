#!/usr/bin/env python3
"""Export a random-init GPT-2 of a named size, with past inputs, for the benchmarks.

Same export as `graphs/make_fixtures.py` makes for `graphs/gpt2-dynamo-past` (dynamo exporter, a wrapper that
builds a DynamicCache from flat past tensors), but full-sized and with the weights as external data
(`model.onnx.data`, every tensor of at least 1024 bytes). Runs in the reference venv:

    /root/.cache/pfx/ref/bin/python benches/make_gpt2_export.py [--size gpt2] [OUT_DIR]

OUT_DIR defaults to /tmp/pfx-bench/<size>. The export of GPT-2 small is ~500 MB: never commit it.
Timing does not depend on the weight values; every parameter gets a little noise anyway so that no two
initializers are equal (exporters merge equal ones, which a pretrained checkpoint would never have).
"""
import argparse
import os
import sys
import time

import numpy as np
import onnx
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

# The export wrapper and the metadata stripping of graphs/make_fixtures.py, so the two exports stay the same.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "graphs"))
from fixture_common import WithPast, strip_node_metadata  # noqa: E402

# The sizes of the peer script (/work/shared/tools/gpu/peft_step.py); vocabulary 50257, 1024 positions.
SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
}
SEED = 20261127


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", help="output folder (default /tmp/pfx-bench/<size>)")
    ap.add_argument("--size", default="gpt2", choices=SIZES)
    ap.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    a = ap.parse_args()
    out_dir = a.out_dir or os.path.join("/tmp/pfx-bench", a.size)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    location = "model.onnx.data"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}")
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()

    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256, **SIZES[a.size])
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    n_layer = cfg.n_layer
    print(f"{a.size}: {n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")

    # Example inputs: batch 2, 5 new tokens after 3 past tokens whose K/V the model computes itself.
    ids = torch.tensor([[95, 17, 42, 8, 63], [95, 5, 77, 30, 30]], dtype=torch.int64)
    first_ids = torch.tensor([[95, 11, 12], [95, 60, 61]], dtype=torch.int64)
    first = model(input_ids=first_ids, attention_mask=torch.ones_like(first_ids), use_cache=True)
    past = []
    for layer in first.cache.layers:
        past += [layer.keys.clone(), layer.values.clone()]
    mask = torch.ones((2, 3 + 5), dtype=torch.int64)
    past_names, present_names = [], []
    for i in range(n_layer):
        past_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present_names += [f"present.{i}.key", f"present.{i}.value"]

    # torch.export cannot express mask_len = past + seq, so the mask length is its own dim (as in the fixture).
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence")
    past_len = torch.export.Dim("past_sequence")
    total = torch.export.Dim("past_sequence_plus_sequence")
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past": tuple({0: batch, 2: past_len} for _ in past_names),
    }
    wrapper = WithPast(model).eval()
    prog = torch.onnx.export(
        wrapper,
        (ids, mask, *past),
        dynamo=True,
        input_names=["input_ids", "attention_mask", *past_names],
        output_names=["logits", *present_names],
        dynamic_shapes=dyn,
    )
    proto = strip_node_metadata(prog.model_proto)
    t1 = time.perf_counter()
    for f in (path, os.path.join(out_dir, location)):
        if os.path.exists(f):
            os.remove(f)
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    t2 = time.perf_counter()
    m = onnx.load(path, load_external_data=False)
    ext = sum(1 for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) + {location} "
          f"({os.path.getsize(os.path.join(out_dir, location)) / 1e6:.1f} MB): nodes={len(m.graph.node)} "
          f"initializers={len(m.graph.initializer)} ({ext} external) opset="
          f"{ {o.domain or 'ai.onnx': o.version for o in m.opset_import} }")
    print(f"export {t1 - t0:.1f} s, save {t2 - t1:.1f} s")

    if not a.no_check:
        import onnxruntime as ort

        onnx.checker.check_model(path, full_check=True)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        feeds.update({n: p.numpy() for n, p in zip(past_names, past)})
        got = sess.run(["logits"], feeds)[0]
        want = wrapper(ids, mask, *[p.clone() for p in past])[0].numpy()
        d = float(np.max(np.abs(got - want)))
        print(f"check_model ok; ONNX Runtime vs PyTorch: max|logits diff| = {d:.3g}")
        assert d < 1e-3, d
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
