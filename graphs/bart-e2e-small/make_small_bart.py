#!/usr/bin/env python3
"""Make a small BART that has learned E2E restaurant English as a denoiser, for the BART prefix-tuning example.

Runs in the reference venv (graphs/requirements-ref.txt; CPU only, about 6 minutes on 2 idle cores) and calls
`optimum-cli` from the optimum venv (graphs/requirements-optimum.txt) for the ONNX export:

    /root/.cache/pfx/ref/bin/python graphs/bart-e2e-small/make_small_bart.py [--data-dir /work/shared/data/e2e]
        [--optimum /root/.cache/pfx/optimum/bin/optimum-cli]

Reads the E2E dev set (`valid.txt`, lines `MR||text`) and, for held-out numbers only, `test.txt`.
Writes (relative to this file's folder):
    tokenizer.json          byte-level BPE, vocab 2048: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>=2047, BART's
                            post-processor (`<s> A </s>`)
    hf/                     BartForConditionalGeneration save_pretrained (config.json, generation_config.json,
                            model.safetensors)
    encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx, config.json, generation_config.json
                            `optimum-cli export onnx --task text2text-generation-with-past` of hf/ (the merged
                            decoder optimum also writes is dropped: a fourth copy of the decoder weights)
    <graph>.reference.safetensors
                            inputs and PyTorch's outputs for each graph (batch 2, real text, row 2 padded)
    train_log.json          losses, perplexities, greedy samples, ORT check (what README.md quotes)

peft_check.py (beside this script) is the prefix-tuning sanity check (PyTorch + PEFT, BLEU bare vs prefix).

Steps: (1) train the tokenizer on the references and the MR strings of valid.txt; (2) pretrain BART as a
denoiser on the references only (never an MR): each epoch the references are shuffled and packed 1..3 to an
example; a word-substitution augmentation puts words the language model cannot predict into source and target
alike (so the model learns to copy from its source instead of recalling memorized references); then BART's text
infilling corrupts the source (Poisson(3) spans, each replaced by one <mask>, 5-55% of the tokens); the target is
the clean text; (3) export with optimum and check onnxruntime == PyTorch, including a greedy denoising decode
through the three graphs with the KV cache. Everything is seeded and training runs with
torch.use_deterministic_algorithms(True), so a rerun with the pinned versions should retrain the same model.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BartConfig, BartForConditionalGeneration, DynamicCache, EncoderDecoderCache

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20261129
VOCAB = 2048
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in BART; <mask> is added last (2047)
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, VOCAB - 1
TOL = 1e-4
OPTIMUM_CLI = "/root/.cache/pfx/optimum/bin/optimum-cli"

# Model. Sizes are kept down because the weights are in the folder four times (hf/, encoder, decoder, decoder
# with past): the embedding table alone is 2048 x d floats per copy.
CONFIG = dict(
    vocab_size=VOCAB,
    max_position_embeddings=256,
    d_model=80,
    encoder_layers=3,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=160,
    decoder_ffn_dim=160,
    activation_function="gelu",
    dropout=0.1,
    attention_dropout=0.0,
    activation_dropout=0.0,
    scale_embedding=False,
    tie_word_embeddings=True,
    init_std=0.07,  # not BART's 0.02: at this width 0.02 leaves attention uniform and the model never learns to
    # copy (in trials a random-token copy task stayed at chance for 400 steps with 0.02 and 0.035; 0.05-0.1 learned it)
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    decoder_start_token_id=EOS,
    forced_eos_token_id=EOS,
)

# Noise: BART's text infilling. BART's sentence permutation is implemented but off (PERMUTE_SENTENCES): it makes
# the source-to-target alignment non-monotonic, and learning to copy was the hard part here (not evaluated further).
PERMUTE_SENTENCES = False
SUBST_PROB = 0.9
SUBST_MAX = 4
MASK_RATIO = 0.3  # held-out evaluation
TRAIN_MASK_RATIO = (0.05, 0.55)  # training: drawn per example, uniformly (mean 0.3)
POISSON_LAMBDA = 3.0
MAX_REFS_PER_EXAMPLE = 3  # references packed into one example: 1..3, uniformly
MAX_CONTENT = CONFIG["max_position_embeddings"] - 2  # room for <s> and </s>

# Training.
EPOCHS = 35
BATCH_TOKENS = 2048  # target tokens per batch (examples of similar length are batched together)
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.01
CLIP = 1.0
EVAL_EVERY = 5

MAX_NEW = 80
SAMPLE_LINES = (0, 1000, 2000, 3000)  # test.txt references for greedy denoising samples


def read_e2e(path):
    """Lines `MR||text ` -> [(mr, text)], both stripped."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            mr, text = line.rstrip("\n").split("||")
            pairs.append((mr.strip(), text.strip()))
    return pairs


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(pairs):
    tok = Tokenizer(models.BPE())
    # add_prefix_space=True: every piece of text between special tokens gets a leading space if it has none,
    # so "The Eagle", " The Eagle" and "<s>The Eagle" all start with the token "ĠThe" (one form per word).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 1,  # <mask> is added after training, so it gets the last id like BART's 50264
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [text for _, text in pairs] + [mr for mr, _ in pairs]
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == VOCAB - 1, tok.get_vocab_size()
    # BART's <mask> strips the space on its left ("a <mask> shop" -> "Ġa", "<mask>", "Ġshop").
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    for i, s in enumerate(SPECIALS + ["<mask>"]):
        assert tok.token_to_id(s) == [BOS, PAD, EOS, UNK, MASK][i], s
    # BART's post-processor: encode(text) -> <s> text </s>; a pair -> <s> A </s> </s> B </s>.
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", EOS), ("<s>", BOS), trim_offsets=True, add_prefix_space=True
    )
    return tok


def content_ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------------- noise
def split_sentences(ids, stops):
    """Cut a token list after each sentence-final token ('Ġ.', 'Ġ!', 'Ġ?'); a tail without one is a sentence."""
    out, cur = [], []
    for t in ids:
        cur.append(t)
        if t in stops:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def split_words(ids, starts_word):
    """Token list -> list of words (token lists), a word starting at each token that begins with 'Ġ'."""
    words = []
    for t in ids:
        if starts_word[t] or not words:
            words.append([t])
        else:
            words[-1].append(t)
    return words


def word_types(id_lists, starts_word):
    """The distinct words of a corpus (token tuples), in first-seen order."""
    seen = {}
    for ids in id_lists:
        for w in split_words(ids, starts_word):
            seen.setdefault(tuple(w), None)
    return [list(w) for w in seen]


def pseudo_word(rng, starts_word):
    """A random 'word': a random word-initial token ('Ġ...') then 0..3 random word-internal tokens. Like the
    names of test.txt that this tokenizer has never seen (e.g. ' Green Man' -> ĠG re en ĠM an)."""
    initial = np.flatnonzero(starts_word)
    inner = np.flatnonzero(~starts_word)
    inner = inner[(inner > UNK) & (inner != MASK)]  # no special tokens
    return [int(rng.choice(initial))] + [int(t) for t in rng.choice(inner, size=int(rng.integers(0, 4)))]


def substitute_words(ids, rng, words, starts_word):
    """Data augmentation applied to the clean text (so to the source and the target alike): with probability
    SUBST_PROB, 1..SUBST_MAX words are replaced, each by a word type of the corpus (uniformly) or by a
    pseudo-word (half the time each). The language model cannot predict such a word: the model has to copy it
    from the source, which is what reading an MR with names it never saw needs."""
    if SUBST_PROB <= 0 or rng.random() >= SUBST_PROB:
        return ids
    ws = split_words(ids, starts_word)
    k = min(len(ws), int(rng.integers(1, SUBST_MAX + 1)))
    for i in rng.choice(len(ws), size=k, replace=False):
        if rng.random() < 0.5:
            ws[i] = words[int(rng.integers(0, len(words)))]
        else:
            ws[i] = pseudo_word(rng, starts_word)
    return [t for w in ws for t in w]


def add_noise(ids, rng, stops, ratio=None):
    """BART's sentence permutation then text infilling on a token list (no specials)."""
    if PERMUTE_SENTENCES:
        sents = split_sentences(ids, stops)
        order = rng.permutation(len(sents))
        ids = [t for i in order for t in sents[i]]
    n = len(ids)
    to_mask = int(math.ceil(n * (MASK_RATIO if ratio is None else ratio)))
    masked = np.zeros(n, bool)
    inserts = set()  # positions before which a <mask> is inserted (spans of length 0)
    covered = 0
    while covered < to_mask:
        length = min(int(rng.poisson(POISSON_LAMBDA)), to_mask - covered)
        start = int(rng.integers(0, n))
        if length == 0:
            inserts.add(start)
            covered += 1  # as in fairseq, a zero-length span still uses up budget (else it could loop long)
            continue
        end = min(n, start + length)
        covered += int((~masked[start:end]).sum()) or 1
        masked[start:end] = True
    out, prev_masked = [], False
    for i, t in enumerate(ids):
        if i in inserts and not prev_masked:
            out.append(MASK)
            prev_masked = True
        if masked[i]:
            if not prev_masked:
                out.append(MASK)
            prev_masked = True
        else:
            out.append(t)
            prev_masked = False
    return out


def pack_examples(refs, rng):
    """Clean examples for one epoch: the references in a random order, packed 1..MAX_REFS_PER_EXAMPLE at a time
    (uniformly; up to MAX_CONTENT tokens), so that positions past one reference's length get trained too.
    Neighbours are unrelated references (not the same MR's), so a later one cannot be copied from an earlier."""
    order = rng.permutation(len(refs))
    examples, i = [], 0
    while i < len(order):
        k = int(rng.integers(1, MAX_REFS_PER_EXAMPLE + 1))
        cur = list(refs[order[i]])
        i += 1
        while k > 1 and i < len(order) and len(cur) + len(refs[order[i]]) <= MAX_CONTENT:
            cur += refs[order[i]]
            i += 1
            k -= 1
        examples.append(cur[:MAX_CONTENT])
    return examples


def make_batches(clean, noisy, rng=None):
    """Batches of examples of similar length, about BATCH_TOKENS target tokens each (padded).

    Returns a list of dicts: input_ids/attention_mask (encoder: <s> noisy </s>, right-padded with <pad>),
    decoder_input_ids (</s> <s> clean), labels (<s> clean </s>, -100 on padding)."""
    order = sorted(range(len(clean)), key=lambda i: (len(clean[i]), i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * (len(clean[i]) + 2) > BATCH_TOKENS:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if rng is not None:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    out = []
    for b in batches:
        src = [[BOS] + noisy[i] + [EOS] for i in b]
        tgt = [[BOS] + clean[i] + [EOS] for i in b]
        S, T = max(map(len, src)), max(map(len, tgt))
        ids = torch.full((len(b), S), PAD, dtype=torch.int64)
        mask = torch.zeros((len(b), S), dtype=torch.int64)
        labels = torch.full((len(b), T), -100, dtype=torch.int64)
        dec = torch.full((len(b), T), PAD, dtype=torch.int64)
        for r, (s, t) in enumerate(zip(src, tgt)):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            labels[r, : len(t)] = torch.tensor(t)
            dec[r, : len(t)] = torch.tensor([EOS] + t[:-1])
        out.append({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels})
    return out


# ------------------------------------------------------------------------------------------------- model
def make_model():
    torch.manual_seed(SEED)
    model = BartForConditionalGeneration(BartConfig(**CONFIG))
    model.generation_config.forced_bos_token_id = None
    return model


@torch.no_grad()
def mean_loss(model, batches):
    """Mean cross-entropy per labelled token."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       decoder_input_ids=b["decoder_input_ids"]).logits
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((b["labels"] != -100).sum())
    return total / count


def pretrain(model, train_refs, held_out, aug, log, epochs):
    """`held_out`: {name: batches} evaluated every EVAL_EVERY epochs; `aug`: (word types, starts_word, stops)."""
    words, starts_word, stops = aug
    rng = np.random.default_rng(SEED + 1)
    # Steps per epoch vary a little with the packing; estimate the schedule from one draw.
    est_rng = np.random.default_rng(SEED + 2)
    probe = pack_examples(train_refs, est_rng)
    steps_per_epoch = len(make_batches(probe, probe))
    total_steps = epochs * steps_per_epoch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR
    )

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        t = min(1.0, (step - WARMUP) / max(1, total_steps - WARMUP))
        return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    print(f"  {len(probe)} examples/epoch, ~{steps_per_epoch} steps/epoch x {epochs} epochs "
          f"(~{BATCH_TOKENS} target tokens per batch)", flush=True)
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        clean = [substitute_words(c, rng, words, starts_word) for c in pack_examples(train_refs, rng)]
        noisy = [add_noise(c, rng, stops, rng.uniform(*TRAIN_MASK_RATIO)) for c in clean]
        running, ntok = [], 0
        for b in make_batches(clean, noisy, rng):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            running.append(float(loss.detach()))
            ntok += int((b["labels"] != -100).sum())
            step += 1
        entry = {"epoch": epoch + 1, "steps": step, "train_loss_running": sum(running) / len(running),
                 "target_tokens": ntok}
        line = f"  epoch {epoch + 1:2d}  step {step:4d}  train {entry['train_loss_running']:.4f}"
        if (epoch + 1) % EVAL_EVERY == 0 or epoch + 1 == epochs:
            for name, batches in held_out.items():
                entry[name] = mean_loss(model, batches)
            line += "  " + "  ".join(f"{k} {entry[k]:.4f}" for k in held_out)
        entry["seconds"] = round(time.time() - t0, 1)
        log["epochs"].append(entry)
        print(f"{line}  {entry['seconds']:.0f}s", flush=True)
    model.eval()
    return time.time() - t0


# -------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def greedy_torch(model, src):
    """Greedy decode (full forward each step, no cache). Returns the generated ids after the decoder start."""
    ids = torch.tensor([src])
    enc = model.model.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    dec = [EOS]
    for _ in range(MAX_NEW):
        logits = model(encoder_outputs=(enc,), attention_mask=torch.ones_like(ids),
                       decoder_input_ids=torch.tensor([dec]), use_cache=False).logits
        nxt = int(logits[0, -1].argmax())
        dec.append(nxt)
        if nxt == EOS:
            break
    return dec[1:]


def ort_session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def greedy_ort(sessions, src, n_layer):
    """Greedy decode through the three graphs: encoder once, decoder_model for the first step (its presents
    hold the decoder and the encoder K/V), then decoder_with_past_model one token at a time."""
    enc_s, dec_s, past_s = sessions
    ids = np.array([src], np.int64)
    mask = np.ones_like(ids)
    (hidden,) = enc_s.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
    names = [o.name for o in dec_s.get_outputs()]
    res = dict(zip(names, dec_s.run(names, {"input_ids": np.array([[EOS]], np.int64),
                                            "encoder_attention_mask": mask, "encoder_hidden_states": hidden})))
    cross = {f"past_key_values.{i}.encoder.{kv}": res[f"present.{i}.encoder.{kv}"]
             for i in range(n_layer) for kv in ("key", "value")}
    out = []
    past_names = [o.name for o in past_s.get_outputs()]
    for _ in range(MAX_NEW):
        nxt = int(res["logits"][0, -1].argmax())
        out.append(nxt)
        if nxt == EOS:
            break
        feeds = {"input_ids": np.array([[nxt]], np.int64), "encoder_attention_mask": mask, **cross}
        for i in range(n_layer):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.decoder.{kv}"] = res[f"present.{i}.decoder.{kv}"]
        res = dict(zip(past_names, past_s.run(past_names, feeds)))
    return out


# ------------------------------------------------------------------------------------------------ export
def optimum_export(hf_dir, optimum_cli, log):
    for f in os.listdir(HERE):
        if f.endswith(".onnx") or f.endswith(".onnx_data") or f.endswith(".onnx.data"):
            os.remove(os.path.join(HERE, f))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [optimum_cli, "export", "onnx", "--model", hf_dir, "--task", "text2text-generation-with-past", tmp]
        print("  $ optimum-cli export onnx --model hf --task text2text-generation-with-past <tmp>", flush=True)
        # optimum's decoder merge iterates over sets of names: fix the hash seed so reruns give identical bytes.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:])
            raise SystemExit("optimum-cli failed")
        written = sorted(os.listdir(tmp))
        print(f"  optimum wrote: {', '.join(written)}")
        keep = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "config.json",
                "generation_config.json"]
        for f in written:
            assert not f.endswith("_data") and not f.endswith(".data"), f"external data: {f}"
        for f in keep:
            shutil.copy(os.path.join(tmp, f), os.path.join(HERE, f))
    ver = subprocess.run([os.path.join(os.path.dirname(optimum_cli), "python"), "-c",
                          "from importlib.metadata import version as v; import transformers, torch;"
                          "print(v('optimum'), v('optimum-onnx'), transformers.__version__, torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    log["export"] = {"tool": "optimum-cli export onnx --task text2text-generation-with-past",
                     "optimum": ver[0], "optimum-onnx": ver[1], "transformers": ver[2], "torch": ver[3],
                     "graphs": {}}
    for g in ("encoder_model", "decoder_model", "decoder_with_past_model"):
        path = os.path.join(HERE, g + ".onnx")
        onnx.checker.check_model(path, full_check=True)
        m = onnx.load(path)
        opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
        info = {"bytes": os.path.getsize(path), "ir": m.ir_version, "opset": opset, "nodes": len(m.graph.node),
                "initializers": len(m.graph.initializer)}
        log["export"]["graphs"][g] = info
        print(f"  {g}.onnx: {info}")
    cfg = json.load(open(os.path.join(HERE, "config.json")))
    assert cfg["pad_token_id"] == PAD and cfg["decoder_start_token_id"] == EOS, cfg


def np_dict(d):
    return {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in d.items()}


def check_graph(name, feeds, expected, log):
    """Run one exported graph on `feeds`, compare with PyTorch's `expected`, save both as the reference file."""
    feeds, expected = np_dict(feeds), np_dict(expected)
    save_file({**feeds, **expected}, os.path.join(HERE, f"{name}.reference.safetensors"))
    sess = ort_session(os.path.join(HERE, name + ".onnx"))
    assert sorted(i.name for i in sess.get_inputs()) == sorted(feeds), ([i.name for i in sess.get_inputs()], list(feeds))
    out_names = [o.name for o in sess.get_outputs()]
    assert sorted(out_names) == sorted(expected), (out_names, list(expected))
    worst = 0.0
    for n, v in zip(out_names, sess.run(out_names, feeds)):
        assert v.shape == expected[n].shape, (n, v.shape, expected[n].shape)
        worst = max(worst, float(np.max(np.abs(v - expected[n]))))
    print(f"  {name}: {len(out_names)} outputs, max |ort - torch| = {worst:.3g}")
    assert worst < TOL, (name, worst)
    log["ort_check"][name] = worst
    return sess


def check_exports(model, tok, pairs, log):
    """Encoder, decoder and decoder-with-past against PyTorch on real text (batch 2, row 2 right-padded)."""
    n_layer = model.config.decoder_layers
    log["ort_check"] = {}
    rows = [tok.encode(pairs[i][1]).ids for i in (0, 100)]
    S = max(len(rows[0]), len(rows[1]))
    ids = torch.full((2, S), PAD, dtype=torch.int64)
    mask = torch.zeros((2, S), dtype=torch.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    # Decoder ids: </s> <s> and the first tokens of each row's own text (the teacher-forced denoising target).
    dec_ids = torch.tensor([[EOS] + row[:5] for row in rows], dtype=torch.int64)  # [2, 6]
    with torch.no_grad():
        enc = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        check_graph("encoder_model", {"input_ids": ids, "attention_mask": mask}, {"last_hidden_state": enc}, log)

        def run_decoder(d, cache=None):
            out = model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=d, cache=cache, use_cache=True)
            c = out.cache
            self_kv = [(l.keys.clone(), l.values.clone()) for l in c.self_attention_cache.layers]
            cross_kv = [(l.keys.clone(), l.values.clone()) for l in c.cross_attention_cache.layers]
            return out.logits, self_kv, cross_kv

        def presents(self_kv, cross_kv=None):
            d = {}
            for i in range(n_layer):
                d[f"present.{i}.decoder.key"], d[f"present.{i}.decoder.value"] = self_kv[i]
                if cross_kv is not None:
                    d[f"present.{i}.encoder.key"], d[f"present.{i}.encoder.value"] = cross_kv[i]
            return d

        logits, self_kv, cross_kv = run_decoder(dec_ids)
        check_graph("decoder_model", {"input_ids": dec_ids, "encoder_attention_mask": mask, "encoder_hidden_states": enc},
                    {"logits": logits, **presents(self_kv, cross_kv)}, log)

        past_len = 4
        _, p_self, p_cross = run_decoder(dec_ids[:, :past_len])
        cache = EncoderDecoderCache(DynamicCache([(k.clone(), v.clone()) for k, v in p_self]),
                                    DynamicCache([(k.clone(), v.clone()) for k, v in p_cross]))
        step = dec_ids[:, past_len:past_len + 1]
        logits_p, self_kv_p, _ = run_decoder(step, cache)
        assert torch.allclose(logits_p[:, 0], logits[:, past_len], atol=1e-5)
        feeds = {"input_ids": step, "encoder_attention_mask": mask}
        for i in range(n_layer):
            feeds[f"past_key_values.{i}.decoder.key"], feeds[f"past_key_values.{i}.decoder.value"] = p_self[i]
            feeds[f"past_key_values.{i}.encoder.key"], feeds[f"past_key_values.{i}.encoder.value"] = p_cross[i]
        check_graph("decoder_with_past_model", feeds, {"logits": logits_p, **presents(self_kv_p)}, log)


# ------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/work/shared/data/e2e", help="folder with valid.txt and test.txt")
    ap.add_argument("--optimum", default=OPTIMUM_CLI, help="optimum-cli of the optimum venv")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="for quick trial runs only")
    ap.add_argument("--no-export", action="store_true", help="for quick trial runs only")
    ap.add_argument("--skip-train", action="store_true",
                    help="load hf/ instead of training (to redo the export and the checks); train_log.json keeps "
                         "the training entries of the run that made hf/")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort.__version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__}
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    log = {"versions": versions, "config": CONFIG,
           "noise": {"sentence_permutation": PERMUTE_SENTENCES, "mask_ratio_train": TRAIN_MASK_RATIO,
                     "mask_ratio_held_out": MASK_RATIO,
                     "poisson_lambda": POISSON_LAMBDA, "max_refs_per_example": MAX_REFS_PER_EXAMPLE,
                     "substitution_prob": SUBST_PROB, "substitution_max_words": SUBST_MAX},
           "training": {"epochs": args.epochs, "batch_tokens": BATCH_TOKENS, "lr": LR, "warmup": WARMUP,
                        "weight_decay": WEIGHT_DECAY, "clip": CLIP, "seed": SEED},
           "epochs": []}

    train_pairs = read_e2e(os.path.join(args.data_dir, "valid.txt"))
    test_pairs = read_e2e(os.path.join(args.data_dir, "test.txt"))

    print("tokenizer")
    tok = train_tokenizer(train_pairs)
    tok.save(os.path.join(HERE, "tokenizer.json"))
    stops = {tok.token_to_id(t) for t in ("Ġ.", "Ġ!", "Ġ?") if tok.token_to_id(t) is not None}
    train_ids = [content_ids(tok, t) for _, t in train_pairs]
    test_ids = [content_ids(tok, t) for _, t in test_pairs]
    mr_lens = [len(content_ids(tok, mr)) for mr, _ in train_pairs + test_pairs]
    example = train_pairs[0][1]
    log["tokenizer"] = {
        "vocab": tok.get_vocab_size(), "specials": {s: tok.token_to_id(s) for s in SPECIALS + ["<mask>"]},
        "ref_tokens_mean": float(np.mean([len(t) for t in train_ids])),
        "ref_tokens_max": max(map(len, train_ids + test_ids)), "mr_tokens_max": max(mr_lens),
        "example": {"text": example, "encode": tok.encode(example).tokens,
                    "encode_ids": tok.encode(example).ids},
    }
    print(f"  vocab {tok.get_vocab_size()}; tokens/reference mean {log['tokenizer']['ref_tokens_mean']:.1f} "
          f"max {log['tokenizer']['ref_tokens_max']}; tokens/MR max {max(mr_lens)}")
    print(f"  encode({example!r}) = {tok.encode(example).tokens}")

    print("pretrain (denoising, references only)")
    if args.skip_train:
        return export_only(args, tok, train_pairs, test_pairs, test_ids, stops)
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  {n_params} parameters ({n_params * 4 / 2**20:.2f} MiB float32)")
    log["parameters"] = n_params
    starts_word = np.array([tok.id_to_token(i).startswith("Ġ") for i in range(VOCAB)])
    words = word_types(train_ids, starts_word)
    print(f"  {len(words)} word types for the substitution augmentation")
    # Held-out: the test.txt references, one per example (no packing, no substitution): noised once with a
    # fixed seed (the denoising loss), clean (copy), and noised but paired with another reference's source
    # (what the decoder gets from the text alone: a language-model loss; the gap to the first is the source's use).
    test_rng = np.random.default_rng(SEED + 3)
    test_noisy = [add_noise(t, test_rng, stops) for t in test_ids]
    held_out = {"test_denoise": make_batches(test_ids, test_noisy),
                "test_copy": make_batches(test_ids, test_ids),
                "test_wrong_source": make_batches(test_ids, test_noisy[1:] + test_noisy[:1])}
    seconds = pretrain(model, train_ids, held_out, (words, starts_word, stops), log, args.epochs)
    train_eval_rng = np.random.default_rng(SEED + 4)
    train_noisy = [add_noise(t, train_eval_rng, stops) for t in train_ids]
    final = {"train_seconds": round(seconds, 1), "train_denoise": mean_loss(model, make_batches(train_ids, train_noisy))}
    final.update({k: log["epochs"][-1][k] for k in held_out})  # evaluated after the last epoch
    for k in list(final):
        if k != "train_seconds":
            final[k + "_ppl"] = math.exp(final[k])
    log["final"] = final
    print("  final (eval mode, one reference per example): " + ", ".join(
        f"{k} {final[k]:.4f} (ppl {final[k + '_ppl']:.2f})" for k in ["train_denoise", *held_out])
        + f"; trained in {seconds:.0f} s")

    model.save_pretrained(os.path.join(HERE, "hf"))
    export_and_sample(args, model, tok, train_pairs, test_pairs, test_ids, test_noisy, log)


def export_only(args, tok, train_pairs, test_pairs, test_ids, stops):
    """--skip-train: the model of hf/ and the training entries of its train_log.json."""
    model = BartForConditionalGeneration.from_pretrained(os.path.join(HERE, "hf"), dtype=torch.float32).eval()
    with open(os.path.join(HERE, "train_log.json")) as f:
        old = json.load(f)
    log = {k: old[k] for k in old if k not in ("export", "ort_check", "samples")}
    test_rng = np.random.default_rng(SEED + 3)  # the same draw as in main
    test_noisy = [add_noise(t, test_rng, stops) for t in test_ids]
    export_and_sample(args, model, tok, train_pairs, test_pairs, test_ids, test_noisy, log)


def export_and_sample(args, model, tok, train_pairs, test_pairs, test_ids, test_noisy, log):
    """Export hf/ with optimum, check ORT == PyTorch, greedy samples (PyTorch == ORT), write train_log.json."""
    hf_dir = os.path.join(HERE, "hf")
    # Greedy samples: noised test references, one clean test reference, one MR (never seen as input).
    samples = [("noised test ref", test_noisy[i], test_ids[i]) for i in SAMPLE_LINES]
    samples.append(("clean test ref", test_ids[SAMPLE_LINES[1]], test_ids[SAMPLE_LINES[1]]))
    samples.append(("MR", content_ids(tok, test_pairs[0][0]), None))
    sessions = None
    if not args.no_export:
        print("export")
        optimum_export(hf_dir, args.optimum, log)
        check_exports(model, tok, train_pairs, log)
        sessions = [ort_session(os.path.join(HERE, g + ".onnx"))
                    for g in ("encoder_model", "decoder_model", "decoder_with_past_model")]

    print("greedy samples" + (" (PyTorch == ONNX graphs with KV cache)" if sessions else ""))
    log["samples"] = []
    for kind, src_ids, ref in samples:
        src = [BOS] + src_ids + [EOS]
        a = greedy_torch(model, src)
        if sessions:
            b = greedy_ort(sessions, src, model.config.decoder_layers)
            assert a == b, (kind, a, b)
        entry = {"kind": kind, "input": tok.decode(src, skip_special_tokens=False).strip(),
                 "output": tok.decode(a, skip_special_tokens=False).strip()}
        if ref is not None:
            entry["reference"] = tok.decode(ref).strip()
            entry["exact"] = a == [BOS] + ref + [EOS]
        log["samples"].append(entry)
        print(f"  [{kind}] {entry['input']}\n      -> {entry['output']}")
    if sessions:
        log["ort_check"]["greedy_samples_identical"] = True

    with open(os.path.join(HERE, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("done")



if __name__ == "__main__":
    sys.exit(main())
