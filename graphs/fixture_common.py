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


KEEP_NODE_METADATA = {"pkg.torch.onnx.name_scopes"}


def strip_node_metadata(proto):
    """Drop the exporter's per-node debug metadata (stack traces with this machine's paths, FX node text,
    class hierarchy, namespace): ~0.25 MB per graph. Keeps name_scopes (the module path of each node), so
    the fixture still carries NodeProto.metadata_props. Graph semantics are untouched."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key in KEEP_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return proto


class NoPast(torch.nn.Module):
    """What torch.onnx.export traces without past: (ids, mask) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class WithPast(torch.nn.Module):
    """Flat tensors in and out: (ids, mask, k0, v0, k1, v1, ...) -> (logits, pk0, pv0, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.n_layer = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layer)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        flat = [out.logits]
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


# ---- the prefix-tuning setup of the PEFT references (graphs/peft/, graphs/peft-decoders/) --------------------
P = 4  # num_virtual_tokens
B = 3  # batch
T = 7  # sequence length
VOCAB_IDS = 95  # input ids are drawn from [0, 95)
PAD = 2  # row 1: last PAD positions masked (right padding); row 2: first PAD positions masked (left padding)
ROW0_IGNORED = 2  # labels of row 0: first ROW0_IGNORED positions set to -100
ENCODER_HIDDEN = 16  # M, reparam mode only
NOISE_STD = 0.1  # seeded noise added to every trainable tensor after PEFT's init


def prefix_batch(seed):
    """The references' batch: B rows of T ids drawn from [0, VOCAB_IDS); row 1 right-padded and row 2 left-padded
    by PAD positions; labels -100 under the padding and on row 0's first ROW0_IGNORED positions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_IDS, (B, T), generator=g, dtype=torch.int64)
    attention_mask = torch.ones(B, T, dtype=torch.int64)
    attention_mask[1, T - PAD :] = 0
    attention_mask[2, :PAD] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, :ROW0_IGNORED] = -100
    return input_ids, attention_mask, labels
