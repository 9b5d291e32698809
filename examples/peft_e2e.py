#!/usr/bin/env python3
"""Quality parity reference: the recipe of examples/e2e.sh, trained with PyTorch + PEFT instead of pfx.

Same model (graphs/e2e-small/hf), same tokenizer, same data and formatting, same epochs / learning rate /
schedule / optimizer / clipping, same greedy generation for the distinct MRs of examples/data/e2e_test.txt,
scored by the same scorer (`pfxrun score`). See examples/PEFT_PARITY.md for the result.
Writes OUT/hyp.txt, OUT/hyp.noprefix.txt (the model without a prefix), OUT/refs.txt (references grouped per MR,
blank-line separated) and OUT/adapter/ (the trained prefix, PEFT format); OUT is out/e2e-peft by default.

    /root/.cache/pfx/ref/bin/python examples/peft_e2e.py            # EPOCHS 2, LR 5e-3 (e2e.sh's defaults)
    /root/.cache/pfx/ref/bin/python examples/peft_e2e.py --epochs 3 --lr 1e-3 --out out/e2e-peft-b

Needs torch, transformers 5.x, peft 0.21, tokenizers (the reference venv, graphs/requirements-ref.txt), and a
built `pfxrun` (release, else debug, under $CARGO_TARGET_DIR or ~/.cache/pfx/target; or --pfxrun PATH).

The recipe, as pfx does it (runtime/src/data.rs, runtime/src/train.rs, examples/e2e.sh):
- data: `MR||text` lines, both trimmed; the source part `' ' + MR + ' <|endoftext|>'` and the target part
  `' ' + text + ' <|endoftext|>'` tokenized separately (no special tokens added) and concatenated; labels
  -100 on the source part, the target ids and the final eos labelled; rows of T = 128 right-padded with the
  eos id (mask 0, label -100); a longer row is cut at the end and kept if a target label remains;
- model: the pretrained small GPT-2 in eval mode (pfx has no dropout); PEFT prefix tuning, 10 virtual
  tokens, reparametrized through an MLP of width 512 (PEFT's own initialization); token positions P + t;
- training: batches of 8, reshuffled every epoch (seeded; the last batch of an epoch may be smaller: the
  loss is the mean over the labelled tokens of a batch, as in pfx, which fills that batch with unlabelled
  rows), AdamW (0.9, 0.999, eps 1e-8, no weight decay), gradient-norm clip 1.0, linear schedule with 50
  warmup steps over all the steps;
- generation: greedy, 64 new tokens at most, stop at eos, prompt `' ' + MR + ' <|endoftext|>'`, one per
  distinct MR in first-seen order; decoded without special tokens and stripped.

Trap (peft 0.21 + transformers 5.x): `PeftModel.generate` silently drops the prefix (generate passes its own
empty cache as `cache=`, PEFT injects the prefix as the deprecated `past_key_values=`, the model keeps
`cache`). Here the prefix PEFT builds is copied into generate's cache at prefill; the first prompts are
checked against a hand-written greedy loop (full forward through the PEFT model each step, no KV reuse), and
the outputs are checked to differ from those of the model without the prefix.
"""
import argparse
import functools
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

import peft
import tokenizers
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MODEL_DIR = os.path.join(ROOT, "graphs", "e2e-small", "hf")
TOKENIZER = os.path.join(ROOT, "graphs", "e2e-small", "tokenizer.json")
EOS_TEXT = "<|endoftext|>"

P = 10  # --prefix-len
MID = 512  # --mid-dim
BATCH = 8  # --batch
T = 128  # --seq
MAX_NEW = 64  # --max-new
WARMUP = 50  # --warmup-steps
IGNORE = -100


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", 2)))
    ap.add_argument("--lr", type=float, default=float(os.environ.get("LR", 5e-3)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", default=os.path.join(ROOT, "examples", "data", "e2e_train.txt"))
    ap.add_argument("--test", default=os.path.join(ROOT, "examples", "data", "e2e_test.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "e2e-peft"))
    ap.add_argument("--pfxrun", default=None, help="the pfxrun binary (default: release, else debug build)")
    ap.add_argument("--check-prompts", type=int, default=3,
                    help="how many prompts to check against the hand-written greedy loop")
    return ap.parse_args()


# ---- data ----------------------------------------------------------------------------------------------------
def read_pairs(path):
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n").lstrip("\ufeff") if n == 1 else line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("||")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                print(f"warning: {path}:{n}: not a `MR||text` line, skipped", file=sys.stderr)
                continue
            pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


def group_by_source(pairs):
    groups = {}
    for src, tgt in pairs:
        groups.setdefault(src, []).append(tgt)  # dicts keep insertion order: first-seen order
    return list(groups.items())


class Format:
    def __init__(self, path):
        self.tok = Tokenizer.from_file(path)
        self.eos = self.tok.token_to_id(EOS_TEXT)
        assert self.eos is not None, f"{path} has no {EOS_TEXT}"

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def prompt(self, source):
        return self.encode(f" {source} {EOS_TEXT}")

    def row(self, source, target):
        """(input_ids, attention_mask, labels, truncated) of length T, or None if no target label fits."""
        src = self.prompt(source)
        tgt = self.encode(f" {target} {EOS_TEXT}")
        truncated = len(src) + len(tgt) > T
        if truncated and len(src) >= T:
            return None
        tgt = tgt[: T - len(src)]
        pad = T - len(src) - len(tgt)
        ids = src + tgt + [self.eos] * pad
        mask = [1] * (len(src) + len(tgt)) + [0] * pad
        labels = [IGNORE] * len(src) + tgt + [IGNORE] * pad
        return ids, mask, labels, truncated

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def encode_dataset(fmt, pairs):
    rows, truncated, skipped, longest = [], 0, 0, 0
    for src, tgt in pairs:
        longest = max(longest, len(fmt.prompt(src)) + len(fmt.encode(f" {tgt} {EOS_TEXT}")))
        r = fmt.row(src, tgt)
        if r is None:
            skipped += 1
            continue
        rows.append(r[:3])
        truncated += r[3]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    mask = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    labels = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    return ids, mask, labels, dict(kept=len(rows), truncated=truncated, skipped=skipped, longest=longest)


# ---- model ---------------------------------------------------------------------------------------------------
def make_model(seed):
    base = GPT2LMHeadModel.from_pretrained(MODEL_DIR, dtype=torch.float32)
    torch.manual_seed(seed)  # PEFT's PrefixEncoder initialization
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prefix_projection=True,
                             encoder_hidden_size=MID)
    model = get_peft_model(base, cfg)
    model.eval()  # dropout off everywhere (pfx trains without dropout); gradients still flow
    return model


def check_training_forward(model, ids, mask, labels):
    """The prefix reaches the training forward, and tokens sit at positions P + t."""
    base = model.get_base_model()
    seen = []
    h = base.transformer.wpe.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        with_prefix = model(input_ids=ids, attention_mask=mask, labels=labels)
        with model.disable_adapter():
            without = model(input_ids=ids, attention_mask=mask, labels=labels)
    h.remove()
    expect = P + torch.arange(T)
    assert seen and torch.equal(seen[0].reshape(-1, T)[0], expect), seen[0]
    assert not torch.allclose(with_prefix.logits, without.logits), "the prefix does not reach the forward"
    return float(with_prefix.loss), float(without.loss)


# ---- training ------------------------------------------------------------------------------------------------
def train(model, ids, mask, labels, epochs, lr, seed):
    n = ids.shape[0]
    per_epoch = (n + BATCH - 1) // BATCH
    total = per_epoch * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, total)
    gen = torch.Generator().manual_seed(seed)
    step, started, window = 0, time.perf_counter(), []
    epoch_means = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        epoch_losses = []
        for b in range(per_epoch):
            idx = order[b * BATCH:(b + 1) * BATCH]
            out = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            loss = out.loss.item()
            window.append(loss)
            epoch_losses.append(loss)
            if step % 50 == 0 or step == total:
                el = time.perf_counter() - started
                print(f"  step {step}/{total}  epoch {epoch + 1}  loss {sum(window) / len(window):.4f} "
                      f"(mean of last {len(window)})  grad-norm {float(gnorm):.3f}  "
                      f"lr {sched.get_last_lr()[0]:.2e}  {el:.0f}s, eta {el / step * (total - step):.0f}s",
                      flush=True)
                window = []
        epoch_means.append(sum(epoch_losses) / len(epoch_losses))
        print(f"  epoch {epoch + 1}: mean loss {epoch_means[-1]:.4f}", flush=True)
    return total, time.perf_counter() - started, epoch_means


# ---- generation ----------------------------------------------------------------------------------------------
def peft_greedy(model, prompt, eos):
    """PeftModel.generate with PEFT's prefix copied into generate's own (empty) cache at prefill."""
    orig = model.prepare_inputs_for_generation
    injected = []

    @functools.wraps(orig)  # generate validates its kwargs against this function's signature
    def patched(*a, **k):
        mk = orig(*a, **k)
        # PEFT finds no `past_key_values` (generate passes `cache`), so it builds the prefix at every step; the
        # model would ignore it. Copy it into generate's cache once, while that is empty; drop it afterwards.
        pkv = mk.pop("past_key_values", None)
        cache = mk.get("cache")
        assert pkv is not None and cache is not None, "transformers/peft changed: revisit the prefix injection"
        if cache.get_seq_length() == 0:
            for li, layer in enumerate(pkv.layers):
                cache.update(layer.keys, layer.values, li)
            injected.append(cache.get_seq_length())
        return mk

    model.prepare_inputs_for_generation = patched
    try:
        ids = torch.tensor([prompt], dtype=torch.int64)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=eos)
    finally:
        del model.prepare_inputs_for_generation  # back to the class method
    assert injected == [P], injected  # exactly once, at prefill
    return out[0, len(prompt):].tolist()


def base_greedy(base, prompt, eos):
    ids = torch.tensor([prompt], dtype=torch.int64)
    with torch.no_grad():
        out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                            max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def manual_greedy(model, prompt, eos):
    """Independent check: one full forward through the PEFT model (training path) per step, no KV reuse."""
    seq = list(prompt)
    new = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            ids = torch.tensor([seq], dtype=torch.int64)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            t = int(logits.argmax())
            new.append(t)
            if t == eos:
                break
            seq.append(t)
    return new


def strip_eos(toks, eos):
    return toks[:toks.index(eos) + 1] if eos in toks else toks


def find_pfxrun(explicit):
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/pfx/target"))
    for kind in ("release", "debug"):
        p = os.path.join(target, kind, "pfxrun")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return shutil.which("pfxrun")


def main():
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"peft {peft.__version__}  tokenizers {tokenizers.__version__}  threads {torch.get_num_threads()}")
    os.makedirs(args.out, exist_ok=True)

    fmt = Format(TOKENIZER)
    pairs = read_pairs(args.train)
    ids, mask, labels, rep = encode_dataset(fmt, pairs)
    print(f"== data: {args.train}: {len(pairs)} examples, {rep['kept']} rows of {T} "
          f"({rep['truncated']} truncated, {rep['skipped']} skipped, longest {rep['longest']} tokens)")

    model = make_model(args.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"== model: {os.path.relpath(MODEL_DIR, ROOT)} + PEFT prefix (P={P}, MLP {MID}): "
          f"{n_train} trainable parameters")
    l_pre, l_base = check_training_forward(model, ids[:BATCH], mask[:BATCH], labels[:BATCH])
    print(f"   first batch before training: loss {l_pre:.4f} with the initial prefix, {l_base:.4f} without one")

    print(f"== prefix-tune ({args.epochs} epochs, lr {args.lr}, batch {BATCH}, warmup {WARMUP})")
    steps, train_s, epoch_means = train(model, ids, mask, labels, args.epochs, args.lr, args.seed)
    print(f"   {steps} steps in {train_s:.1f}s")
    model.eval()
    model.save_pretrained(os.path.join(args.out, "adapter"))

    groups = group_by_source(read_pairs(args.test))
    print(f"== generate for the {len(groups)} distinct MRs of {args.test} (greedy, {MAX_NEW} new at most)")
    started = time.perf_counter()
    base = model.get_base_model()
    hyps, plain_hyps, n_diff = [], [], 0
    for i, (src, _refs) in enumerate(groups):
        prompt = fmt.prompt(src)
        toks = peft_greedy(model, prompt, fmt.eos)
        if i < args.check_prompts:
            hand = manual_greedy(model, prompt, fmt.eos)
            assert strip_eos(toks, fmt.eos) == hand, (i, toks, hand)
        with model.disable_adapter():
            plain = base_greedy(base, prompt, fmt.eos)
        n_diff += strip_eos(toks, fmt.eos) != strip_eos(plain, fmt.eos)
        hyps.append(fmt.decode(toks))
        plain_hyps.append(fmt.decode(plain))
        if (i + 1) % 20 == 0 or i + 1 == len(groups):
            print(f"   {i + 1}/{len(groups)}", flush=True)
    gen_s = time.perf_counter() - started
    assert n_diff > 0, "the prefix changes no output: it was dropped"
    print(f"   {gen_s:.1f}s; the prefix changes the output for {n_diff}/{len(groups)} MRs "
          f"(first {min(args.check_prompts, len(groups))} checked against a hand-written greedy loop)")

    hyp_path = os.path.join(args.out, "hyp.txt")
    plain_path = os.path.join(args.out, "hyp.noprefix.txt")
    refs_path = os.path.join(args.out, "refs.txt")
    for path, lines in ((hyp_path, hyps), (plain_path, plain_hyps)):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    with open(refs_path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(refs) for _src, refs in groups) + "\n")

    pfxrun = find_pfxrun(args.pfxrun)
    print(f"== score ({len(hyps)} test MRs, multi-reference) with {pfxrun}")
    if pfxrun is None:
        print("   no pfxrun binary found: build it (cargo build --release -p pfx-runtime) or pass --pfxrun")
        rc = 1
    else:
        print("-- without a prefix (the pretrained LM alone):", flush=True)
        rc = subprocess.run([pfxrun, "score", "--hyp", plain_path, "--refs", refs_path]).returncode
        print("-- with the PEFT-trained prefix:", flush=True)
        rc |= subprocess.run([pfxrun, "score", "--hyp", hyp_path, "--refs", refs_path]).returncode
    print(f"== done in {time.perf_counter() - wall:.0f}s (training {train_s:.0f}s, generation {gen_s:.0f}s); "
          f"epoch mean losses {', '.join(f'{x:.4f}' for x in epoch_means)}; samples:")
    for h in hyps[:3]:
        print(f"  {h}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
