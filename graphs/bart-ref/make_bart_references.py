#!/usr/bin/env python3
"""Reference values for prefix-tuning BART, in both of pfx's modes, on the two tiny BART fixtures and on tiny Marian,
Pegasus, mBART, BlenderBot, BlenderBot-small and M2M100 exported in BART's layout, and on tiny T5 (v1.0 and v1.1)
and mT5.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/bart-ref/make_bart_references.py [--weights f16] [FIXTURE ...]

(FIXTUREs given: those alone, each still seeded by its place in FIXTURES; none: all.)

Reads  graphs/bart-enc-deep/hf/ and graphs/bart-dec-deep/hf/ (written by graphs/make_fixtures.py),
graphs/marian-tiny/hf/, graphs/pegasus-tiny/hf/, graphs/mbart-tiny/hf/, graphs/blenderbot-tiny/hf/ and
graphs/blenderbot-small-tiny/hf/, graphs/m2m100-tiny/hf/ (graphs/make_seq2seq_fixtures.py) and graphs/t5-tiny/hf/,
graphs/t5v11-tiny/hf/, graphs/mt5-tiny/hf/ (graphs/make_t5_fixtures.py), all loaded through
AutoModelForSeq2SeqLM. FIXTURES lists them; new fixtures go at its end (each file's noise seed depends on the
fixture's index).
Writes graphs/bart-ref/<fixture>-<mode>-<param>.safetensors, mode in {peft, paper}, param in {reparam, noreparam}.
With --weights f16: <fixture>-<mode>-reparam-f16.safetensors, the same on the model whose weights of rank >= 2
(parameters and buffers) are rounded to float16 and used in float32, which `pfxc compile --weights f16` compiles.
What each file holds, and what the script found out about PEFT, is in graphs/bart-ref/README.md.

- `peft`: PEFT's own `PeftModelForSeq2SeqLM` (`PrefixTuningConfig`, task SEQ_2_SEQ_LM). The script also rebuilds
  PEFT's forward twice without PEFT (its cache built by hand; and the attention written out below with the prefix
  on the decoder's self-attention only and the decoder positions shifted by P), which pins down the quirks pfx
  reproduces.
- `paper`: the reference code's design (Li & Liang): three generators (encoder self-attention, decoder
  self-attention, cross-attention); each attention's prefix keys/values are concatenated in front of its own, the
  additive mask gets P zero columns in front; positions are not shifted. The attention is written out below
  (`prefixed_attention`) and checked against a float64 run of the same code and against finite differences.

mbart-tiny's batch is framed as mBART's tokenizer frames it (`X </s> en_XX` sources, `Y </s> tgt_lang` labels with
tgt_lang ro_RO, de_DE, ro_RO; no <s>) and its decoder inputs are mBART's own `shift_tokens_right(labels, pad)` (the
row's last non-pad token, the target language code, moved to the front; `decoder_input_ids` in the files), not BART's
`[decoder_start, labels[:-1]]`.

T5 (t5-tiny, t5v11-tiny; mt5-tiny: model_type "mt5", T5 v1.1's architecture under mT5's classes, `is_t5`): no
absolute positions but a relative position bias, computed from a table [buckets, heads] in each stack's block 0 and
shared by its layers (none in cross-attention), and unscaled scores.
Its batch is framed as T5's tokenizer frames it (`X </s>` sources, no bos, pad 0), its decoder inputs are T5's
`_shift_right(labels)` (= BART's shift behind decoder_start = pad 0). `peft`: PEFT puts the prefix into the decoder's
self-attention only, and its cache of length P numbers the decoder's queries P..P+T-1 over keys 0..P+T-1, so the
prefix keys get the bias table[bucket(c - P - t)] (prefix key c, query t) and the real x real block is unchanged;
rebuilt by hand (`t5_prefixed_attention`, an independent bucket function). `paper`: the prefix columns of all three
attentions get no position bias (0) and are visible to every query; the real x real bias is unchanged.

CPU, float32, eval mode (dropout off), eager attention, seeded: reruns give byte-identical files.
"""
import copy
import os
import sys

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from safetensors.numpy import save_file
from transformers import AutoModelForSeq2SeqLM, BartForConditionalGeneration, DynamicCache, EncoderDecoderCache
from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

HERE = os.path.dirname(os.path.abspath(__file__))
GRAPHS = os.path.join(HERE, "..")
# New fixtures go at the end: the noise seeds depend on the index (the existing files must not change).
FIXTURES = ("bart-enc-deep", "bart-dec-deep", "marian-tiny", "pegasus-tiny", "mbart-tiny", "blenderbot-tiny",
            "blenderbot-small-tiny", "m2m100-tiny", "t5-tiny", "t5v11-tiny", "mt5-tiny")
# Marian, Pegasus, mBART, BlenderBot and BlenderBot-small in BART's layout (graphs/make_seq2seq_fixtures.py): loaded
# through AutoModelForSeq2SeqLM.
AUTO_FIXTURES = ("marian-tiny", "pegasus-tiny", "mbart-tiny", "blenderbot-tiny", "blenderbot-small-tiny",
                 "m2m100-tiny", "t5-tiny", "t5v11-tiny", "mt5-tiny")
# T5 and mT5 (graphs/make_t5_fixtures.py): relative position bias, no absolute positions (t5_prefixed_attention below).
T5_FIXTURES = ("t5-tiny", "t5v11-tiny", "mt5-tiny")
T5_MODEL_TYPES = ("t5", "mt5")  # mT5: T5 v1.1's modules under other class names (MT5Attention, MT5LayerNorm, ...)
# mbart-tiny's language codes (graphs/tokenizers/mbart-style/'s ids; 70..94 are the 25 codes, 95 <mask>): sources end
# `</s> en_XX`; labels `</s> ro_RO` (89 = its decoder_start_token_id, as mbart-large-en-ro's), row 1's `</s> de_DE` (72,
# not the config's start: a multilingual batch, where only mBART's own shift gives HF's decoder inputs).
MBART_SRC_LANG, MBART_TGT_LANGS, MBART_FIRST_CODE = 73, (89, 72, 89), 70

# ---- fixed setup -------------------------------------------------------------------------------------------
SEED = 20261127
P = 4  # num_virtual_tokens
B = 3  # batch
S = 7  # source length
T = 6  # target length
M = 16  # reparametrization width (PEFT: encoder_hidden_size)
NOISE_STD = 0.1  # seeded noise added to every trainable tensor after its initialization
LABEL_SMOOTHING = 0.1  # the `ls.*` keys
LR = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.01
STEPS = 3
TRAIN_RUNS = (("train", 1.0), ("clip", 1e-3))  # (key prefix, MAX_NORM)
FD_H = 1e-6  # central finite-difference step (float64)
FD_PER_TENSOR = 6  # coordinates checked per trainable tensor

PARAMS = {"reparam": M, "noreparam": None}


def is_t5(cfg):
    """T5 or mT5 (same modules, same treatment here)."""
    return cfg.model_type in T5_MODEL_TYPES


def make_batch(cfg):
    """Source with padding (right-padded rows 1 and 2), labels with -100 (trailing, and one inside row 0). Sources are
    `<s> words </s>` (BART's framing), or `words </s>` as T5's tokenizer frames them (no bos; pad 0, words from 3:
    0 pad, 1 eos, 2 unk)."""
    if cfg.model_type == "mbart":
        return make_mbart_batch(cfg)
    head = [] if is_t5(cfg) else [cfg.bos_token_id]
    g = torch.Generator().manual_seed(SEED)
    r = lambda *shape: torch.randint(3, cfg.vocab_size, shape, generator=g, dtype=torch.int64)
    input_ids = torch.full((B, S), cfg.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(B, S, dtype=torch.int64)
    for b, n in enumerate((S, S - 2, S - 4)):  # real tokens per row: (bos), words, eos
        input_ids[b, : len(head)] = torch.tensor(head, dtype=torch.int64)
        input_ids[b, len(head) : n - 1] = r(n - 1 - len(head))
        input_ids[b, n - 1] = cfg.eos_token_id
        attention_mask[b, :n] = 1
    labels = torch.full((B, T), -100, dtype=torch.int64)
    for b, n in enumerate((T, T - 2, T - 3)):
        labels[b, : n - 1] = r(n - 1)
        labels[b, n - 1] = cfg.eos_token_id
    labels[0, 2] = -100  # an ignored target inside a row: its decoder input becomes pad
    return input_ids, attention_mask, labels


def make_mbart_batch(cfg):
    """make_batch's rows as mBART's tokenizer frames them: source `words </s> en_XX` (no <s>; 7, 5, 3 real tokens,
    right-padded with pad), labels `words </s> tgt_lang` (6, 4, 3 real tokens, then -100; one -100 inside row 0),
    tgt_lang ro_RO, de_DE, ro_RO. Words are ids 3..69 (no language code, no <mask>)."""
    assert cfg.decoder_start_token_id == MBART_TGT_LANGS[0], cfg.decoder_start_token_id
    g = torch.Generator().manual_seed(SEED)
    r = lambda *shape: torch.randint(3, MBART_FIRST_CODE, shape, generator=g, dtype=torch.int64)
    input_ids = torch.full((B, S), cfg.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(B, S, dtype=torch.int64)
    for b, n in enumerate((S, S - 2, S - 4)):
        input_ids[b, : n - 2] = r(n - 2)
        input_ids[b, n - 2] = cfg.eos_token_id
        input_ids[b, n - 1] = MBART_SRC_LANG
        attention_mask[b, :n] = 1
    labels = torch.full((B, T), -100, dtype=torch.int64)
    for b, n in enumerate((T, T - 2, T - 3)):
        labels[b, : n - 2] = r(n - 2)
        labels[b, n - 2] = cfg.eos_token_id
        labels[b, n - 1] = MBART_TGT_LANGS[b]
    labels[0, 2] = -100  # an ignored target inside a row: HF's mBART shift then takes the wrong token as start (README)
    return input_ids, attention_mask, labels


def layers(cfg):
    """(encoder layers, decoder layers): BART's config names, or T5's."""
    if is_t5(cfg):
        return cfg.num_layers, cfg.num_decoder_layers
    return cfg.encoder_layers, cfg.decoder_layers


def heads(cfg):
    """(encoder heads, decoder heads)."""
    if is_t5(cfg):
        assert cfg.num_heads * cfg.d_kv == cfg.d_model, "PEFT's D is d_model / heads"
        return cfg.num_heads, cfg.num_heads
    return cfg.encoder_attention_heads, cfg.decoder_attention_heads


def activation(cfg):
    return cfg.feed_forward_proj if is_t5(cfg) else cfg.activation_function


def decoder_inputs(cfg, labels):
    """What HF's model feeds its decoder for these labels (its prepare_decoder_input_ids_from_labels): BART's shift
    behind decoder_start_token_id, or mBART's, which ignores decoder_start_token_id and moves each row's last non-pad
    token to the front: index (number of labels that are neither -100 nor pad) - 1, -100 -> pad."""
    if cfg.model_type == "mbart":
        from transformers.models.mbart.modeling_mbart import shift_tokens_right as mbart_shift

        return mbart_shift(labels, cfg.pad_token_id)
    return shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)


def shift_tokens_right(labels, pad, start):
    out = labels.new_zeros(labels.shape)
    out[:, 1:] = labels[:, :-1].clone()
    out[:, 0] = start
    out.masked_fill_(out == -100, pad)
    return out


# "f16": load_base rounds every tensor of rank >= 2 to float16 (set by main from --weights; other scripts import
# this module and keep f32).
WEIGHTS = "f32"


def load_base(fixture, dtype=torch.float32):
    cls = AutoModelForSeq2SeqLM if fixture in AUTO_FIXTURES else BartForConditionalGeneration
    model = cls.from_pretrained(os.path.join(GRAPHS, fixture, "hf"), attn_implementation="eager", dtype=dtype)
    if WEIGHTS == "f16":
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.dim() >= 2:
                    t.copy_(t.half().to(t.dtype))
    model.eval()
    return model


def np32(t):
    return np.array(t.detach().cpu().to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def scalar32(x):
    return np.array(float(x), dtype=np.float32).reshape(())


def smoothed_ce(logits, labels, eps):
    """torch's cross_entropy with label smoothing (= HF Trainer's LabelSmoother): mean over labels != -100."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=eps)


# ---- the prefix generator (PEFT's PrefixEncoder layout) and the prefixed attention ---------------------------


class Generator(torch.nn.Module):
    """Embedding(P, d) -> Linear(d, M) -> Tanh -> Linear(M, 2·L·d), or Embedding(P, 2·L·d) without M."""

    def __init__(self, d, layers, heads, mid):
        super().__init__()
        self.layers, self.heads, self.head_dim = layers, heads, d // heads
        width = 2 * layers * d
        if mid is None:
            self.embedding = torch.nn.Embedding(P, width)
        else:
            self.embedding = torch.nn.Embedding(P, d)
            self.transform = torch.nn.Sequential(torch.nn.Linear(d, mid), torch.nn.Tanh(), torch.nn.Linear(mid, width))

    def forward(self):
        flat = self.embedding.weight
        if hasattr(self, "transform"):
            flat = self.transform(flat)
        # [P, 2L·d] -> [2L, H, P, D]: layer l's key is row 2l, its value row 2l+1.
        return flat.view(P, 2 * self.layers, self.heads, self.head_dim).permute(1, 2, 0, 3)


def prefixed_attention(attn, prefix):
    """A BartAttention forward with prefix keys/values in front of its own (no projection, no positions) and
    P zero columns in front of the additive mask: every query sees every prefix slot; padding and causality
    still apply to the real keys. `prefix()` returns ([H, P, D] keys, [H, P, D] values)."""

    def forward(hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        h, d = attn.num_heads, attn.head_dim
        src = hidden_states if key_value_states is None else key_value_states
        s = src.shape[1]
        q = attn.q_proj(hidden_states).view(b, t, h, d).transpose(1, 2)
        k = attn.k_proj(src).view(b, s, h, d).transpose(1, 2)
        v = attn.v_proj(src).view(b, s, h, d).transpose(1, 2)
        pk, pv = prefix()
        k = torch.cat([pk.unsqueeze(0).expand(b, h, P, d), k], dim=2)
        v = torch.cat([pv.unsqueeze(0).expand(b, h, P, d), v], dim=2)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        if attention_mask is not None:
            assert attention_mask.dtype.is_floating_point and attention_mask.shape[-1] == s, attention_mask.shape
            mask = attention_mask.expand(b, 1, t, s)
            mask = torch.cat([torch.zeros(b, 1, t, P, dtype=mask.dtype), mask], dim=-1)
            scores = scores + mask
        else:
            # the decoder's self-attention always gets a causal mask in eager mode
            assert key_value_states is not None or not attn.is_decoder, "decoder self-attention without a mask"
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h * d)
        return attn.out_proj(out), probs

    return forward


def layer_kv(gen, l):
    return lambda: (lambda kv: (kv[2 * l], kv[2 * l + 1]))(gen())


def patch_paper(model, gens):
    for i, lay in enumerate(model.model.encoder.layers):
        lay.self_attn.forward = prefixed_attention(lay.self_attn, layer_kv(gens["enc"], i))
    for i, lay in enumerate(model.model.decoder.layers):
        lay.self_attn.forward = prefixed_attention(lay.self_attn, layer_kv(gens["dec"], i))
        lay.encoder_attn.forward = prefixed_attention(lay.encoder_attn, layer_kv(gens["cross"], i))


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's _relative_position_bucket, written independently (numpy, float64 log; exact for these sizes: asserted
    against HF's own in t5_bias)."""
    rel = np.asarray(rel, dtype=np.int64)
    ret = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    large = max_exact + (np.log(np.maximum(n, 1) / max_exact) / np.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(n < max_exact, n, large)


def t5_bias(stack, q_pos, k_pos):
    """[1, H, len(q_pos), len(k_pos)]: the stack's table (block 0's relative_attention_bias) at
    bucket(k - q), bidirectional in the encoder."""
    attn = stack.block[0].layer[0].SelfAttention
    cfg = stack.config
    rel = np.asarray(k_pos)[None, :] - np.asarray(q_pos)[:, None]
    bi = not stack.is_decoder
    nb, md = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    idx = t5_bucket(rel, bi, nb, md)
    hf = attn._relative_position_bucket(torch.from_numpy(rel), bidirectional=bi, num_buckets=nb, max_distance=md)
    assert np.array_equal(hf.numpy(), idx), (rel, hf, idx)
    return attn.relative_attention_bias.weight[torch.from_numpy(idx)].permute(2, 0, 1).unsqueeze(0)


def t5_prefixed_attention(attn, prefix, bias):
    """A T5Attention forward with prefix keys/values in front of its own (no projection), scores unscaled (T5),
    `bias(t, s, p)` ([1, H, t, p + s]: the position bias over the p prefix keys and the s real keys) added, and p zero
    columns in front of the additive mask (every query sees every prefix slot; padding and causality apply to the real
    keys). Ignores the position_bias it is passed (block 0's, shared): it builds its own. `prefix()` returns
    ([H, p, D] keys, [H, p, D] values)."""

    def forward(hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        assert cache is None or cache.get_seq_length() == 0  # no past: queries at 0..t-1 (peft: bias() shifts)
        b, t, _ = hidden_states.shape
        h, d = attn.n_heads, attn.key_value_proj_dim
        src = hidden_states if key_value_states is None else key_value_states
        s = src.shape[1]
        q = attn.q(hidden_states).view(b, t, h, d).transpose(1, 2)
        k = attn.k(src).view(b, s, h, d).transpose(1, 2)
        v = attn.v(src).view(b, s, h, d).transpose(1, 2)
        pk, pv = prefix()
        p = pk.shape[1]
        k = torch.cat([pk.unsqueeze(0).expand(b, h, p, d), k], dim=2)
        v = torch.cat([pv.unsqueeze(0).expand(b, h, p, d), v], dim=2)
        assert attn.scaling == 1.0
        pb = bias(t, s, p)
        assert pb.shape == (1, h, t, p + s), pb.shape
        scores = torch.matmul(q, k.transpose(2, 3)) + pb
        if mask is not None:
            assert mask.dtype.is_floating_point and mask.shape[-1] == s, mask.shape
            mask = mask.expand(b, 1, t, s)
            scores = scores + torch.cat([torch.zeros(b, 1, t, p, dtype=mask.dtype), mask], dim=-1)
        else:
            assert key_value_states is not None or not attn.is_decoder, "decoder self-attention without a mask"
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h * d)
        return attn.o(out), pb, probs

    return forward


def t5_paper_bias(stack, cross=False):
    """Paper mode: 0 on the prefix columns, the real x real bias unchanged (none in cross-attention)."""

    def bias(t, s, p):
        h = stack.config.num_heads
        dtype = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.dtype
        real = torch.zeros(1, h, t, s, dtype=dtype) if cross else t5_bias(stack, np.arange(t), np.arange(s))
        return torch.cat([torch.zeros(1, h, t, p, dtype=dtype), real], dim=-1)

    return bias


def t5_peft_bias(stack):
    """PEFT's: a cache of length p numbers the queries p..p+t-1 and the keys (prefix, then real) 0..p+t-1."""
    return lambda t, s, p: t5_bias(stack, np.arange(p, p + t), np.arange(p + s))


def patch_paper_t5(model, gens):
    for i, blk in enumerate(model.encoder.block):
        a = blk.layer[0].SelfAttention
        a.forward = t5_prefixed_attention(a, layer_kv(gens["enc"], i), t5_paper_bias(model.encoder))
    for i, blk in enumerate(model.decoder.block):
        a = blk.layer[0].SelfAttention
        a.forward = t5_prefixed_attention(a, layer_kv(gens["dec"], i), t5_paper_bias(model.decoder))
        a = blk.layer[1].EncDecAttention
        a.forward = t5_prefixed_attention(a, layer_kv(gens["cross"], i), t5_paper_bias(model.decoder, cross=True))


def t5_norms_in_own_dtype(model):
    """T5LayerNorm (and mT5's copy) computes its variance in float32 whatever the model's dtype: in the float64 run
    (the finite differences need it) compute it in float64."""
    from transformers.models.mt5.modeling_mt5 import MT5LayerNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    def norm(mod):
        def forward(hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return mod.weight * (hidden_states * torch.rsqrt(variance + mod.variance_epsilon))

        return forward

    for m in model.modules():
        if isinstance(m, (T5LayerNorm, MT5LayerNorm)):
            m.forward = norm(m)


def shift_decoder_positions(model, by):
    """Numbers the decoder's tokens from `by` (what a cache of length `by` does in HF)."""

    def hook(_mod, args, kwargs):
        kwargs = dict(kwargs)
        if kwargs.get("position_ids") is not None:  # BART
            kwargs["position_ids"] = kwargs["position_ids"] + by
        elif isinstance(_mod, M2M100SinusoidalPositionalEmbedding):
            # M2M100: embed_positions(input_ids, inputs_embeds, cache_length) numbers real tokens
            # (cumsum(ids != pad) + cache_length) * (ids != pad) + pad: pads keep the pad row, whatever the shift.
            args = (args[0], args[1], args[2] + by) + tuple(args[3:])
        else:  # Marian, Pegasus: embed_positions(shape, cache_length, position_ids=None)
            args = (args[0], args[1] + by) + tuple(args[2:])
        return args, kwargs

    return model.model.decoder.embed_positions.register_forward_pre_hook(hook, with_kwargs=True)


# ---- the two modes: a forward and the named trainable tensors ------------------------------------------------


class PeftRunner:
    """PEFT itself. Its table has L = max(encoder, decoder layers) layers: PEFT takes num_layers from
    `num_hidden_layers` (= encoder_layers for BART) and crashes when the decoder is deeper, so the deeper-decoder
    fixture passes num_layers explicitly (what a user must do)."""

    def __init__(self, fixture, mid, facts):
        base = load_base(fixture)
        cfg = base.config
        n_enc, n_dec = layers(cfg)
        self.L = max(n_enc, n_dec)
        kw = dict(prefix_projection=True, encoder_hidden_size=mid) if mid is not None else dict(prefix_projection=False)
        default = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P, **kw)
        if n_dec > n_enc:
            # PEFT's default on a deeper decoder: the table is too short for the decoder's layers.
            torch.manual_seed(SEED)
            m = get_peft_model(load_base(fixture), copy.deepcopy(default))
            assert m.active_peft_config.num_layers == n_enc
            try:
                m(**self.inputs_of(cfg))
                raise AssertionError("PEFT's default config was expected to fail on a deeper decoder")
            except IndexError as e:
                facts["PEFT default (num_layers = encoder_layers) on this fixture"] = f"IndexError: {e}"
        peft_cfg = PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P, num_layers=self.L, **kw)
        torch.manual_seed(SEED)  # PEFT's init (nn.Embedding / nn.Linear defaults) draws from the global RNG
        self.model = get_peft_model(base, peft_cfg)
        self.model.eval()
        pc = self.model.active_peft_config
        assert pc.num_layers == self.L and pc.num_transformer_submodules == 2, pc
        self.base = self.model.get_base_model()
        enc = self.model.prompt_encoder[self.model.active_adapter]
        self.named = list(enc.named_parameters())
        assert [n for n, _ in self.named] == list(enc.state_dict().keys())
        assert sum(p.numel() for p in self.model.parameters() if p.requires_grad) == sum(
            p.numel() for _, p in self.named
        )

    @staticmethod
    def inputs_of(cfg):
        ids, mask, labels = make_batch(cfg)
        return dict(input_ids=ids, attention_mask=mask, labels=labels)

    def forward(self, ids, mask, labels):
        out = self.model(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out.logits


class PaperRunner:
    def __init__(self, fixture, mid, dtype=torch.float32, gens=None):
        self.model = load_base(fixture, dtype)
        cfg = self.model.config
        if gens is None:
            (n_enc, n_dec), (h_enc, h_dec) = layers(cfg), heads(cfg)
            torch.manual_seed(SEED)  # the same init rule as PEFT's PrefixEncoder, one generator after another
            gens = torch.nn.ModuleDict({
                "enc": Generator(cfg.d_model, n_enc, h_enc, mid),
                "dec": Generator(cfg.d_model, n_dec, h_dec, mid),
                "cross": Generator(cfg.d_model, n_dec, h_dec, mid),
            })
        self.gens = gens.to(dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if is_t5(cfg):
            if dtype == torch.float64:
                t5_norms_in_own_dtype(self.model)
            patch_paper_t5(self.model, self.gens)
        else:
            patch_paper(self.model, self.gens)
        self.named = [(f"{site}.{n}", p) for site, g in self.gens.items() for n, p in g.named_parameters()]

    def forward(self, ids, mask, labels):
        out = self.model(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out.logits


def set_params(named, values):
    with torch.no_grad():
        for n, p in named:
            p.copy_(values[n])


# ---- checks particular to each mode --------------------------------------------------------------------------


def check_peft_semantics(runner, fixture, init, ids, mask, labels, loss, logits, facts):
    """PEFT's forward rebuilt twice without PEFT."""
    base, L = runner.base, runner.L
    cfg = base.config
    with torch.no_grad():
        # The table PEFT builds: [P, 2L·d] -> [2L, H, P, D] (as for GPT-2), then duplicated ([4L, ...]) and split
        # in fours: decoder layer i gets self-attention rows 4i, 4i+1 and "cross" rows 4i+2, 4i+3 of the
        # duplicated table, i.e. rows (4i mod 2L, 4i+1 mod 2L) of the original for its self-attention. The
        # cross rows are thrown away (get_prompt replaces the cross-attention cache by an empty one).
        cache = runner.model.get_prompt(B)
        assert isinstance(cache, EncoderDecoderCache), type(cache)
        assert len(cache.cross_attention_cache.layers) == 0
        assert len(cache.self_attention_cache.layers) == L
        flat = runner.model.prompt_encoder[runner.model.active_adapter](torch.arange(P).unsqueeze(0))[0]
        H = heads(cfg)[1]
        D = cfg.d_model // H
        table = flat.view(P, 2 * L, H, D).permute(1, 2, 0, 3)  # [2L, H, P, D]
        rows = []
        for i in range(L):
            rk, rv = (4 * i) % (2 * L), (4 * i + 1) % (2 * L)
            rows.append((rk, rv))
            k, v = cache.self_attention_cache.layers[i].keys, cache.self_attention_cache.layers[i].values
            assert torch.equal(k, table[rk].unsqueeze(0).expand(B, H, P, D)), i
            assert torch.equal(v, table[rv].unsqueeze(0).expand(B, H, P, D)), i
        facts["decoder layer i reads rows"] = ", ".join(f"{i}: {rows[i]}" for i in range(layers(cfg)[1]))

        # (1) the same cache built by hand, passed to the bare model.
        own = EncoderDecoderCache(
            DynamicCache([(table[rk].unsqueeze(0).expand(B, H, P, D).clone(),
                           table[rv].unsqueeze(0).expand(B, H, P, D).clone()) for rk, rv in rows]),
            DynamicCache(),
        )
        dec_ids = decoder_inputs(cfg, labels)
        if is_t5(cfg):
            assert torch.equal(dec_ids, base._shift_right(labels))
        l1 = base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, past_key_values=own).logits
        torch.testing.assert_close(l1, logits, rtol=0, atol=1e-5)
        if is_t5(cfg):
            return check_peft_t5(runner, fixture, rows, table, ids, mask, labels, dec_ids, loss, logits, facts)

        # (2) the attention written out: prefix on the decoder's self-attention only (layer i: rows above),
        # encoder and cross-attention untouched, decoder positions numbered from P.
        plain = load_base(fixture)
        for i, lay in enumerate(plain.model.decoder.layers):
            rk, rv = rows[i]
            lay.self_attn.forward = prefixed_attention(lay.self_attn, lambda rk=rk, rv=rv: (table[rk], table[rv]))
        hook = shift_decoder_positions(plain, P)
        l2 = plain(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        hook.remove()
        torch.testing.assert_close(l2, logits, rtol=0, atol=1e-5)
        ce = F.cross_entropy(l2.reshape(-1, l2.shape[-1]), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(ce, loss.detach(), rtol=0, atol=1e-5)

        # The prefix matters; so does the position shift on its own.
        bare = load_base(fixture)
        lb = bare(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        hook = shift_decoder_positions(bare, P)
        lp = bare(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        hook.remove()
        facts["max |logits - logits without prefix|"] = (
            f"{(lb - logits).abs().max().item():.4f} (positions shifted, no K/V: {(lp - logits).abs().max().item():.4f})"
        )
        assert (lb - logits).abs().max().item() > 1e-2 and (lp - logits).abs().max().item() > 1e-2


def check_peft_t5(runner, fixture, rows, table, ids, mask, labels, dec_ids, loss, logits, facts):
    """(2) for T5: the decoder's self-attention written out (t5_prefixed_attention) with the prefix in front and
    PEFT's bias (queries at P..P+T-1, keys at 0..P+T-1: the prefix columns table[bucket(c - P - t)], the real x real
    block as without a prefix); encoder and cross-attention untouched; no positions to shift."""
    plain = load_base(fixture)
    bias = t5_peft_bias(plain.decoder)
    rel = np.arange(P)[None, :] - np.arange(P, P + T)[:, None]
    cfg = plain.config
    facts["prefix columns' buckets (rows: query t)"] = t5_bucket(
        rel, False, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance).tolist()
    real = t5_bias(plain.decoder, np.arange(T), np.arange(T))
    assert torch.equal(bias(T, T, P)[..., P:], real)  # shift invariance: the real x real block is unchanged

    def written_out(bias):
        for i, blk in enumerate(plain.decoder.block):
            rk, rv = rows[i]
            a = blk.layer[0].SelfAttention
            a.forward = t5_prefixed_attention(a, lambda rk=rk, rv=rv: (table[rk], table[rv]), bias)
        return plain(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits

    l2 = written_out(bias)
    d2 = (l2 - logits).abs().max().item()
    torch.testing.assert_close(l2, logits, rtol=0, atol=1e-5)
    ce = F.cross_entropy(l2.reshape(-1, l2.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce, loss.detach(), rtol=0, atol=1e-5)
    facts["hand rebuild vs PEFT"] = f"max |logits diff| {d2:.2g}, |loss diff| {abs(ce.item() - loss.item()):.2g}"
    # The prefix matters; so does its bias: zero bias on the prefix columns (pfx's paper-mode columns) is wrong here.
    lz = written_out(lambda t, s, p: torch.cat([torch.zeros(1, real.shape[1], t, p), bias(t, s, p)[..., p:]], -1))
    lb = load_base(fixture)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
    facts["max |logits - logits without prefix|"] = (
        f"{(lb - logits).abs().max().item():.4f} (prefix columns with zero bias: {(lz - logits).abs().max().item():.4f})"
    )
    assert (lb - logits).abs().max().item() > 1e-2 and (lz - logits).abs().max().item() > 1e-3


def check_paper_numerics(runner, fixture, mid, init, ids, mask, labels, loss, grads, facts):
    """The float32 run against the same code in float64 (loss and gradients), and float64 autograd against
    central finite differences."""
    gens64 = copy.deepcopy(runner.gens)
    r64 = PaperRunner(fixture, mid, torch.float64, gens64)
    set_params(r64.named, {n: v.double() for n, v in init.items()})
    l64, logits64 = r64.forward(ids, mask, labels)
    for _, p in r64.named:
        p.grad = None
    l64.backward()
    dl = abs(l64.item() - loss.item())
    assert dl < 1e-5, dl
    worst = 0.0
    for n, p in r64.named:
        e = ((grads[n].double() - p.grad).norm() / p.grad.norm()).item()
        worst = max(worst, e)
    assert worst < 1e-4, worst
    facts["float32 vs float64"] = f"|dloss| {dl:.1e}, worst gradient norm-rel {worst:.1e}"
    if is_t5(runner.model.config):
        # The written-out attention with no prefix (p = 0) is HF's own: the real x real bias and masks are unchanged.
        with torch.no_grad():
            none = load_base(fixture)
            empty = {site: (lambda g=g: torch.zeros(2 * g.layers, g.heads, 0, g.head_dim))
                     for site, g in runner.gens.items()}
            lb = none(input_ids=ids, attention_mask=mask, labels=labels).logits
            patch_paper_t5(none, empty)
            l0 = none(input_ids=ids, attention_mask=mask, labels=labels).logits
        d0 = (l0 - lb).abs().max().item()
        assert d0 < 1e-5, d0
        facts["written-out attention without prefix vs HF"] = f"max |logits diff| {d0:.2g}"
    g = torch.Generator().manual_seed(SEED + 7)
    worst_fd = 0.0
    checked = 0
    with torch.no_grad():
        for n, p in r64.named:
            flat = p.view(-1)
            for idx in torch.randperm(flat.numel(), generator=g)[:FD_PER_TENSOR].tolist():
                old = flat[idx].item()
                flat[idx] = old + FD_H
                lp = r64.forward(ids, mask, labels)[0].item()
                flat[idx] = old - FD_H
                lm = r64.forward(ids, mask, labels)[0].item()
                flat[idx] = old
                fd = (lp - lm) / (2 * FD_H)
                an = p.grad.view(-1)[idx].item()
                err = abs(fd - an) / max(abs(an), 1e-3)
                assert err < 1e-5, (n, idx, fd, an)
                worst_fd = max(worst_fd, err)
                checked += 1
    facts["finite differences (float64)"] = f"{checked} coordinates, worst rel err {worst_fd:.1e}"
    with torch.no_grad():
        bare = load_base(fixture)
        lb = bare(input_ids=ids, attention_mask=mask, labels=labels).logits
        _, lg = runner.forward(ids, mask, labels)
        diff = (lb - lg).abs().max().item()
        assert diff > 1e-2, diff
        facts["max |logits - logits without prefix|"] = f"{diff:.4f}"


# ---- one reference file ------------------------------------------------------------------------------------


def run(fixture, mode, param):
    facts = {}
    mid = PARAMS[param]
    runner = PeftRunner(fixture, mid, facts) if mode == "peft" else PaperRunner(fixture, mid)
    cfg = runner.model.config if mode == "paper" else runner.base.config
    ids, mask, labels = make_batch(cfg)
    named = runner.named
    g = torch.Generator().manual_seed(SEED + 1 + 2 * FIXTURES.index(fixture) + list(PARAMS).index(param))
    with torch.no_grad():
        for _, p in named:
            p.add_(torch.randn(p.shape, generator=g) * NOISE_STD)
    init = {n: p.detach().clone() for n, p in named}

    out = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "labels": labels.numpy()}
    dec_ids = decoder_inputs(cfg, labels)
    out["decoder_input_ids"] = dec_ids.numpy()
    for n in init:
        out[n] = np32(init[n])

    for _, p in named:
        p.grad = None
    loss, logits = runner.forward(ids, mask, labels)
    loss.backward()
    out["loss"] = scalar32(loss.item())
    out["logits"] = np32(logits)
    grads = {n: p.grad.detach().clone() for n, p in named}
    for n in grads:
        out["grad." + n] = np32(grads[n])
    # HF's loss is the plain mean cross-entropy over labels != -100, no shift.
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce, loss, rtol=0, atol=1e-6)
    if mode == "paper":  # the model derived `decoder_input_ids` from the labels itself (peft: check_peft_semantics)
        with torch.no_grad():
            explicit = runner.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids).logits
        torch.testing.assert_close(explicit, logits.detach(), rtol=0, atol=0)
    if cfg.model_type == "mbart":  # BART's shift would feed other tokens: the files tell the two apart
        bart_style = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        facts["decoder starts (mBART's shift)"] = dec_ids[:, 0].tolist()
        assert not torch.equal(bart_style, dec_ids)
    facts["targets counted"] = int((labels != -100).sum())

    # Label smoothing.
    for _, p in named:
        p.grad = None
    _, lg = runner.forward(ids, mask, labels)
    ls = smoothed_ce(lg, labels, LABEL_SMOOTHING)
    ls.backward()
    out["ls.loss"] = scalar32(ls.item())
    for n, p in named:
        out["ls.grad." + n] = np32(p.grad)

    if mode == "peft":
        check_peft_semantics(runner, fixture, init, ids, mask, labels, loss, logits, facts)
    else:
        check_paper_numerics(runner, fixture, mid, init, ids, mask, labels, loss, grads, facts)

    # Training: AdamW + clip_grad_norm_, same batch.
    summary = {"loss": loss.item(), "grad_norm": torch.sqrt(sum((gr ** 2).sum() for gr in grads.values())).item()}
    for prefix, max_norm in TRAIN_RUNS:
        set_params(named, init)
        params = [p for _, p in named]
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        losses, norms = [], []
        for k in range(1, STEPS + 1):
            opt.zero_grad(set_to_none=True)
            l_k = runner.forward(ids, mask, labels)[0]
            l_k.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if max_norm < 1.0:
                assert norm.item() > max_norm, (norm.item(), max_norm)
            opt.step()
            out[f"{prefix}.loss.{k}"] = scalar32(l_k.item())
            out[f"{prefix}.grad_norm.{k}"] = scalar32(norm.item())
            losses.append(l_k.item())
            norms.append(norm.item())
        assert abs(losses[0] - loss.item()) < 1e-6
        for n, p in named:
            st = opt.state[p]
            out[f"{prefix}.final.{n}"] = np32(p)
            out[f"{prefix}.final.adam.m.{n}"] = np32(st["exp_avg"])
            out[f"{prefix}.final.adam.v.{n}"] = np32(st["exp_avg_sq"])
        summary[prefix] = (losses, norms)
    set_params(named, init)
    for n in init:
        assert np.abs(out[f"train.final.{n}"] - out[n]).max() > 1e-3, n
        m_train = np.abs(out[f"train.final.adam.m.{n}"]).max()
        m_clip = np.abs(out[f"clip.final.adam.m.{n}"]).max()
        assert m_clip < 0.5 * m_train, (n, m_clip, m_train)

    for key, arr in out.items():
        assert arr.dtype in (np.float32, np.int64), (key, arr.dtype)
    path = os.path.join(HERE, f"{fixture}-{mode}-{param}" + ("-f16" if WEIGHTS == "f16" else "") + ".safetensors")
    save_file(out, path)  # no metadata: its order is random, reruns would differ byte-wise
    return path, out, summary, facts


def main():
    global WEIGHTS
    args = sys.argv[1:]
    f16 = args[:2] == ["--weights", "f16"]
    chosen = args[2:] if f16 else args
    if any(a not in FIXTURES for a in chosen):
        sys.exit(f"usage: make_bart_references.py [--weights f16] [FIXTURE ...] (FIXTUREs among {', '.join(FIXTURES)})")
    WEIGHTS = "f16" if f16 else "f32"
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}")
    for fixture in [f for f in FIXTURES if f in chosen or not chosen]:  # FIXTURES' order; the seeds follow it
        cfg = load_base(fixture).config
        ids, mask, labels = make_batch(cfg)
        print(f"\n#### {fixture}: encoder {layers(cfg)[0]} / decoder {layers(cfg)[1]} layers, {activation(cfg)}")
        print("input_ids\n", ids.numpy())
        print("attention_mask\n", mask.numpy())
        print("labels\n", labels.numpy())
        print("decoder_input_ids\n", decoder_inputs(cfg, labels).numpy())
        for mode in ("peft", "paper"):
            for param in PARAMS if WEIGHTS == "f32" else ("reparam",):
                path, out, summary, facts = run(fixture, mode, param)
                print(f"\n== {os.path.relpath(path, os.path.join(GRAPHS, '..'))}  {os.path.getsize(path)} bytes, "
                      f"{len(out)} tensors")
                print(f"  loss {summary['loss']:.8f}  grad norm {summary['grad_norm']:.8f}  "
                      f"ls.loss {float(out['ls.loss']):.8f}")
                for prefix, _ in TRAIN_RUNS:
                    losses, norms = summary[prefix]
                    print(f"  {prefix}: losses " + " ".join(f"{x:.8f}" for x in losses)
                          + " | grad norms " + " ".join(f"{x:.8f}" for x in norms))
                for k, v in facts.items():
                    print(f"  {k}: {v}")
                names = [k[len("grad."):] for k in out if k.startswith("grad.")]
                print("  trainable: " + ", ".join(f"{n} {list(out[n].shape)}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
