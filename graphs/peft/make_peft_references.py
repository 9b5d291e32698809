#!/usr/bin/env python3
"""Reference values for prefix tuning, computed with PyTorch + PEFT on the tiny GPT-2.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/peft/make_peft_references.py [--weights f16]

Reads  graphs/gpt2-tiny/hf/ (written by graphs/make_fixtures.py).
Writes graphs/peft/gpt2-reparam.safetensors and graphs/peft/gpt2-noreparam.safetensors; with --weights f16,
gpt2-reparam-f16.safetensors and gpt2-noreparam-f16.safetensors: the same computation on the model whose
weight matrices (every parameter of rank >= 2) are rounded to float16 and used in float32, which is what
`pfxc compile --weights f16` compiles.
What each file holds is described in graphs/peft/README.md.

Everything runs on the CPU in float32, in eval mode (dropout off), seeded: reruns give the same values.
"""
import os
import sys

import numpy as np
import peft
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from safetensors.numpy import save_file
from transformers import DynamicCache, GPT2LMHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fixture_common import B, ENCODER_HIDDEN, NOISE_STD, P, PAD, T, VOCAB_IDS, prefix_batch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HF_DIR = os.path.join(HERE, "..", "gpt2-tiny", "hf")

# ---- fixed setup -------------------------------------------------------------------------------------------
SEED = 20261127
LR = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.01
STEPS = 3
TRAIN_RUNS = (("train", 1.0), ("clip", 1e-3))  # (key prefix, MAX_NORM)
ATTN = "eager"  # attention implementation used for the references (sdpa is checked to agree)
WEIGHTS = "f16" if sys.argv[1:] == ["--weights", "f16"] else "f32"
if sys.argv[1:] not in ([], ["--weights", "f16"]):
    sys.exit("usage: make_peft_references.py [--weights f16]")

MODES = {
    "reparam": dict(prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN),
    "noreparam": dict(prefix_projection=False),
}


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
    base = load_base(attn)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, **MODES[mode])
    torch.manual_seed(SEED)  # PEFT's own init (nn.Embedding / nn.Linear defaults) draws from the global RNG
    model = get_peft_model(base, cfg)
    model.eval()
    return model


def trainable(model):
    """The PrefixEncoder's parameters, in its state-dict order, under its state-dict names."""
    enc = model.prompt_encoder[model.active_adapter]
    named = list(enc.named_parameters())
    assert [n for n, _ in named] == list(enc.state_dict().keys()), "state dict has non-parameter entries"
    # Nothing else may be trainable.
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for _, p in named), n_trainable
    return named


def expected_shapes(mode, L, d):
    if mode == "reparam":
        return {
            "embedding.weight": (P, d),
            "transform.0.weight": (ENCODER_HIDDEN, d),
            "transform.0.bias": (ENCODER_HIDDEN,),
            "transform.2.weight": (2 * L * d, ENCODER_HIDDEN),
            "transform.2.bias": (2 * L * d,),
        }
    return {"embedding.weight": (P, 2 * L * d)}


def set_params(named, values):
    with torch.no_grad():
        for n, p in named:
            p.copy_(values[n])


def forward(model, input_ids, attention_mask, labels):
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def np32(t):
    # a copy: .numpy() shares memory with the tensor, which training would later overwrite
    return np.array(t.detach().cpu().to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def scalar32(x):
    return np.array(float(x), dtype=np.float32).reshape(())


def manual_prefix(named_values, mode, L, H, D):
    """The prefix K/V recomputed from the trainable tensors without PEFT: per layer [H, P, D] (key, value)."""
    if mode == "reparam":
        x = named_values["embedding.weight"]  # [P, d]
        h = torch.tanh(x @ named_values["transform.0.weight"].T + named_values["transform.0.bias"])
        flat = h @ named_values["transform.2.weight"].T + named_values["transform.2.bias"]  # [P, 2*L*d]
    else:
        flat = named_values["embedding.weight"]
    # column index = ((2*l + kv) * H + h) * D + dd
    kv = flat.view(P, 2 * L, H, D).permute(1, 2, 0, 3)  # [2L, H, P, D]
    return [(kv[2 * l], kv[2 * l + 1]) for l in range(L)]


def run_mode(mode, input_ids, attention_mask, labels):
    model = make_peft(mode)
    base = model.get_base_model()
    cfg = base.config
    L, H, d = cfg.n_layer, cfg.n_head, cfg.n_embd
    D = d // H
    named = trainable(model)
    shapes = expected_shapes(mode, L, d)
    assert {n: tuple(p.shape) for n, p in named} == shapes, {n: tuple(p.shape) for n, p in named}

    # PEFT's init, then seeded noise on every tensor.
    g = torch.Generator().manual_seed(SEED + 1 + list(MODES).index(mode))
    with torch.no_grad():
        for _, p in named:
            p.add_(torch.randn(p.shape, generator=g) * NOISE_STD)
    init = {n: p.detach().clone() for n, p in named}

    out = {
        "input_ids": input_ids.numpy(),
        "attention_mask": attention_mask.numpy(),
        "labels": labels.numpy(),
    }
    for n in init:
        out[n] = np32(init[n])

    # ---- what the base model receives (hooks) -------------------------------------------------------------
    seen = {}

    def pre_hook(_mod, args, kwargs):
        seen["kwargs"] = dict(kwargs)
        seen["args"] = args
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        seen["cache_type"] = type(cache).__name__
        seen["cache_len"] = cache.get_seq_length() if cache is not None else None
        if cache is not None:
            seen["cache_kv"] = [(lay.keys.detach().clone(), lay.values.detach().clone()) for lay in cache.layers]

    def wpe_hook(_mod, args):
        seen["position_ids"] = args[0].detach().clone()

    h1 = base.register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = base.transformer.wpe.register_forward_pre_hook(wpe_hook)
    model.zero_grad(set_to_none=True)
    res = forward(model, input_ids, attention_mask, labels)
    h1.remove()
    h2.remove()
    loss = res.loss
    loss.backward()
    out["loss"] = scalar32(loss.item())
    out["logits"] = np32(res.logits)
    for n, p in named:
        out["grad." + n] = np32(p.grad)
    grads0 = {n: p.grad.detach().clone() for n, p in named}

    kw = seen["kwargs"]
    key_name = "past_key_values" if "past_key_values" in kw else "cache"
    recv_mask = kw["attention_mask"]
    facts = {
        "past passed as": f"kwarg `{key_name}` = {seen['cache_type']} (seq length {seen['cache_len']})",
        "attention_mask received": f"{tuple(recv_mask.shape)} {recv_mask.dtype}",
        "position_ids": seen["position_ids"].tolist(),
        "labels received": f"{tuple(kw['labels'].shape)}",
        "logits": f"{tuple(res.logits.shape)}",
    }
    assert seen["cache_len"] == P
    assert torch.equal(recv_mask[:, :P], torch.ones(B, P)), recv_mask
    assert torch.equal(recv_mask[:, P:].to(torch.int64), attention_mask), recv_mask
    assert torch.equal(kw["labels"], labels)
    pos = seen["position_ids"].expand(B, T)
    assert torch.equal(pos, (P + torch.arange(T)).expand(B, T)), pos

    # ---- the prefix PEFT builds (get_prompt), checked against the layout documented in the README ----------
    with torch.no_grad():
        cache = model.get_prompt(B)
        assert isinstance(cache, DynamicCache), type(cache)
        manual = manual_prefix(init, mode, L, H, D)
        for l in range(L):
            k, v = cache.layers[l].keys, cache.layers[l].values
            assert k.shape == (B, H, P, D) and v.shape == (B, H, P, D), k.shape
            for b in range(B):
                torch.testing.assert_close(k[b], manual[l][0], rtol=0, atol=1e-6)
                torch.testing.assert_close(v[b], manual[l][1], rtol=0, atol=1e-6)
            # the one the model actually received in the forward above
            assert torch.equal(seen["cache_kv"][l][0], k) and torch.equal(seen["cache_kv"][l][1], v)
            out[f"past.{l}.key"] = np32(k)
            out[f"past.{l}.value"] = np32(v)

        # ---- independent recomputation without PEFT: own DynamicCache, own mask, own loss -----------------
        own = DynamicCache([(manual[l][0].expand(B, H, P, D).clone(), manual[l][1].expand(B, H, P, D).clone())
                            for l in range(L)])
        mask_full = torch.cat([torch.ones(B, P, dtype=torch.int64), attention_mask], dim=1)
        pos_ids = (P + torch.arange(T)).unsqueeze(0).expand(B, T)
        logits_own = base(input_ids=input_ids, attention_mask=mask_full, past_key_values=own,
                          position_ids=pos_ids).logits
        torch.testing.assert_close(logits_own, res.logits, rtol=0, atol=1e-5)
        tgt = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1)
        ce = torch.nn.functional.cross_entropy(logits_own.reshape(-1, logits_own.shape[-1]), tgt.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        loss_own = ce / (tgt != -100).sum()
        torch.testing.assert_close(loss_own, loss.detach(), rtol=0, atol=1e-5)
        facts["targets counted"] = int((tgt != -100).sum())

        # A masked (padding) position is hidden from every query, itself included: changing the token under
        # row 2's first pad changes only that position's own logits (through its residual stream). Its query
        # still sees the P prefix slots, so no softmax row is empty. Row 2's logits at pad position PAD-1 are
        # what predicts row 2's first real token (a counted target).
        ids2 = input_ids.clone()
        ids2[2, 0] = (ids2[2, 0] + 1) % VOCAB_IDS
        logits2 = base(input_ids=ids2, attention_mask=mask_full, past_key_values=DynamicCache(
            [(manual[l][0].expand(B, H, P, D).clone(), manual[l][1].expand(B, H, P, D).clone()) for l in range(L)]),
            position_ids=pos_ids).logits
        assert (logits2[2, 0] - logits_own[2, 0]).abs().max() > 1e-3
        assert torch.equal(logits2[:, 1:], logits_own[:, 1:]) and torch.equal(logits2[:2], logits_own[:2])
        assert tgt[2, PAD - 1] != -100

        # ---- the prefix really changes the output -----------------------------------------------------------
        logits_base = base(input_ids=input_ids, attention_mask=attention_mask).logits
        diff_base = (logits_base - res.logits).abs().max().item()
        assert diff_base > 1e-2, diff_base
        # same positions as with the prefix but no prefix K/V: isolates the effect of the K/V themselves
        logits_pos = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos_ids).logits
        diff_kv = (logits_pos - res.logits).abs().max().item()
        assert diff_kv > 1e-2, diff_kv
        facts["max |logits(no prefix) - logits(prefix)|"] = f"{diff_base:.4f} (same positions P+t: {diff_kv:.4f})"

    # ---- sdpa agrees with eager ------------------------------------------------------------------------------
    model_sdpa = make_peft(mode, attn="sdpa")
    named_sdpa = trainable(model_sdpa)
    set_params(named_sdpa, init)
    res_sdpa = forward(model_sdpa, input_ids, attention_mask, labels)
    res_sdpa.loss.backward()
    facts["sdpa vs eager |dloss|"] = f"{abs(res_sdpa.loss.item() - loss.item()):.2e}"
    torch.testing.assert_close(res_sdpa.loss.detach(), loss.detach(), rtol=0, atol=1e-5)
    for n, p in named_sdpa:
        torch.testing.assert_close(p.grad, grads0[n], rtol=1e-4, atol=1e-6)
    del model_sdpa

    # ---- training: AdamW + clip_grad_norm_, same fixed batch ---------------------------------------------------
    summary = {"loss": loss.item(), "grad_norm": torch.sqrt(sum((gr ** 2).sum() for gr in grads0.values())).item()}
    for prefix, max_norm in TRAIN_RUNS:
        set_params(named, init)
        params = [p for _, p in named]
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        losses, norms = [], []
        for k in range(1, STEPS + 1):
            opt.zero_grad(set_to_none=True)
            l_k = forward(model, input_ids, attention_mask, labels).loss
            l_k.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if max_norm < 1.0:
                assert norm.item() > max_norm, (norm.item(), max_norm)
            opt.step()
            out[f"{prefix}.loss.{k}"] = scalar32(l_k.item())
            out[f"{prefix}.grad_norm.{k}"] = scalar32(norm.item())
            losses.append(l_k.item())
            norms.append(norm.item())
        if prefix == "train":
            assert abs(losses[0] - loss.item()) < 1e-6
        for n, p in named:
            st = opt.state[p]
            assert int(st["step"]) == STEPS
            out[f"{prefix}.final.{n}"] = np32(p)
            out[f"{prefix}.final.adam.m.{n}"] = np32(st["exp_avg"])
            out[f"{prefix}.final.adam.v.{n}"] = np32(st["exp_avg_sq"])
        summary[prefix] = (losses, norms)
        # The same run written out by hand (the formulas README.md states), checked against torch's.
        set_params(named, init)
        m = {n: torch.zeros_like(p) for n, p in named}
        v = {n: torch.zeros_like(p) for n, p in named}
        for k in range(1, STEPS + 1):
            model.zero_grad(set_to_none=True)
            forward(model, input_ids, attention_mask, labels).loss.backward()
            with torch.no_grad():
                total = torch.sqrt(sum((p.grad ** 2).sum() for _, p in named))
                torch.testing.assert_close(total, torch.tensor(norms[k - 1]), rtol=1e-6, atol=0)
                coef = min(1.0, max_norm / (total.item() + 1e-6))
                for n, p in named:
                    g_ = p.grad * coef
                    p.mul_(1 - LR * WD)
                    m[n] = BETAS[0] * m[n] + (1 - BETAS[0]) * g_
                    v[n] = BETAS[1] * v[n] + (1 - BETAS[1]) * g_ * g_
                    denom = v[n].sqrt() / (1 - BETAS[1] ** k) ** 0.5 + EPS
                    p.sub_(LR / (1 - BETAS[0] ** k) * m[n] / denom)
        for n, p in named:
            np.testing.assert_allclose(np32(p), out[f"{prefix}.final.{n}"], rtol=0, atol=1e-6)
            for key, mine in ((f"{prefix}.final.adam.m.{n}", m[n]), (f"{prefix}.final.adam.v.{n}", v[n])):
                ref = out[key]  # torch rounds differently (lerp_/addcmul_): compare relative to the tensor's scale
                np.testing.assert_allclose(np32(mine), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    set_params(named, init)
    model.zero_grad(set_to_none=True)
    for n in init:
        # training moved every tensor, and clipping changed the Adam moments (m scales with the clip factor)
        assert np.abs(out[f"train.final.{n}"] - out[n]).max() > 1e-3, n
        assert np.abs(out[f"clip.final.{n}"] - out[n]).max() > 1e-3, n
        m_train = np.abs(out[f"train.final.adam.m.{n}"]).max()
        m_clip = np.abs(out[f"clip.final.adam.m.{n}"]).max()
        assert m_clip < 0.5 * m_train, (n, m_clip, m_train)
    summary["max |clip.final - train.final|"] = max(
        float(np.abs(out[f"clip.final.{n}"] - out[f"train.final.{n}"]).max()) for n in init)

    path = os.path.join(HERE, f"gpt2-{mode}.safetensors" if WEIGHTS == "f32" else f"gpt2-{mode}-f16.safetensors")
    for key, arr in out.items():
        assert arr.dtype in (np.float32, np.int64), (key, arr.dtype)
    # No metadata: safetensors writes its metadata map in random order, which would make reruns differ
    # byte-wise. Versions are recorded in README.md.
    save_file(out, path)
    return path, out, summary, facts


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}")
    input_ids, attention_mask, labels = prefix_batch(SEED)
    print("input_ids\n", input_ids.numpy())
    print("attention_mask\n", attention_mask.numpy())
    print("labels\n", labels.numpy())
    for mode in MODES:
        path, out, summary, facts = run_mode(mode, input_ids, attention_mask, labels)
        print(f"\n== {mode}: {os.path.relpath(path, os.path.join(HERE, '..', '..'))}  {os.path.getsize(path)} bytes")
        print(f"  loss {summary['loss']:.8f}  grad norm {summary['grad_norm']:.8f}")
        print(f"  max |clip.final - train.final| {summary['max |clip.final - train.final|']:.3e}")
        for prefix, _ in TRAIN_RUNS:
            losses, norms = summary[prefix]
            print(f"  {prefix}: losses " + " ".join(f"{x:.8f}" for x in losses)
                  + " | grad norms " + " ".join(f"{x:.8f}" for x in norms))
        for k, v in facts.items():
            print(f"  {k}: {v}")
        for key, arr in out.items():
            print(f"    {key:40s} {str(arr.dtype):8s} {list(arr.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
