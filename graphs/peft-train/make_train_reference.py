#!/usr/bin/env python3
"""20 training steps of PEFT prefix tuning (reparam) with the HF Trainer's optimizer recipe, fixed data order.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/peft-train/make_train_reference.py

Reads  graphs/gpt2-tiny/hf/ and graphs/peft/gpt2-reparam.safetensors (initial prefix values).
Writes graphs/peft-train/reference.safetensors (keys in graphs/peft-train/README.md).

Recipe (what transformers.Trainer does with default optimizer settings, no gradient accumulation):
    torch.optim.AdamW(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    each step: zero_grad; loss = model(batch).loss; loss.backward();
               clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=20)
CPU, float32, eval mode (dropout off), eager attention, seeded: reruns give the same file.
"""
import os
import sys

import numpy as np
import peft
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
HF_DIR = os.path.join(REPO, "graphs", "gpt2-tiny", "hf")
INIT = os.path.join(REPO, "graphs", "peft", "gpt2-reparam.safetensors")

SEED = 20261128
P = 4
ENCODER_HIDDEN = 16
ATTN = "eager"
# data
N_ROWS = 12
T = 7
VOCAB_IDS = 95  # ids drawn from [0, 95)
PAD_ID = 95  # id put on padded positions
PAD_LENS = [0, 2, 0, 3, 0, 1, 4, 0, 2, 0, 0, 1]  # right padding per row (each batch of 3 mixes full and padded)
IGNORED_HEAD = 2  # labels of the first 2 positions of every row are -100
# training
BATCH = 3
STEPS = 20
LR = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.0
MAX_NORM = 1.0
WARMUP = 3

NAMES = ["embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"]


def make_rows():
    g = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, VOCAB_IDS, (N_ROWS, T), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(N_ROWS, T, dtype=torch.int64)
    for r, n in enumerate(PAD_LENS):
        if n:
            attention_mask[r, T - n:] = 0
    input_ids[attention_mask == 0] = PAD_ID
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[:, :IGNORED_HEAD] = -100
    return input_ids, attention_mask, labels


def batch_rows(k):
    """Rows used by step k (1-based): ((k-1) mod 4)*3 .. +3."""
    start = ((k - 1) % (N_ROWS // BATCH)) * BATCH
    return slice(start, start + BATCH)


def lr_factor(k):
    """get_linear_schedule_with_warmup's factor for the lr used by step k (1-based; the scheduler is at k-1)."""
    s = k - 1
    if s < WARMUP:
        return s / max(1, WARMUP)
    return max(0.0, (STEPS - s) / max(1, STEPS - WARMUP))


def np32(t):
    return np.array(t.detach().cpu().to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def check_with_trainer(input_ids, attention_mask, labels, init, out):
    """The same run through transformers.Trainer itself (its default optimizer for these arguments, sequential
    sampler, dropout set to 0 because Trainer trains in train mode): must agree with the hand-written loop."""
    import tempfile

    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(Dataset):
        def __len__(self):
            return N_ROWS

        def __getitem__(self, i):
            return dict(input_ids=input_ids[i], attention_mask=attention_mask[i], labels=labels[i])

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    logged = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(dict(logs))

    base = GPT2LMHeadModel.from_pretrained(HF_DIR, attn_implementation=ATTN, dtype=torch.float32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prefix_projection=True,
                             encoder_hidden_size=ENCODER_HIDDEN)
    model = get_peft_model(base, cfg)
    enc = model.prompt_encoder[model.active_adapter]
    with torch.no_grad():
        for n, p in enc.named_parameters():
            p.copy_(torch.from_numpy(init[n]))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=STEPS,
                                 learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
                                 weight_decay=WD, max_grad_norm=MAX_NORM, lr_scheduler_type="linear",
                                 warmup_steps=WARMUP, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
        SequentialTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[Log()]).train()
    assert len(logged) == STEPS, len(logged)
    # Trainer logs loss / grad_norm as Python floats of the step's values; losses are rounded for logging in some
    # versions, so compare loosely here and strictly on the final parameters.
    d_loss = max(abs(float(l["loss"]) - float(out["losses"][i])) for i, l in enumerate(logged))
    d_norm = max(abs(float(l["grad_norm"]) - float(out["grad_norms"][i])) for i, l in enumerate(logged))
    d_lr = max(abs(float(l["learning_rate"]) - float(out["lrs"][i])) for i, l in enumerate(logged))
    d_par = max(float(np.abs(np32(p) - out["final." + n]).max()) for n, p in enc.named_parameters())
    assert d_loss < 1e-5 and d_norm < 1e-6 and d_lr < 1e-8 and d_par < 1e-5, (d_loss, d_norm, d_lr, d_par)
    return f"optim {args.optim.value}: max |dloss| {d_loss:.1e}, |dgrad_norm| {d_norm:.1e}, |dlr| {d_lr:.1e}, " \
           f"|dfinal| {d_par:.1e}"


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}")
    input_ids, attention_mask, labels = make_rows()
    assert ((labels != -100).sum(1) >= 1).all()
    for k in range(1, 5):
        m = attention_mask[batch_rows(k)]
        assert (m.sum(1) == T).any() and (m.sum(1) < T).any(), k  # every batch mixes full and padded rows
    print("input_ids\n", input_ids.numpy())
    print("attention_mask\n", attention_mask.numpy())
    print("labels\n", labels.numpy())

    base = GPT2LMHeadModel.from_pretrained(HF_DIR, attn_implementation=ATTN, dtype=torch.float32)
    base.eval()
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prefix_projection=True,
                             encoder_hidden_size=ENCODER_HIDDEN)
    torch.manual_seed(SEED)
    model = get_peft_model(base, cfg)
    model.eval()
    enc = model.prompt_encoder[model.active_adapter]
    named = list(enc.named_parameters())
    assert [n for n, _ in named] == NAMES
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for _, p in named)
    init = load_file(INIT)
    with torch.no_grad():
        for n, p in named:
            p.copy_(torch.from_numpy(init[n]))
    params = [p for _, p in named]

    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    losses, norms, lrs = [], [], []
    for k in range(1, STEPS + 1):
        rows = batch_rows(k)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        lr = opt.param_groups[0]["lr"]
        assert abs(lr - LR * lr_factor(k)) < 1e-12, (k, lr)
        opt.step()
        sched.step()
        if k == 1:
            # lr 0 and weight decay 0: step 1 leaves the parameters exactly as they were, but it fills Adam's
            # moments and counts as Adam step 1 for the bias corrections of the later steps.
            for n, p in named:
                assert np.array_equal(np32(p), init[n]), n
        losses.append(loss.item())
        norms.append(norm.item())
        lrs.append(lr)
        print(f"  step {k:2d} rows {rows.start:2d}..{rows.stop - 1:2d}  lr {lr:.6f}  loss {loss.item():.9f}  "
              f"grad_norm {norm.item():.9f}")

    out = {
        "rows.input_ids": input_ids.numpy(),
        "rows.attention_mask": attention_mask.numpy(),
        "rows.labels": labels.numpy(),
        "losses": np.array(losses, dtype=np.float32),
        "grad_norms": np.array(norms, dtype=np.float32),
        "lrs": np.array(lrs, dtype=np.float32),
    }
    for n, p in named:
        assert int(opt.state[p]["step"]) == STEPS
        out["final." + n] = np32(p)
        out["final.adam.m." + n] = np32(opt.state[p]["exp_avg"])
        out["final.adam.v." + n] = np32(opt.state[p]["exp_avg_sq"])
        assert np.abs(out["final." + n] - init[n]).max() > 1e-3, n  # training moved every tensor
    final_state = {n: p.detach().clone() for n, p in named}

    # ---- replay with the formulas (torch AdamW, clip_grad_norm_, the schedule), checked against torch ---------
    with torch.no_grad():
        for n, p in named:
            p.copy_(torch.from_numpy(init[n]))
    mom = {n: torch.zeros_like(p) for n, p in named}
    vel = {n: torch.zeros_like(p) for n, p in named}
    for k in range(1, STEPS + 1):
        rows = batch_rows(k)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        loss.backward()
        assert abs(loss.item() - losses[k - 1]) < 1e-5, (k, loss.item(), losses[k - 1])
        with torch.no_grad():
            total = torch.sqrt(sum((p.grad ** 2).sum() for _, p in named))
            assert abs(total.item() - norms[k - 1]) < 1e-5 * norms[k - 1]
            coef = min(1.0, MAX_NORM / (total.item() + 1e-6))
            lr = LR * lr_factor(k)
            for n, p in named:
                g_ = p.grad * coef
                p.mul_(1 - lr * WD)
                mom[n] = BETAS[0] * mom[n] + (1 - BETAS[0]) * g_
                vel[n] = BETAS[1] * vel[n] + (1 - BETAS[1]) * g_ * g_
                denom = vel[n].sqrt() / (1 - BETAS[1] ** k) ** 0.5 + EPS
                p.sub_(lr / (1 - BETAS[0] ** k) * mom[n] / denom)
    replay_diff = 0.0
    for n, p in named:
        replay_diff = max(replay_diff, float(np.abs(np32(p) - out["final." + n]).max()))
    assert replay_diff < 1e-5, replay_diff
    print(f"  replay with the formulas: max |final - torch final| = {replay_diff:.2e}")
    with torch.no_grad():
        for n, p in named:
            p.copy_(final_state[n])

    # loss on step-1's batch after training (a sanity value; not a key)
    with torch.no_grad():
        r = batch_rows(1)
        after = model(input_ids=input_ids[r], attention_mask=attention_mask[r], labels=labels[r]).loss.item()
    print(f"  loss on batch 1 after 20 steps: {after:.9f} (before: {losses[0]:.9f})")
    assert after < losses[0]

    print("  transformers.Trainer cross-check: " + check_with_trainer(input_ids, attention_mask, labels, init, out))

    path = os.path.join(HERE, "reference.safetensors")
    for key, arr in out.items():
        assert arr.dtype in (np.float32, np.int64), (key, arr.dtype)
    save_file(out, path)  # no metadata (safetensors writes its map in random order)
    print(f"\n== {os.path.relpath(path, REPO)}  {os.path.getsize(path)} bytes")
    print("losses     " + " ".join(f"{x:.9f}" for x in losses))
    print("grad_norms " + " ".join(f"{x:.9f}" for x in norms))
    print("lrs        " + " ".join(f"{x:.9g}" for x in lrs))
    for key, arr in out.items():
        print(f"    {key:40s} {str(arr.dtype):8s} {list(arr.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
