#!/usr/bin/env python3
"""Tiny Llama (also with grouped-query attention), OPT, GPT-Neo and other decoders: HF folders, optimum exports, and
PyTorch + PEFT references.

One command, from the reference venv (torch, transformers 5.x, peft); it runs itself in the optimum venv
(transformers 4.x, optimum-onnx) for the export step:

    /root/.cache/pfx/ref/bin/python graphs/make_decoder_fixtures.py [--skip-hf | --refs-only] [--only NAME,...]

Writes (relative to this file's folder) the fixtures listed in decoder-fixtures.json (the lists
tests/compile_decoders.rs reads too; each entry says what it covers), for NAME in its families:
    NAME/hf/          save_pretrained safetensors (transformers 5.x), seeded random weights
    NAME/model.onnx   `optimum-cli export onnx --task text-generation-with-past` (transformers 4.x)
    peft-decoders/NAME-{reparam,noreparam}.safetensors   PEFT prefix-tuning loss, gradients, greedy and beam tokens
for NAME in its nopast list, NAME/model.onnx: `--task text-generation` (no past) of the hf/ folder of the family
its "hf" names (its references are that family's), and for NAME in its dynamo list, NAME/model.onnx: a torch.onnx
dynamo export (reference venv, as graphs/make_fixtures.py exports GPT-2) of that family's hf/ folder, with or
without past as its "past" says (references: that family's).
llama-gqa-tiny has 4 query heads and 2 key/value heads: PEFT sizes its prefix by the key/value heads. Its reparam
model is also saved by PEFT (`save_pretrained`: the MLP's output as `prompt_embeddings` [P, 2 L 16], config with
token_dim 16, num_attention_heads 2) into peft-decoders/adapter-llama-gqa-tiny/. Multi-query Falcon and GPT-BigCode
(falcon-mqa-tiny, bigcode-tiny) have one key/value head: PEFT is given token_dim 8 and num_attention_heads 1.
phi-tiny is Phi-1/2 (PhiForCausalLM: rotary on half of each head, attention and MLP in parallel). gptj-tiny and
codegen-tiny rotate neighbouring pairs (strided slices); neox-tiny is Pythia's layout (its 4.x config also gets
rotary_pct and rotary_emb_base, the names 4.x reads). bloom-tiny and mpt-tiny add ALiBi biases (Bloom's from the
attention mask, MPT's from a table by key slot); PEFT is given MPT's sizes (it does not read n_heads), and MPT's
greedy and beam references are the full forwards alone (transformers 5.24's generate feeds MPT the whole sequence
again on top of its cache); the search by full forwards equals HF's beam search on every other family.
falcon-new-tiny is Falcon's new decoder architecture (2 key/value groups of 2 query heads): transformers caches each
group's key/value broadcast to its query heads, so PEFT's own sizes (4 heads, token_dim 32) are the cache's, and its
optimum export gets a dummy past of 4 heads (FALCON_NEW_CLI; optimum-onnx sizes it by num_kv_heads and fails).
olmo-, olmo2-, cohere- and granite-tiny are llama-gqa-tiny's sizes in OLMo's, OLMo 2's, Cohere's and Granite's layouts.
No mixture-of-experts family: optimum-onnx 0.1.0 exports no Mixtral, Qwen2-MoE or OLMoE, and its Qwen3-MoE export
routes tokens to experts through NonZero of the router's top-k (shapes that depend on the data), which pfx refuses.

--skip-hf keeps the hf/ folders; --refs-only keeps them and the exports too, and remakes the references alone.
--only makes the fixtures it names alone (families, nopast and dynamo names; a family's weights keep the seed of its
place in the list), leaving every other file as it is. The
export step asserts that every saved tensor loads unchanged in transformers 4.x and that onnxruntime gives PyTorch's
logits and presents (max diff < 1e-4). The references come from PyTorch + PEFT only. Reruns give byte-identical files.
"""
import os
import subprocess
import sys

import numpy as np
import torch
from fixture_common import (B, ENCODER_HIDDEN, NOISE_STD, P, T, VOCAB_IDS, NoPast, WithPast, add_noise, load_checked,
                            prefix_batch, strip_node_metadata)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_REFS = os.path.join(HERE, "peft-decoders")
OPTIMUM_PYTHON = os.environ.get("PFX_OPTIMUM_PYTHON", "/root/.cache/pfx/optimum/bin/python")
SEED = 20261127
TOL = 1e-4
FIXTURES = os.path.join(HERE, "decoder-fixtures.json")


def load_fixtures(path=FIXTURES):
    """The fixture lists of decoder-fixtures.json (also read by tests/compile_decoders.rs), checked; exits naming
    the file and the entry on anything malformed."""
    import json

    def fail(what):
        sys.exit(f"{path}: {what}")

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the decoder fixture lists: {e}")
    fields = {  # list: (required fields, optional fields), with their types
        "families": ({"name": str, "why": str}, {"snapshot": str, "second_eos": bool, "weight_seed_shift": int}),
        "nopast": ({"name": str, "hf": str, "why": str}, {"snapshot": str}),
        "dynamo": ({"name": str, "hf": str, "past": bool, "why": str}, {"snapshot": str}),
    }
    if not isinstance(data, dict) or set(data) - {"about"} != set(fields):
        fail(f"expected an object with the lists {sorted(fields)} (and \"about\")")
    kinds = {str: "a non-empty string", bool: "true or false", int: "an integer"}
    names = set()
    for key, (required, optional) in fields.items():
        if not isinstance(data[key], list) or not data[key]:
            fail(f"\"{key}\" must be a non-empty list")
        for i, entry in enumerate(data[key]):
            where = f"{key}[{i}]"
            if not isinstance(entry, dict):
                fail(f"{where}: expected an object")
            where = f"{key}[{i}] ({entry.get('name')!r})"
            for field, kind in {**required, **optional}.items():
                if field not in entry:
                    if field in required:
                        fail(f"{where}: missing \"{field}\"")
                elif type(entry[field]) is not kind or (kind is str and not entry[field]):
                    fail(f"{where}: \"{field}\" must be {kinds[kind]}")
            unknown = set(entry) - set(required) - set(optional)
            if unknown:
                fail(f"{where}: unknown field(s) {sorted(unknown)}")
            if entry["name"] in names:
                fail(f"{where}: listed twice")
            names.add(entry["name"])
    families = {f["name"] for f in data["families"]}
    for key in ("nopast", "dynamo"):
        for i, entry in enumerate(data[key]):
            if entry["hf"] not in families:
                fail(f"{key}[{i}] ({entry['name']!r}): \"hf\" {entry['hf']!r} is not one of the families")
    return data


_FIXTURES = load_fixtures()
# With past (optimum), each with its own hf/ folder and PEFT references; the order of configs().
FAMILIES = [f["name"] for f in _FIXTURES["families"]]
# Exports without past: (folder, HF folder it is exported from).
NOPAST = [(e["name"], e["hf"]) for e in _FIXTURES["nopast"]]
# torch.onnx dynamo exports (reference venv), weights inline: (folder, HF folder, with past). They compute OPT's
# positions from the mask in the graph, and Llama's RMSNorm as Reciprocal(Sqrt); references are the HF folder's.
DYNAMO = [(e["name"], e["hf"], e["past"]) for e in _FIXTURES["dynamo"]]
# Families whose references also hold generation with two end-of-sequence ids (greedy and beam 3).
STOP_FAMILIES = [f["name"] for f in _FIXTURES["families"] if f.get("second_eos")]
# Weights drawn from other seeds: with their own, the greedy tokens of a prompt do not change with the prefix
# (falcon-mqa-tiny's first prompt repeats one token; the references need a prefix that changes every prompt's;
# bigcode-tiny's reparam prefix changed only 2 of a prompt's 8; gptj-, codegen-, neox- and cohere-tiny likewise: the
# first shifts, in hundreds, that pass).
WEIGHT_SEED_SHIFT = {f["name"]: f["weight_seed_shift"] for f in _FIXTURES["families"] if "weight_seed_shift" in f}

# ---- prefix-tuning setup: graphs/peft/'s (fixture_common.py) ----------------------------------------------------
MODES = {
    "reparam": dict(prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN),
    "noreparam": dict(prefix_projection=False),
}
# ---- generation: as graphs/peft-generate/ ---------------------------------------------------------------------
EOS = 95  # bos = eos = pad = 95 in every config, as gpt2-tiny
NEW = 8  # exactly 8 new tokens (eos banned before that)
PROMPT_LENS = (6, 4, 2)  # left-padded to 6 with EOS
BEAMS = 3  # beam3 references: 3 beams, exactly NEW tokens
# Smallest gaps (summed log-probabilities, about -20 here; float32 rounds them by 2e-6) asserted between a beam3
# reference's best and second hypotheses (smallest here 4.0e-4), and between the last candidate a step keeps and the
# first it drops (7.4e-5, llama-gqa-tiny noreparam's third prompt).
BEAM_GAP_MIN = 1e-4
BEAM_KEPT_MIN = 5e-5
# The first seed from 20261225 on for which the prefix changes at least 4 of the 8 greedy tokens of every
# prompt, in every family and mode (on a random tiny model many prompts give the same tokens either way).
PROMPT_SEED = 20261240


def configs():
    from transformers import (BloomConfig, CodeGenConfig, CohereConfig, FalconConfig, Gemma2Config, GemmaConfig,
                              GPTBigCodeConfig, GPTJConfig, GPTNeoConfig, GPTNeoXConfig, GraniteConfig, LlamaConfig,
                              MistralConfig, MptConfig, Olmo2Config, OlmoConfig, OPTConfig, Phi3Config, PhiConfig,
                              Qwen2Config, Qwen3Config, StableLmConfig)

    special = dict(bos_token_id=EOS, eos_token_id=EOS)
    return {
        "llama-tiny": LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                  **special),
        "opt-tiny": OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=EOS, **special),
        # The local layer's window (4) is shorter than prefix + sequence (4 + 7 in training, 4 + 14 when
        # generating), so some queries cannot see some prefix positions, as in real GPT-Neo (256 of 2048).
        "gptneo-tiny": GPTNeoConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]], window_size=4,
                                    max_position_embeddings=64, **special),
        # Grouped-query attention, as TinyLlama / Llama 3: 2 query heads share each key/value head.
        "llama-gqa-tiny": LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **special),
        # Heads wider than width / heads (16, not 32 / 4), RMSNorm on each head's queries and keys.
        "qwen3-tiny": Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=64, **special),
        # Gemma: one key/value head of 16, GELU (tanh). Untied, with larger weights: otherwise the tiny model's
        # greedy tokens follow the last token's (√d-scaled) embedding whatever the prefix. Its optimum export has no position_ids input (rotary angles from
        # cache_position, which its causal mask reads too).
        "gemma-tiny": GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                  tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=64,
                                  **special),
        # Falcon with a key/value head per query head (PEFT cannot size a multi-query Falcon's prefix): its fused
        # QKV is split by Gathers of constant indices. Untied, with larger weights, as Gemma.
        "falcon-tiny": FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=False, initializer_range=0.1, tie_word_embeddings=False,
                                    max_position_embeddings=64, **special),
        # Qwen2: biases on the query, key and value projections; grouped-query attention.
        "qwen2-tiny": Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  **special),
        # Mistral without a sliding window (with one, pfx refuses generation graphs that reach it).
        "mistral-tiny": MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                      max_position_embeddings=64, **special),
        # Phi-3: fused QKV and gate/up projections, split by Slice.
        "phi3-tiny": Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, original_max_position_embeddings=64,
                                max_position_embeddings=64, sliding_window=None, pad_token_id=EOS, **special),
        # StableLM: rotary on half of each head only (partial_rotary_factor), LayerNorm, biased QKV.
        "stablelm-tiny": StableLmConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                                        use_qkv_bias=True, max_position_embeddings=64, **special),
        # Falcon multi-query (as Falcon-7B): one key/value head for the 4 query heads. PEFT's own config guesses
        # a prefix for every head here; it gets the key/value head (token_dim 8, one head) spelled out.
        "falcon-mqa-tiny": FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True, initializer_range=0.1, tie_word_embeddings=False,
                                        max_position_embeddings=64, **special),
        # Mistral with a sliding window of 6, shorter than prefix + sequence in training (4 + 7) and than the
        # generation cache (4 + 6 + 8 - 1): late queries no longer see the prefix, nor early tokens.
        "mistral-window-tiny": MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                             max_position_embeddings=64, **special),
        # Gemma 2: a sliding window (6) on every other layer only, attention and final logits soft-capped (tanh).
        "gemma2-tiny": Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
                                    tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=64,
                                    pad_token_id=EOS, **special),
        # Phi (Phi-1/2): rotary on half of each head, one LayerNorm feeding attention and MLP in parallel, untied.
        "phi-tiny": PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                              tie_word_embeddings=False, max_position_embeddings=64, **special),
        # GPT-BigCode multi-query (as StarCoder): one key/value head for the 4 query heads, fused into c_attn.
        # PEFT gets the key/value head (token_dim 8, one head) spelled out, as for multi-query Falcon.
        "bigcode-tiny": GPTBigCodeConfig(vocab_size=96, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                                         multi_query=True, initializer_range=0.1, **special),
        # GPT-J and CodeGen rotate pairs of neighbouring elements (x[..., ::2], x[..., 1::2]) over rotary_dim 4 of
        # each head's 8; CodeGen reads its angles from a sin/cos table by position id and splits a fused QKV.
        "gptj-tiny": GPTJConfig(vocab_size=96, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                                tie_word_embeddings=False, initializer_range=0.2, **special),
        "codegen-tiny": CodeGenConfig(vocab_size=96, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                                      n_ctx=64, tie_word_embeddings=False, initializer_range=0.2, **special),
        # GPT-NeoX (Pythia's layout): rotary on a quarter of each head, attention and MLP in parallel, QKV fused
        # per head.
        "neox-tiny": GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, partial_rotary_factor=0.25, use_parallel_residual=True,
                                   max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2,
                                   **special),
        # Bloom: ALiBi biases computed in the graph from the attention mask (no positions to feed), fused QKV per
        # head, a LayerNorm on the embeddings. Untied, with larger weights, as Gemma.
        "bloom-tiny": BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2,
                                  tie_word_embeddings=False, pad_token_id=EOS, **special),
        # MPT: ALiBi biases from a constant table of max_seq_len positions, sliced to the key length (cache slots).
        "mpt-tiny": MptConfig(vocab_size=96, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64,
                              initializer_range=0.2, tie_word_embeddings=False, pad_token_id=EOS, **special),
        # Falcon's new decoder architecture (Falcon-40B/180B): 2 key/value groups of 2 query heads, the fused QKV laid
        # out per group (its queries, then its key, then its value), ln_attn and ln_mlp feeding attention and MLP in
        # parallel. transformers broadcasts each group's key/value to its query heads before caching them, so the
        # cache (and PEFT's prefix) holds all 4 heads. Untied, with larger weights, as falcon-tiny.
        "falcon-new-tiny": FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_kv_heads=2, new_decoder_architecture=True, initializer_range=0.1,
                                        tie_word_embeddings=False, max_position_embeddings=64, **special),
        # OLMo: LayerNorm without weights or biases, untied; otherwise Llama's layout (grouped-query as llama-gqa-tiny).
        "olmo-tiny": OlmoConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=EOS, **special),
        # OLMo 2: RMSNorm after attention and after the MLP (before the residual add), and on the whole query and
        # key projections (across heads) before rotary.
        "olmo2-tiny": Olmo2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=EOS, **special),
        # Cohere (Command-R): one bias-free LayerNorm feeding attention and MLP in parallel, rotary on neighbouring
        # pairs (GPT-J's interleaving), logits scaled by logit_scale. Untied, with larger weights, as Gemma.
        "cohere-tiny": CohereConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    logit_scale=0.5, tie_word_embeddings=False, initializer_range=0.2,
                                    pad_token_id=EOS, **special),
        # Granite: Llama's layout with scalar multipliers on the embeddings, the attention scores (in place of
        # 1/sqrt(head dim)), each residual branch, and the logits (divided by logits_scaling). Untied, with larger
        # weights, as Gemma.
        "granite-tiny": GraniteConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      embedding_multiplier=4.0, attention_multiplier=0.25, residual_multiplier=0.5,
                                      logits_scaling=2.0, tie_word_embeddings=False, initializer_range=0.2,
                                      pad_token_id=EOS, **special),
    }


def lift_rope_settings(path):
    """transformers 5.x writes rope_theta and partial_rotary_factor inside rope_parameters only; 4.x (the optimum venv)
    reads them at the top level and would silently export its defaults. Copied up where missing."""
    import json

    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    rope = config.get("rope_parameters") or {}
    missing = {k: v for k, v in rope.items() if k in ("rope_theta", "partial_rotary_factor") and k not in config}
    # GPT-NeoX's 4.x config names them rotary_pct and rotary_emb_base.
    if config.get("model_type") == "gpt_neox":
        missing.update({k: rope[r] for k, r in (("rotary_pct", "partial_rotary_factor"), ("rotary_emb_base", "rope_theta"))
                        if r in rope and k not in config})
    if missing:
        config.update(missing)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def make_hf():
    from transformers import AutoModelForCausalLM

    cfgs = configs()
    if list(cfgs) != FAMILIES:  # the index seeds each family's weights
        sys.exit(f"{FIXTURES}: families {FAMILIES} are not configs()'s, in its order: {list(cfgs)}")
    for i, (name, cfg) in enumerate(cfgs.items()):
        if not selected(name):
            continue
        i += WEIGHT_SEED_SHIFT.get(name, 0)
        torch.manual_seed(SEED + 100 + i)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        add_noise(model, SEED + 110 + i)
        model.save_pretrained(os.path.join(HERE, name, "hf"))
        lift_rope_settings(os.path.join(HERE, name, "hf", "config.json"))
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name}/hf: {type(model).__name__}, {n} parameters")


# ================================================================================================================
# Export step: optimum venv (transformers 4.x)
# ================================================================================================================
def legacy_cache(cache):
    # GPT-BigCode (transformers 4.57) keeps its cache in an EncoderDecoderCache: its self-attention half.
    cache = getattr(cache, "self_attention_cache", cache)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


FALCON_NEW_CLI = """
import sys
from optimum.utils import FalconDummyPastKeyValuesGenerator as G
init = G.__init__
def sized_as_cached(self, task, normalized_config, *args, **kwargs):
    init(self, task, normalized_config, *args, **kwargs)
    if normalized_config.new_decoder_architecture:
        self.num_kv_heads = normalized_config.num_attention_heads
G.__init__ = sized_as_cached
from optimum.commands.optimum_cli import main
sys.argv[0] = "optimum-cli"
sys.exit(main())
"""


def export_one(name, hf_name=None):
    """Exports HERE/hf_name/hf (default: name's own) into HERE/name, with past unless hf_name is given."""
    import onnx
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    out_dir = os.path.join(HERE, name)
    hf_name = hf_name or name
    hf_dir = os.path.join(HERE, hf_name, "hf")
    task = "text-generation-with-past" if hf_name == name else "text-generation"
    model = load_checked(AutoModelForCausalLM, hf_dir)
    path = os.path.join(out_dir, "model.onnx")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.endswith(".onnx") or f.endswith(".onnx_data"):
            os.remove(os.path.join(out_dir, f))
    cli = [os.path.join(os.path.dirname(sys.executable), "optimum-cli")]
    cfg = model.config
    if task == "text-generation-with-past" and cfg.model_type == "falcon" and cfg.new_decoder_architecture and \
            cfg.num_kv_heads != cfg.num_attention_heads:
        # optimum-onnx 0.1.0 sizes a new-architecture Falcon's dummy past by num_kv_heads, but transformers
        # broadcasts each group's key/value to its query heads before the cache, which so holds num_attention_heads
        # (its export stops at the cache's concatenation): the CLI, with the dummy past sized as the cache is.
        cli = [sys.executable, "-c", FALCON_NEW_CLI]
    cmd = [*cli, "export", "onnx", "--model", hf_dir, "--task", task, out_dir]
    print(f"  $ optimum-cli export onnx --model {hf_name}/hf --task {task} {name}")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # optimum iterates over sets of names
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    assert sorted(f for f in os.listdir(out_dir) if "onnx" in f) == ["model.onnx"], os.listdir(out_dir)
    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    print(f"  {name}/model.onnx: ir={m.ir_version} opset={opset} nodes={len(m.graph.node)} "
          f"initializers={len(m.graph.initializer)} {os.path.getsize(path)} bytes, check_model(full)=OK")
    print("    inputs: " + ", ".join(i.name for i in m.graph.input))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if task == "text-generation":
        # No past: 6 tokens, row 1 left-padded by 2 (position ids from the mask, as optimum's generate feeds them).
        torch.set_grad_enabled(False)
        ids = torch.tensor([[17, 42, 8, 63, 5, 11], [95, 95, 77, 30, 30, 9]])
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if "position_ids" not in names:
            # The export numbers the rows' positions 0..T itself (Gemma's, from cache_position).
            pos = None
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.numpy()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        assert not any(n.startswith("past") for n in names), names
        (got,) = sess.run(None, {n: feeds[n].numpy() for n in names})
        # Left padding: compare the real positions only (padding rows see no key in some exports).
        worst = float(np.abs(got - want)[mask.numpy() == 1].max())
        print(f"    onnxruntime vs PyTorch (no past, left-padded): max diff {worst:.2g} over logits")
        assert worst < TOL
        return

    # onnxruntime equals PyTorch: 3 past tokens (K/V from the model), 5 new tokens, row 1 left-padded.
    torch.set_grad_enabled(False)
    first_ids = torch.tensor([[95, 11, 12], [95, 95, 61]])
    first_mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    ids = torch.tensor([[17, 42, 8, 63, 5], [5, 77, 30, 30, 9]])
    mask = torch.cat([first_mask, torch.ones_like(ids)], dim=1)
    pos_all = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    if "position_ids" not in names:
        # The export numbers positions itself (Gemma's: the cache slots, as transformers does without position ids).
        pos_all = None
    first = model(input_ids=first_ids, attention_mask=first_mask,
                  position_ids=None if pos_all is None else pos_all[:, :3], use_cache=True)
    past = [(k.clone(), v.clone()) for k, v in legacy_cache(first.past_key_values)]
    cache = DynamicCache.from_legacy_cache(tuple((k.clone(), v.clone()) for k, v in past))
    pos = None if pos_all is None else pos_all[:, 3:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    expected = {"logits": out.logits}
    for i, (k, v) in enumerate(legacy_cache(out.past_key_values)):
        expected[f"present.{i}.key"], expected[f"present.{i}.value"] = k, v
    got = sess.run(None, {n: feeds[n].numpy() for n in names})
    worst = 0.0
    for o, v in zip(sess.get_outputs(), got):
        want = expected[o.name].numpy()
        assert v.shape == want.shape, (o.name, v.shape, want.shape)
        worst = max(worst, float(np.abs(v - want).max()))
    print(f"    onnxruntime vs PyTorch (past 3, left-padded): max diff {worst:.2g} over {len(got)} outputs")
    assert worst < TOL


def export_main():
    import onnx
    import onnxruntime as ort
    import transformers
    from importlib.metadata import version

    print(f"[optimum venv] torch {torch.__version__}, transformers {transformers.__version__}, onnx "
          f"{onnx.__version__}, onnxruntime {ort.__version__}, optimum-onnx {version('optimum-onnx')}")
    for name in FAMILIES:
        if selected(name):
            export_one(name)
    for name, hf_name in NOPAST:
        if selected(name):
            export_one(name, hf_name)


# ================================================================================================================
# torch.onnx dynamo exports: reference venv (transformers 5.x)
# ================================================================================================================
def export_dynamo(name, hf_name, with_past):
    """torch.onnx.export(dynamo=True) of HERE/hf_name/hf into HERE/name/model.onnx, checked in onnxruntime against
    PyTorch on a left-padded row (without past: its real positions; with past: 3 past tokens, 5 new)."""
    import onnx
    import onnxruntime as ort

    model = load_base(hf_name, attn="sdpa" if "neo" not in hf_name else "eager")
    layers = model.config.num_hidden_layers
    ids = torch.tensor([[17, 42, 8, 63, 5], [95, 95, 77, 30, 9]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        if with_past:
            first_ids, first_mask = torch.tensor([[95, 11, 12], [95, 95, 61]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
            first = model(input_ids=first_ids, attention_mask=first_mask, use_cache=True)
            past = [t.clone() for layer in first.cache.layers for t in (layer.keys, layer.values)]
            full = torch.cat([first_mask, torch.ones_like(ids)], dim=1)
            past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
            outputs = ["logits"] + [n.replace("past_key_values", "present") for n in past_names]
            wrapper, args = WithPast(model).eval(), (ids, full, *past)
            names = ["input_ids", "attention_mask", *past_names]
            past_len, total = torch.export.Dim("past_sequence"), torch.export.Dim("past_sequence_plus_sequence")
            dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                       "past": tuple({0: batch, 2: past_len} for _ in past_names)}
        else:
            outputs, wrapper, args = ["logits"], NoPast(model).eval(), (ids, mask)
            names = ["input_ids", "attention_mask"]
            dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        want = wrapper(*[a.clone() for a in args])
        want = [want] if isinstance(want, torch.Tensor) else list(want)
    prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=outputs,
                             dynamic_shapes=dynamic)
    path = os.path.join(HERE, name, "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.save_model(strip_node_metadata(prog.model_proto), path)
    onnx.checker.check_model(path, full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    got = sess.run(outputs, {n: a.numpy() for n, a in zip(names, args)})
    # Without past, the padding's logits differ between attention kernels: compare the real positions.
    real = np.ones(got[0].shape[:2], dtype=bool) if with_past else mask.numpy() == 1
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        d = np.abs(g - w.numpy())
        worst = max(worst, float((d[real] if i == 0 else d).max()))
    print(f"  {name}/model.onnx: torch.onnx dynamo of {hf_name}/hf, {'with' if with_past else 'without'} past, "
          f"{len(onnx.load(path).graph.node)} nodes, onnxruntime vs PyTorch max diff {worst:.2g}")
    assert worst < TOL, worst


# ================================================================================================================
# References: reference venv (transformers 5.x + PEFT)
# ================================================================================================================
def make_prompts():
    g = torch.Generator().manual_seed(PROMPT_SEED)
    tp = max(PROMPT_LENS)
    prompts = torch.full((len(PROMPT_LENS), tp), EOS, dtype=torch.int64)
    mask = torch.zeros((len(PROMPT_LENS), tp), dtype=torch.int64)
    for i, n in enumerate(PROMPT_LENS):
        prompts[i, tp - n:] = torch.randint(0, VOCAB_IDS, (n,), generator=g)
        mask[i, tp - n:] = 1
    return prompts, mask


def np32(t):
    return np.array(t.detach().cpu().to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def load_base(name, attn="eager"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(HERE, name, "hf"), attn_implementation=attn,
                                                 dtype=torch.float32)
    return model.eval()


def prefix_cache(prefix, rows):
    from transformers import DynamicCache

    return DynamicCache([(k.unsqueeze(0).expand(rows, *k.shape).clone(), v.unsqueeze(0).expand(rows, *v.shape).clone())
                         for k, v in prefix])


def last_logits(base, seq, prefix):
    """The last position's logits of one full forward over `seq` [1, n] (no cache of its own), after the prefix's
    cache at positions P + t (prefix None: the base model alone, positions from 0)."""
    if prefix is None:
        out = base(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
    else:
        n = seq.shape[1]
        mask = torch.ones(1, P + n, dtype=torch.int64)
        pos = (P + torch.arange(n)).unsqueeze(0)
        out = base(input_ids=seq, attention_mask=mask, cache=prefix_cache(prefix, 1), position_ids=pos, use_cache=False)
    return out.logits[0, -1]


def hand_greedy(base, ids, prefix):
    """One prompt (no padding), one full forward per step over the sequence so far, with a fresh prefix cache;
    positions P + t, eos banned (min_new_tokens = NEW). prefix None: the base model alone, positions from 0."""
    seq = ids.clone()
    new = []
    with torch.no_grad():
        for _ in range(NEW):
            logits = last_logits(base, seq, prefix).clone()
            logits[EOS] = -float("inf")
            t = int(logits.argmax())
            new.append(t)
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
    return new


def hf_generate(base, ids, prefix):
    """transformers' own generate with the prefix in its cache (one prompt, no padding)."""
    args = dict(do_sample=False, num_beams=1, min_new_tokens=NEW, max_new_tokens=NEW, pad_token_id=EOS,
                eos_token_id=EOS)
    mask = torch.ones(1, P + ids.shape[1], dtype=torch.int64)
    with torch.no_grad():
        seqs = base.generate(input_ids=ids, attention_mask=mask, cache=prefix_cache(prefix, 1), **args)
    assert torch.equal(seqs[:, :ids.shape[1]], ids)
    return seqs[0, ids.shape[1]:].tolist()


def hf_generate_stopping(base, ids, prefix, stop, beams):
    """transformers' generate (greedy or beam search) with the prefix in its cache, up to NEW tokens, stopping at EOS
    or `stop`: a list of end-of-sequence ids, as Llama 3's generation config has. The new tokens, EOS cut."""
    args = dict(do_sample=False, num_beams=beams, num_return_sequences=1, min_new_tokens=0, max_new_tokens=NEW,
                length_penalty=1.0, early_stopping=False, pad_token_id=EOS, eos_token_id=[EOS, stop])
    mask = torch.ones(1, P + ids.shape[1], dtype=torch.int64)
    with torch.no_grad():
        seqs = base.generate(input_ids=ids, attention_mask=mask, cache=prefix_cache(prefix, beams), **args)
    new = seqs[0, ids.shape[1]:].tolist()
    ends = [i for i, t in enumerate(new) if t in (EOS, stop)]
    return new[:ends[0]] if ends else new


def hf_beam(base, ids, prefix):
    """transformers' beam search (BEAMS beams, exactly NEW tokens: eos banned before that), the prefix in its cache
    (None: the base model alone), one prompt, no padding. The best hypothesis's new tokens and its score (HF's
    sequences_scores: summed log-probabilities / NEW, length_penalty 1)."""
    args = dict(do_sample=False, num_beams=BEAMS, num_return_sequences=1, min_new_tokens=NEW, max_new_tokens=NEW,
                length_penalty=1.0, early_stopping=False, pad_token_id=EOS, eos_token_id=EOS,
                return_dict_in_generate=True, output_scores=True)
    n = ids.shape[1]
    with torch.no_grad():
        if prefix is None:
            out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **args)
        else:
            mask = torch.ones(1, P + n, dtype=torch.int64)
            out = base.generate(input_ids=ids, attention_mask=mask, cache=prefix_cache(prefix, BEAMS), **args)
    assert torch.equal(out.sequences[:, :n], ids) and out.sequences.shape[1] == n + NEW
    return out.sequences[0, n:].tolist(), float(out.sequences_scores[0])


def hand_beam(base, ids, prefix, dtype=torch.float32):
    """Beam search by full forwards (as hand_greedy: one per hypothesis and step, a fresh prefix cache, positions
    P + t; prefix None: the base model alone), in HF 5.x's order and precision: float32 log_softmax of the last
    logits, eos then set to -inf (min_new_tokens = NEW), added to the hypothesis's float32 score (dtype float64:
    both in float64, to see that the tokens do not hang on float32 rounding), the top BEAMS of all (hypothesis,
    token) candidates kept (torch.topk over the hypothesis-major flattening; HF keeps the top 2 BEAMS and drops those
    ending in eos, none here). No hypothesis ends before NEW, so all finish with NEW tokens and the best is the
    highest summed log-probability. Returns (new tokens, best score / NEW, gap between the best
    and second final summed scores, smallest gap between the last kept and the first dropped candidate of a step)."""
    beams = [(ids.clone(), torch.zeros((), dtype=dtype))]
    kept_gap = float("inf")
    with torch.no_grad():
        for _ in range(NEW):
            cand = []
            for seq, score in beams:
                lp = torch.log_softmax(last_logits(base, seq, prefix).to(dtype), dim=-1)
                lp[EOS] = -float("inf")
                cand.append(lp + score)
            flat = torch.cat(cand)
            V = cand[0].shape[0]
            top = torch.topk(flat, BEAMS + 1)
            kept_gap = min(kept_gap, float(top.values[BEAMS - 1] - top.values[BEAMS]))
            new = []
            for s, idx in zip(top.values[:BEAMS], top.indices[:BEAMS].tolist()):
                b, tok = divmod(idx, V)
                new.append((torch.cat([beams[b][0], torch.tensor([[tok]])], dim=1), s))
            beams = new
    best = beams[0]  # topk's values are sorted: the first is the best
    return (best[0][0, ids.shape[1]:].tolist(), float(best[1]) / NEW, float(beams[0][1] - beams[1][1]), kept_gap)


def save_adapter(model, name, loss, input_ids, attention_mask, labels):
    """PEFT's own adapter folder for this prefix, proven to load back in PEFT with the same loss."""
    from peft import PeftModel

    # Recorded as the base model, repo-relative (the checkout's path would make reruns differ).
    model.peft_config[model.active_adapter].base_model_name_or_path = f"graphs/{name}/hf"
    out_dir = os.path.join(OUT_REFS, f"adapter-{name}")
    model.save_pretrained(out_dir)
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)
    loaded = PeftModel.from_pretrained(load_base(name), out_dir).eval()
    with torch.no_grad():
        back = loaded(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()
    assert abs(back - loss) <= 1e-5 * abs(loss), (back, loss)
    print(f"  {os.path.relpath(out_dir, HERE)}: PEFT loads it back with loss {back:.6f} (saved model: {loss:.6f})")


def run_family(name):
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from safetensors.numpy import save_file

    input_ids, attention_mask, labels = prefix_batch(SEED)
    prompts, prompt_mask = make_prompts()
    for mode in MODES:
        base = load_base(name)
        cfg = base.config
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        d = cfg.hidden_size
        D = getattr(cfg, "head_dim", None) or d // H  # Qwen3's and Gemma's heads are wider than d / H
        # Grouped-query attention: PEFT's prefix holds the key/value heads only (token_dim = kv heads x D).
        H = getattr(cfg, "num_key_value_heads", None) or H
        sizes = {}
        if (cfg.model_type == "falcon" and cfg.multi_query and not cfg.new_decoder_architecture) or \
                (cfg.model_type == "gpt_bigcode" and cfg.multi_query):
            # Multi-query Falcon and GPT-BigCode: PEFT reads num_attention_heads (4) from the config; their forward
            # needs 1.
            H = 1
            sizes = dict(token_dim=H * D, num_attention_heads=H, num_layers=L)
        elif cfg.model_type == "mpt":
            # PEFT looks for num_attention_heads in the config's dict, where MPT's are n_heads: spelled out.
            sizes = dict(token_dim=H * D, num_attention_heads=H, num_layers=L)
        pcfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, **MODES[mode], **sizes)
        torch.manual_seed(SEED)  # PEFT's own init draws from the global RNG
        model = get_peft_model(base, pcfg).eval()
        enc = model.prompt_encoder[model.active_adapter]
        named = list(enc.named_parameters())
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for _, p in named)
        g = torch.Generator().manual_seed(SEED + 1 + list(MODES).index(mode))
        with torch.no_grad():
            for _, p in named:
                p.add_(torch.randn(p.shape, generator=g) * NOISE_STD)
        init = {n: p.detach().clone() for n, p in named}
        out = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(), "labels": labels.numpy()}
        for n, v in init.items():
            out[n] = np32(v)

        res = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        res.loss.backward()
        out["loss"] = np.array(res.loss.item(), dtype=np.float32).reshape(())
        for n, p in named:
            out["grad." + n] = np32(p.grad)

        with torch.no_grad():
            # The prefix PEFT builds, in the layout pfx uses: column ((2l + kv) H + h) D + dd of the [P, 2LHD] rows
            # (H key/value heads).
            used = model.peft_config[model.active_adapter]
            assert (used.num_attention_heads, used.token_dim) == (H, H * D), (used.num_attention_heads, used.token_dim)
            if mode == "reparam":
                x = init["embedding.weight"]
                hid = torch.tanh(x @ init["transform.0.weight"].T + init["transform.0.bias"])
                flat = hid @ init["transform.2.weight"].T + init["transform.2.bias"]
            else:
                flat = init["embedding.weight"]
            kv = flat.view(P, 2 * L, H, D).permute(1, 2, 0, 3)
            prefix = [(kv[2 * l].clone(), kv[2 * l + 1].clone()) for l in range(L)]
            cache = model.get_prompt(1)
            for l in range(L):
                torch.testing.assert_close(cache.layers[l].keys[0], prefix[l][0], rtol=0, atol=1e-6)
                torch.testing.assert_close(cache.layers[l].values[0], prefix[l][1], rtol=0, atol=1e-6)
            # PEFT's forward is the base model with that prefix as its cache and P leading ones in the mask
            # (no position ids: each family numbers positions its own way).
            full_mask = torch.cat([torch.ones(B, P, dtype=torch.int64), attention_mask], dim=1)
            own = base(input_ids=input_ids, attention_mask=full_mask, cache=prefix_cache(prefix, B)).logits
            torch.testing.assert_close(own, res.logits, rtol=0, atol=1e-5)
            no_prefix = base(input_ids=input_ids, attention_mask=attention_mask).logits
            assert (no_prefix - res.logits).abs().max() > 1e-2

            # Greedy generation with this prefix, each prompt alone; two ways, asserted equal.
            greedy, bare = [], []
            for i in range(prompts.shape[0]):
                ids = prompts[i:i + 1, prompt_mask[i] == 1]
                hand = hand_greedy(base, ids, prefix)
                # transformers 5.24's generate feeds MPT the whole sequence at every step on top of its cache (the
                # keys outgrow its ALiBi table): MPT's references are the full forwards alone.
                assert cfg.model_type == "mpt" or hand == hf_generate(base, ids, prefix), (name, mode, i)
                greedy.append(hand)
                bare.append(hand_greedy(base, ids, None))
            out["prompts"] = prompts.numpy()
            out["prompt_mask"] = prompt_mask.numpy()
            out["greedy"] = np.array(greedy, dtype=np.int64)
            out["greedy_noprefix"] = np.array(bare, dtype=np.int64)
            changed = min(sum(a != b for a, b in zip(x, y)) for x, y in zip(greedy, bare))
            assert changed >= 4, (name, mode, changed)
            # Beam search (BEAMS beams, exactly NEW tokens), each prompt alone, with the prefix and without: HF's
            # generate, and hand_beam asserted equal to it (tokens, and the best score to 1e-5); MPT's are hand_beam's
            # alone (its generate is broken, above). Not knife-edge: the same tokens with the scores in float64, and
            # beam3_gaps [prompt, 2] records (asserted above BEAM_GAP_MIN, BEAM_KEPT_MIN) the gap between the best
            # and second summed log-probabilities, and the smallest between a step's last kept and first dropped
            # candidates.
            beam, beam_bare, gaps = [], [], []
            for i in range(prompts.shape[0]):
                ids = prompts[i:i + 1, prompt_mask[i] == 1]
                for pre, rows in ((prefix, beam), (None, beam_bare)):
                    hand, score, gap, kept = hand_beam(base, ids, pre)
                    assert hand_beam(base, ids, pre, torch.float64)[0] == hand, (name, mode, i, pre is None)
                    if cfg.model_type != "mpt":
                        hf, hf_score = hf_beam(base, ids, pre)
                        assert hand == hf and abs(score - hf_score) <= 1e-5, (name, mode, i, hand, hf, hf_score)
                    rows.append(hand)
                    if pre is not None:
                        gaps.append((gap, kept))
            assert min(g for g, _ in gaps) > BEAM_GAP_MIN, (name, mode, gaps)
            assert min(k for _, k in gaps) > BEAM_KEPT_MIN, (name, mode, gaps)
            assert beam != beam_bare, (name, mode, beam)
            out["beam3"] = np.array(beam, dtype=np.int64)
            out["beam3_noprefix"] = np.array(beam_bare, dtype=np.int64)
            out["beam3_gaps"] = np.array(gaps, dtype=np.float32)
            differ = [sum(a != b for a, b in zip(x, y)) for x, y in zip(beam, greedy)]
            print(f"  {mode}: beam3 {beam} ({differ} of {NEW} tokens differ from greedy), no prefix {beam_bare}; "
                  f"gaps best-second {[f'{g:.2g}' for g, _ in gaps]}, kept-dropped {[f'{k:.2g}' for _, k in gaps]}")
            if name in STOP_FAMILIES:
                for key, beams in (("greedy", 1), ("beam3", 3)):
                    def search(stop):
                        return [hf_generate_stopping(base, prompts[i:i + 1, prompt_mask[i] == 1], prefix, stop, beams)
                                for i in range(prompts.shape[0])]
                    # A second end-of-sequence id: the 4th token the search gives the first prompt without it
                    # (EOS twice there is one id). Greedy stops there or before; beam search finishes that hypothesis, which
                    # need not win, but the search goes otherwise.
                    plain = search(EOS)
                    stop = plain[0][3]
                    rows = search(stop)
                    assert rows != plain and (beams > 1 or len(rows[0]) <= 3), (name, mode, key, rows)
                    out[f"{key}_stop_id"] = np.array([stop], dtype=np.int64)
                    out[f"{key}_stop"] = np.array([r + [-1] * (NEW - len(r)) for r in rows], dtype=np.int64)
        os.makedirs(OUT_REFS, exist_ok=True)
        if name == "llama-gqa-tiny" and mode == "reparam":
            save_adapter(model, name, res.loss.item(), input_ids, attention_mask, labels)
        path = os.path.join(OUT_REFS, f"{name}-{mode}.safetensors")
        save_file(out, path)  # no metadata: reruns are byte-identical
        print(f"  {os.path.relpath(path, HERE)}: loss {out['loss']:.6f}, |grad| "
              f"{np.sqrt(sum((out['grad.' + n] ** 2).sum() for n in init)):.4g}, greedy {greedy}, "
              f"no prefix {bare}")


ONLY = None  # --only: the names of the fixtures to make (None: all)


def selected(name):
    return ONLY is None or name in ONLY


def main():
    global ONLY
    args = sys.argv[1:]
    if len(args) >= 2 and args[-2] == "--only":
        ONLY = {n for n in args[-1].split(",") if n}
        unknown = ONLY - set(FAMILIES) - {n for n, _ in NOPAST} - {n for n, _, _ in DYNAMO}
        if not ONLY or unknown:
            sys.exit(f"--only: {sorted(unknown) or 'no names'}: not fixtures of {FIXTURES}")
        args = args[:-2]
    if args == ["--export"]:
        return export_main()
    if args not in ([], ["--skip-hf"], ["--refs-only"]):
        sys.exit("usage: make_decoder_fixtures.py [--skip-hf | --refs-only] [--only NAME,...]")
    import peft
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"[reference venv] torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    if args == []:
        make_hf()
    if args != ["--refs-only"]:
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        only = ["--only", ",".join(sorted(ONLY))] if ONLY is not None else []
        subprocess.run([OPTIMUM_PYTHON, os.path.abspath(__file__), "--export", *only], check=True, env=env)
        for name, hf_name, with_past in DYNAMO:
            if selected(name):
                export_dynamo(name, hf_name, with_past)
    for name in FAMILIES:
        if selected(name):
            print(name)
            run_family(name)
    print("done")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
