#!/usr/bin/env python3
"""Make a small GPT-2 that has actually learned E2E restaurant English, for the prefix-tuning example.

Runs in the reference venv (graphs/requirements-ref.txt; CPU only, ~5 minutes on 2 idle cores):

    /root/.cache/pfx/ref/bin/python graphs/e2e-small/make_small_model.py [--data-dir /work/shared/data/e2e]

Reads the E2E dev set (`valid.txt`, lines `MR||text`) and, for a held-out perplexity only, `test.txt`.
Writes (relative to this file's folder):
    tokenizer.json          byte-level BPE, vocab 2048, `<|endoftext|>` = 2047 (last, as in GPT-2)
    hf/                     GPT2LMHeadModel save_pretrained (config.json, generation_config.json, model.safetensors)
    model.onnx              torch.onnx.export(dynamo=True) with past; weights inline
    reference.safetensors   inputs (past length 3) and PyTorch's outputs, under the graph's names
    train_log.json          losses, perplexities and greedy samples (what README.md quotes)

Steps: (1) train the tokenizer on the references and the MR strings of valid.txt; (2) pretrain the LM on the
references only, `' ' + text + ' <|endoftext|>'` per line, the references of one MR kept together (MR groups
shuffled each epoch) and packed into blocks of n_positions tokens (so every position embedding is trained); (3) export with past and check ORT == PyTorch,
including a greedy decode through the ONNX graph with its own KV cache. Everything is seeded and training runs with
torch.use_deterministic_algorithms(True), so a rerun with the pinned versions retrains the same model.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
# The export wrapper of graphs/make_fixtures.py (the gpt2-dynamo-past fixture) and its metadata stripping.
sys.path.insert(0, os.path.dirname(HERE))
from fixture_common import WithPast, strip_node_metadata  # noqa: E402
SEED = 20261128
EOT = "<|endoftext|>"
VOCAB = 2048
TOL = 1e-4

# Model and training hyper-parameters. n_positions is 256, not 128: an E2E MR + reference is up to ~126
# tokens with this tokenizer, and the prefix comes on top of that.
CONFIG = dict(n_positions=256, n_embd=128, n_layer=4, n_head=4)
EPOCHS = 12
EVAL_EVERY = 3  # epochs between held-out evaluations
BATCH = 8  # blocks of n_positions tokens per step
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.01
CLIP = 1.0

# Greedy samples for the README: each prompt follows an <|endoftext|> (the document boundary of pretraining).
PROMPTS = ["", " The Eagle", " There is a cheap"]
MAX_NEW = 60


def read_e2e(path):
    """Lines `MR||text ` -> [(mr, text)], both stripped."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            mr, text = line.rstrip("\n").split("||")
            pairs.append((mr.strip(), text.strip()))
    return pairs


def lm_line(text):
    return " " + text + " " + EOT


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(pairs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 1,  # the special token is added after, so it gets the last id like GPT-2's 50256
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" " + text for _, text in pairs] + [" " + mr for mr, _ in pairs]
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == VOCAB - 1, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    assert tok.token_to_id(EOT) == VOCAB - 1
    return tok


# ------------------------------------------------------------------------------------------------- model
def make_model(eot_id):
    config = GPT2Config(vocab_size=VOCAB, bos_token_id=eot_id, eos_token_id=eot_id, **CONFIG)
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(config)


def packed_blocks(groups, block, generator=None):
    """Concatenate the references and cut the stream into full blocks of `block` tokens.

    `groups` holds, per MR, the token lists of its references. Groups are shuffled (when a generator is
    given) but the references of one MR stay together, so a block reads like several descriptions of the same
    restaurant: the LM learns to reuse what its context already said (names, food, area). It still never sees
    an MR; prefix-tuning has to teach it to read one.
    """
    order = torch.randperm(len(groups), generator=generator).tolist() if generator else range(len(groups))
    stream = []
    for i in order:
        refs = groups[i]
        inner = torch.randperm(len(refs), generator=generator).tolist() if generator else range(len(refs))
        for j in inner:
            stream.extend(refs[j])
    n = len(stream) // block
    return torch.tensor(stream[: n * block], dtype=torch.int64).view(n, block)


def group_refs(pairs, ids):
    """Token lists grouped by MR, in first-seen order."""
    groups, index = [], {}
    for (mr, _), t in zip(pairs, ids):
        if mr not in index:
            index[mr] = len(groups)
            groups.append([])
        groups[index[mr]].append(t)
    return groups


@torch.no_grad()
def mean_loss(model, blocks, batch=16):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        loss = model(input_ids=x, labels=x).loss  # mean over the batch's shifted tokens
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(loss) * n
        count += n
    return total / count


def pretrain(model, train_ids, test_ids, log, epochs=EPOCHS):
    block = model.config.n_positions
    g = torch.Generator().manual_seed(SEED + 1)
    test_blocks = packed_blocks(test_ids, block)
    steps_per_epoch = packed_blocks(train_ids, block).shape[0] // BATCH
    total_steps = epochs * steps_per_epoch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        t = (step - WARMUP) / max(1, total_steps - WARMUP)
        return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    print(f"  {sum(len(t) for grp in train_ids for t in grp)} train tokens, {steps_per_epoch} steps/epoch x {epochs} epochs "
          f"(batch {BATCH} x {block}); {test_blocks.shape[0]} held-out blocks")
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        blocks = packed_blocks(train_ids, block, g)
        perm = torch.randperm(blocks.shape[0], generator=g)
        running = []
        for b in range(steps_per_epoch):
            x = blocks[perm[b * BATCH : (b + 1) * BATCH]]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            running.append(float(loss.detach()))
            step += 1
        entry = {"epoch": epoch + 1, "train_loss_running": sum(running) / len(running)}
        line = f"  epoch {epoch + 1:2d}  train {entry['train_loss_running']:.4f}"
        if (epoch + 1) % EVAL_EVERY == 0 or epoch + 1 == epochs:
            entry["test_loss"] = mean_loss(model, test_blocks)
            line += f"  held-out {entry['test_loss']:.4f} (ppl {math.exp(entry['test_loss']):.2f})"
        entry["seconds"] = round(time.time() - t0, 1)
        log["epochs"].append(entry)
        print(f"{line}  {entry['seconds']:.0f}s", flush=True)
    model.eval()


# ------------------------------------------------------------------------------------------------ export


def io_names(n_layer):
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return past, present


def np_dict(d):
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in d.items()}


def ort_session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def export_with_past(model, tok, pairs, path, log):
    n_layer = model.config.n_layer
    past_names, present_names = io_names(n_layer)
    wrapper = WithPast(model).eval()

    # Example inputs from real E2E text: 3 past tokens (K/V computed by the model itself), 5 new, full mask.
    rows = [tok.encode(EOT + lm_line(pairs[i][1])).ids[:8] for i in (0, 100)]
    ids_all = torch.tensor(rows, dtype=torch.int64)
    past_ids, ids = ids_all[:, :3], ids_all[:, 3:]
    with torch.no_grad():
        first = model(input_ids=past_ids, attention_mask=torch.ones_like(past_ids), use_cache=True)
    past = []
    for layer in first.cache.layers:
        past += [layer.keys.clone(), layer.values.clone()]
    mask = torch.ones_like(ids_all)

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_len, total = torch.export.Dim("past_sequence"), torch.export.Dim("past_sequence_plus_sequence")
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past": tuple({0: batch, 2: past_len} for _ in past_names),
    }
    prog = torch.onnx.export(
        wrapper,
        (ids, mask, *past),
        dynamo=True,
        input_names=["input_ids", "attention_mask", *past_names],
        output_names=["logits", *present_names],
        dynamic_shapes=dyn,
    )
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    onnx.save_model(strip_node_metadata(prog.model_proto), path)  # weights inline (~4.5 MB)
    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path)
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    print(f"  {os.path.basename(path)}: ir={m.ir_version} opset={opset} nodes={len(m.graph.node)} "
          f"initializers={len(m.graph.initializer)} size={os.path.getsize(path)} bytes")

    # Reference: PyTorch outputs for these inputs, checked against ORT.
    with torch.no_grad():
        outs = wrapper(ids, mask, *[p.clone() for p in past])
    feeds = np_dict({"input_ids": ids, "attention_mask": mask, **dict(zip(past_names, past))})
    expected = np_dict(dict(zip(["logits", *present_names], outs)))
    save_file({**feeds, **expected}, os.path.join(HERE, "reference.safetensors"))

    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", *past_names]
    assert [o.name for o in sess.get_outputs()] == ["logits", *present_names]
    for i in sess.get_inputs() + sess.get_outputs():
        print(f"    {i.name:28s} {i.type:16s} {i.shape}")
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    worst = 0.0
    for n, v in expected.items():
        assert got[n].shape == v.shape, (n, got[n].shape, v.shape)
        worst = max(worst, float(np.max(np.abs(got[n] - v))))
    print(f"  reference (past 3, seq 5, batch 2): max |ort - torch| = {worst:.3g}")
    assert worst < TOL
    log["export"] = {"max_abs_ort_minus_torch": worst, "nodes": len(m.graph.node), "opset": opset,
                     "bytes": os.path.getsize(path)}
    return sess


# -------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def greedy_torch(model, ids, eot_id):
    out = list(ids)
    for _ in range(MAX_NEW):
        logits = model(input_ids=torch.tensor([out]), use_cache=False).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eot_id:
            break
    return out[len(ids):]


def greedy_ort(sess, ids, eot_id, model_config):
    """Greedy decode through the exported graph with its own KV cache: prefill with an empty past, then 1 token
    at a time feeding present -> past."""
    past_names, present_names = io_names(model_config.n_layer)
    h, d = model_config.n_head, model_config.n_embd // model_config.n_head
    past = {n: np.zeros((1, h, 0, d), np.float32) for n in past_names}
    cur, out = list(ids), []
    length = 0
    for _ in range(MAX_NEW):
        length += len(cur)
        feeds = {"input_ids": np.array([cur], np.int64), "attention_mask": np.ones((1, length), np.int64), **past}
        res = dict(zip(["logits", *present_names], sess.run(None, feeds)))
        nxt = int(res["logits"][0, -1].argmax())
        out.append(nxt)
        if nxt == eot_id:
            break
        past = {pn: res[qn] for pn, qn in zip(past_names, present_names)}
        cur = [nxt]
    return out


# ------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/work/shared/data/e2e", help="folder with valid.txt and test.txt")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="for quick trial runs only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort.__version__, "tokenizers": tokenizers.__version__}
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    log = {"versions": versions, "config": dict(CONFIG, vocab_size=VOCAB), "epochs": []}

    train_pairs = read_e2e(os.path.join(args.data_dir, "valid.txt"))
    test_pairs = read_e2e(os.path.join(args.data_dir, "test.txt"))

    print("tokenizer")
    tok = train_tokenizer(train_pairs)
    tok.save(os.path.join(HERE, "tokenizer.json"))
    eot_id = tok.token_to_id(EOT)
    train_ids = [tok.encode(lm_line(t)).ids for _, t in train_pairs]
    test_ids = [tok.encode(lm_line(t)).ids for _, t in test_pairs]
    mr_lens = [len(tok.encode(" " + mr).ids) for mr, _ in train_pairs]
    print(f"  vocab {tok.get_vocab_size()}, {EOT} = {eot_id}; tokens/reference mean "
          f"{np.mean([len(t) for t in train_ids]):.1f} max {max(map(len, train_ids))}; "
          f"tokens/MR mean {np.mean(mr_lens):.1f} max {max(mr_lens)}")
    log["tokenizer"] = {"vocab": tok.get_vocab_size(), "eot_id": eot_id,
                        "ref_tokens_mean": float(np.mean([len(t) for t in train_ids])),
                        "ref_tokens_max": max(map(len, train_ids)), "mr_tokens_max": max(mr_lens)}

    print("pretrain")
    model = make_model(eot_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  {n_params} parameters ({n_params * 4 / 2**20:.2f} MiB float32)")
    log["parameters"] = n_params
    train_groups, test_groups = group_refs(train_pairs, train_ids), group_refs(test_pairs, test_ids)
    pretrain(model, train_groups, test_groups, log, args.epochs)
    block = model.config.n_positions
    train_loss = mean_loss(model, packed_blocks(train_groups, block))
    test_loss = log["epochs"][-1]["test_loss"]  # evaluated after the last epoch
    log["final"] = {"train_loss": train_loss, "train_ppl": math.exp(train_loss),
                    "test_loss": test_loss, "test_ppl": math.exp(test_loss)}
    print(f"  final (eval mode): train loss {train_loss:.4f} ppl {math.exp(train_loss):.2f}; "
          f"held-out test.txt loss {test_loss:.4f} ppl {math.exp(test_loss):.2f}")

    model.save_pretrained(os.path.join(HERE, "hf"))

    print("export")
    sess = export_with_past(model, tok, train_pairs, os.path.join(HERE, "model.onnx"), log)

    print("greedy samples (after <|endoftext|>)")
    log["samples"] = []
    for prompt in PROMPTS:
        ids = tok.encode(EOT + prompt).ids
        a = greedy_torch(model, ids, eot_id)
        b = greedy_ort(sess, ids, eot_id, model.config)
        assert a == b, (prompt, a, b)
        text = tok.decode(a, skip_special_tokens=False)
        log["samples"].append({"prompt": prompt, "continuation": text})
        print(f"  {prompt!r} -> {text!r}")

    with open(os.path.join(HERE, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
        f.write("\n")
    print("done")


if __name__ == "__main__":
    sys.exit(main())
