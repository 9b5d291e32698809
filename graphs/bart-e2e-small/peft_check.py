#!/usr/bin/env python3
"""Sanity check that prefix-tuning can steer graphs/bart-e2e-small: PyTorch + PEFT, MR -> text on E2E.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, tokenizers); BLEU comes from sacrebleu, taken from
the scorer venv (/root/.cache/pfx/score-ref, graphs/score/requirements.txt) when the running Python lacks it:

    /root/.cache/pfx/ref/bin/python graphs/bart-e2e-small/peft_check.py [--epochs 2] [--lr 5e-3] [--n-test 50]

- data: examples/data/e2e_train.txt (`MR||text`); source `<s> MR </s>` and labels `<s> text </s>` as the
  tokenizer's encode gives them (BART's post-processor), decoder input = labels shifted right after
  decoder_start_token_id (2, `</s>`), as BART fine-tuning does;
- model: graphs/bart-e2e-small/hf in eval mode (no dropout) + PEFT PrefixTuningConfig(SEQ_2_SEQ_LM, 10 virtual
  tokens, prefix_projection with width 512); batches of 8, AdamW (no weight decay), clip 1.0, linear schedule
  with 50 warmup steps; seeded;
- evaluation: the distinct MRs of examples/data/e2e_test.txt (BLEU on the first N = 50 and on all 100), greedy (64 new tokens at most, stop at
  `</s>`) with a hand-written loop over the PEFT model's forward (one full forward per step, no cache:
  peft 0.21's generate drops the prefix with transformers 5.x), with and without the adapter; corpus BLEU
  (sacrebleu, tokenize='none': the E2E texts are already tokenized) against all references of each MR.
Writes graphs/bart-e2e-small/peft_check.json (numbers and the first hypotheses).
"""
import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import peft
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer
from transformers import BartForConditionalGeneration, get_linear_schedule_with_warmup

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
SCORE_PY = "/root/.cache/pfx/score-ref/bin/python"
P, MID, BATCH, WARMUP, MAX_NEW = 10, 512, 8, 50, 64
PAD, EOS, IGNORE = 1, 2, -100


def read_pairs(path):
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                mr, text = line.rstrip("\n").split("||")
                pairs.append((mr.strip(), text.strip()))
    return pairs


def pad_to(rows, value):
    n = max(map(len, rows))
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.int64)


def make_batch(tok, pairs):
    src = [tok.encode(mr).ids for mr, _ in pairs]  # <s> MR </s>
    tgt = [tok.encode(text).ids for _, text in pairs]  # <s> text </s>
    ids = pad_to(src, PAD)
    mask = pad_to([[1] * len(s) for s in src], 0)
    labels = pad_to(tgt, IGNORE)
    dec = pad_to([[EOS] + t[:-1] for t in tgt], PAD)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)


@torch.no_grad()
def greedy(model, src):
    """One full forward per step through `model` (the PEFT model, or the bare one): no cache, no generate."""
    ids = torch.tensor([src], dtype=torch.int64)
    dec = [EOS]
    for _ in range(MAX_NEW):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       decoder_input_ids=torch.tensor([dec], dtype=torch.int64)).logits
        nxt = int(logits[0, -1].argmax())
        dec.append(nxt)
        if nxt == EOS:
            break
    return dec[1:]


def bleu(hyps, refs):
    """sacrebleu corpus BLEU, multi-reference (None where an MR has fewer references)."""
    width = max(map(len, refs))
    payload = json.dumps({"hyps": hyps, "streams": [[g[j] if j < len(g) else None for g in refs] for j in range(width)]})
    code = ("import json, sys, sacrebleu; d = json.load(sys.stdin); "
            "print(json.dumps([sacrebleu.corpus_bleu(d['hyps'], d['streams'], tokenize='none').score, sacrebleu.__version__]))")
    try:
        import sacrebleu  # noqa: F401
        py = sys.executable
    except ImportError:
        py = SCORE_PY
    out = subprocess.run([py, "-c", code], input=payload, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=50, help="BLEU on the first N distinct test MRs (and on all of them)")
    ap.add_argument("--train", default=os.path.join(ROOT, "examples", "data", "e2e_train.txt"))
    ap.add_argument("--test", default=os.path.join(ROOT, "examples", "data", "e2e_test.txt"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}")

    tok = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
    base = BartForConditionalGeneration.from_pretrained(os.path.join(HERE, "hf"), dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P,
                                                    prefix_projection=True, encoder_hidden_size=MID))
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"PEFT prefix: P={P}, MLP {MID}, {sum(p.numel() for p in params)} trainable parameters")

    train = read_pairs(args.train)
    n = len(train)
    per_epoch = (n + BATCH - 1) // BATCH
    total = per_epoch * args.epochs
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, total)
    gen = torch.Generator().manual_seed(args.seed)
    t0, epoch_losses = time.time(), []
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen).tolist()
        losses = []
        for b in range(per_epoch):
            batch = make_batch(tok, [train[i] for i in order[b * BATCH:(b + 1) * BATCH]])
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        epoch_losses.append(sum(losses) / len(losses))
        print(f"  epoch {epoch + 1}: mean loss {epoch_losses[-1]:.4f}  {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    groups = {}
    for mr, text in read_pairs(args.test):
        groups.setdefault(mr, []).append(text)
    groups = list(groups.items())
    hyps, bare_hyps = [], []
    t1 = time.time()
    for mr, _ in groups:
        src = tok.encode(mr).ids
        hyps.append(tok.decode(greedy(model, src), skip_special_tokens=True).strip())
        with model.disable_adapter():
            bare_hyps.append(tok.decode(greedy(model, src), skip_special_tokens=True).strip())
    gen_s = time.time() - t1
    refs = [r for _, r in groups]
    k = min(args.n_test, len(groups))
    b_prefix, ver = bleu(hyps[:k], refs[:k])
    b_bare, _ = bleu(bare_hyps[:k], refs[:k])
    b_prefix_all, _ = bleu(hyps, refs)
    b_bare_all, _ = bleu(bare_hyps, refs)
    n_diff = sum(a != b for a, b in zip(hyps, bare_hyps))
    print(f"BLEU (sacrebleu {ver}, tokenize none) on {os.path.relpath(args.test, ROOT)}: first {k} MRs: bare "
          f"{b_bare:.2f}, with the prefix {b_prefix:.2f}; all {len(groups)} MRs: bare {b_bare_all:.2f}, with the "
          f"prefix {b_prefix_all:.2f}; the prefix changes {n_diff}/{len(groups)} outputs; "
          f"training {train_s:.0f}s, generation {gen_s:.0f}s")
    for (mr, _), h, bh in list(zip(groups, hyps, bare_hyps))[:3]:
        print(f"  MR     {mr}\n  prefix {h}\n  bare   {bh}")
    result = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "sacrebleu": ver},
        "setup": {"P": P, "mid": MID, "batch": BATCH, "warmup": WARMUP, "epochs": args.epochs, "lr": args.lr,
                  "seed": args.seed, "steps": total, "train": os.path.relpath(args.train, ROOT),
                  "test": os.path.relpath(args.test, ROOT), "n_test_mrs": k, "n_test_mrs_all": len(groups),
                  "max_new": MAX_NEW},
        "epoch_mean_loss": epoch_losses, "train_seconds": round(train_s, 1),
        "bleu_bare": b_bare, "bleu_prefix": b_prefix, "bleu_bare_all": b_bare_all, "bleu_prefix_all": b_prefix_all,
        "outputs_changed_by_prefix": n_diff,
        "samples": [{"mr": mr, "prefix": h, "bare": bh, "refs": r[:2]}
                    for (mr, r), h, bh in list(zip(groups, hyps, bare_hyps))[:5]],
    }
    with open(os.path.join(HERE, "peft_check.json"), "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
