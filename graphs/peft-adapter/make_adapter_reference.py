#!/usr/bin/env python3
"""PEFT prefix-tuning adapter folders (save_pretrained) and what PeftModel.from_pretrained makes of them.

Runs in the reference venv (torch, transformers 5.x, peft 0.21, safetensors):

    /root/.cache/pfx/ref/bin/python graphs/peft-adapter/make_adapter_reference.py

Reads  graphs/gpt2-tiny/hf/ and graphs/peft/gpt2-{reparam,noreparam}.safetensors.
Writes graphs/peft-adapter/peft-saved/        (save_pretrained of the reparam prefix, untrained)
       graphs/peft-adapter/reference.safetensors
       graphs/peft-adapter/peft-trained/      (save_pretrained after a few AdamW steps, noreparam)
       graphs/peft-adapter/peft-trained.reference.safetensors
What each holds, and which adapter_config.json PEFT accepts, is in graphs/peft-adapter/README.md.

CPU, float32, eval mode (dropout off), eager attention, seeded: reruns give the same files.
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import peft
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
HF_DIR = os.path.join(REPO, "graphs", "gpt2-tiny", "hf")
BASE_NAME = "graphs/gpt2-tiny/hf"  # recorded as base_model_name_or_path (repo-relative, so reruns are identical)
PEFT_DIR = os.path.join(REPO, "graphs", "peft")

SEED = 20261127
P = 4
ENCODER_HIDDEN = 16
ATTN = "eager"
# the PEFT-trained adapter
TRAIN_STEPS = 5
TRAIN_LR = 0.05
TRAIN_BETAS = (0.9, 0.999)
TRAIN_EPS = 1e-8
TRAIN_WD = 0.0

REPARAM_NAMES = ["embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                 "transform.2.bias"]


def load_base():
    model = GPT2LMHeadModel.from_pretrained(HF_DIR, attn_implementation=ATTN, dtype=torch.float32)
    # what save_pretrained (base_model_name_or_path) and the model card record as the base model; repo-relative,
    # so the saved folders do not depend on where the checkout lives
    model.name_or_path = BASE_NAME
    model.config._name_or_path = BASE_NAME
    model.eval()
    return model


def make_peft(reparam):
    kw = dict(prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN) if reparam else dict(prefix_projection=False)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, **kw)
    torch.manual_seed(SEED)
    model = get_peft_model(load_base(), cfg)
    model.eval()
    return model


def encoder_params(model):
    enc = model.prompt_encoder[model.active_adapter]
    return dict(enc.named_parameters())


def np32(t):
    return np.array(t.detach().cpu().to(torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def scalar32(x):
    return np.array(float(x), dtype=np.float32).reshape(())


def fwd(model, ref):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ref["input_ids"]),
                     attention_mask=torch.from_numpy(ref["attention_mask"]),
                     labels=torch.from_numpy(ref["labels"]))


def load_folder(folder):
    m = PeftModel.from_pretrained(load_base(), folder)
    m.eval()
    return m


def read_adapter(folder):
    path = os.path.join(folder, "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    return cfg, tensors, meta


def write_variant(src, dst, cfg=None, tensors=None, metadata="keep"):
    """A copy of adapter folder `src` with its config and/or tensors replaced."""
    os.makedirs(dst, exist_ok=True)
    c0, t0, m0 = read_adapter(src)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(c0 if cfg is None else cfg, f, indent=2, sort_keys=True)
    from safetensors.torch import save_file as save_torch
    save_torch(t0 if tensors is None else tensors, os.path.join(dst, "adapter_model.safetensors"),
               metadata=m0 if metadata == "keep" else metadata)


def try_load(folder, ref_logits, **kw):
    """("same" | "differs" | "error", detail): does PeftModel.from_pretrained(base, folder) load it, and does it
    reproduce ref_logits (within 1e-6)?"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = PeftModel.from_pretrained(load_base(), folder, **kw)
            m.eval()
            enc = m.prompt_encoder["default"]
            cfg = m.peft_config["default"]
            shapes = {n: tuple(p.shape) for n, p in enc.named_parameters()}
            with torch.no_grad():
                logits = m(input_ids=torch.from_numpy(REF["input_ids"]),
                           attention_mask=torch.from_numpy(REF["attention_mask"])).logits
        diff = float((logits - torch.from_numpy(ref_logits)).abs().max())
        return ("same" if diff <= 1e-6 else "differs"), (
            f"loads as {type(m).__name__}, inference_mode={cfg.inference_mode} prefix_projection={cfg.prefix_projection} "
            f"encoder params {shapes}; max |dlogits| = {diff:.2e}")
    except Exception as exc:  # noqa: BLE001 - the point is to record what PEFT says
        return "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}"


REF = None


def main():
    global REF
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}")
    rep = load_file(os.path.join(PEFT_DIR, "gpt2-reparam.safetensors"))
    nor = load_file(os.path.join(PEFT_DIR, "gpt2-noreparam.safetensors"))
    for k in ("input_ids", "attention_mask", "labels"):
        assert np.array_equal(rep[k], nor[k])
    REF = {k: rep[k] for k in ("input_ids", "attention_mask", "labels")}

    # ================= 1. the reparam prefix, saved by PEFT ===================================================
    model = make_peft(reparam=True)
    params = encoder_params(model)
    assert list(params) == REPARAM_NAMES, list(params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(rep[n]))
    res = fwd(model, REF)
    # same values as graphs/peft (same model, same prefix, same batch)
    np.testing.assert_allclose(np32(res.logits), rep["logits"], rtol=0, atol=1e-6)
    assert abs(res.loss.item() - float(rep["loss"])) < 1e-6
    logits_ref = np32(res.logits)

    # what PEFT computes as prompt_embeddings: PrefixEncoder(arange(P)) = tanh(E W0^T + b0) W2^T + b2, [P, 2Ld]
    prompt_embeddings = model.get_prompt_embedding_to_save("default")
    with torch.no_grad():
        e = torch.from_numpy(rep["embedding.weight"])
        h = torch.tanh(e @ torch.from_numpy(rep["transform.0.weight"]).T + torch.from_numpy(rep["transform.0.bias"]))
        mine = h @ torch.from_numpy(rep["transform.2.weight"]).T + torch.from_numpy(rep["transform.2.bias"])
    torch.testing.assert_close(prompt_embeddings, mine, rtol=0, atol=1e-6)
    cfg_b = model.base_model.config
    L, H, d = cfg_b.n_layer, cfg_b.n_head, cfg_b.n_embd
    assert prompt_embeddings.shape == (P, 2 * L * d)
    # its columns are the per-layer K/V: column ((2l+kv)*H + h)*D + j, row p (graphs/peft/README.md)
    D = d // H
    kv = prompt_embeddings.view(P, 2 * L, H, D).permute(1, 2, 0, 3)
    for l in range(L):
        np.testing.assert_allclose(np32(kv[2 * l]), rep[f"past.{l}.key"][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(np32(kv[2 * l + 1]), rep[f"past.{l}.value"][0], rtol=0, atol=1e-6)

    saved = os.path.join(HERE, "peft-saved")
    shutil.rmtree(saved, ignore_errors=True)
    model.save_pretrained(saved)
    cfg_saved, t_saved, meta_saved = read_adapter(saved)
    assert list(t_saved) == ["prompt_embeddings"], list(t_saved)
    assert t_saved["prompt_embeddings"].dtype == torch.float32
    assert torch.equal(t_saved["prompt_embeddings"], prompt_embeddings)
    assert cfg_saved["inference_mode"] is True and cfg_saved["prefix_projection"] is True
    assert model.peft_config["default"].inference_mode is False  # save_pretrained writes True, restores False
    print(f"\n== {os.path.relpath(saved, REPO)}: {sorted(os.listdir(saved))}")
    print(f"  tensors: { {k: (tuple(v.shape), str(v.dtype)) for k, v in t_saved.items()} }  metadata {meta_saved}")
    print("  adapter_config.json:", json.dumps(cfg_saved, sort_keys=True))

    # ---- loading it back ------------------------------------------------------------------------------------
    loaded = load_folder(saved)
    lcfg = loaded.peft_config["default"]
    assert lcfg.inference_mode is True and lcfg.prefix_projection is True
    enc = loaded.prompt_encoder["default"]
    assert {n: tuple(p.shape) for n, p in enc.named_parameters()} == {"embedding.weight": (P, 2 * L * d)}
    assert not hasattr(enc, "transform")  # inference_mode: the encoder is a bare [P, 2Ld] table, no MLP
    assert torch.equal(enc.embedding.weight, prompt_embeddings)
    res_l = fwd(loaded, REF)
    dl = float((res_l.logits - res.logits).abs().max())
    assert dl <= 1e-6, dl
    assert abs(res_l.loss.item() - res.loss.item()) <= 1e-6
    # from_pretrained leaves the [P, 2Ld] table with requires_grad=True (the base model is frozen)
    req = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert req == ["prompt_encoder.default.embedding.weight"], req
    print(f"  from_pretrained: inference_mode={lcfg.inference_mode} prefix_projection={lcfg.prefix_projection}; "
          f"max |dlogits| vs training-mode PeftModel {dl:.2e}, |dloss| {abs(res_l.loss.item() - res.loss.item()):.2e}")

    # ---- which adapter_config.json / tensor files PEFT accepts (probed, recorded in README.md) -------------
    probes = {}
    with tempfile.TemporaryDirectory() as tmp:
        def probe(name, expect, cfg=None, tensors=None, metadata="keep", **kw):
            dst = os.path.join(tmp, name)
            write_variant(saved, dst, cfg=cfg, tensors=tensors, metadata=metadata)
            got, detail = try_load(dst, logits_ref, **kw)
            probes[name] = (got, detail)
            assert got == expect, (name, got, detail)

        c = dict(cfg_saved)
        probe("as saved", "same")
        probe("prefix_projection false", "same", cfg={**c, "prefix_projection": False})
        probe("prefix_projection false, encoder_hidden_size null", "same",
              cfg={**c, "prefix_projection": False, "encoder_hidden_size": None})
        probe("inference_mode false", "same", cfg={**c, "inference_mode": False})
        probe("inference_mode false, prefix_projection false", "same",
              cfg={**c, "inference_mode": False, "prefix_projection": False})
        probe("minimal {peft_type, task_type, num_virtual_tokens}", "same",
              cfg={"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P})
        probe("minimal without task_type", "differs",
              cfg={"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P})
        probe("no safetensors metadata", "same", metadata=None)
        probe("unknown extra config key", "same", cfg={**c, "pfx_note": "x"})
        probe("num_virtual_tokens 3 (mismatch)", "error", cfg={**c, "num_virtual_tokens": 3})
        probe("prompt_embeddings [P, d] (pre-MLP shape)", "error",
              tensors={"prompt_embeddings": torch.from_numpy(rep["embedding.weight"])})
        probe("reparam state dict (embedding.weight, transform.*) instead", "error",
              tensors={n: torch.from_numpy(rep[n]) for n in REPARAM_NAMES})
        probe("prompt_embeddings as f16", "differs",
              tensors={"prompt_embeddings": prompt_embeddings.half()})
        probe("is_trainable=True", "error", is_trainable=True)
    print("\n  load probes (PeftModel.from_pretrained(base, folder)):")
    for name, (got, detail) in probes.items():
        print(f"    [{got:7s}] {name}: {detail}")

    out = dict(REF)
    out["logits"] = logits_ref
    out["loss"] = scalar32(res.loss.item())
    out["prompt_embeddings"] = np32(prompt_embeddings)
    path = os.path.join(HERE, "reference.safetensors")
    save_file(out, path)
    print(f"\n== {os.path.relpath(path, REPO)}: loss {res.loss.item():.9f}")
    for k, v in out.items():
        print(f"    {k:20s} {str(v.dtype):8s} {list(v.shape)}")

    # ================= 2. an adapter PEFT trained (noreparam) ===================================================
    model = make_peft(reparam=False)
    params = encoder_params(model)
    assert list(params) == ["embedding.weight"]
    with torch.no_grad():
        params["embedding.weight"].copy_(torch.from_numpy(nor["embedding.weight"]))
    ids, am, lab = (torch.from_numpy(REF[k]) for k in ("input_ids", "attention_mask", "labels"))
    opt = torch.optim.AdamW(list(params.values()), lr=TRAIN_LR, betas=TRAIN_BETAS, eps=TRAIN_EPS,
                            weight_decay=TRAIN_WD)
    losses = []
    for k in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=am, labels=lab).loss
        if k == 0:
            assert abs(loss.item() - float(nor["loss"])) < 1e-6
        loss.backward()
        opt.step()
        losses.append(loss.item())
    res_t = fwd(model, REF)
    trained = os.path.join(HERE, "peft-trained")
    shutil.rmtree(trained, ignore_errors=True)
    model.save_pretrained(trained)
    cfg_t, t_t, _ = read_adapter(trained)
    assert list(t_t) == ["prompt_embeddings"] and tuple(t_t["prompt_embeddings"].shape) == (P, 2 * L * d)
    assert torch.equal(t_t["prompt_embeddings"], params["embedding.weight"].detach())
    assert cfg_t["inference_mode"] is True and cfg_t["prefix_projection"] is False
    assert np.abs(np32(t_t["prompt_embeddings"]) - nor["embedding.weight"]).max() > 1e-2  # training moved it
    loaded_t = load_folder(trained)
    res_tl = fwd(loaded_t, REF)
    dl = float((res_tl.logits - res_t.logits).abs().max())
    assert dl <= 1e-6 and abs(res_tl.loss.item() - res_t.loss.item()) <= 1e-6, dl
    out_t = dict(REF)
    out_t["logits"] = np32(res_tl.logits)
    out_t["loss"] = scalar32(res_tl.loss.item())
    out_t["prompt_embeddings"] = np32(t_t["prompt_embeddings"])
    out_t["train_losses"] = np.array(losses, dtype=np.float32)
    path_t = os.path.join(HERE, "peft-trained.reference.safetensors")
    save_file(out_t, path_t)
    print(f"\n== {os.path.relpath(trained, REPO)}: {sorted(os.listdir(trained))}")
    print("  adapter_config.json:", json.dumps(cfg_t, sort_keys=True))
    print(f"  train losses (before each of {TRAIN_STEPS} steps): " + " ".join(f"{x:.9f}" for x in losses))
    print(f"  reloaded: loss {res_tl.loss.item():.9f}  max |dlogits| vs in-memory {dl:.2e}")
    print(f"== {os.path.relpath(path_t, REPO)}")
    for k, v in out_t.items():
        print(f"    {k:20s} {str(v.dtype):8s} {list(v.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
