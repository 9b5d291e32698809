#!/usr/bin/env python3
"""Generation references (greedy and beam search) with a PEFT prefix on the tiny GPT-2.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/peft-generate/make_generate_references.py [--weights f16]

Reads  graphs/gpt2-tiny/hf/ and the prefix parameters in graphs/peft/gpt2-<mode>.safetensors.
Writes graphs/peft-generate/gpt2-reparam.safetensors and graphs/peft-generate/gpt2-noreparam.safetensors; with
--weights f16, gpt2-<mode>-f16.safetensors: the same on the model whose parameters of rank >= 2 are rounded to
float16 and used in float32 (what `pfxc compile --weights f16` compiles), from the same prefix parameters.
What each file holds, and what the script found, is in graphs/peft-generate/README.md.

Trap: with peft 0.21 + transformers 5.2x, `PeftModel.generate` silently drops the prefix (generate passes its own
empty cache as `cache=`, PEFT injects the prefix as the deprecated `past_key_values=`, the model keeps `cache`).
So the references are computed three independent ways, all asserted to agree:
  A. `base.generate(...)` with the prefix placed in generate's own cache: a DynamicCache pre-filled with the P
     prefix keys/values (one row per batch row x beam) and an attention mask with P leading ones;
  B. `PeftModel.generate(...)` with PEFT's `prepare_inputs_for_generation` wrapped so that the prefix PEFT builds
     is copied into generate's (empty) cache at prefill (PEFT's own mask and position handling otherwise);
  C. hand-written greedy and beam-search loops: one full forward per step over the whole sequence, with a fresh
     prefix cache as the past, positions and masks built by hand, no KV reuse.

Everything runs on the CPU in float32, eval mode, eager attention (sdpa is checked to give the same tokens).
"""
import functools
import os
import sys

import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import DynamicCache, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
HF_DIR = os.path.join(HERE, "..", "gpt2-tiny", "hf")
WEIGHTS = "f16" if sys.argv[1:] == ["--weights", "f16"] else "f32"
if sys.argv[1:] not in ([], ["--weights", "f16"]):
    sys.exit("usage: make_generate_references.py [--weights f16]")
PEFT_DIR = os.path.join(HERE, "..", "peft")

# ---- fixed setup -------------------------------------------------------------------------------------------
SEED = 20261225  # prompt ids: a seed (scanned from 20261204 on) where, in both modes and for every prompt, the prefix changes
# the greedy tokens both vs the base model and vs the base model with the prefix's positions but no K/V
P = 4  # num_virtual_tokens (as in graphs/peft/)
ENCODER_HIDDEN = 16  # reparam M (as in graphs/peft/)
N = 3  # prompts
TP = 6  # padded prompt length
LENGTHS = (6, 4, 2)  # real prompt lengths (left padding)
VOCAB_IDS = 95  # prompt ids drawn from [0, 95)
PAD = 95  # pad id = eos id = bos id of the tiny GPT-2
EOS = 95
NEW = 8  # new tokens, min and max
BEAMS = 3
ATTN = "eager"

MODES = {
    "reparam": dict(prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN),
    "noreparam": dict(prefix_projection=False),
}

# The exact generate() arguments (besides input_ids / attention_mask / cache). length_penalty and early_stopping
# are transformers' defaults (GenerationConfig: length_penalty=1.0, early_stopping=False; the tiny model's
# generation_config.json sets neither), passed explicitly so the call is self-describing. min_new_tokens = NEW
# makes MinNewTokensLengthLogitsProcessor set the eos logit to -inf at every one of the NEW steps, so no sequence
# or beam can end early; max_new_tokens = NEW stops all of them after exactly NEW tokens.
GREEDY_ARGS = dict(do_sample=False, num_beams=1, min_new_tokens=NEW, max_new_tokens=NEW, pad_token_id=PAD,
                   eos_token_id=EOS)
BEAM_ARGS = dict(do_sample=False, num_beams=BEAMS, num_return_sequences=1, min_new_tokens=NEW, max_new_tokens=NEW,
                 length_penalty=1.0, early_stopping=False, pad_token_id=PAD, eos_token_id=EOS,
                 output_scores=True, return_dict_in_generate=True)


# Repetition penalties and source n-gram bans, each added to GREEDY_ARGS and BEAM_ARGS (key suffix: setting).
# For a decoder-only model generate hands the prompt to the "encoder" processors: `_get_logits_processor(...,
# encoder_input_ids=inputs_tensor)` (transformers/generation/utils.py), inputs_tensor = the input_ids passed.
PENALTIES = (("reppen13", dict(repetition_penalty=1.3)),
             ("encreppen05", dict(encoder_repetition_penalty=0.5)),
             ("encnorepeat1", dict(encoder_no_repeat_ngram_size=1)),
             # Token bans and biases, on tokens the tiny models' outputs hold (37, 5 5, 90 90, 91; first tokens 55,
             # 34, 0): [95] is eos alone, which HF drops from bad_words_ids.
             ("bans", dict(bad_words_ids=[[37], [5, 5], [90, 90], [95]], suppress_tokens=[91],
                           begin_suppress_tokens=[55, 34, 0])),
             ("bias", dict(sequence_bias=[[[37], -5.0], [[90], -3.0], [[55, 55], 4.0], [[0, 0], -3.0]])))
# The first sampling step: repetition penalty, then the warpers generate appends when do_sample (temperature, top-k,
# top-p, min-p). min_new_tokens = max_new_tokens = 1: eos is -inf in that step too, and generation stops after it.
SAMPLE_ARGS = dict(GREEDY_ARGS, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05,
                   repetition_penalty=1.3, min_new_tokens=1, max_new_tokens=1, output_scores=True,
                   output_logits=True, return_dict_in_generate=True)
# The order _get_logits_processor gives (min_new_tokens also sets min_length = T + 1: two eos bans, same effect).
SAMPLE_CHAIN = ["RepetitionPenaltyLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
                "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]
SAMPLE_SEED = 0  # the draw is not stored (scores[0] does not depend on it); seeded, in a forked RNG, for hygiene
# The end-of-sequence length decay, eos allowed (no min_new_tokens): after 2 new tokens eos scores s grow to
# s + |s| (2^k - 1), k tokens past the start. Outputs hold pad (= eos, 95) after the end, as generate returns them.
DECAY = dict(exponential_decay_length_penalty=(2, 2.0))
FREE_GREEDY = {k: v for k, v in GREEDY_ARGS.items() if k != "min_new_tokens"}
FREE_BEAM = {k: v for k, v in BEAM_ARGS.items() if k != "min_new_tokens"}
# Renormalized scores (renormalize_logits: a log-softmax after every processor) under repetition penalty 1.3, whose
# penalized log-probabilities no longer sum to 1: beam search adds up other scores.
RENORM = dict(repetition_penalty=1.3, renormalize_logits=True)
# Beam sampling (do_sample with beams), whose draws no seed can match, pinned: top-k 1 becomes 2 per beam
# (min_tokens_to_keep = 1 + the one eos id), so 3 beams offer exactly the 6 candidates (2 · 3, HF's beams_to_keep)
# each step draws without replacement: all of them, whatever the seed (asserted over BEAM_SAMPLE_SEEDS). Beam search
# would keep a beam's 3rd best token; this cannot. Temperature scales every score alike (same ranking).
BEAM_SAMPLE_ARGS = dict(BEAM_ARGS, do_sample=True, top_k=1, temperature=0.7)
BEAM_SAMPLE_SEEDS = (0, 1, 2)
# Beam sampling's first processed scores (log-softmax, repetition penalty, eos ban, then the warpers keeping 2).
BEAM_SAMPLE_SCORE_ARGS = dict(BEAM_ARGS, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05,
                              repetition_penalty=1.3, min_new_tokens=1, max_new_tokens=1)


def check_penalty_processor(name, procs, ids):
    """What generate built for one PENALTIES setting: the prompt as the encoder input, no prompt_ignore_length."""
    names = [type(p).__name__ for p in procs]
    if name == "reppen13":
        (p,) = [p for p in procs if type(p).__name__ == "RepetitionPenaltyLogitsProcessor"]
        assert p.penalty == 1.3 and p.prompt_ignore_length is None, (p.penalty, p.prompt_ignore_length)
    elif name == "encreppen05":
        (p,) = [p for p in procs if type(p).__name__ == "EncoderRepetitionPenaltyLogitsProcessor"]
        assert p.penalty == 1 / 0.5 and torch.equal(p.encoder_input_ids, ids)  # HF stores 1 / penalty
    elif name == "encnorepeat1":
        (p,) = [p for p in procs if type(p).__name__ == "EncoderNoRepeatNGramLogitsProcessor"]
        assert p.ngram_size == 1 and p.batch_size == 1  # n-grams of the prompt (ids), one row
    elif name == "bans":
        # bad words before the eos ban; the suppressions after it (they only ban, so the order does not matter)
        assert names[names.index("NoBadWordsLogitsProcessor") + 1:] == [
            "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "SuppressTokensLogitsProcessor",
            "SuppressTokensAtBeginLogitsProcessor"], names
        (p,) = [p for p in procs if type(p).__name__ == "SuppressTokensAtBeginLogitsProcessor"]
        assert p.begin_index == ids.shape[1], p.begin_index  # the first new token
        return
    else:
        assert names[0] == "SequenceBiasLogitsProcessor", names  # biases come first, before any penalty
    assert names[-1] == "MinNewTokensLengthLogitsProcessor", names  # the penalty comes before the eos ban


class ProcessorProbe:
    """Records the LogitsProcessorList generate builds (`_get_logits_processor`), to assert what it holds."""

    def __init__(self, base):
        self.base, self.lists = base, []
        orig = base._get_logits_processor

        def wrapped(*a, **k):
            self.lists.append(orig(*a, **k))
            return self.lists[-1]
        base._get_logits_processor = wrapped

    def remove(self):
        del self.base._get_logits_processor  # back to the class method


def make_prompts():
    g = torch.Generator().manual_seed(SEED)
    prompts = torch.full((N, TP), PAD, dtype=torch.int64)
    mask = torch.zeros((N, TP), dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        prompts[i, TP - n:] = torch.randint(0, VOCAB_IDS, (n,), generator=g, dtype=torch.int64)
        mask[i, TP - n:] = 1
    return prompts, mask


def load_base(attn=ATTN):
    model = GPT2LMHeadModel.from_pretrained(HF_DIR, attn_implementation=attn, dtype=torch.float32)
    if WEIGHTS == "f16":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(p.half().float())
    model.eval()
    return model


def make_peft(mode, attn=ATTN):
    """A PeftModel whose PrefixEncoder holds the initial values stored in graphs/peft/gpt2-<mode>.safetensors."""
    stored = load_file(os.path.join(PEFT_DIR, f"gpt2-{mode}.safetensors"))
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, **MODES[mode])
    model = get_peft_model(load_base(attn), cfg)
    model.eval()
    enc = model.prompt_encoder[model.active_adapter]
    names = list(enc.state_dict().keys())
    with torch.no_grad():
        for n, p in enc.named_parameters():
            p.copy_(stored[n])
    # get_prompt must reproduce the prefix graphs/peft/ recorded (same layout, same values)
    with torch.no_grad():
        cache = model.get_prompt(batch_size=1)
    L = model.get_base_model().config.n_layer
    for l in range(L):
        torch.testing.assert_close(cache.layers[l].keys, stored[f"past.{l}.key"][:1], rtol=0, atol=1e-6)
        torch.testing.assert_close(cache.layers[l].values, stored[f"past.{l}.value"][:1], rtol=0, atol=1e-6)
    prefix = [(cache.layers[l].keys[0].detach().clone(), cache.layers[l].values[0].detach().clone())
              for l in range(L)]  # per layer [H, P, D]
    return model, prefix, names


def prefix_cache(prefix, rows):
    """A fresh DynamicCache holding the prefix for `rows` batch rows: per layer [rows, H, P, D]."""
    return DynamicCache([(k.unsqueeze(0).expand(rows, *k.shape).clone(), v.unsqueeze(0).expand(rows, *v.shape).clone())
                         for k, v in prefix])


# ---- A: base.generate with the prefix in generate's own cache -----------------------------------------------
class Recorder:
    """Records what each forward of the base model receives (position ids, mask, cache length, input ids)."""

    def __init__(self, base):
        self.calls = []
        self.h1 = base.register_forward_pre_hook(self.pre, with_kwargs=True)
        self.h2 = base.transformer.wpe.register_forward_pre_hook(self.wpe)

    def pre(self, _mod, _args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        am = kwargs.get("attention_mask")
        self.calls.append(dict(input_ids=kwargs["input_ids"].clone(),
                               mask=None if am is None else am.clone(),
                               cache_len=None if cache is None else cache.get_seq_length()))

    def wpe(self, _mod, args):
        self.calls[-1]["pos"] = args[0].clone()

    def remove(self):
        self.h1.remove()
        self.h2.remove()


def hf_generate(base, ids, mask, prefix, args, new=NEW):
    """Returns (new tokens [B, new], output). prefix None: the base model alone, plain mask."""
    B = ids.shape[0]
    rows = B * args["num_beams"]
    kw = dict(args)
    if prefix is not None:
        kw["cache"] = prefix_cache(prefix, rows)
        kw["attention_mask"] = torch.cat([torch.ones(B, P, dtype=torch.int64), mask], dim=1)
    else:
        kw["attention_mask"] = mask
    with torch.no_grad():
        out = base.generate(input_ids=ids, **kw)
    seqs = out.sequences if not torch.is_tensor(out) else out
    per_input = args.get("num_return_sequences", 1)  # rows of one input are consecutive
    if "min_new_tokens" not in args and seqs.shape[1] < ids.shape[1] + new:  # every row ended early: pad as generate
        seqs = torch.cat([seqs, torch.full((seqs.shape[0], ids.shape[1] + new - seqs.shape[1]), PAD)], dim=1)
    assert seqs.shape == (B * per_input, ids.shape[1] + new), seqs.shape
    assert torch.equal(seqs[:, :ids.shape[1]], ids.repeat_interleave(per_input, dim=0))
    return seqs[:, ids.shape[1]:].clone(), out


# ---- B: PeftModel.generate, prefix copied into generate's cache ----------------------------------------------
def peft_generate(model, ids, mask, args):
    orig = model.prepare_inputs_for_generation
    injected = []

    @functools.wraps(orig)  # generate validates its kwargs against this function's signature
    def patched(*a, **k):
        mk = orig(*a, **k)
        # PEFT looks for the cache under `past_key_values`, finds none (generate passes `cache`), so it builds a
        # fresh prefix at EVERY step; the model would ignore it in favour of `cache`. Copy it into generate's
        # cache once, at prefill (cache still empty); drop it at the later steps (the cache already holds it).
        pkv = mk.pop("past_key_values", None)
        cache = mk.get("cache")
        assert pkv is not None and cache is not None
        if cache.get_seq_length() == 0:
            for li, layer in enumerate(pkv.layers):
                cache.update(layer.keys, layer.values, li)
            injected.append(cache.get_seq_length())
        return mk

    model.prepare_inputs_for_generation = patched
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **args)
    finally:
        del model.prepare_inputs_for_generation  # back to the class method
    assert injected == [P], injected  # exactly once, at prefill
    seqs = out.sequences if not torch.is_tensor(out) else out
    return seqs[:, ids.shape[1]:].clone()


def peft_generate_unpatched(model, ids, mask, args):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **args)
    seqs = out.sequences if not torch.is_tensor(out) else out
    return seqs[:, ids.shape[1]:].clone()


# ---- C: hand-written loops, one full forward per step ----------------------------------------------------------
SHIFT_ONLY = "positions P + rank, no prefix K/V"


def full_logits(base, seq, seq_mask, prefix, pad_pos=0):
    """Last-position logits [B, V] of a full forward over seq [B, S] with the prefix as past (if any).
    Positions: cumsum of the mask including the P prefix ones, minus 1 (= P + rank among the real tokens);
    padded positions get pad_pos (they are masked from every query, so the value must not matter).
    prefix None: the base model, positions = rank. prefix SHIFT_ONLY: the prefix's positions without its K/V."""
    B = seq.shape[0]
    if prefix is SHIFT_ONLY:
        full_mask = seq_mask
        pos = full_mask.cumsum(-1) - 1 + P
        cache = None
    elif prefix is not None:
        full_mask = torch.cat([torch.ones(B, P, dtype=torch.int64), seq_mask], dim=1)
        pos = (full_mask.cumsum(-1) - 1)[:, P:]
        cache = prefix_cache(prefix, B)
    else:
        full_mask = seq_mask
        pos = full_mask.cumsum(-1) - 1
        cache = None
    pos = pos.masked_fill(seq_mask == 0, pad_pos)
    with torch.no_grad():
        out = base(input_ids=seq, attention_mask=full_mask, cache=cache, position_ids=pos, use_cache=False)
    return out.logits[:, -1, :]


def manual_greedy(base, ids, mask, prefix, pad_pos=0):
    """Returns (tokens [B, NEW], raw argmax hit eos somewhere?, smallest top1-top2 logit margin)."""
    seq, seq_mask = ids.clone(), mask.clone()
    eos_hit, margin = False, float("inf")
    for _ in range(NEW):
        logits = full_logits(base, seq, seq_mask, prefix, pad_pos).clone()
        eos_hit |= bool((logits.argmax(-1) == EOS).any())
        logits[:, EOS] = -float("inf")  # min_new_tokens = NEW: eos banned at every step
        top2 = logits.topk(2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], dim=1)
    return seq[:, ids.shape[1]:], eos_hit, margin


def manual_beam(base, ids, mask, prefix, renormalize=False):
    """Beam search for one prompt ids [1, T], as HF does it when no beam can end early:
    score = sum over steps of log_softmax(logits over the FULL vocabulary)[token], eos then set to -inf;
    each step keeps the top BEAMS of all (beam, token) candidates (torch.topk over the beam-major flattening);
    the result is the best final beam (all have length NEW, so length_penalty only divides every score by NEW).
    Returns (tokens [NEW], score / NEW, margin between the best and second final beam scores)."""
    beams = [(ids.clone(), mask.clone(), 0.0)]
    for _ in range(NEW):
        cand = []
        for seq, seq_mask, score in beams:
            logits = full_logits(base, seq, seq_mask, prefix)[0].double()
            if renormalize:  # NOT what HF does: ban eos before the log_softmax (a variant, for the README)
                logits[EOS] = -float("inf")
            lp = torch.log_softmax(logits, dim=-1)
            lp[EOS] = -float("inf")
            cand.append(score + lp)
        flat = torch.cat(cand)  # [len(beams) * V]
        V = cand[0].shape[0]
        top = torch.topk(flat, BEAMS)
        new = []
        for s, idx in zip(top.values.tolist(), top.indices.tolist()):
            b, tok = divmod(idx, V)
            seq, seq_mask, _ = beams[b]
            t = torch.tensor([[tok]], dtype=torch.int64)
            new.append((torch.cat([seq, t], 1), torch.cat([seq_mask, torch.ones_like(t)], 1), s))
        beams = new
    scores = [s for _, _, s in beams]
    best = max(range(len(beams)), key=lambda i: scores[i])
    others = sorted(scores, reverse=True)
    return beams[best][0][0, ids.shape[1]:], scores[best] / NEW, (others[0] - others[1]) / NEW


def alone(ids, mask, i):
    keep = mask[i] == 1
    return ids[i:i + 1, keep], mask[i:i + 1, keep]


def run_mode(mode, prompts, prompt_mask):
    model, prefix, names = make_peft(mode)
    base = model.get_base_model()
    out = {"prompts": prompts.numpy(), "prompt_mask": prompt_mask.numpy()}
    facts = {}

    greedy, greedy_noprefix, greedy_shift, beam, beam_score = [], [], [], [], []
    greedy_nr, beam_nr = [], []  # no_repeat_ngram_size=2: n-grams of the prompt and the new tokens banned
    pen = {f"{kind}_{name}": [] for name, _ in PENALTIES for kind in ("greedy", "beam")}
    beam_all, beam_all_scores = [], []  # num_return_sequences = BEAMS
    pen_margin = {name: [] for name, _ in PENALTIES}  # smallest greedy top1-top2 processed-score gap per prompt
    sample_first, sample_kept, sample_margin = [], [], []
    beam_sampled, beam_sample_first, beam_sample_kept = [], [], []
    decayed = {"greedy_decay": [], "beam_decay": [], "greedy_free": [], "beam_free": [], "beam_reppen13_renorm": []}
    eos_any, eos_np_any, margins, beam_margins, same_free, same_renorm = False, False, [], [], [], []
    for i in range(N):
        ids, m = alone(prompts, prompt_mask, i)
        # A
        g_a, _ = hf_generate(base, ids, m, prefix, GREEDY_ARGS)
        b_a, b_out = hf_generate(base, ids, m, prefix, BEAM_ARGS)
        # B
        g_b = peft_generate(model, ids, m, GREEDY_ARGS)
        b_b = peft_generate(model, ids, m, BEAM_ARGS)
        # C
        g_c, eos_hit, margin = manual_greedy(base, ids, m, prefix)
        b_c, b_c_score, b_margin = manual_beam(base, ids, m, prefix)
        assert torch.equal(g_a, g_b) and torch.equal(g_a, g_c), (mode, i, g_a, g_b, g_c)
        assert torch.equal(b_a, b_b) and torch.equal(b_a[0], b_c), (mode, i, b_a, b_b, b_c)
        # HF's sequences_scores = sum of the chosen log-probs / NEW ** length_penalty
        assert abs(float(b_out.sequences_scores[0]) - b_c_score) < 1e-5, (float(b_out.sequences_scores[0]), b_c_score)
        # early_stopping makes no difference here (no beam can finish before step NEW)
        for es in (True, "never"):
            b_es, _ = hf_generate(base, ids, m, prefix, dict(BEAM_ARGS, early_stopping=es))
            assert torch.equal(b_es, b_a), (es, b_es, b_a)
        # base model without prefix
        g_np, _ = hf_generate(base, ids, m, None, GREEDY_ARGS)
        g_np_c, eos_np, _ = manual_greedy(base, ids, m, None)
        assert torch.equal(g_np, g_np_c), (g_np, g_np_c)
        with model.disable_adapter():
            g_np_d, _ = hf_generate(model.get_base_model(), ids, m, None, GREEDY_ARGS)
        assert torch.equal(g_np, g_np_d)
        # the prefix's positions (P + rank) without its K/V: isolates the effect of the K/V themselves
        g_shift, _, _ = manual_greedy(base, ids, m, SHIFT_ONLY)
        greedy_shift.append(g_shift[0])
        # the trap: unpatched PeftModel.generate drops the K/V but keeps PEFT's +P on the positions
        g_unp = peft_generate_unpatched(model, ids, m, GREEDY_ARGS)
        assert torch.equal(g_unp, g_shift), (g_unp, g_shift)
        # without min_new_tokens (eos allowed): does the eos ban change anything?
        g_free, _ = hf_generate(base, ids, m, prefix, {k: v for k, v in GREEDY_ARGS.items() if k != "min_new_tokens"})
        b_free, _ = hf_generate(base, ids, m, prefix, {k: v for k, v in BEAM_ARGS.items() if k != "min_new_tokens"})
        same_renorm.append(torch.equal(manual_beam(base, ids, m, prefix, renormalize=True)[0], b_c))
        same_free.append((torch.equal(g_free, g_a), torch.equal(b_free, b_a)))
        eos_np_any |= eos_np
        g_nr, _ = hf_generate(base, ids, m, prefix, dict(GREEDY_ARGS, no_repeat_ngram_size=2))
        b_nr, _ = hf_generate(base, ids, m, prefix, dict(BEAM_ARGS, no_repeat_ngram_size=2))
        greedy_nr.append(g_nr[0])
        beam_nr.append(b_nr[0])
        for name, kw in PENALTIES:
            probe = ProcessorProbe(base)
            g_pen, g_out = hf_generate(base, ids, m, prefix, dict(GREEDY_ARGS, output_scores=True,
                                                                  return_dict_in_generate=True, **kw))
            top2 = torch.stack(g_out.scores).topk(2, dim=-1).values  # processed scores, [NEW, 1, 2]
            pen_margin[name].append(round(float((top2[..., 0] - top2[..., 1]).min()), 4))
            b_pen, _ = hf_generate(base, ids, m, prefix, dict(BEAM_ARGS, **kw))
            probe.remove()
            for procs in probe.lists:
                check_penalty_processor(name, procs, ids)
            pen[f"greedy_{name}"].append(g_pen[0])
            pen[f"beam_{name}"].append(b_pen[0])
        # Every hypothesis beam search keeps (num_return_sequences = num_beams), best first, as generate returns them.
        r_tok, r_out = hf_generate(base, ids, m, prefix, dict(BEAM_ARGS, num_return_sequences=BEAMS))
        assert torch.equal(r_tok[0], b_a[0]), (r_tok, b_a)  # the first is the one num_return_sequences=1 gives
        assert bool((r_out.sequences_scores[:-1] >= r_out.sequences_scores[1:]).all()), r_out.sequences_scores
        beam_all.append(r_tok)
        beam_all_scores.append(r_out.sequences_scores)
        # First sampling step: generate's processed scores (the multinomial draw itself is not a reference).
        probe = ProcessorProbe(base)
        with torch.random.fork_rng():
            torch.manual_seed(SAMPLE_SEED)
            _, s_out = hf_generate(base, ids, m, prefix, SAMPLE_ARGS, new=1)
        probe.remove()
        (procs,) = probe.lists
        assert [type(p).__name__ for p in procs] == SAMPLE_CHAIN, [type(p).__name__ for p in procs]
        assert procs[0].prompt_ignore_length is None  # the all-ones mask is dropped before the list is built
        sample_first.append(s_out.scores[0][0])
        # how many tokens survive each processor in turn (which filter bites), from the raw logits generate saw
        x, kept, steps = s_out.logits[0], [], []
        for p in procs:
            x = p(ids, x)
            kept.append(int(torch.isfinite(x).sum()))
            steps.append(x)
        assert torch.equal(x, s_out.scores[0])
        sample_kept.append(kept)
        # how far each filter's decisions are from flipping (f32 reimplementations): top-k's 10th - 11th value,
        # top-p's cumulative probability (ascending) vs 1 - 0.9, min-p's probability vs 0.05 * the top one
        v = steps[3][0].sort(descending=True).values
        cum = steps[4][0][torch.isfinite(steps[4][0])].sort().values.softmax(-1).cumsum(-1)
        pr = steps[5][0].softmax(-1)
        pr = pr[torch.isfinite(steps[5][0])]
        sample_margin.append((round(float(v[9] - v[10]), 4), round(float((cum - (1 - 0.9)).abs().min()), 4),
                              round(float(((pr - 0.05 * pr.max()).abs() / pr.max()).min()), 4)))
        decayed["greedy_decay"].append(hf_generate(base, ids, m, prefix, dict(FREE_GREEDY, **DECAY))[0][0])
        decayed["beam_decay"].append(hf_generate(base, ids, m, prefix, dict(FREE_BEAM, **DECAY))[0][0])
        decayed["greedy_free"].append(hf_generate(base, ids, m, prefix, FREE_GREEDY)[0][0])
        decayed["beam_free"].append(hf_generate(base, ids, m, prefix, FREE_BEAM)[0][0])
        decayed["beam_reppen13_renorm"].append(hf_generate(base, ids, m, prefix, dict(BEAM_ARGS, **RENORM))[0][0])
        # Beam sampling, pinned: every seed gives the same tokens.
        runs = []
        for seed in BEAM_SAMPLE_SEEDS:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                runs.append(hf_generate(base, ids, m, prefix, BEAM_SAMPLE_ARGS)[0])
        assert all(torch.equal(r, runs[0]) for r in runs), runs
        beam_sampled.append(runs[0][0])
        with torch.random.fork_rng():
            torch.manual_seed(SAMPLE_SEED)
            _, bs_out = hf_generate(base, ids, m, prefix, BEAM_SAMPLE_SCORE_ARGS, new=1)
        assert torch.equal(bs_out.scores[0][0], bs_out.scores[0][1])  # the beams of step 1 are copies
        beam_sample_first.append(bs_out.scores[0][0])
        beam_sample_kept.append(int(torch.isfinite(bs_out.scores[0][0]).sum()))
        greedy.append(g_a[0])
        greedy_noprefix.append(g_np[0])
        beam.append(b_a[0])
        beam_score.append(float(b_out.sequences_scores[0]))
        eos_any |= eos_hit
        margins.append(margin)
        beam_margins.append(b_margin)
    greedy = torch.stack(greedy)
    greedy_noprefix = torch.stack(greedy_noprefix)
    beam = torch.stack(beam)
    facts["raw argmax ever eos (greedy, with prefix / without)"] = (eos_any, eos_np_any)
    facts["same tokens without min_new_tokens (greedy, beam) per prompt"] = same_free
    facts["beam: same tokens if eos is banned BEFORE the log_softmax (not HF's order)"] = same_renorm
    facts["min greedy top1-top2 logit margin per prompt"] = [round(x, 4) for x in margins]
    facts["beam best-second score margin (/NEW) per prompt"] = [round(x, 4) for x in beam_margins]

    # ---- the prefix really changes the generated tokens ---------------------------------------------------------
    for i in range(N):
        assert not torch.equal(greedy[i], greedy_noprefix[i]), (mode, i)
    facts["greedy differs from no-prefix in positions"] = [int((greedy[i] != greedy_noprefix[i]).sum())
                                                           for i in range(N)]
    greedy_shift = torch.stack(greedy_shift)
    for i in range(N):
        assert not torch.equal(greedy[i], greedy_shift[i]), (mode, i)
    facts["greedy differs from positions-shifted-only (= unpatched PeftModel.generate) in positions"] = [
        int((greedy[i] != greedy_shift[i]).sum()) for i in range(N)]
    facts["greedy_shift (= unpatched PeftModel.generate)"] = greedy_shift.tolist()

    # ---- the left-padded batch ----------------------------------------------------------------------------------
    rec = Recorder(base)
    g_batch, _ = hf_generate(base, prompts, prompt_mask, prefix, GREEDY_ARGS)
    rec.remove()
    g_batch_b = peft_generate(model, prompts, prompt_mask, GREEDY_ARGS)
    g_batch_c, _, _ = manual_greedy(base, prompts, prompt_mask, prefix)
    g_batch_c2, _, _ = manual_greedy(base, prompts, prompt_mask, prefix, pad_pos=P)  # pad positions don't matter
    assert torch.equal(g_batch, g_batch_b) and torch.equal(g_batch, g_batch_c) and torch.equal(g_batch_c, g_batch_c2)
    batched_equal = torch.equal(g_batch, greedy)
    facts["greedy: left-padded batch == each prompt alone"] = batched_equal
    b_batch, _ = hf_generate(base, prompts, prompt_mask, prefix, BEAM_ARGS)
    b_batch_b = peft_generate(model, prompts, prompt_mask, BEAM_ARGS)
    assert torch.equal(b_batch, b_batch_b)
    facts["beam: left-padded batch == each prompt alone"] = torch.equal(b_batch, beam)
    g_np_batch, _ = hf_generate(base, prompts, prompt_mask, None, GREEDY_ARGS)
    facts["greedy_noprefix: left-padded batch == alone"] = torch.equal(g_np_batch, greedy_noprefix)

    # what the model received in the batched greedy run (A)
    pre = rec.calls[0]
    full_mask = torch.cat([torch.ones(N, P, dtype=torch.int64), prompt_mask], dim=1)
    expect_pos = ((full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0))[:, P:]
    assert pre["cache_len"] == P and torch.equal(pre["pos"], expect_pos), (pre["cache_len"], pre["pos"])
    assert torch.equal(pre["mask"].to(torch.int64), full_mask)
    assert len(rec.calls) == NEW
    for s, c in enumerate(rec.calls[1:], start=1):
        assert c["input_ids"].shape == (N, 1) and c["cache_len"] == P + TP + s - 1
        assert torch.equal(c["pos"][:, 0], expect_pos[:, -1] + s), (s, c["pos"])
    facts["prefill position_ids (batched, A)"] = pre["pos"].tolist()
    facts["decode position_ids (batched, A)"] = [c["pos"][:, 0].tolist() for c in rec.calls[1:]]

    # ---- sdpa gives the same tokens -----------------------------------------------------------------------------
    model_s, prefix_s, _ = make_peft(mode, attn="sdpa")
    base_s = model_s.get_base_model()
    for i in range(N):
        ids, m = alone(prompts, prompt_mask, i)
        assert torch.equal(hf_generate(base_s, ids, m, prefix_s, GREEDY_ARGS)[0][0], greedy[i])
        assert torch.equal(hf_generate(base_s, ids, m, prefix_s, BEAM_ARGS)[0][0], beam[i])
    assert torch.equal(hf_generate(base_s, prompts, prompt_mask, prefix_s, GREEDY_ARGS)[0], g_batch)
    del model_s

    out["greedy"] = greedy.numpy()
    if not batched_equal:
        out["greedy_batched"] = g_batch.numpy()
    out["beam"] = beam.numpy()
    out["beam_score"] = np.array(beam_score, dtype=np.float32)
    out["greedy_noprefix"] = greedy_noprefix.numpy()
    # Each prompt alone (HF's batch would also hold the left padding in its n-grams).
    greedy_nr, beam_nr = torch.stack(greedy_nr), torch.stack(beam_nr)
    facts["no_repeat_ngram_size 2 changes (greedy, beam) per prompt"] = [
        (bool((greedy_nr[i] != greedy[i]).any()), bool((beam_nr[i] != beam[i]).any())) for i in range(N)]
    out["greedy_norepeat2"] = greedy_nr.numpy()
    out["beam_norepeat2"] = beam_nr.numpy()
    # Penalties, each prompt alone: whether each changes the tokens, per prompt (a setting that changes nothing
    # would test nothing).
    for name, _ in PENALTIES:
        for kind, ref in (("greedy", greedy), ("beam", beam)):
            toks = torch.stack(pen[f"{kind}_{name}"])
            facts[f"{kind}_{name} differs from {kind} per prompt"] = [bool((toks[i] != ref[i]).any()) for i in range(N)]
            out[f"{kind}_{name}"] = toks.numpy()
        facts[f"greedy_{name}: min top1-top2 processed-score margin per prompt"] = pen_margin[name]
    out["sample_first_scores"] = torch.stack(sample_first).numpy()
    for key in ("greedy_decay", "beam_decay", "beam_reppen13_renorm"):
        out[key] = torch.stack(decayed[key]).numpy()
    for key, base_key in (("greedy_decay", "greedy_free"), ("beam_decay", "beam_free")):
        facts[f"{key}: eos at (per prompt); differs from {base_key} (no decay, eos allowed)"] = [
            (int((decayed[key][i] == EOS).nonzero()[0, 0]) if (decayed[key][i] == EOS).any() else None,
             bool((decayed[key][i] != decayed[base_key][i]).any())) for i in range(N)]
    facts["beam_reppen13_renorm differs from beam_reppen13 per prompt"] = [
        bool((decayed["beam_reppen13_renorm"][i] != pen["beam_reppen13"][i]).any()) for i in range(N)]
    out["beam_sample_pinned"] = torch.stack(beam_sampled).numpy()
    out["beam_sample_first_scores"] = torch.stack(beam_sample_first).numpy()
    facts["beam_sample_pinned differs from beam per prompt"] = [
        bool((beam_sampled[i] != beam[i]).any()) for i in range(N)]
    facts["beam_sample_first_scores: finite entries per prompt"] = beam_sample_kept
    out["beam_return3"] = torch.stack(beam_all).numpy()
    out["beam_return3_scores"] = torch.stack(beam_all_scores).float().numpy()
    facts["beam_return3: distinct hypotheses per prompt"] = [len({tuple(r.tolist()) for r in b}) for b in beam_all]
    facts["beam_return3: score gaps (1st-2nd, 2nd-3rd) per prompt"] = [
        [round(float(s[0] - s[1]), 4), round(float(s[1] - s[2]), 4)] for s in beam_all_scores]
    facts["sample_first_scores: finite entries after each of " + ", ".join(SAMPLE_CHAIN)] = sample_kept
    facts["sample_first_scores: margins (top-k 10th-11th, |top-p cum - 0.1|, |min-p p/pmax - 0.05|) per prompt"] = \
        sample_margin
    for l, (k, v) in enumerate(prefix):
        out[f"prefix.{l}.key"] = np.array(k.numpy(), dtype=np.float32, order="C", copy=True)
        out[f"prefix.{l}.value"] = np.array(v.numpy(), dtype=np.float32, order="C", copy=True)
    for key, arr in out.items():
        assert arr.dtype in (np.float32, np.int64), (key, arr.dtype)
    path = os.path.join(HERE, f"gpt2-{mode}.safetensors" if WEIGHTS == "f32" else f"gpt2-{mode}-f16.safetensors")
    save_file(out, path)  # no metadata (its order is random): reruns are byte-identical
    return path, out, facts


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}  "
          f"safetensors {safetensors.__version__}  numpy {np.__version__}")
    prompts, prompt_mask = make_prompts()
    print("prompts\n", prompts.numpy())
    print("prompt_mask\n", prompt_mask.numpy())
    for mode in MODES:
        path, out, facts = run_mode(mode, prompts, prompt_mask)
        report(mode, path, out, facts, ("greedy", "greedy_batched", "beam", "beam_score", "greedy_noprefix"))
    return 0


def report(mode, path, out, facts, shown):
    """Prints what a mode's file holds: the `shown` arrays, the facts checked, every array's dtype and shape."""
    print(f"\n== {mode}: {os.path.relpath(path, ROOT)}  {os.path.getsize(path)} bytes")
    for key in shown:
        if key in out:
            print(f"  {key}\n", out[key])
    for k, v in facts.items():
        print(f"  {k}: {v}")
    width = max(24, *(len(k) for k in out))
    for key, arr in out.items():
        print(f"    {key:{width}s} {str(arr.dtype):8s} {list(arr.shape)}")


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
