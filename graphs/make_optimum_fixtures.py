#!/usr/bin/env python3
"""Make the fixtures that need transformers 4.x: legacy TorchScript export and optimum-cli exports.

Runs in the optimum venv (optimum-onnx, transformers 4.x, torch, onnx, onnxruntime), after
graphs/make_fixtures.py has written the HF folders (gpt2-tiny/hf, bart-enc-deep/hf, bart-dec-deep/hf):

    /root/.cache/pfx/optimum/bin/python graphs/make_optimum_fixtures.py

Writes (relative to this file's folder):
    gpt2-legacy/     model.onnx (torch.onnx.export dynamo=False, opset 14, no past), reference*.safetensors
    gpt2-optimum/    model.onnx from `optimum-cli export onnx --task text-generation-with-past`, references
    gpt2-optimum-nopast/  model.onnx from `--task text-generation` (position_ids an input), reference
    bart-enc-deep/   encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx,
    bart-dec-deep/   decoder_model_merged.onnx from `--task text2text-generation-with-past`, one
                     <graph>.reference.safetensors per graph
"""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file
from fixture_common import NoPast, load_checked
from transformers import BartForConditionalGeneration, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4

# Same inputs as make_fixtures.py (batch 2, sequence 5, row 1 right-padded).
IDS = torch.tensor([[95, 17, 42, 8, 63], [95, 5, 77, 30, 30]], dtype=torch.int64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.int64)
PAST_PREFIX_IDS = torch.tensor([[95, 11, 12], [95, 60, 61]], dtype=torch.int64)
PAST_LEN = 3
# BART: encoder ids end with eos (2) and are right-padded with pad (1); decoder ids start with
# decoder_start_token_id (2).
BART_IDS = torch.tensor([[0, 17, 42, 8, 2], [0, 77, 2, 1, 1]], dtype=torch.int64)
BART_DEC_IDS = torch.tensor([[2, 0, 33, 44, 55], [2, 0, 66, 5, 9]], dtype=torch.int64)


def np_dict(d):
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in d.items()}


def ort_check(path, feeds, expected):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    assert sorted(in_names) == sorted(feeds), (in_names, list(feeds))
    out_names = [o.name for o in sess.get_outputs()]
    assert sorted(out_names) == sorted(expected), (out_names, list(expected))
    outs = sess.run(out_names, feeds)
    for n, v in zip(out_names, outs):
        assert v.shape == expected[n].shape, (n, v.shape, expected[n].shape)
        d = float(np.max(np.abs(v - expected[n]))) if v.size else 0.0
        print(f"    {n:28s} {str(list(v.shape)):16s} max|ort-torch| = {d:.3g}")
        assert d < TOL, f"{path}: {n} differs by {d}"


def save_reference(path, feeds, expected):
    save_file({**np_dict(feeds), **np_dict(expected)}, path)


def check_and_verify(model_path, ref_path, feeds, expected):
    save_reference(ref_path, feeds, expected)
    print(f"  {os.path.relpath(ref_path, HERE)}")
    ort_check(model_path, np_dict(feeds), np_dict(expected))


def describe(path):
    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path, load_external_data=False)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    print(f"  {os.path.relpath(path, HERE)}: ir={m.ir_version} opset={opset} nodes={len(m.graph.node)} "
          f"initializers={len(m.graph.initializer)} functions={len(m.functions)} check_model(full)=OK")


def cross_check(name, got, ref_file, key):
    """Compare with the transformers 5.x reference written by make_fixtures.py (same weights, same inputs)."""
    if not os.path.exists(ref_file):
        print(f"    (no {os.path.relpath(ref_file, HERE)} to cross-check against)")
        return
    ref = np_load_file(ref_file)[key]
    d = float(np.max(np.abs(got.detach().numpy() - ref)))
    print(f"    cross-check {name} vs {os.path.relpath(ref_file, HERE)}[{key}]: max diff {d:.3g}")
    assert d < TOL


def optimum_cli(hf_dir, task, out_dir):
    if os.path.exists(out_dir):
        for f in os.listdir(out_dir):
            if f.endswith(".onnx") or f.endswith(".onnx_data") or f.endswith(".onnx.data"):
                os.remove(os.path.join(out_dir, f))
    cli = os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    cmd = [cli, "export", "onnx", "--model", hf_dir, "--task", task, out_dir]
    print("  $ optimum-cli " + " ".join(os.path.relpath(c, HERE) if c.startswith(HERE) else c for c in cmd[1:]))
    # optimum's decoder merge iterates over sets of names: fix the hash seed so reruns give identical bytes.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def eager_mask_no_vmap(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None,
                       attention_mask=None, dtype=torch.float32, **_):
    """Additive [B, 1, Q, KV] mask (0 / finfo.min) built by broadcasting instead of torch.vmap.

    transformers >= 4.53 builds masks with torch.vmap, which the TorchScript tracer cannot follow
    (IndexError: unordered_map::at). Registered under "eager" for the legacy export only.
    """
    q = cache_position.view(1, 1, -1, 1)
    kv = (torch.arange(kv_length, dtype=torch.long) + kv_offset).view(1, 1, 1, -1)
    b = torch.arange(batch_size, dtype=torch.long).view(-1, 1, 1, 1)
    h = torch.zeros(1, dtype=torch.long).view(1, -1, 1, 1)
    allowed = mask_function(b, h, q, kv) if mask_function is not None else kv <= q
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, kv_offset:kv_offset + kv_length].view(batch_size, 1, 1, -1)
    allowed = allowed.expand(batch_size, 1, q.shape[2], kv_length)
    zero = torch.tensor(0.0, dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def gpt2_legacy(model):
    """Legacy TorchScript export with eager attention: the classic GPT-2 graph (Div by sqrt(d), the `bias`
    buffer's triangle sliced and applied with Where, the padding mask added as 0/finfo.min, Softmax)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model.config._attn_implementation = "eager"  # noqa: SLF001 - the only switch transformers 4.x offers
    saved_eager = ALL_MASK_ATTENTION_FUNCTIONS["eager"]
    ALL_MASK_ATTENTION_FUNCTIONS.register("eager", eager_mask_no_vmap)
    try:
        _gpt2_legacy(model)
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS.register("eager", saved_eager)
        model.config._attn_implementation = "sdpa"  # noqa: SLF001


def _gpt2_legacy(model):
    out_dir = os.path.join(HERE, "gpt2-legacy")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    wrapper = NoPast(model).eval()
    torch.onnx.export(
        wrapper,
        (IDS, MASK),
        path,
        dynamo=False,
        opset_version=14,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        },
    )
    describe(path)
    logits = wrapper(IDS, MASK)
    check_and_verify(path, os.path.join(out_dir, "reference.safetensors"),
                     {"input_ids": IDS, "attention_mask": MASK}, {"logits": logits})
    cross_check("logits", logits, os.path.join(HERE, "gpt2-dynamo", "reference.safetensors"), "logits")
    # Batch 1, other length (the trace must not have baked in the example's shape).
    ids1, mask1 = IDS[1:, :3], MASK[1:, :3]
    logits1 = wrapper(ids1, mask1)
    check_and_verify(path, os.path.join(out_dir, "reference_bs1.safetensors"),
                     {"input_ids": ids1, "attention_mask": mask1}, {"logits": logits1})


def legacy_cache(cache):
    """Per layer (key, value) from a transformers 4.x DynamicCache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def gpt2_optimum(model):
    out_dir = os.path.join(HERE, "gpt2-optimum")
    hf_dir = os.path.join(HERE, "gpt2-tiny", "hf")
    optimum_cli(hf_dir, "text-generation-with-past", out_dir)
    path = os.path.join(out_dir, "model.onnx")
    describe(path)
    n_layer = model.config.n_layer

    # With past: 3 past tokens (K/V from the model itself), 5 new tokens, full mask.
    first = model(input_ids=PAST_PREFIX_IDS, attention_mask=torch.ones_like(PAST_PREFIX_IDS), use_cache=True)
    past = [(k.clone(), v.clone()) for k, v in legacy_cache(first.past_key_values)]
    mask = torch.ones((IDS.shape[0], PAST_LEN + IDS.shape[1]), dtype=torch.int64)
    # What HF generate / optimum's ORTModelForCausalLM feed: cumsum(mask) - 1 (padding set to 1), past cut off.
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, PAST_LEN:]
    cache = DynamicCache.from_legacy_cache(tuple((k.clone(), v.clone()) for k, v in past))
    out = model(input_ids=IDS, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    feeds = {"input_ids": IDS, "attention_mask": mask, "position_ids": pos}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"] = k
        feeds[f"past_key_values.{i}.value"] = v
    expected = {"logits": out.logits}
    for i, (k, v) in enumerate(legacy_cache(out.past_key_values)):
        expected[f"present.{i}.key"] = k
        expected[f"present.{i}.value"] = v
    assert len(expected) == 1 + 2 * n_layer
    check_and_verify(path, os.path.join(out_dir, "reference.safetensors"), feeds, expected)
    cross_check("logits", out.logits, os.path.join(HERE, "gpt2-dynamo-past", "reference.safetensors"), "logits")

    # No past (past length 0, as optimum feeds on the first step), right-padded mask.
    pos0 = (MASK.cumsum(-1) - 1).masked_fill(MASK == 0, 1)
    out0 = model(input_ids=IDS, attention_mask=MASK, position_ids=pos0, use_cache=True)
    feeds0 = {"input_ids": IDS, "attention_mask": MASK, "position_ids": pos0}
    empty = torch.zeros((IDS.shape[0], model.config.n_head, 0, model.config.n_embd // model.config.n_head))
    for i in range(n_layer):
        feeds0[f"past_key_values.{i}.key"] = empty
        feeds0[f"past_key_values.{i}.value"] = empty
    expected0 = {"logits": out0.logits}
    for i, (k, v) in enumerate(legacy_cache(out0.past_key_values)):
        expected0[f"present.{i}.key"] = k
        expected0[f"present.{i}.value"] = v
    check_and_verify(path, os.path.join(out_dir, "reference_nopast.safetensors"), feeds0, expected0)


def gpt2_optimum_nopast(model):
    """optimum's export without past (`--task text-generation`): it takes position_ids as an input."""
    out_dir = os.path.join(HERE, "gpt2-optimum-nopast")
    optimum_cli(os.path.join(HERE, "gpt2-tiny", "hf"), "text-generation", out_dir)
    path = os.path.join(out_dir, "model.onnx")
    describe(path)
    # What optimum's ORTModelForCausalLM feeds: cumsum(mask) - 1, padding set to 1.
    pos = (MASK.cumsum(-1) - 1).masked_fill(MASK == 0, 1)
    out = model(input_ids=IDS, attention_mask=MASK, position_ids=pos)
    feeds = {"input_ids": IDS, "attention_mask": MASK, "position_ids": pos}
    check_and_verify(path, os.path.join(out_dir, "reference.safetensors"), feeds, {"logits": out.logits})


def bart_layout_cases(model, ids, mask, dec_ids):
    """Inputs and PyTorch's outputs for each graph of an export in BART's layout (optimum's
    text2text-generation-with-past of BART, also of Marian and Pegasus: graphs/make_seq2seq_fixtures.py):
    {graph: (feeds, expected)} for the encoder on `ids`, the decoder without past on `dec_ids` over the padded encoder
    output, and the decoder with past (the K/V of the first PAST_LEN decoder tokens, then the next token); and the
    encoder's output."""
    n_layer = model.config.decoder_layers
    enc = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def run_decoder(dec_ids, cache=None):
        out = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec_ids,
                    past_key_values=cache, use_cache=True)
        c = out.past_key_values
        self_kv = legacy_cache(c.self_attention_cache)
        cross_kv = legacy_cache(c.cross_attention_cache)
        return out.logits, self_kv, cross_kv

    def presents(self_kv, cross_kv=None):
        d = {}
        for i in range(n_layer):
            d[f"present.{i}.decoder.key"], d[f"present.{i}.decoder.value"] = self_kv[i]
            if cross_kv is not None:
                d[f"present.{i}.encoder.key"], d[f"present.{i}.encoder.value"] = cross_kv[i]
        return d

    # Decoder without past: the decoder tokens over the padded encoder output.
    logits, self_kv, cross_kv = run_decoder(dec_ids)
    dec_feeds = {"input_ids": dec_ids, "encoder_attention_mask": mask, "encoder_hidden_states": enc}
    # Decoder with past: K/V of the first PAST_LEN decoder tokens, then the next token.
    _, p_self, p_cross = run_decoder(dec_ids[:, :PAST_LEN])
    p_self = [(k.clone(), v.clone()) for k, v in p_self]
    p_cross = [(k.clone(), v.clone()) for k, v in p_cross]
    cache = EncoderDecoderCache.from_legacy_cache(
        tuple((s[0].clone(), s[1].clone(), c[0].clone(), c[1].clone()) for s, c in zip(p_self, p_cross)))
    step_ids = dec_ids[:, PAST_LEN:PAST_LEN + 1]
    logits_p, self_kv_p, _ = run_decoder(step_ids, cache)
    assert torch.allclose(logits_p[:, 0], logits[:, PAST_LEN], atol=1e-5)
    wp_feeds = {"input_ids": step_ids, "encoder_attention_mask": mask}
    for i in range(n_layer):
        wp_feeds[f"past_key_values.{i}.decoder.key"], wp_feeds[f"past_key_values.{i}.decoder.value"] = p_self[i]
        wp_feeds[f"past_key_values.{i}.encoder.key"], wp_feeds[f"past_key_values.{i}.encoder.value"] = p_cross[i]
    cases = {
        "encoder_model": ({"input_ids": ids, "attention_mask": mask}, {"last_hidden_state": enc}),
        "decoder_model": (dec_feeds, {"logits": logits, **presents(self_kv, cross_kv)}),
        "decoder_with_past_model": (wp_feeds, {"logits": logits_p, **presents(self_kv_p)}),
    }
    return cases, enc


def bart_optimum(name):
    out_dir = os.path.join(HERE, name)
    hf_dir = os.path.join(out_dir, "hf")
    model = load_checked(BartForConditionalGeneration, hf_dir)
    optimum_cli(hf_dir, "text2text-generation-with-past", out_dir)
    graphs = ["encoder_model", "decoder_model", "decoder_with_past_model", "decoder_model_merged"]
    for g in graphs:
        if os.path.exists(os.path.join(out_dir, g + ".onnx")):
            describe(os.path.join(out_dir, g + ".onnx"))
    n_layer = model.config.decoder_layers

    def ref_path(g, tag=""):
        return os.path.join(out_dir, f"{g}{tag}.reference.safetensors")

    cases, enc = bart_layout_cases(model, BART_IDS, MASK, BART_DEC_IDS)
    for g, (feeds, expected) in cases.items():
        check_and_verify(os.path.join(out_dir, g + ".onnx"), ref_path(g), feeds, expected)
    dec_feeds, dec_expected = cases["decoder_model"]
    wp_feeds, wp_expected = cases["decoder_with_past_model"]

    merged = os.path.join(out_dir, "decoder_model_merged.onnx")
    if os.path.exists(merged):
        # use_cache_branch = true: the with-past step; the encoder presents pass the encoder past through.
        m_feeds = {**wp_feeds, "encoder_hidden_states": enc, "use_cache_branch": torch.tensor([True])}
        # optimum's merged decoder does not pass the encoder past through in this branch: its
        # present.*.encoder.* outputs are empty placeholders of shape [0, H, 1, D]; stored as such.
        h = model.config.decoder_attention_heads
        placeholder = torch.zeros((0, h, 1, model.config.d_model // h))
        m_expected = dict(wp_expected)
        for i in range(n_layer):
            m_expected[f"present.{i}.encoder.key"] = placeholder
            m_expected[f"present.{i}.encoder.value"] = placeholder
        check_and_verify(merged, ref_path("decoder_model_merged"), m_feeds, m_expected)
        # use_cache_branch = false: the no-past decoder; past inputs are empty (length 0), as optimum feeds them.
        empty = torch.zeros((BART_IDS.shape[0], h, 0, model.config.d_model // h))
        n_feeds = {**dec_feeds, "use_cache_branch": torch.tensor([False]),
                   **{k: empty for k in wp_feeds if k.startswith("past_key_values.")}}
        check_and_verify(merged, ref_path("decoder_model_merged", ".nocache"), n_feeds, dec_expected)


def main():
    import optimum.exporters.onnx  # noqa: F401  (fail early if optimum-onnx is missing)
    from importlib.metadata import version

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}, optimum {version('optimum')}, optimum-onnx {version('optimum-onnx')}")
    torch.set_grad_enabled(False)
    gpt2 = load_checked(GPT2LMHeadModel, os.path.join(HERE, "gpt2-tiny", "hf"))
    print("gpt2-legacy")
    gpt2_legacy(gpt2)
    print("gpt2-optimum")
    gpt2_optimum(gpt2)
    print("gpt2-optimum-nopast")
    gpt2_optimum_nopast(gpt2)
    for name in ["bart-enc-deep", "bart-dec-deep"]:
        print(name)
        bart_optimum(name)
    print("done")


if __name__ == "__main__":
    sys.exit(main())
