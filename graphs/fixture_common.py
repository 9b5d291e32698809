"""What the fixture scripts share. They run in two venvs (transformers 5.x for the HF folders and references,
4.x with optimum for the exports), so this needs torch and safetensors only."""
import os

import torch


def add_noise(model, seed):
    """Perturb every parameter so no two initializers are identical (exporters merge equal ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)


def load_checked(cls, hf_dir):
    """Load the HF folder with `cls` and prove every saved tensor arrived unchanged (one set of weights across
    venvs)."""
    from safetensors.torch import load_file

    model, info = cls.from_pretrained(hf_dir, output_loading_info=True, torch_dtype=torch.float32)
    assert not any(info.values()), info
    saved = load_file(os.path.join(hf_dir, "model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    return model.eval()


def prefix_batch(seed, batch, seq, vocab_ids, pad, row0_ignored):
    """The prefix-tuning test batch: ids drawn from [0, vocab_ids); row 1 right-padded and row 2 left-padded by
    `pad` positions; labels -100 under the padding and on row 0's first `row0_ignored` positions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_ids, (batch, seq), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[1, seq - pad :] = 0
    attention_mask[2, :pad] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :row0_ignored] = -100
    return input_ids, attention_mask, labels
