#!/usr/bin/env python3
"""Tiny T5 (v1.0), T5 v1.1 / flan-t5 and mT5: HF folders and optimum exports in BART's layout (encoder / decoder /
decoder with past), as graphs/make_seq2seq_fixtures.py makes Marian's and Pegasus'.

One command, from the reference venv (torch, transformers 5.x); it runs itself in the optimum venv (transformers
4.x, optimum-onnx) for the v1.1 and mT5 HF folders and the export step, then checks them back in 5.x:

    /root/.cache/pfx/ref/bin/python graphs/make_t5_fixtures.py [--skip-hf] [NAME ...]

Writes (relative to this file's folder), for NAME in t5-tiny, t5v11-tiny, mt5-tiny (or the NAMEs given):
    NAME/hf/      save_pretrained safetensors, seeded random weights: t5-tiny's by transformers 5.x, t5v11-tiny's and
                  mt5-tiny's by transformers 4.x (see below)
    NAME/         encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx, config.json,
                  generation_config.json from `optimum-cli export onnx --task text2text-generation-with-past`
                  (transformers 4.x); optimum's decoder_model_merged.onnx is deleted (size), node metadata stripped

- t5-tiny: T5ForConditionalGeneration, T5 v1.0 (t5-small's layout): ReLU feed-forward, lm_head tied to the shared
  embedding and fed the decoder output scaled by d_model^-0.5; 2 encoder / 2 decoder layers.
- t5v11-tiny: T5 v1.1 / flan-t5's layout: gated-gelu feed-forward (gelu_new), an untied lm_head without the scaling;
  2 encoder / 3 decoder layers (num_decoder_layers 3 > num_layers 2: PEFT's row mapping for a deeper decoder).
  Its hf/ folder is written by transformers 4.x, as the real flan-t5 checkpoints were: 5.x's T5Config always sets
  tie_word_embeddings=True (the old flag becomes scale_decoder_outputs), so a v1.1 model saved by 5.x has no
  lm_head.weight, and 4.x reads its folder as tied and scaled (different logits). 5.x loads a 4.x folder untied and
  unscaled (with a warning); the script asserts that, and that 5.x's logits equal 4.x's.
- mt5-tiny: MT5ForConditionalGeneration (config model_type "mt5"): T5 v1.1's architecture (gated-gelu, untied
  lm_head, no scaling) under mT5's classes; 3 encoder / 2 decoder layers (the encoder deeper, unlike t5v11-tiny) and
  relative_attention_max_distance 20 (not 16: the buckets of distances 6 (encoder) and 8 (decoder) differ).
  Written by transformers 4.x for the same reason as t5v11-tiny, and more so: 5.x's MT5Config always sets
  tie_word_embeddings=True and its MT5 never scales, so 5.x cannot build an untied mT5 and 4.x would read a folder it
  saved as tied and scaled.
All: vocab 100, d_model 32, d_kv 8, 4 heads, d_ff 64, 8 relative-position buckets, max distance 16 (mt5-tiny: 20),
pad 0 = decoder start, eos 1, dropout off; every parameter gets 0.02 * randn (fixture_common.add_noise) after the
seeded init.

The export step asserts that every saved tensor loads unchanged in transformers 4.x (`load_checked`) and that
onnxruntime gives PyTorch's outputs (max diff < 1e-4) for all three graphs; the reference step asserts that 5.x's
logits equal 4.x's for every folder. The prefix-tuning references are graphs/bart-ref/make_bart_references.py's.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from fixture_common import add_noise, load_checked, strip_node_metadata

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMUM_PYTHON = os.environ.get("PFX_OPTIMUM_PYTHON", "/root/.cache/pfx/optimum/bin/python")
SEED = 20261301
# New names at the end: the seeds follow the index.
NAMES = ["t5-tiny", "t5v11-tiny", "mt5-tiny"]
GRAPHS = ["encoder_model", "decoder_model", "decoder_with_past_model"]
# Written by transformers 4.x (the optimum venv): 5.x cannot save an untied T5 or mT5 head.
HF_BY_4X = {"t5v11-tiny", "mt5-tiny"}
# Encoder ids end with eos (1), right-padded with pad (0); decoder ids start with decoder_start (= pad, 0).
IDS = torch.tensor([[17, 42, 8, 9, 1], [77, 3, 1, 0, 0]], dtype=torch.int64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
DEC_IDS = torch.tensor([[0, 33, 44, 55, 66, 7], [0, 66, 5, 9, 12, 13]], dtype=torch.int64)
TOL_VERSIONS = 1e-4  # |logits 5.x - 4.x| (the study: 7e-7 tied, 6e-6 untied; a tying mix-up gives ~16)


def configs():
    """In NAMES' order (the seeds follow it)."""
    from transformers import MT5Config, T5Config

    common = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_heads=4, relative_attention_num_buckets=8,
                  dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    t5 = dict(num_layers=2, relative_attention_max_distance=16, **common)
    out = {"t5-tiny": T5Config(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=2, **t5),
           "t5v11-tiny": T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3,
                                  **t5),
           "mt5-tiny": MT5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3,
                                 num_decoder_layers=2, relative_attention_max_distance=20, **common)}
    assert list(out) == NAMES
    return out


def make_hf(names):
    from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration

    for i, (name, cfg) in enumerate(configs().items()):
        if name not in names:
            continue
        torch.manual_seed(SEED + i)
        cls = MT5ForConditionalGeneration if cfg.model_type == "mt5" else T5ForConditionalGeneration
        model = cls(cfg).eval()
        add_noise(model, SEED + 10 + i)
        if name in HF_BY_4X:
            assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
        model.save_pretrained(os.path.join(HERE, name, "hf"))
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name}/hf: {type(model).__name__}, {n} parameters")


def logits_of(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DEC_IDS).logits.numpy()


# ================================================================================================================
# Export step: optimum venv (transformers 4.x)
# ================================================================================================================
class BartView:
    """What make_optimum_fixtures.bart_layout_cases reads of a BART model (config.decoder_layers,
    model.encoder), on a T5 model."""

    def __init__(self, model):
        from types import SimpleNamespace

        self.t5 = model
        self.config = SimpleNamespace(decoder_layers=model.config.num_decoder_layers)
        self.model = SimpleNamespace(encoder=model.encoder)

    def __call__(self, **kw):
        return self.t5(**kw)


def ort_check(path, feeds, expected):
    """graphs/make_optimum_fixtures.py's check (ORT's outputs equal PyTorch's within its TOL), on torch tensors."""
    from make_optimum_fixtures import ort_check as check

    def as_np(d):
        return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in d.items()}

    print(f"    {os.path.relpath(path, HERE)}:")
    check(path, as_np(feeds), as_np(expected))


def export_one(name, logits_dir):
    import onnx
    from transformers import AutoModelForSeq2SeqLM

    out_dir = os.path.join(HERE, name)
    hf_dir = os.path.join(out_dir, "hf")
    model = load_checked(AutoModelForSeq2SeqLM, hf_dir)
    tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert tied == (name not in HF_BY_4X), (name, tied)
    np.save(os.path.join(logits_dir, name + ".npy"), logits_of(model))
    for f in os.listdir(out_dir):
        if f.endswith(".onnx") or f.endswith(".onnx_data") or f.endswith(".json"):
            os.remove(os.path.join(out_dir, f))
    cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    cmd = [cli, "export", "onnx", "--model", hf_dir, "--task", "text2text-generation-with-past", out_dir]
    print(f"  $ optimum-cli export onnx --model {name}/hf --task text2text-generation-with-past {name}")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # optimum iterates over sets of names
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    merged = os.path.join(out_dir, "decoder_model_merged.onnx")
    if os.path.exists(merged):
        os.remove(merged)
    files = sorted(f for f in os.listdir(out_dir) if f != "hf")
    want = sorted([g + ".onnx" for g in GRAPHS] + ["config.json", "generation_config.json"])
    assert files == want, files
    for g in GRAPHS:
        path = os.path.join(out_dir, g + ".onnx")
        m = strip_node_metadata(onnx.load(path))
        onnx.save_model(m, path)
        onnx.checker.check_model(path, full_check=True)
        opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
        print(f"  {name}/{g}.onnx: ir={m.ir_version} opset={opset} nodes={len(m.graph.node)} "
              f"initializers={len(m.graph.initializer)} {os.path.getsize(path)} bytes, check_model(full)=OK")

    torch.set_grad_enabled(False)
    from make_optimum_fixtures import bart_layout_cases

    cases, _ = bart_layout_cases(BartView(model), IDS, MASK, DEC_IDS)
    for g, (feeds, expected) in cases.items():
        ort_check(os.path.join(out_dir, g + ".onnx"), feeds, expected)


def export_main(args):
    import onnx
    import onnxruntime as ort
    import transformers
    from importlib.metadata import version

    skip_hf = args[:1] == ["--skip-hf"]
    if skip_hf:
        args = args[1:]
    logits_dir, names = args[0], args[1:]
    print(f"[optimum venv] torch {torch.__version__}, transformers {transformers.__version__}, onnx "
          f"{onnx.__version__}, onnxruntime {ort.__version__}, optimum-onnx {version('optimum-onnx')}")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if not skip_hf:
        make_hf([n for n in names if n in HF_BY_4X])
    for name in names:
        export_one(name, logits_dir)


# ================================================================================================================
# Reference venv (transformers 5.x)
# ================================================================================================================
def check_5x(name, logits_dir):
    """5.x loads the folder with every tensor, the head tied or not as 4.x has it, and gives 4.x's logits."""
    from transformers import AutoModelForSeq2SeqLM

    hf_dir = os.path.join(HERE, name, "hf")
    model = load_checked(AutoModelForSeq2SeqLM, hf_dir)
    tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    assert tied == (name not in HF_BY_4X), (name, tied)
    d = float(np.abs(logits_of(model) - np.load(os.path.join(logits_dir, name + ".npy"))).max())
    # 5.x's MT5Config has no scale_decoder_outputs: its MT5 never scales
    scaled = getattr(model.config, "scale_decoder_outputs", "(none: never scaled)")
    print(f"  {name}/hf in transformers 5.x: {type(model).__name__}, lm_head tied={tied}, scale_decoder_outputs="
          f"{scaled}, max|logits 5.x - 4.x| = {d:.3g}")
    assert d < TOL_VERSIONS, (name, d)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--export"]:
        return export_main(args[1:])
    skip_hf = args[:1] == ["--skip-hf"]
    names = args[1:] if skip_hf else args
    if any(n not in NAMES for n in names):
        sys.exit(f"usage: make_t5_fixtures.py [--skip-hf] [NAME ...] (NAMEs among {', '.join(NAMES)})")
    names = names or NAMES
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    print(f"[reference venv] torch {torch.__version__}, transformers {transformers.__version__}")
    if not skip_hf:
        make_hf([n for n in names if n not in HF_BY_4X])
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as logits_dir:
        subprocess.run([OPTIMUM_PYTHON, os.path.abspath(__file__), "--export", *(["--skip-hf"] if skip_hf else []),
                        logits_dir, *names], check=True, env=env)
        for name in names:
            check_5x(name, logits_dir)
    for name in names:
        total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(HERE, name))
                    for f in fs)
        print(f"  {name}/: {total} bytes in all")
    print("done")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
