#!/usr/bin/env python3
"""A PEFT prefix-tuning adapter for each tiny BART fixture, as PEFT saves it, and PEFT's loss and logits with it.

Runs in the reference venv (graphs/requirements-ref.txt), about 5 s:

    /root/.cache/pfx/ref/bin/python graphs/bart-ref/make_bart_adapter.py

For each fixture (bart-enc-deep, bart-dec-deep): PEFT's SEQ_2_SEQ_LM prefix model without projection
(num_layers = max(encoder, decoder layers), as make_bart_references.py explains), its table set to the
`embedding.weight` of `<fixture>-peft-noreparam.safetensors` plus seeded noise (so the adapter is not the
initial prefix the training references start from), then `save_pretrained` into `adapter-<fixture>/`, then
`PeftModel.from_pretrained` on a fresh base model and a forward on make_bart_references.py's batch. Writes
`adapter-<fixture>.reference.safetensors`: `loss`, `logits` [B, T, V] and the batch. pfx imports the folder into a
`--bart-prefix peft --no-reparam` bundle and must give this loss (tests/generate_bart.rs).
"""
import os
import sys

import numpy as np
import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from safetensors.numpy import load_file, save_file

import make_bart_references as R

HERE = os.path.dirname(os.path.abspath(__file__))
NOISE_SEED = 20261130
NOISE_STD = 0.5


# The BART fixtures only (tests/peft_interop.rs reads these two); R.FIXTURES also lists marian-tiny and pegasus-tiny.
FIXTURES = ("bart-enc-deep", "bart-dec-deep")


def main():
    for fixture in FIXTURES:
        base = R.load_base(fixture)
        cfg = base.config
        layers = max(cfg.encoder_layers, cfg.decoder_layers)
        peft_cfg = PrefixTuningConfig(
            task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=R.P, num_layers=layers, prefix_projection=False
        )
        model = get_peft_model(base, peft_cfg)
        start = load_file(os.path.join(HERE, f"{fixture}-peft-noreparam.safetensors"))["embedding.weight"]
        g = torch.Generator().manual_seed(NOISE_SEED)
        table = torch.from_numpy(start) + NOISE_STD * torch.randn(start.shape, generator=g)
        enc = model.prompt_encoder[model.active_adapter]
        with torch.no_grad():
            enc.embedding.weight.copy_(table)
        # Recorded as the base model, repo-relative (the checkout's path would make reruns differ).
        model.peft_config[model.active_adapter].base_model_name_or_path = f"graphs/{fixture}/hf"
        out_dir = os.path.join(HERE, f"adapter-{fixture}")
        model.save_pretrained(out_dir)
        card = os.path.join(out_dir, "README.md")
        if os.path.exists(card):
            os.remove(card)  # a template model card; not needed to load
        loaded = PeftModel.from_pretrained(R.load_base(fixture), out_dir)
        loaded.eval()
        ids, mask, labels = R.make_batch(cfg)
        with torch.no_grad():
            res = loaded(input_ids=ids, attention_mask=mask, labels=labels)
        saved = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
        assert list(saved) == ["prompt_embeddings"], list(saved)
        assert np.array_equal(saved["prompt_embeddings"], table.numpy()), "PEFT saves the table as is"
        ref = {
            "input_ids": ids.numpy(),
            "attention_mask": mask.numpy(),
            "labels": labels.numpy(),
            "prompt_embeddings": table.numpy().astype(np.float32),
            "loss": np.array(res.loss.item(), dtype=np.float32),
            "logits": np.ascontiguousarray(res.logits.numpy().astype(np.float32)),
        }
        save_file({k: np.ascontiguousarray(v) for k, v in ref.items()}, os.path.join(HERE, f"adapter-{fixture}.reference.safetensors"))
        print(f"{fixture}: L = {layers}, prompt_embeddings {list(table.shape)}, PEFT loss {res.loss.item():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
