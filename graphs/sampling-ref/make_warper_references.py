#!/usr/bin/env python3
"""Logits processor references: Hugging Face's sampling warpers and repetition penalties on fixed logits, no model.

Runs in the reference venv (torch, transformers 5.x, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/sampling-ref/make_warper_references.py

Writes graphs/sampling-ref/warpers.safetensors. Keys, rows and findings: graphs/sampling-ref/README.md.

Every processed tensor is the output of transformers' own classes (generation/logits_process.py) called on float32
torch tensors, as generate calls them (`processor(input_ids, scores)`); the sampling chain is the
LogitsProcessorList that generate's own `_get_logits_processor` builds. The script only crafts the inputs (rows
that hit the edge cases) and measures how far each decision is from flipping (so that a float32 reimplementation
that computes in another order still lands on the same side). CPU, one thread, seeded, no safetensors metadata:
reruns are byte-identical.
"""
import os
import sys
import types

import numpy as np
import safetensors
import torch
import transformers
from safetensors.numpy import save_file
from transformers import (EncoderRepetitionPenaltyLogitsProcessor, EpsilonLogitsWarper, EtaLogitsWarper,
                          GenerationConfig, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)
from transformers.generation.logits_process import (ExponentialDecayLengthPenalty, InfNanRemoveLogitsProcessor,
                                                    TopHLogitsWarper)
from transformers.generation.utils import GenerationMixin

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")

# ---- fixed setup -------------------------------------------------------------------------------------------
SEED = 20261302  # the random parts of the rows, history and source: the first seed from 20261301 on with every
# decision margin >= MIN_MARGIN (20261301's scale-0.5 row had a top-p cumulative sum 1.1e-5 from 0.1)
V = 96  # the tiny fixtures' vocabulary
ROWS = 8
HIST = 6  # history length (the decoder tokens so far, what RepetitionPenalty reads)
SRC = 5  # source length (what EncoderRepetitionPenalty reads)
MIN_MARGIN = 1e-4  # every non-tied decision must be at least this far from flipping
# The sampling chain: generate's settings; _get_logits_processor appends the warpers in its own order.
CHAIN = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
CHAIN_ORDER = ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]
# The end-of-sequence length decay: ids 2 (-inf in row 3) and 47 (row 4's peak) as eos, start 1 after a 3-token
# prompt: the 6-token history is 2 past the regulation start, so each eos score s becomes s + |s| (1.5^2 - 1).
DECAY = dict(exponential_decay_length_penalty=(1, 1.5), eos_token_id=[2, 47], input_ids_seq_length=3)
ROW_WHAT = [
    "normal, scale 1",
    "normal, scale 3",
    "ties (scale 1): 3 equal values in places 4-6 (the 5th largest), 3 in places 9-11, 4 in places 19-22",
    "16 entries -inf (scale 2)",
    "peaked: one entry 12 above the rest (scale 1)",
    "flat: all 0",
    "top-p 0.9 boundary inside a tie of 5 equal values",
    "normal, scale 0.5",
]


def ranked(row):
    """Indices of row by decreasing value (ties by index), for crafting."""
    return sorted(range(V), key=lambda i: (-float(row[i]), i))


def tie_row_for_top_p(g):
    """5 top values, a group of 5 equal values, 86 low ones; the tie's value is chosen so that, in top-p's
    ascending cumulative sum, 2 of the tied entries stay <= 1 - 0.9 (removed) and 3 do not (kept), each with a
    margin >= 0.005 (a coarse scan over the tie's value, checked below on HF's own output)."""
    top = torch.tensor([3.0, 2.6, 2.3, 2.1, 1.9])
    low = torch.randn(86, generator=g) * 0.5 - 3.0
    best = None
    for t in torch.arange(-2.0, 1.0, 0.01):
        x = torch.cat([low, torch.full((5,), float(t)), top])
        p = x.softmax(-1)
        c0 = float(p[:86].sum())
        q = float(p[86])
        margin = min(0.1 - (c0 + 2 * q), (c0 + 3 * q) - 0.1)
        if best is None or margin > best[0]:
            best = (margin, float(t))
    assert best[0] >= 0.005, best
    row = torch.cat([low, torch.full((5,), best[1]), top])
    return row[torch.randperm(V, generator=g)]  # spread over the vocabulary


def make_inputs():
    g = torch.Generator().manual_seed(SEED)
    logits = torch.zeros(ROWS, V)
    logits[0] = torch.randn(V, generator=g)
    logits[1] = torch.randn(V, generator=g) * 3
    r = torch.randn(V, generator=g)
    order = ranked(r)
    for ranks, at in (((3, 4, 5), 4), ((8, 9, 10), 9), ((18, 19, 20, 21), 19)):  # 0-based ranks
        for k in ranks:
            r[order[k]] = r[order[at]]
    logits[2] = r
    r = torch.randn(V, generator=g) * 2
    neg = torch.randperm(V, generator=g)[:16]
    r[neg] = -float("inf")
    logits[3] = r
    r = torch.randn(V, generator=g)
    peak = int(torch.randint(0, V, (1,), generator=g))
    r[peak] = r.max() + 12
    logits[4] = r
    logits[5] = 0.0
    logits[6] = tie_row_for_top_p(g)
    logits[7] = torch.randn(V, generator=g) * 0.5

    history = torch.randint(0, V, (ROWS, HIST), generator=g)
    source = torch.randint(0, V, (ROWS, SRC), generator=g)
    # edge cases of the penalties: a repeated id (penalized once), ids whose logit is -inf, the peak, a tied id
    history[0, 1] = history[0, 4]
    history[3, :2] = neg[:2]
    source[3, :2] = neg[1:3]
    history[4, 0] = peak
    source[4, 0] = peak
    history[2, 0] = ranked(logits[2])[4]  # one of the three tied at the 5th largest: the penalty breaks the tie
    history[1, 0] = ranked(logits[1])[0]  # the argmax (7.47, 2nd 7.24): the penalty (/1.3) moves it off the top
    source[0, 2] = source[0, 0]
    return logits, history, source, neg


def built_chain(gc):
    """The warpers generate itself builds for `gc`: GenerationMixin._get_logits_processor on a stand-in for the model
    (it reads only config.is_encoder_decoder and _merge_criteria_processor_list from it)."""
    stub = types.SimpleNamespace(config=types.SimpleNamespace(is_encoder_decoder=False))
    stub._merge_criteria_processor_list = lambda d, c: GenerationMixin._merge_criteria_processor_list(stub, d, c)
    procs = GenerationMixin._get_logits_processor(stub, generation_config=gc, input_ids_seq_length=HIST,
                                                  encoder_input_ids=None, logits_processor=None, device="cpu",
                                                  model_kwargs={})
    assert [type(p).__name__ for p in procs] == CHAIN_ORDER, [type(p).__name__ for p in procs]
    return procs


def generate_chain():
    """The chain for CHAIN (sampling, one beam)."""
    procs = built_chain(GenerationConfig(**CHAIN))
    t, k, p, m = procs
    assert t.temperature == 0.7 and k.top_k == 20 and p.top_p == 0.9 and m.min_p == 0.05
    assert k.min_tokens_to_keep == p.min_tokens_to_keep == m.min_tokens_to_keep == 1  # num_beams 1
    return procs


def beam_chain():
    """The same warpers as generate builds them for beam sampling (num_beams 3, end-of-sequence ids 0 and 1): each
    keeps at least 1 + 2 tokens (`min_tokens_to_keep`), so a beam can go on past both ends."""
    gc = GenerationConfig(**CHAIN, num_beams=3)
    gc._eos_token_tensor = torch.tensor([0, 1])  # what generate's _prepare_special_tokens sets
    procs = built_chain(gc)
    assert all(p.min_tokens_to_keep == 3 for p in procs[1:])
    return procs


# ---- how far each decision is from flipping ----------------------------------------------------------------
def topk_margin(x, k):
    """Gap between the k-th largest value and the next smaller distinct one (exact ties are not knife edges)."""
    v = x[torch.isfinite(x)].sort(descending=True).values
    below = v[v < v[k - 1]]
    return float(v[k - 1] - below[0]) if len(below) else float("inf")


def topp_margin(x, top_p):
    c = x[torch.isfinite(x)].sort().values.softmax(-1).cumsum(-1)
    return float((c - (1 - top_p)).abs().min())


def minp_margin(x, min_p):
    p = x.softmax(-1)
    p = p[torch.isfinite(x)]
    return float(((p - min_p * p.max()).abs() / p.max()).min())


def typical_margin(x, mass):
    """Typical's cut: the cumulative mass (sorted by |-log p - entropy|) against `mass`, and the gap in that
    sort key between the last kept value and the first removed one."""
    lp = torch.log_softmax(x, -1)
    ent = -(lp * lp.exp()).nansum()
    key = (-lp - ent).abs()
    s, idx = key.sort()
    c = x[idx].softmax(-1).cumsum(-1)
    fin = torch.isfinite(s)
    m = float((c[fin] - mass).abs().min())
    last = int((c < mass).sum().clamp(max=V - 1))
    above = s[s > s[last]]
    return min(m, float(above[0] - s[last]) if len(above) and torch.isfinite(above[0]) else float("inf"))


def toph_margin(x, h):
    """Top-H's cut: the smallest |cumulative entropy - tau| / tau over the 100 best (as TopHLogitsWarper computes
    them; relative, as a peaked row's terms are all tiny)."""
    top = x.topk(min(100, x.numel())).values
    dist = torch.distributions.Categorical(logits=top)
    cum = torch.cumsum(-dist.probs * torch.log(dist.probs), -1)
    tau = dist.entropy() * h
    d = (cum - tau).abs() / tau
    d = d[torch.isfinite(d)]
    return float(d[1:].min()) if len(d) > 1 else float("inf")  # the first is always kept


def kept(x):
    return [int(n) for n in torch.isfinite(x).sum(-1)]


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  safetensors {safetensors.__version__}"
          f"  numpy {np.__version__}")
    logits, history, source, neg = make_inputs()
    out = {"logits": logits, "history": history, "source": source}

    # One class at a time, as generate calls each: processor(input_ids, scores).
    single = {
        "temp07": TemperatureLogitsWarper(0.7),
        "topk5": TopKLogitsWarper(5),
        "topp09": TopPLogitsWarper(0.9),
        "minp01": MinPLogitsWarper(0.1),
        "typical09": TypicalLogitsWarper(0.9),
        # Truncation sampling (HF's epsilon_cutoff, eta_cutoff): a fixed and an entropy-scaled probability floor.
        "eps002": EpsilonLogitsWarper(0.02),
        "eta002": EtaLogitsWarper(0.02),
        # Beam sampling's floor (min_tokens_to_keep 2: one end-of-sequence id + 1), where the cuts above keep 1.
        "topk1_keep2": TopKLogitsWarper(1, min_tokens_to_keep=2),
        "topp03_keep2": TopPLogitsWarper(0.3, min_tokens_to_keep=2),
        "minp09_keep2": MinPLogitsWarper(0.9, min_tokens_to_keep=2),
        "typical02_keep2": TypicalLogitsWarper(0.2, min_tokens_to_keep=2),
        "eps02_keep2": EpsilonLogitsWarper(0.2, min_tokens_to_keep=2),
        "eta09_keep2": EtaLogitsWarper(0.9, min_tokens_to_keep=2),
        # Top-H (entropy-bounded: of the 100 best, here all 96, those whose cumulative -p ln p stays within 0.55 H).
        "toph055": TopHLogitsWarper(0.55),
        "decay15": ExponentialDecayLengthPenalty(**DECAY),
    }
    for key, proc in single.items():
        out[key] = proc(history, logits.clone())
    procs = generate_chain()
    x, stages = logits.clone(), []
    for proc in procs:  # what LogitsProcessorList.__call__ does: each on the previous one's output
        x = proc(history, x)
        stages.append(x)
    out["chain"] = procs(history, logits.clone())
    assert torch.equal(out["chain"], x)
    beams = beam_chain()
    out["chain_keep3"] = beams(history, logits.clone())
    # remove_invalid_values on the rows with a NaN (row 0, id 5) and a +inf (row 1, id 7) put in; row 3's -inf too.
    invalid = logits.clone()
    invalid[0, 5], invalid[1, 7] = float("nan"), float("inf")
    out["logits_invalid"] = invalid
    out["infnan"] = InfNanRemoveLogitsProcessor()(history, invalid.clone())
    out["probs_chain"] = torch.softmax(out["chain"], dim=-1)  # what _sample gives torch.multinomial
    out["reppen13"] = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    out["reppen13_logsoftmax"] = RepetitionPenaltyLogitsProcessor(1.3)(history, torch.log_softmax(logits, dim=-1))
    out["encreppen05"] = EncoderRepetitionPenaltyLogitsProcessor(0.5, encoder_input_ids=source)(history, logits.clone())
    assert torch.equal(logits, out["logits"])  # no processor wrote into its input

    # ---- facts -------------------------------------------------------------------------------------------------
    facts = {}
    # Which outputs depend on the order torch.sort gives equal values (CPU, not stable: neither index order nor
    # reversed, e.g. all-zeros ascending starts 60, 71, 70, ...): the same HF call on the vocabulary permuted,
    # mapped back. Where it differs, only the row's multiset of values is defined (tied entries hold equal values).
    g = torch.Generator().manual_seed(SEED + 1)
    perms = [torch.arange(V - 1, -1, -1)] + [torch.randperm(V, generator=g) for _ in range(3)]
    tie_dep = {}
    for key, fn in list(single.items()) + [("chain", procs), ("chain_keep3", beams)]:
        if key == "decay15":  # reads eos ids by position: not a permutation-invariant processor
            continue
        ids = set()
        for perm in perms:
            y = fn(history, logits[:, perm].clone())[:, perm.argsort()]
            ids |= {(int(r), int(i)) for r, i in (y != out[key]).nonzero()}
            assert torch.equal(y.sort(-1).values, out[key].sort(-1).values), key  # same values, other ids
        tie_dep[key] = sorted(ids)
    for key, ids in tie_dep.items():
        facts[f"{key}: entries (row, id) that depend on torch.sort's order of ties"] = \
            {r: [i for rr, i in ids if rr == r] for r in sorted({r for r, _ in ids})} or "none"
    for key in ("temp07", "topk5", "topp09", "minp01", "typical09", "eps002", "eta002", "chain", "reppen13",
                "reppen13_logsoftmax", "encreppen05", "topk1_keep2", "topp03_keep2", "minp09_keep2", "typical02_keep2",
                "eps02_keep2", "eta09_keep2", "chain_keep3", "toph055"):
        facts[f"{key}: finite entries per row"] = kept(out[key])
    facts["chain: finite entries after temperature, top-k 20, top-p 0.9, min-p 0.05"] = [
        kept(s) for s in stages]
    margins = {
        "topk5": [topk_margin(logits[r], 5) for r in range(ROWS)],
        "topp09": [topp_margin(logits[r], 0.9) for r in range(ROWS)],
        "minp01": [minp_margin(logits[r], 0.1) for r in range(ROWS)],
        "typical09": [typical_margin(logits[r], 0.9) for r in range(ROWS)],
        "topp03_keep2": [topp_margin(logits[r], 0.3) for r in range(ROWS)],
        "minp09_keep2": [minp_margin(logits[r], 0.9) for r in range(ROWS)],
        "typical02_keep2": [typical_margin(logits[r], 0.2) for r in range(ROWS)],
        "toph055": [toph_margin(logits[r], 0.55) for r in range(ROWS)],
        "chain top-k 20": [topk_margin(stages[0][r], 20) for r in range(ROWS)],
        "chain top-p": [topp_margin(stages[1][r], 0.9) for r in range(ROWS)],
        "chain min-p": [minp_margin(stages[2][r], 0.05) for r in range(ROWS)],
    }
    for key, ms in margins.items():
        assert min(ms) >= MIN_MARGIN, (key, ms)
        facts[f"margin {key} per row"] = [f"{m:.2g}" for m in ms]
    # the tie cases, by index
    r2 = logits[2]
    tied5 = [i for i in range(V) if r2[i] == r2[ranked(r2)[4]]]
    facts["row 2: ids tied at the 5th largest; topk5 keeps"] = (tied5, torch.isfinite(out["topk5"][2]).nonzero()
                                                                .flatten().tolist())
    r6 = logits[6]
    vals, counts = r6.unique(return_counts=True)
    tie6 = [i for i in range(V) if r6[i] == vals[counts == 5][0]]
    facts["row 6: the 5 tied ids; topp09 keeps of them"] = (
        tie6, [i for i in tie6 if torch.isfinite(out["topp09"][6, i])])
    facts["row 5 (flat): topp09 removes ids"] = (~torch.isfinite(out["topp09"][5])).nonzero().flatten().tolist()
    facts["row 3: -inf ids (in history / source)"] = (sorted(neg.tolist()), history[3].tolist(), source[3].tolist())
    for key in ("reppen13", "reppen13_logsoftmax", "encreppen05"):
        base = torch.log_softmax(logits, -1) if key == "reppen13_logsoftmax" else logits
        facts[f"{key}: changed entries per row"] = [int((out[key][r] != base[r]).sum()) for r in range(ROWS)]
    facts["argmax changed by reppen13 (rows)"] = [r for r in range(ROWS)
                                                  if out["reppen13"][r].argmax() != logits[r].argmax()]

    arrays = {k: v.numpy() for k, v in out.items()}
    for key, arr in arrays.items():
        assert arr.dtype in (np.float32, np.int64), (key, arr.dtype)
        assert arr.shape[0] == ROWS, (key, arr.shape)
    path = os.path.join(HERE, "warpers.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)  # no metadata: reruns byte-identical
    print(f"\n== {os.path.relpath(path, ROOT)}  {os.path.getsize(path)} bytes")
    for r, what in enumerate(ROW_WHAT):
        print(f"  row {r}: {what}; history {history[r].tolist()}, source {source[r].tolist()}")
    for k, v in facts.items():
        print(f"  {k}: {v}")
    for key, arr in arrays.items():
        print(f"    {key:22s} {str(arr.dtype):8s} {list(arr.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
