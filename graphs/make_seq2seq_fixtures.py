#!/usr/bin/env python3
"""Tiny Marian, Pegasus, mBART, BlenderBot, BlenderBot-small and M2M100: HF folders and optimum exports in BART's layout
(encoder / decoder / decoder with past).

One command, from the reference venv (torch, transformers 5.x); it runs itself in the optimum venv (transformers
4.x, optimum-onnx) for the export step, as graphs/make_decoder_fixtures.py does:

    /root/.cache/pfx/ref/bin/python graphs/make_seq2seq_fixtures.py [--skip-hf] [NAME ...]

Writes (relative to this file's folder), for NAME in marian-tiny, pegasus-tiny, mbart-tiny, blenderbot-tiny,
blenderbot-small-tiny, m2m100-tiny (or the NAMEs given):
    NAME/hf/      save_pretrained safetensors (transformers 5.x), seeded random weights
    NAME/         encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx, config.json,
                  generation_config.json from `optimum-cli export onnx --task text2text-generation-with-past`
                  (transformers 4.x); optimum's decoder_model_merged.onnx is deleted (size), node metadata stripped

- marian-tiny: MarianMTModel, 3 encoder / 2 decoder layers (bart-enc-deep's sizes), swish (Marian's default),
  shared encoder/decoder/LM-head embeddings, embeddings scaled by sqrt(d), sinusoidal positions (no offset),
  post-LN as BART but no embedding LayerNorm; decoder_start_token_id = pad (1), as real Marian.
- pegasus-tiny: PegasusForConditionalGeneration, 1 encoder / 2 decoder layers (bart-dec-deep's sizes), relu,
  pre-LN (a final LayerNorm after each stack), scaled embeddings, sinusoidal positions; decoder start = pad (1).
- mbart-tiny: MBartForConditionalGeneration (mBART-cc25 / en-ro layout), 2 encoder / 2 decoder layers, gelu, pre-LN
  with an embedding LayerNorm (layernorm_embedding) and a final LayerNorm after each stack, embeddings scaled by
  sqrt(d) (scale_embedding=True, as the real mBART configs), learned positions with BART's offset 2 (table of 66
  rows), shared encoder/decoder/LM-head embeddings. Its ids follow graphs/tokenizers/mbart-style/
  (graphs/make_text_references.py): <s> 0, <pad> 1, </s> 2, <unk> 3, the 25 language codes of mBART-cc25 at
  70..94 (en_XX 73, ro_RO 89), <mask> 95. decoder_start_token_id = ro_RO (89), as facebook/mbart-large-en-ro's
  config has it (250020 = ro_RO there): what HF's generate starts the decoder with. Training does not read it: mBART's
  shift_tokens_right moves each label row's last non-pad token (the target language code) to the front.
- blenderbot-tiny: BlenderbotForConditionalGeneration, 1 encoder / 2 decoder layers (the real BlenderBot-400M's
  encoder is shallower than its decoder too: 2 / 12), gelu, pre-LN with a final LayerNorm after each stack (no
  embedding LayerNorm), scaled embeddings, learned positions WITHOUT BART's offset (table of 64 rows, position 0 at
  row 0), BART's shift_tokens_right; decoder start = bos (0; the real vocabulary's `<s>` is 1, its decoder start too).
  encoder_no_repeat_ngram_size = 0 (BlenderbotConfig's default 3 would reach generate() through the generation
  config; pfx does not implement it).
- blenderbot-small-tiny: BlenderbotSmallForConditionalGeneration, 2 encoder / 2 decoder layers, gelu, post-LN as BART
  with an embedding LayerNorm (layernorm_embedding; the encoder normalizes token + position embeddings, the decoder
  only the token embeddings, then adds the positions), scaled embeddings, learned positions without offset, BART's
  shift; decoder start = bos (0; `__start__` = 1 in the real vocabulary).
- m2m100-tiny: M2M100ForConditionalGeneration (M2M100's and NLLB-200's architecture), 2 encoder / 2 decoder layers,
  relu (M2M100's default), pre-LN with a final LayerNorm after each stack, scaled embeddings, tied embeddings,
  sinusoidal positions numbered from the token ids in the graph (`create_position_ids_from_input_ids`: real tokens
  pad + 1 + (real tokens before them) + past length, pad tokens the table's zero row pad), no final_logits_bias.
  Sources are framed `src_lang X </s>` and the decoder starts with `</s>` (decoder_start_token_id = eos, 2), then the
  target language as forced_bos_token_id; language codes at 92..95 (M2M_LANG: 92 and 93 in the checks).
  forced_eos_token_id = eos (2) in its generation config, as the other fixtures (M2M100Config has no such field,
  and the real checkpoints force none).
All: vocab 96, d_model 32, 4 heads, ffn 64, 64 positions, bos 0, pad 1, eos 2 (= forced eos), dropout off; every
parameter but the (fixed) sinusoidal tables of Marian and Pegasus gets 0.02 * randn (mBART's and BlenderBot's learned
positions do; M2M100's table is a buffer, not a parameter), final_logits_bias 0.02 * randn (M2M100 has none).

The export step asserts that every saved tensor loads unchanged in transformers 4.x (`load_checked`) and that
onnxruntime gives PyTorch's outputs (max diff < 1e-4) for all three graphs. The prefix-tuning references are
graphs/bart-ref/make_bart_references.py's and make_bart_generation_references.py's. Reruns give byte-identical files.
"""
import os
import subprocess
import sys

import numpy as np
import torch
from fixture_common import load_checked, strip_node_metadata

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMUM_PYTHON = os.environ.get("PFX_OPTIMUM_PYTHON", "/root/.cache/pfx/optimum/bin/python")
SEED = 20261201
# New names at the end: the seeds follow the index.
NAMES = ["marian-tiny", "pegasus-tiny", "mbart-tiny", "blenderbot-tiny", "blenderbot-small-tiny", "m2m100-tiny"]
GRAPHS = ["encoder_model", "decoder_model", "decoder_with_past_model"]
# Encoder ids end with eos (2), right-padded with pad (1); decoder ids start with decoder_start (= pad, 1).
IDS = torch.tensor([[0, 17, 42, 8, 2], [0, 77, 2, 1, 1]], dtype=torch.int64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
DEC_IDS = torch.tensor([[1, 0, 33, 44, 55], [1, 0, 66, 5, 9]], dtype=torch.int64)
# mBART (graphs/tokenizers/mbart-style/'s ids): language codes 70..94 (25, mBART-cc25's order), <mask> 95.
MBART_LANG_CODES = 70
EN_XX, RO_RO = MBART_LANG_CODES + 3, MBART_LANG_CODES + 19  # 73, 89
# mBART frames a source as `X </s> src_lang` (no <s>), right-padded; its decoder starts with the target language
# code (decoder_start_token_id = ro_RO), the tokens after it as HF's shift_tokens_right of `Y </s> ro_RO` gives them.
MBART_IDS = torch.tensor([[17, 42, 8, 2, EN_XX], [77, 2, EN_XX, 1, 1]], dtype=torch.int64)
MBART_DEC_IDS = torch.tensor([[RO_RO, 33, 44, 55, 2], [RO_RO, 66, 5, 9, 2]], dtype=torch.int64)
# M2M100 / NLLB: `src_lang X </s>` sources, decoder `</s> tgt_lang Y` (start = eos, forced_bos = the target language).
M2M_LANG = 92  # language codes 92..95
M2M_SRC, M2M_TGT = M2M_LANG, M2M_LANG + 1
M2M_IDS = torch.tensor([[M2M_SRC, 17, 42, 8, 2], [M2M_SRC, 77, 2, 1, 1]], dtype=torch.int64)
M2M_DEC_IDS = torch.tensor([[2, M2M_TGT, 33, 44, 55], [2, M2M_TGT, 66, 5, 9]], dtype=torch.int64)
CHECK_IDS = {"mbart-tiny": (MBART_IDS, MASK, MBART_DEC_IDS),
             "m2m100-tiny": (M2M_IDS, MASK, M2M_DEC_IDS)}  # others: (IDS, MASK, DEC_IDS)


def configs():
    from transformers import (BlenderbotConfig, BlenderbotSmallConfig, M2M100Config, MarianConfig, MBartConfig,
                              PegasusConfig)

    common = dict(vocab_size=96, max_position_embeddings=64, d_model=32, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1, bos_token_id=0,
                  eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=2, scale_embedding=True,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return {
        "marian-tiny": MarianConfig(encoder_layers=3, decoder_layers=2, activation_function="swish",
                                    decoder_vocab_size=96, share_encoder_decoder_embeddings=True, **common),
        "pegasus-tiny": PegasusConfig(encoder_layers=1, decoder_layers=2, activation_function="relu", **common),
        "mbart-tiny": MBartConfig(encoder_layers=2, decoder_layers=2, activation_function="gelu",
                                  **{**common, "decoder_start_token_id": RO_RO}),
        # BlenderBot: decoder start = bos (0 here; `<s>` / `__start__` = 1 in the real vocabularies); no
        # encoder_no_repeat_ngram_size (BlenderbotConfig's default 3 would reach generate(); pfx has no such rule).
        "blenderbot-tiny": BlenderbotConfig(encoder_layers=1, decoder_layers=2, activation_function="gelu",
                                            encoder_no_repeat_ngram_size=0,
                                            **{**common, "decoder_start_token_id": 0}),
        "blenderbot-small-tiny": BlenderbotSmallConfig(encoder_layers=2, decoder_layers=2,
                                                       activation_function="gelu",
                                                       **{**common, "decoder_start_token_id": 0}),
        # M2M100: decoder start = eos (2), as the real checkpoints; no layerdrop (training is eval mode anyway).
        "m2m100-tiny": M2M100Config(encoder_layers=2, decoder_layers=2, activation_function="relu",
                                    encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                                    **{**common, "decoder_start_token_id": 2}),
    }


def model_class(name):
    import transformers

    return {"marian-tiny": transformers.MarianMTModel,
            "pegasus-tiny": transformers.PegasusForConditionalGeneration,
            "mbart-tiny": transformers.MBartForConditionalGeneration,
            "blenderbot-tiny": transformers.BlenderbotForConditionalGeneration,
            "blenderbot-small-tiny": transformers.BlenderbotSmallForConditionalGeneration,
            "m2m100-tiny": transformers.M2M100ForConditionalGeneration}[name]


def add_noise(model, seed, sinusoidal=True):
    """fixture_common.add_noise without the sinusoidal position tables (fixed, recomputed by transformers); mBART's
    learned positions (sinusoidal=False) get their noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if sinusoidal and "embed_positions" in n:
                continue
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)


def make_hf(names):
    for i, (name, cfg) in enumerate(configs().items()):
        if name not in names:
            continue
        torch.manual_seed(SEED + i)
        model = model_class(name)(cfg).eval()
        add_noise(model, SEED + 10 + i, sinusoidal=name in ("marian-tiny", "pegasus-tiny"))
        if hasattr(model, "final_logits_bias"):  # M2M100 has none
            with torch.no_grad():  # a buffer, zeros at init: perturb it so the logits bias is exercised
                g = torch.Generator().manual_seed(SEED + 20 + i)
                model.final_logits_bias.add_(torch.randn(model.final_logits_bias.shape, generator=g) * 0.02)
        if model.generation_config.forced_eos_token_id is None:
            # M2M100's config has no forced_eos_token_id (nor do the real checkpoints'); the fixture forces eos as
            # the others do, through its generation config, so that the same forced-token references apply.
            model.generation_config.forced_eos_token_id = cfg.eos_token_id
        model.save_pretrained(os.path.join(HERE, name, "hf"))
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name}/hf: {type(model).__name__}, {n} parameters")


# ================================================================================================================
# Export step: optimum venv (transformers 4.x)
# ================================================================================================================
def ort_check(path, feeds, expected):
    """graphs/make_optimum_fixtures.py's check (ORT's outputs equal PyTorch's within its TOL), on torch tensors."""
    from make_optimum_fixtures import ort_check as check

    def as_np(d):
        return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in d.items()}

    print(f"    {os.path.relpath(path, HERE)}:")
    check(path, as_np(feeds), as_np(expected))


def export_one(name):
    import onnx
    from transformers import AutoModelForSeq2SeqLM

    out_dir = os.path.join(HERE, name)
    hf_dir = os.path.join(out_dir, "hf")
    model = load_checked(AutoModelForSeq2SeqLM, hf_dir)
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
        os.remove(merged)  # pfx reads it too (tests/compile_bart.rs checks it on bart-dec-deep); kept small here
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
    # The same inputs and PyTorch outputs as the BART fixtures' exports are checked on (its decoder tokens start
    # with this config's decoder start, the pad).
    from make_optimum_fixtures import bart_layout_cases

    cases, _ = bart_layout_cases(model, *CHECK_IDS.get(name, (IDS, MASK, DEC_IDS)))
    for g, (feeds, expected) in cases.items():
        ort_check(os.path.join(out_dir, g + ".onnx"), feeds, expected)


def export_main(names):
    import onnx
    import onnxruntime as ort
    import transformers
    from importlib.metadata import version

    print(f"[optimum venv] torch {torch.__version__}, transformers {transformers.__version__}, onnx "
          f"{onnx.__version__}, onnxruntime {ort.__version__}, optimum-onnx {version('optimum-onnx')}")
    for name in names:
        export_one(name)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--export"]:
        return export_main(args[1:])
    skip_hf = args[:1] == ["--skip-hf"]
    names = args[1:] if skip_hf else args
    if any(n not in NAMES for n in names):
        sys.exit(f"usage: make_seq2seq_fixtures.py [--skip-hf] [NAME ...] (NAMEs among {', '.join(NAMES)})")
    names = names or NAMES
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    print(f"[reference venv] torch {torch.__version__}, transformers {transformers.__version__}")
    if not skip_hf:
        make_hf(names)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run([OPTIMUM_PYTHON, os.path.abspath(__file__), "--export", *names], check=True, env=env)
    for name in names:
        total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(HERE, name))
                    for f in fs)
        print(f"  {name}/: {total} bytes in all")
    print("done")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
