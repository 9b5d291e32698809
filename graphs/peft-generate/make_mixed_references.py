#!/usr/bin/env python3
"""Mixed-prefix generation references: prompts of one batch that each generate with their own PEFT prefix.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/peft-generate/make_mixed_references.py
    /root/.cache/pfx/ref/bin/python graphs/peft-generate/make_mixed_references.py --scan prompts 1  # seed searches,
    /root/.cache/pfx/ref/bin/python graphs/peft-generate/make_mixed_references.py --scan second 1   # no file written

Reads  graphs/gpt2-tiny/hf/ and the (first) prefix parameters in graphs/peft/gpt2-<mode>.safetensors.
Writes graphs/peft-generate/gpt2-<mode>-mixed.safetensors, mode = reparam, noreparam: a SECOND prefix
(`second.<name>`, the PrefixEncoder tensors of the first one's names and shapes, drawn from SECOND_SEED), N = 6
left-padded prompts (drawn from PROMPT_SEED), which prefix each uses (`assignment`, 0 = first, 1 = second), and the
greedy and beam-search (3 beams) tokens of each prompt with its own prefix (`greedy`, `beam`), plus every prompt with
the first (`greedy_first`, `beam_first`), with the second (`greedy_second`, `beam_second`) and with no prefix
(`greedy_noprefix`). Settings are those of make_generate_references.py (imported, not copied: GREEDY_ARGS /
BEAM_ARGS, P = 4, 8 new tokens with min = max, pad = eos = 95, f32, eager attention, CPU).

The stored tokens come from `base.generate` with the prompt's prefix in generate's cache, each prompt alone (way A of
make_generate_references.py), and are asserted equal to
  B. `PeftModel.generate` (patched as there) on a PeftModel holding that prefix's parameters, each prompt alone;
  C. the hand-written full-forward greedy and beam loops, each prompt alone (beam scores within 1e-5 of HF's);
  D. one left-padded `base.generate` call over all N prompts whose DynamicCache holds, row by row (and beam by beam),
     the prefix of that row's prompt: the batch that mixes prefixes, as pfx runs it;
  E. a hand-written greedy loop over that mixed batch (full forward per step, per-row prefix cache, positions from
     the mask).
The second prefix's keys/values are also computed by hand from its tensors (embedding, then for reparam
tanh(x W0^T + b0) W2^T + b2; [P, 2 L d] viewed [P, 2 L, H, D], layer l's key at 2 l and value at 2 l + 1) and
asserted equal to PEFT's get_prompt.

Seeds, scanned from 1 on (a random tiny model often ignores a prefix, or gives every prompt the same tokens):
PROMPT_SEED is the first for which, in both modes and for every prompt, the first prefix changes the greedy tokens
of the bare model and its decisions are not close (`prompt_failures`: every greedy top-1 - top-2 logit gap, eos
excluded, >= MIN_GAP; the best final beam's score >= the second's + MIN_BEAM_GAP, per-token units); SECOND_SEED,
given those prompts, the first for which, in both modes and for every prompt, the second prefix's greedy tokens
differ from the first prefix's and the bare model's, its beam tokens from the first prefix's, its decisions are not
close either, and its greedy and its beam tokens differ between any two of the prompts assigned to it
(`second_failures`). Reruns are byte-identical (the files carry no metadata).
What the files hold and what the script found: graphs/peft-generate/README.md, "Mixed prefixes".
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = sys.argv[1:]
if ARGS and not (len(ARGS) == 3 and ARGS[0] == "--scan" and ARGS[1] in ("prompts", "second") and ARGS[2].isdigit()):
    sys.exit("usage: make_mixed_references.py [--scan prompts|second FIRST_SEED]")
sys.argv[1:] = []  # make_generate_references reads its own flags (--weights f16) at import: none, the f32 model
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import make_generate_references as ref  # noqa: E402

PROMPT_SEED = 1  # the prompts' ids (scanned: see the docstring)
SECOND_SEED = 159  # the second prefix's tensors, in PrefixEncoder state-dict order (scanned, given the prompts)
N = 6  # prompts
LENGTHS = (4, 6, 2, 5, 3, 6)  # real lengths, left-padded to ref.TP = 6
ASSIGNMENT = (0, 1, 1, 0, 1, 0)  # the prefix of each prompt: 0 = graphs/peft's, 1 = the second one
# Scale of the second prefix's N(0, 1) draws, per PrefixEncoder tensor (the first prefix has std about 0.95 on the
# embeddings and 0.15-0.18 on the MLP's tensors). 0.3 on the MLP gives reparam keys/values of std 0.96 (the first
# prefix's: 0.38); 0.5 gives std 1.8, which at some seeds drowns the prompts (all 6 generate 91 91 91 ...).
SCALES = {"embedding.weight": 1.0, "transform.0.weight": 0.3, "transform.0.bias": 0.3,
          "transform.2.weight": 0.3, "transform.2.bias": 0.3}
MIN_GAP = 0.002  # smallest accepted greedy top-1 - top-2 logit gap (eos excluded), both prefixes, every step
MIN_BEAM_GAP = 0.002  # smallest accepted best - second final beam score gap (sum of log-probs / 8)


def draw_prompts(seed):
    """The N prompts, ids torch.randint(0, 95, (len,)) in row order from one generator, left-padded with 95 (as
    make_generate_references.make_prompts), and their mask."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.full((N, ref.TP), ref.PAD, dtype=torch.int64)
    mask = torch.zeros((N, ref.TP), dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        prompts[i, ref.TP - n:] = torch.randint(0, ref.VOCAB_IDS, (n,), generator=g, dtype=torch.int64)
        mask[i, ref.TP - n:] = 1
    return prompts, mask


def draw_second(seed, names_shapes):
    """The second prefix: torch.randn(shape) * SCALES[name] per tensor, in state-dict order, from one generator."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g) * SCALES[n] for n, shape in names_shapes}


def peft_with(mode, params):
    """make_generate_references.make_peft's model with the PrefixEncoder set to `params` (None: the first prefix);
    returns (model, prefix: per layer (K, V) [H, P, D] from PEFT's get_prompt, [(name, shape)] in state-dict order)."""
    model, prefix, _ = ref.make_peft(mode)
    enc = model.prompt_encoder[model.active_adapter]
    names_shapes = [(n, tuple(t.shape)) for n, t in enc.state_dict().items()]
    if params is None:
        return model, prefix, names_shapes
    with torch.no_grad():
        for n, p in enc.named_parameters():
            p.copy_(params[n])
        cache = model.get_prompt(batch_size=1)
    prefix = [(cache.layers[l].keys[0].detach().clone(), cache.layers[l].values[0].detach().clone())
              for l in range(len(cache.layers))]
    return model, prefix, names_shapes


def kv_by_hand(params, cfg):
    """The prefix keys/values from the PrefixEncoder tensors, without PEFT: per layer (K, V) [H, P, D]."""
    x = params["embedding.weight"]
    if "transform.0.weight" in params:
        x = torch.tanh(x @ params["transform.0.weight"].T + params["transform.0.bias"])
        x = x @ params["transform.2.weight"].T + params["transform.2.bias"]
    L, H = cfg.n_layer, cfg.n_head
    x = x.view(ref.P, 2 * L, H, cfg.n_embd // H)
    return [(x[:, 2 * l].permute(1, 0, 2), x[:, 2 * l + 1].permute(1, 0, 2)) for l in range(L)]


def mixed_cache(row_prefixes):
    """A DynamicCache whose row r holds row_prefixes[r] (each per layer (K, V) [H, P, D])."""
    L = len(row_prefixes[0])
    return DynamicCache([(torch.stack([p[l][0] for p in row_prefixes]).clone(),
                          torch.stack([p[l][1] for p in row_prefixes]).clone()) for l in range(L)])


def mixed_generate(base, prompts, mask, prefixes, args):
    """D: one generate call over the left-padded batch, prompt i with prefixes[i] (its beams' cache rows too:
    generate's expansion puts prompt i's beams at rows i k .. i k + k - 1). Returns the new tokens [N, NEW]."""
    k = args["num_beams"]
    rows = [p for p in prefixes for _ in range(k)]
    full = torch.cat([torch.ones(prompts.shape[0], ref.P, dtype=torch.int64), mask], dim=1)
    with torch.no_grad():
        out = base.generate(input_ids=prompts, attention_mask=full, cache=mixed_cache(rows), **args)
    seqs = out.sequences if not torch.is_tensor(out) else out
    assert seqs.shape == (prompts.shape[0], prompts.shape[1] + ref.NEW) and torch.equal(seqs[:, :prompts.shape[1]],
                                                                                         prompts)
    return seqs[:, prompts.shape[1]:].clone()


def mixed_manual_greedy(base, prompts, mask, prefixes):
    """E: greedy over the mixed batch, one full forward per step (no KV reuse), prompt i's prefix in cache row i;
    positions: cumsum of the mask with the P prefix ones, minus 1, padding at 0 (as generate)."""
    seq, seq_mask = prompts.clone(), mask.clone()
    B = seq.shape[0]
    for _ in range(ref.NEW):
        full = torch.cat([torch.ones(B, ref.P, dtype=torch.int64), seq_mask], dim=1)
        pos = (full.cumsum(-1) - 1)[:, ref.P:].masked_fill(seq_mask == 0, 0)
        with torch.no_grad():
            logits = base(input_ids=seq, attention_mask=full, cache=mixed_cache(prefixes), position_ids=pos,
                          use_cache=False).logits[:, -1, :].clone()
        logits[:, ref.EOS] = -float("inf")  # min_new_tokens = NEW
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], dim=1)
    return seq[:, prompts.shape[1]:]


def alone_runs(base, prompts, mask, prefix, checks=None):
    """Each prompt alone with one prefix (None: the bare model): greedy and beam tokens [N, NEW] (A), the smallest
    greedy top1-top2 gap and best-second beam gap per prompt (C). With checks = (PeftModel of that prefix,), the
    tokens are also asserted equal to B and C."""
    greedy, beam, gaps, beam_gaps = [], [], [], []
    for i in range(N):
        ids, m = ref.alone(prompts, mask, i)
        g_a, _ = ref.hf_generate(base, ids, m, prefix, ref.GREEDY_ARGS)
        g_c, _, gap = ref.manual_greedy(base, ids, m, prefix)
        assert torch.equal(g_a, g_c), (i, g_a, g_c)
        greedy.append(g_a[0])
        gaps.append(gap)
        if prefix is None:
            continue
        b_a, b_out = ref.hf_generate(base, ids, m, prefix, ref.BEAM_ARGS)
        b_c, b_c_score, b_gap = ref.manual_beam(base, ids, m, prefix)
        assert torch.equal(b_a[0], b_c), (i, b_a, b_c)
        assert abs(float(b_out.sequences_scores[0]) - b_c_score) < 1e-5, (float(b_out.sequences_scores[0]), b_c_score)
        beam.append(b_a[0])
        beam_gaps.append(b_gap)
        if checks is not None:
            (model,) = checks
            assert torch.equal(ref.peft_generate(model, ids, m, ref.GREEDY_ARGS), g_a), i
            assert torch.equal(ref.peft_generate(model, ids, m, ref.BEAM_ARGS), b_a), i
    return (torch.stack(greedy), torch.stack(beam) if beam else None, gaps, beam_gaps)


def prompt_failures(first, bare):
    """What keeps a prompt seed from being used (empty: usable): the first prefix must change every prompt's greedy
    tokens, and its decisions must not be close. first: alone_runs of the first prefix; bare: of the bare model."""
    bad = []
    for i in range(N):
        if torch.equal(first[0][i], bare[0][i]):
            bad.append(f"prompt {i}: the first prefix gives the bare model's greedy tokens")
        bad += close_calls(first, i)
    return bad


def close_calls(runs, i):
    """Prompt i's close decisions in alone_runs `runs`: a greedy or a beam gap under its minimum."""
    bad = []
    if runs[2][i] < MIN_GAP:
        bad.append(f"prompt {i}: greedy gap {runs[2][i]:.4f}")
    if runs[3][i] < MIN_BEAM_GAP:
        bad.append(f"prompt {i}: beam gap {runs[3][i]:.4f}")
    return bad


def second_failures(first, second, bare):
    """What keeps a second-prefix seed from being used (empty: usable), given the prompts: for every prompt the
    second prefix's greedy tokens differ from the first's and the bare model's, its beam tokens from the first's,
    no decision is close; and it does not drown its prompts (a strong prefix can give every prompt the same tokens):
    its greedy and its beam tokens differ between any two of the prompts assigned to it."""
    bad = []
    for i in range(N):
        g1, g2, g0 = first[0][i], second[0][i], bare[0][i]
        if torch.equal(g2, g1) or torch.equal(g2, g0):
            bad.append(f"prompt {i}: second greedy tokens = first's or bare's")
        if torch.equal(first[1][i], second[1][i]):
            bad.append(f"prompt {i}: same beam tokens")
        bad += close_calls(second, i)
    own = [i for i in range(N) if ASSIGNMENT[i] == 1]
    for kind, toks in (("greedy", second[0]), ("beam", second[1])):
        if len({tuple(toks[i].tolist()) for i in own}) < len(own):
            bad.append(f"{kind} tokens repeat among the second prefix's prompts {own}")
    return bad


class Mode:
    """One mode's models: the first prefix's PeftModel (its base model runs everything of way A, C, D, E), the
    PrefixEncoder's names and shapes, and the first prefix's and bare model's runs on the prompts."""

    def __init__(self, mode, prompts, mask, checked=False):
        self.mode, self.prompts, self.mask = mode, prompts, mask
        self.model1, self.prefix1, self.names_shapes = peft_with(mode, None)
        self.base = self.model1.get_base_model()
        self.runs1 = alone_runs(self.base, prompts, mask, self.prefix1, (self.model1,) if checked else None)
        self.runs0 = alone_runs(self.base, prompts, mask, None)

    def second(self, seed, checked=False):
        params = draw_second(seed, self.names_shapes)
        model2, prefix2, _ = peft_with(self.mode, params)
        runs2 = alone_runs(self.base, self.prompts, self.mask, prefix2, (model2,) if checked else None)
        return params, prefix2, runs2


def scan(what, start):
    """Prints, seed after seed, the first reason each is refused, until one passes in both modes."""
    modes = None
    if what == "second":
        prompts, mask = draw_prompts(PROMPT_SEED)
        modes = [Mode(mode, prompts, mask) for mode in ref.MODES]
    for seed in range(start, start + 2000):
        bad = []
        for i, mode in enumerate(ref.MODES):
            if what == "prompts":
                m = Mode(mode, *draw_prompts(seed))
                bad += [f"{mode} {b}" for b in prompt_failures(m.runs1, m.runs0)]
            else:
                m = modes[i]
                bad += [f"{mode} {b}" for b in second_failures(m.runs1, m.second(seed)[2], m.runs0)]
            if bad:
                break
        print(f"{what} seed {seed}: {'ok' if not bad else bad[0] + f' (+{len(bad) - 1})'}", flush=True)
        if not bad:
            return 0
    return 1


def run_mode(mode):
    prompts, mask = draw_prompts(PROMPT_SEED)
    m = Mode(mode, prompts, mask, checked=True)
    second, prefix2, runs2 = m.second(SECOND_SEED, checked=True)
    runs1, runs0, prefix1, base = m.runs1, m.runs0, m.prefix1, m.base
    bad = prompt_failures(runs1, runs0) + second_failures(runs1, runs2, runs0)
    assert not bad, bad
    cfg = base.config
    # the second prefix's keys/values: PEFT's get_prompt == by hand from its tensors
    for (k, v), (k2, v2) in zip(prefix2, kv_by_hand(second, cfg)):
        torch.testing.assert_close(k, k2, rtol=0, atol=1e-6)
        torch.testing.assert_close(v, v2, rtol=0, atol=1e-6)
    (g1, b1, gaps1, bgaps1), (g2, b2, gaps2, bgaps2), (g0, _, _, _) = runs1, runs2, runs0
    pick = torch.tensor(ASSIGNMENT, dtype=torch.int64)
    greedy = torch.where((pick == 1)[:, None], g2, g1)
    beam = torch.where((pick == 1)[:, None], b2, b1)
    # D and E: the batch that mixes prefixes gives each prompt its alone tokens
    row_prefixes = [prefix2 if a else prefix1 for a in ASSIGNMENT]
    assert torch.equal(mixed_generate(base, prompts, mask, row_prefixes, ref.GREEDY_ARGS), greedy)
    assert torch.equal(mixed_generate(base, prompts, mask, row_prefixes, ref.BEAM_ARGS), beam)
    assert torch.equal(mixed_manual_greedy(base, prompts, mask, row_prefixes), greedy)
    for prefix, g, b in ((prefix1, g1, b1), (prefix2, g2, b2)):  # one prefix for all, batched
        assert torch.equal(mixed_generate(base, prompts, mask, [prefix] * N, ref.GREEDY_ARGS), g)
        assert torch.equal(mixed_generate(base, prompts, mask, [prefix] * N, ref.BEAM_ARGS), b)
    facts = {
        "greedy (first prefix) differs from second in positions": [int((g1[i] != g2[i]).sum()) for i in range(N)],
        "greedy second differs from bare in positions": [int((g2[i] != g0[i]).sum()) for i in range(N)],
        "greedy first differs from bare in positions": [int((g1[i] != g0[i]).sum()) for i in range(N)],
        "beam first differs from second in positions": [int((b1[i] != b2[i]).sum()) for i in range(N)],
        "min greedy top1-top2 gap (first, second)": [(round(a, 4), round(b, 4)) for a, b in zip(gaps1, gaps2)],
        "beam best-second gap /NEW (first, second)": [(round(a, 4), round(b, 4)) for a, b in zip(bgaps1, bgaps2)],
        "second prefix K/V std (layer 0 key) vs first": (round(float(prefix2[0][0].std()), 3),
                                                         round(float(prefix1[0][0].std()), 3)),
    }
    out = {"prompts": prompts.numpy(), "prompt_mask": mask.numpy(),
           "assignment": np.array(ASSIGNMENT, dtype=np.int64),
           "greedy": greedy.numpy(), "beam": beam.numpy(),
           "greedy_first": g1.numpy(), "beam_first": b1.numpy(),
           "greedy_second": g2.numpy(), "beam_second": b2.numpy(),
           "greedy_noprefix": g0.numpy()}
    for n, t in second.items():
        out[f"second.{n}"] = np.array(t.numpy(), dtype=np.float32, order="C", copy=True)
    for key, arr in out.items():
        assert arr.dtype in (np.float32, np.int64), (key, arr.dtype)
    path = os.path.join(HERE, f"gpt2-{mode}-mixed.safetensors")
    save_file(out, path)  # no metadata (its order is random): reruns are byte-identical
    return path, out, facts


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}  "
          f"safetensors {safetensors.__version__}  numpy {np.__version__}")
    if ARGS:
        return scan(ARGS[1], int(ARGS[2]))
    for mode in ref.MODES:
        path, out, facts = run_mode(mode)
        ref.report(mode, path, out, facts, ("prompts", "assignment", "greedy", "beam", "greedy_first",
                                            "greedy_second", "beam_first", "beam_second", "greedy_noprefix"))
    return 0


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
