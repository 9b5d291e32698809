"""References for pfxrun's text format on models with their own special tokens (Llama, OPT, ...).

Run with the reference venv (graphs/requirements-ref.txt):  python graphs/make_text_references.py

No real Llama or OPT tokenizer can be downloaded here, so two small ones are trained on the E2E slice in
examples/data/ and saved through transformers' own tokenizer classes, which write the pipelines those models' files
have:
- graphs/tokenizers/llama-style/: LlamaTokenizer (SentencePiece-style BPE, Metaspace, `<s>` added before a text),
  96 ids, so that it fits the tiny Llama fixtures' vocabulary;
- graphs/tokenizers/opt-style/: GPT2Tokenizer as OPT's (byte-level BPE, `</s>` added before a text), 320 ids;
- graphs/tokenizers/llama-eos-style/: llama-style's, also adding `</s>` after a text (add_eos_token);
- graphs/tokenizers/qwen-style/: Qwen2Tokenizer (byte-level BPE, nothing added around a text, `<|endoftext|>` the
  end of text), 300 ids;
- graphs/tokenizers/pegasus-style/: PegasusTokenizer (SentencePiece-style Unigram, `</s>` added after a text and
  nothing before, as Pegasus's and Marian's tokenizers do), for the encoder-decoders of BART's layout;
- graphs/tokenizers/mbart-style/: MBartTokenizer (mBART-cc25's: `X </s> lang_code` for sources and targets alike,
  the language set by src_lang / tgt_lang), 96 ids laid out as mBART's (<s> 0, <pad> 1, </s> 2, <unk> 3, 66
  Unigram pieces counted from the E2E slice, the 25 language codes at 70..94, <mask> 95), the ids of
  graphs/mbart-tiny/;
- graphs/tokenizers/mbart50-style/: MBart50Tokenizer (mBART-50's: `lang_code X </s>`), the same pieces, its 52
  language codes at 70..121 (the first 25 as mbart-style's), <mask> 122;
- graphs/tokenizers/nllb-style/: NllbTokenizer (NLLB-200's: `lang_code X </s>` for sources and targets, BPE pieces
  after Metaspace), 96 ids laid out for graphs/m2m100-tiny/ (<s> 0, <pad> 1, </s> 2, <unk> 3, 87 BPE pieces counted
  from the E2E slice, <mask> 91, then the language codes eng_Latn, fra_Latn, deu_Latn, ron_Latn at 92..95, the
  fixture's; the real checkpoint has its 202 codes before <mask>, which would not fit 96 ids);
- graphs/tokenizers/nllb-legacy-style/: the same with legacy_behaviour=True (`X </s> lang_code`, the framing
  NLLB's tokenizer had at first, kept behind that flag; HF goes by that flag in tokenizer_config.json, not by the
  post-processor saved in tokenizer.json, which the script checks);
- graphs/tokenizers/blenderbot-small-style/: BlenderbotSmallTokenizer's files (vocab.json, merges.txt: lowercased,
  punctuation split off, subword-nmt style BPE with `</w>` word ends and `@@` on the pieces that do not end a word;
  nothing added around a text; specials `__start__` 0, `__null__` 1, `__end__` 2, `__unk__` 3, as
  graphs/blenderbot-small-tiny/'s bos, pad, eos: the real checkpoint has `__null__` 0, `__start__` 1), 320 ids, with a
  merges list learned by this script (a plain BPE count, ties to the smaller pair: reruns give the same files), and a
  tokenizer.json for the `tokenizers` library that gives the same ids as the Python class on every line of
  examples/data/e2e_*.txt (the checkpoint has none: transformers maps blenderbot-small to the Python class only);
- graphs/tokenizers/t5-style/: T5Tokenizer (T5's pipeline: Unigram, WhitespaceSplit + Metaspace, `$A </s>`, nothing
  before a text), 100 ids as T5's layout starts (<pad> 0 = decoder start, </s> 1, <unk> 2, then 97 Unigram pieces
  counted from the E2E slice: the word start mark, the 50 most frequent characters, the most frequent words after the
  mark) and no `<extra_id_N>` sentinels (extra_ids=0: the real 100 would not fit), the ids of graphs/t5-tiny/;
- graphs/tokenizers/t5-sp-style/: T5's tokenizer.json as its checkpoints have it, made as theirs were: a SentencePiece
  Unigram model trained here (the `sentencepiece` package; 90 pieces, nmt_nfkc normalization, <pad> 0, </s> 1, <unk> 2,
  one thread and a fixed seed, so reruns give the same bytes) converted by `T5Tokenizer.from_pretrained` on its
  spiece.model with extra_ids=10: a `Precompiled` normalizer (the nmt_nfkc charsmap, most of the file's 330 KB),
  WhitespaceSplit + Metaspace, `$A </s>`, and `<extra_id_9>`..`<extra_id_0>` as special added tokens at 90..99 (T5's
  layout at a smaller count), 100 ids as graphs/t5-tiny/. spiece.model itself is not kept.

Written references (Hugging Face's tokenizer is the reference for the ids, PEFT for the numbers):
- graphs/tokenizers/model-format-cases.json: for each tokenizer and the first examples of
  examples/data/e2e_test.txt, the prompt `tokenizer(source) + [eos]` (no second EOS when the tokenizer ends a
  text with it) and the labelled part
  `tokenizer(target, add_special_tokens=False) + [eos]`;
- graphs/tokenizers/seq2seq-format-cases.json: for pegasus-style, the source ids `tokenizer(source)` and the labels
  `tokenizer(text_target=target)` of the first examples of examples/data/e2e_test.txt, as a Pegasus or Marian
  fine-tuning script makes them;
- graphs/tokenizers/mbart-format-cases.json: the same for mbart-style and mbart50-style, for two language pairs
  each (src_lang / tgt_lang passed to `from_pretrained`), with the decoder inputs mBART's `shift_tokens_right` makes
  of the labels and the ids of HF's truncation to 8 (source) / 6 (target) tokens (a file of its own, so that
  seq2seq-format-cases.json stays as it was);
- graphs/tokenizers/nllb-format-cases.json: the same for nllb-style and nllb-legacy-style (M2M100's labels are
  shifted right behind decoder_start = </s>, no rotation), and for nllb-style the greedy ids and text of HF's
  `generate(..., forced_bos_token_id=fra_Latn)` on graphs/m2m100-tiny/hf (no prefix) for the distinct sources of the
  first 8 lines of examples/data/e2e_train.txt, cut to 48 tokens, 6 new tokens at most;
- graphs/tokenizers/blenderbot-small-format-cases.json: the same for blenderbot-small-style (`tokenizer(source)`,
  `tokenizer(text_target=target)`: the bare pieces, no specials), with the decoder inputs BART's
  `shift_tokens_right(labels, pad, decoder_start = __start__)` makes of the labels and HF's truncation to 8 / 6;
- graphs/tokenizers/t5-format-cases.json: the same for t5-style (loaded as `T5TokenizerFast(tokenizer_file=...)`;
  `X </s>` for sources and targets alike), with the decoder inputs T5's `_shift_right` makes of the labels (behind
  <pad>, the decoder start) and HF's truncation to 8 / 6; under `generate`, HF's greedy
  `generate(max_new_tokens=8)` on graphs/t5-tiny/hf (no prefix) for a few short sources cut to 16 tokens (the last
  one longer, so that it is cut). The random fixture repeats one token (the first step's pick) for every source,
  never </s>: pad (0) for the last one, whose text is empty. `python graphs/make_text_references.py t5` writes only
  t5-style and this file;
- graphs/tokenizers/t5-sp-format-cases.json: the same for t5-sp-style (AutoTokenizer, checked against
  `T5TokenizerFast(tokenizer_file=...)`) on pairs written to go through the normalizer (full-width letters and digits,
  ligatures, NBSP, ideographic and zero-width spaces, runs of spaces, tabs, newlines, é composed and decomposed,
  unknown characters, sentinels in the text), plus `tokenizer(text)` of lone texts (empty and blank ones too), the
  sentinels' ids, HF's `decode(ids, skip_special_tokens=True)` of a few id lists, and the greedy generation on
  graphs/t5-tiny/hf of four sources (one giving a sentinel eight times: an empty text). `python
  graphs/make_text_references.py t5-sp` writes only t5-sp-style and this file (it needs `sentencepiece`);
- graphs/peft-decoders/text-llama-gqa-tiny.json: the tiny GQA Llama with PEFT's saved adapter
  (graphs/peft-decoders/adapter-llama-gqa-tiny) and the llama-style tokenizer: the mean loss over the examples of
  graphs/peft-decoders/text-e2e.txt (rows of SEQ tokens, right-padded), and the greedy text of each source.

Reruns are byte-identical.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZERS = os.path.join(HERE, "tokenizers")
SEQ = 56  # rows of the eval reference; with the 4 prefix positions inside the fixture's 64
NEW = 8  # greedy tokens at most (fewer when EOS comes first)
# Short E2E-style examples, so that they fit SEQ tokens of a 96-id tokenizer (written to text-e2e.txt).
TEXT_EXAMPLES = [
    ("name : Aromi | food : Chinese", "Aromi serves Chinese food ."),
    ("name : Aromi | area : riverside", "Aromi is by the river ."),
    ("name : Zizzi | eatType : pub", "Zizzi is a pub ."),
]


def e2e_pairs(path):
    """(source, target) of each line, trimmed as pfxrun's reader trims them."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                source, target = line.split("||")
                pairs.append((source.strip(), target.strip()))
    return pairs


def train_texts():
    return [t for pair in e2e_pairs(os.path.join(ROOT, "examples/data/e2e_train.txt")) for t in pair]


def vocab_and_merges(trained):
    model = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def save(tokenizer, name):
    out = os.path.join(TOKENIZERS, name)
    tokenizer.save_pretrained(out)
    # Only the files a model folder has for its tokenizer; indented JSON with sorted keys is stable across runs.
    for f in sorted(os.listdir(out)):
        if f not in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(out, f))
    return out


def make_llama_style():
    from tokenizers import Tokenizer, models, trainers
    from transformers import LlamaTokenizer

    trained = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60,
                                  show_progress=False)
    trained.train_from_iterator(train_texts(), trainer)
    vocab, merges = vocab_and_merges(trained)
    # Also the same one ending every text with `</s>` (LlamaTokenizer's add_eos_token).
    eos_style = save(LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=True),
                     "llama-eos-style")
    return save(LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True), "llama-style"), eos_style


def make_opt_style():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator(train_texts(), trainer)
    vocab, merges = vocab_and_merges(trained)
    opt = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                        unk_token="<unk>", add_bos_token=True)
    return save(opt, "opt-style")


def make_qwen_style():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator(train_texts(), trainer)
    vocab, merges = vocab_and_merges(trained)
    return save(Qwen2Tokenizer(vocab=vocab, merges=merges), "qwen-style")


def make_pegasus_style():
    import math
    from collections import Counter

    from transformers import PegasusTokenizer

    # A Unigram vocabulary made by counting rather than by the trainer (whose choice among pieces of equal score
    # varies from run to run): the 120 most frequent words with their word-start mark, then every character
    # alone and after the mark, scored by log frequency, so that reruns give the same file.
    words = Counter(w for text in train_texts() for w in text.split())
    chars = Counter(c for text in train_texts() for c in text if not c.isspace())
    total = sum(words.values()) + sum(chars.values())
    pieces = {"\u2581" + w: n for w, n in words.most_common(120)}
    for c, n in chars.items():
        pieces.setdefault(c, n)
        pieces.setdefault("\u2581" + c, n)
    pieces["\u2581"] = total
    scored = sorted(((p, round(math.log(n / total), 6)) for p, n in pieces.items()), key=lambda v: (-v[1], v[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + scored
    # offset=0: no reserved <unk_N> ids (real Pegasus has 103), so the ids stay few.
    return save(PegasusTokenizer(vocab=vocab, offset=0), "pegasus-style")


def mbart_pieces():
    """66 Unigram pieces counted as make_pegasus_style counts them (so reruns give the same file), few enough that
    mbart-style has 96 ids as the tiny fixtures: the word start mark, the 45 most frequent characters, then the most
    frequent words after the mark (characters outside them become <unk>)."""
    import math
    from collections import Counter

    words = Counter(w for text in train_texts() for w in text.split())
    chars = Counter(c for text in train_texts() for c in text if not c.isspace())
    total = sum(words.values()) + sum(chars.values())
    pieces = {"\u2581": total}
    for c, n in chars.most_common(45):
        pieces[c] = n
    for w, n in words.most_common():
        if len(pieces) == 66:
            break
        pieces.setdefault("\u2581" + w, n)
    return sorted(((p, round(math.log(n / total), 6)) for p, n in pieces.items()), key=lambda v: (-v[1], v[0]))


# The language pairs of the mBART cases; en_XX -> ro_RO is mbart-large-en-ro's (graphs/mbart-tiny's ids).
MBART_PAIRS = [("en_XX", "ro_RO"), ("de_DE", "fr_XX")]


def make_mbart_style():
    from transformers import MBartTokenizer
    from transformers.models.mbart.tokenization_mbart import FAIRSEQ_LANGUAGE_CODES

    # mBART's layout: the four fairseq specials, the pieces, the language codes, <mask> last.
    vocab = ([("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + mbart_pieces()
             + [(c, 0.0) for c in FAIRSEQ_LANGUAGE_CODES] + [("<mask>", 0.0)])
    tok = MBartTokenizer(vocab=vocab, src_lang="en_XX", tgt_lang="ro_RO")
    assert len(tok) == 96 and tok.convert_tokens_to_ids(["en_XX", "ro_RO", "<mask>"]) == [73, 89, 95]
    return save(tok, "mbart-style")


def make_mbart50_style():
    from transformers import MBart50Tokenizer
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES

    vocab = ([("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + mbart_pieces()
             + [(c, 0.0) for c in FAIRSEQ_LANGUAGE_CODES] + [("<mask>", 0.0)])
    tok = MBart50Tokenizer(vocab=vocab, src_lang="en_XX", tgt_lang="ro_RO")
    assert len(tok) == 123 and tok.convert_tokens_to_ids(["en_XX", "ro_RO", "<mask>"]) == [73, 89, 122]
    return save(tok, "mbart50-style")


def seq2seq_case(tok, source, target, shift):
    """HF's ids for one source/target pair: the rows, the decoder inputs (`shift`: the model's shift_tokens_right
    of a [1, T] labels tensor) and both cut as its truncation cuts them (source to 8, target to 6)."""
    labels = tok(text_target=target)["input_ids"]
    dec = shift(torch.tensor([labels]))[0].tolist()
    return {"source": source, "target": target, "input_ids": tok(source)["input_ids"], "labels": labels,
            "decoder_input_ids": dec,
            "input_ids_max8": tok(source, max_length=8, truncation=True)["input_ids"],
            "labels_max6": tok(text_target=target, max_length=6, truncation=True)["input_ids"]}


def apply_merge(seqs, a, b):
    """Joins every adjacent (a, b) of each word's piece sequence, left to right, in place (a BPE merge)."""
    for w, seq in seqs.items():
        out, i = [], 0
        while i < len(seq):
            if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                out.append(a + b)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        seqs[w] = tuple(out)


def counted_bpe(size, alphabet_size=40):
    """A BPE counted from the E2E slice's words as Metaspace splits them (`\u2581word`): the alphabet_size most
    frequent characters, then the most frequent pair merged (ties to the smaller pair) until `size` pieces; pairs
    with a character outside the alphabet (an <unk>) are never merged. No trainer: reruns give the same pieces."""
    from collections import Counter

    words = Counter("\u2581" + w for text in train_texts() for w in text.split())
    chars = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    alphabet = sorted(c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:alphabet_size])
    seqs = {w: tuple(c if c in alphabet else None for c in w) for w in words}
    vocab, merges = list(alphabet), []
    while len(vocab) < size:
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                if a is not None and b is not None:
                    pairs[(a, b)] += words[w]
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        vocab.append(a + b)
        apply_merge(seqs, a, b)
    assert len(set(vocab)) == len(vocab)
    return vocab, merges


# graphs/m2m100-tiny's language codes are ids 92..95; the checks there use 92 (source) and 93 (target).
NLLB_CODES = ["eng_Latn", "fra_Latn", "deu_Latn", "ron_Latn"]
NLLB_PAIRS = [("eng_Latn", "fra_Latn"), ("deu_Latn", "ron_Latn")]
NLLB_GEN = {"src_len": 48, "max_new_tokens": 6}  # the bundle runtime/tests/bart_cli.rs compiles


def make_nllb_style(legacy):
    from transformers import NllbTokenizer

    pieces, merges = counted_bpe(87)
    # <mask> before the codes (the real file has it last), so that the codes sit at the fixture's 92..95.
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + pieces + ["<mask>"] + NLLB_CODES
    tok = NllbTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, src_lang="eng_Latn",
                        tgt_lang="fra_Latn", extra_special_tokens=NLLB_CODES, legacy_behaviour=legacy)
    assert len(tok) == 96 and tok.convert_tokens_to_ids(NLLB_CODES + ["<mask>"]) == [92, 93, 94, 95, 91]
    return save(tok, "nllb-legacy-style" if legacy else "nllb-style")


def nllb_generate_reference(folder):
    """HF's recipe for NLLB: the source with src_lang, `generate(forced_bos_token_id=<tgt_lang>)` (the decoder starts
    with the config's decoder_start_token_id, </s>), greedy, on the tiny M2M100 without a prefix."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    src_lang, tgt_lang = NLLB_PAIRS[0]
    tok = AutoTokenizer.from_pretrained(folder, src_lang=src_lang, tgt_lang=tgt_lang)
    model = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(HERE, "m2m100-tiny/hf"), dtype=torch.float32).eval()
    assert model.config.decoder_start_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    sources = list(dict.fromkeys(s for s, _ in e2e_pairs(os.path.join(ROOT, "examples/data/e2e_train.txt"))[:8]))
    batch = tok(sources, max_length=NLLB_GEN["src_len"], truncation=True, padding=True, return_tensors="pt")
    forced = tok.convert_tokens_to_ids(tgt_lang)
    with torch.no_grad():
        out = model.generate(**batch, forced_bos_token_id=forced, max_new_tokens=NLLB_GEN["max_new_tokens"],
                             num_beams=1, do_sample=False)
    # The new tokens up to the first </s> (a row that ended early is padded after it).
    new = [row[1:row.index(tok.eos_token_id, 1) + 1] if tok.eos_token_id in row[1:] else row[1:]
           for row in out.tolist()]
    assert all(row[0] == forced for row in new), new
    return dict(NLLB_GEN, src_lang=src_lang, tgt_lang=tgt_lang, forced_bos_token_id=forced, sources=sources,
                decoder_start_token_id=out[0, 0].item(), new_ids=new,
                texts=[tok.decode(row, skip_special_tokens=True) for row in new])


def nllb_cases(folder):
    """HF's ids with src_lang / tgt_lang given to from_pretrained, the decoder inputs M2M100's shift_tokens_right
    makes of the labels (behind </s>), and HF's truncation to 8 (source) / 6 (target) tokens."""
    from transformers import AutoTokenizer
    from transformers.models.m2m_100.modeling_m2m_100 import shift_tokens_right

    pairs = e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]
    out, by_pair = None, []
    for src_lang, tgt_lang in NLLB_PAIRS:
        tok = AutoTokenizer.from_pretrained(folder, src_lang=src_lang, tgt_lang=tgt_lang)
        assert type(tok).__name__ == "NllbTokenizer", type(tok)
        if out is None:
            out = {"tokenizer_class": "NllbTokenizer", "legacy_behaviour": tok.legacy_behaviour,
                   "eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id,
                   "decoder_start_token_id": tok.eos_token_id,
                   "lang_code_ids": {c: tok.convert_tokens_to_ids(c) for c in NLLB_CODES}}
        cases = []
        for s, t in pairs:
            cases.append(seq2seq_case(tok, s, t, lambda l: shift_tokens_right(l, tok.pad_token_id, tok.eos_token_id)))
        by_pair.append({"src_lang": src_lang, "tgt_lang": tgt_lang, "cases": cases})
    out["pairs"] = by_pair
    return out


def check_nllb_config_decides(nllb_style, legacy_style):
    """HF's NllbTokenizer frames texts as tokenizer_config.json's legacy_behaviour says, whatever the post-processor
    saved in tokenizer.json (runtime/tests/bart_cli.rs relies on it: such a folder gives the legacy cases)."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as mixed:
        shutil.copy(os.path.join(nllb_style, "tokenizer.json"), mixed)
        shutil.copy(os.path.join(legacy_style, "tokenizer_config.json"), mixed)
        for src_lang, tgt_lang in NLLB_PAIRS:
            kw = dict(src_lang=src_lang, tgt_lang=tgt_lang)
            tok, legacy = AutoTokenizer.from_pretrained(mixed, **kw), AutoTokenizer.from_pretrained(legacy_style, **kw)
            for s, t in e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]:
                assert tok(s)["input_ids"] == legacy(s)["input_ids"], s
                assert tok(text_target=t)["input_ids"] == legacy(text_target=t)["input_ids"], t


BLENDERBOT_SMALL_SPECIALS = ["__start__", "__null__", "__end__", "__unk__"]  # bos, pad, eos, unk: 0..3


def blenderbot_small_pipeline(tok):
    """BlenderbotSmallTokenizer's splitting in `tokenizers` terms: lowercase; split on whitespace; each of .,!?() starts
    a new piece (its `re.sub("([.,!?()])", r" \1")`); `'` is a piece of its own (`re.sub("(')", r" \1 ")`)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[.,!?()]"), "merged_with_next"),
        pre_tokenizers.Split("'", "isolated"),
    ])
    return tok


def make_blenderbot_small_style(size=320):
    """A subword-nmt style BPE counted from the E2E slice (the tokenizers trainer breaks ties by hash order), written
    as BlenderbotSmallTokenizer's files, plus a tokenizer.json that reproduces them (checked on every E2E line)."""
    from collections import Counter

    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import BlenderbotSmallTokenizer

    splitter = blenderbot_small_pipeline(Tokenizer(models.BPE()))
    words = Counter(w for text in train_texts()
                    for w, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)))
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    vocab = BLENDERBOT_SMALL_SPECIALS + sorted({s for seq in seqs.values() for s in seq})
    merges = []
    while len(vocab) < size:
        pairs = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
        apply_merge(seqs, a, b)
    internal = {t: i for i, t in enumerate(vocab)}
    # The Python class's vocabulary: a word's last piece without `</w>`, the others with `@@`.
    surface = {t: t if t in BLENDERBOT_SMALL_SPECIALS else t[:-4] if t.endswith("</w>") else t + "@@" for t in vocab}
    assert len(set(surface.values())) == len(vocab)
    out = os.path.join(TOKENIZERS, "blenderbot-small-style")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({surface[t]: i for t, i in internal.items()}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    slow = BlenderbotSmallTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"))
    assert [slow.bos_token_id, slow.pad_token_id, slow.eos_token_id, slow.unk_token_id] == [0, 1, 2, 3]
    slow.save_pretrained(out)  # its own vocab.json / merges.txt and tokenizer_config.json
    fast = blenderbot_small_pipeline(Tokenizer(models.BPE(vocab=internal, merges=merges, unk_token="__unk__",
                                                          end_of_word_suffix="</w>")))
    fast.decoder = decoders.BPEDecoder(suffix="</w>")
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BLENDERBOT_SMALL_SPECIALS])
    fast.save(os.path.join(out, "tokenizer.json"))
    for f in sorted(os.listdir(out)):
        if f not in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
            os.remove(os.path.join(out, f))
    slow = BlenderbotSmallTokenizer.from_pretrained(out)
    fast = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    texts = [t for name in ("e2e_train.txt", "e2e_valid.txt", "e2e_test.txt")
             if os.path.exists(os.path.join(ROOT, "examples/data", name))
             for pair in e2e_pairs(os.path.join(ROOT, "examples/data", name)) for t in pair]
    for t in texts:
        ids = slow(t)["input_ids"]
        assert fast.encode(t, add_special_tokens=False).ids == ids, t
        assert fast.decode(ids) == slow.decode(ids, skip_special_tokens=True), t
    print(f"  blenderbot-small-style: {len(vocab)} ids; tokenizer.json = the Python class on {len(texts)} texts")
    return out


def blenderbot_small_cases(folder):
    """HF's ids (the Python class, what AutoTokenizer gives for blenderbot-small), the decoder inputs BART's
    shift_tokens_right makes of the labels behind decoder_start = `__start__` (the real config's
    decoder_start_token_id is its bos), and HF's truncation to 8 (source) / 6 (target) tokens."""
    from transformers import AutoTokenizer
    from transformers.models.blenderbot_small.modeling_blenderbot_small import shift_tokens_right

    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "BlenderbotSmallTokenizer", type(tok)
    pairs = e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]
    cases = []
    for s, t in pairs:
        cases.append(seq2seq_case(tok, s, t, lambda l: shift_tokens_right(l, tok.pad_token_id, tok.bos_token_id)))
        assert tok.unk_token_id not in cases[-1]["input_ids"] + cases[-1]["labels"]
    return {"tokenizer_class": "BlenderbotSmallTokenizer", "bos": tok.bos_token_id, "pad": tok.pad_token_id,
            "eos": tok.eos_token_id, "unk": tok.unk_token_id,
            "special_tokens": {"bos": tok.bos_token, "pad": tok.pad_token, "eos": tok.eos_token, "unk": tok.unk_token},
            "cases": cases}


T5_SPECIALS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}  # ids 0, 1, 2 as T5's; <pad> is the decoder start
T5_GEN = {"src_len": 16, "max_new_tokens": 8}
# Short sources giving different greedy texts on graphs/t5-tiny (with top-2 logit margins of 0.18 at least); the last
# is 19 tokens, cut to src_len.
T5_GEN_SOURCES = ["The pub", "It is cold", "Cambridge", "Fitzbillies is a coffee shop with a high customer rating ."]


def t5_pieces(size=97, n_chars=50):
    """Unigram pieces counted as make_pegasus_style counts them (so reruns give the same file): the word start mark,
    the n_chars most frequent characters (ties by character), then the most frequent words after the mark (ties by
    word) until `size`; the other characters become <unk>."""
    import math
    from collections import Counter

    words = Counter(w for text in train_texts() for w in text.split())
    chars = Counter(c for text in train_texts() for c in text if not c.isspace())
    total = sum(words.values()) + sum(chars.values())
    pieces = {"\u2581": total}
    for c, n in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:n_chars]:
        pieces[c] = n
    for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(pieces) == size:
            break
        pieces.setdefault("\u2581" + w, n)
    return sorted(((p, round(math.log(n / total), 6)) for p, n in pieces.items()), key=lambda v: (-v[1], v[0]))


def make_t5_style():
    from transformers import T5Tokenizer

    vocab = [(T5_SPECIALS[k], 0.0) for k in ("pad", "eos", "unk")] + t5_pieces()
    # extra_ids=0: T5's 100 `<extra_id_N>` sentinels would take ids 100..199, past the fixture's vocabulary.
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    assert len(tok) == 100 and [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
    return save(tok, "t5-style")


def t5_tokenizer(folder):
    """The tokenizer as a T5 fine-tuning script may load it: T5TokenizerFast over the tokenizer.json with T5's
    specials (extra_ids=0, else the class appends 100 sentinels); checked against AutoTokenizer on the folder."""
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = T5TokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), pad_token=T5_SPECIALS["pad"],
                          eos_token=T5_SPECIALS["eos"], unk_token=T5_SPECIALS["unk"], extra_ids=0)
    auto = AutoTokenizer.from_pretrained(folder)
    assert type(auto).__name__ == "T5Tokenizer" and len(tok) == len(auto) == 100, (type(auto), len(tok), len(auto))
    for s, t in e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]:
        assert tok(s)["input_ids"] == auto(s)["input_ids"] and tok(text_target=t)["input_ids"] == auto(
            text_target=t)["input_ids"], s
    return tok


def t5_model():
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(os.path.join(HERE, "t5-tiny/hf"), dtype=torch.float32).eval()
    assert model.config.vocab_size == 100 and model.config.decoder_start_token_id == 0, model.config
    return model


def t5_cases(folder, model):
    """HF's ids (`X </s>` for sources and targets alike), the decoder inputs T5's `_shift_right` makes of the labels
    (behind decoder_start = <pad>), and HF's truncation to 8 (source) / 6 (target) tokens."""
    tok = t5_tokenizer(folder)
    pairs = e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]
    cases = [seq2seq_case(tok, s, t, model._shift_right) for s, t in pairs]
    return {"tokenizer_class": "T5Tokenizer", "pad": tok.pad_token_id, "eos": tok.eos_token_id,
            "unk": tok.unk_token_id, "decoder_start_token_id": model.config.decoder_start_token_id,
            "special_tokens": dict(T5_SPECIALS), "cases": cases}


def t5_generate_reference(folder, model, tok=None, sources=T5_GEN_SOURCES):
    """HF's greedy generation on the bare graphs/t5-tiny/hf: the sources cut to src_len as HF's truncation cuts them
    (</s> kept), a padded batch (checked against one source at a time), the decoder starting with <pad>; `tok`
    t5_tokenizer(folder) unless given."""
    tok = t5_tokenizer(folder) if tok is None else tok
    gen = dict(max_new_tokens=T5_GEN["max_new_tokens"], num_beams=1, do_sample=False)
    batch = tok(sources, max_length=T5_GEN["src_len"], truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, **gen).tolist()
        for s, row in zip(sources, out):
            alone = model.generate(**tok([s], max_length=T5_GEN["src_len"], truncation=True, return_tensors="pt"),
                                   **gen)[0].tolist()
            assert alone == row[:len(alone)] and all(t == tok.pad_token_id for t in row[len(alone):]), (s, row, alone)
    assert all(row[0] == model.config.decoder_start_token_id for row in out), out
    # The new tokens up to the first </s> (a row that ended early is padded after it).
    new = [row[1:row.index(tok.eos_token_id, 1) + 1] if tok.eos_token_id in row[1:] else row[1:] for row in out]
    texts = [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    assert len(set(texts)) > 1, texts
    return dict(T5_GEN, sources=sources,
                input_ids=[tok(s, max_length=T5_GEN["src_len"], truncation=True)["input_ids"] for s in sources],
                decoder_start_token_id=model.config.decoder_start_token_id, eos=tok.eos_token_id,
                new_ids=new, ends_with_eos=[row[-1] == tok.eos_token_id for row in new], texts=texts)


def write_t5(model=None):
    model = t5_model() if model is None else model
    folder = make_t5_style()
    write_json(os.path.join(TOKENIZERS, "t5-format-cases.json"),
               {"t5-style": t5_cases(folder, model), "generate": t5_generate_reference(folder, model)})


# t5-sp-style: T5's tokenizer.json as its checkpoints have it. A SentencePiece Unigram model with nmt_nfkc
# normalization (T5's spiece.model has it) converted by transformers, which writes its charsmap as a `Precompiled`
# normalizer, and the `<extra_id_N>` sentinels as added special tokens after the pieces, counting down (<extra_id_0>
# the last id). 90 pieces + 10 sentinels = the 100 ids of graphs/t5-tiny.
T5_SP_EXTRA_IDS = 10
# Texts read alone (`tokenizer(text)`), also those a data file cannot hold (empty, blank).
T5_SP_TEXTS = [
    "", "   ", "\t\n", "<extra_id_0>", "x<extra_id_0>y", "\u00a0<extra_id_0>\u3000", "<extra_id_9>. <extra_id_10>",
    "ＡＢＣ１２３", "ﬁ ﬀ", "€30 ½ ™ ① ℌ", "日本 🍕 ｶﾀｶﾅ", "x\u0085y \u2028z", "A\u0300 \u00c0 a\u0308 \u00e4",
    "zero\u200bwidth soft\u00adhyphen",
]
# Source/target pairs for the rows: full-width letters and digits, ligatures, NBSP and ideographic spaces, runs of
# spaces, tabs and newlines, leading and trailing spaces, é composed and decomposed, unknown characters, and
# sentinels in T5's span-corruption layout. Each source is over 8 ids and each target at least 6 (the rows' check
# cuts them to 8 and 6).
T5_SP_PAIRS = [
    ("name : ＡＢＣ１２３ | food : Ｃｈｉｎｅｓｅ", "ＡＢＣ１２３ serves Ｃｈｉｎｅｓｅ food ."),
    ("name : The ﬁsh shop | area :\u00a0riverside", "The\u00a0ﬁsh shop is by the\u3000river ."),
    ("  name :  Caf\u00e9 Rouge   | food :\tFrench  ", "Cafe\u0301 Rouge\nserves  French food . "),
    ("The <extra_id_0> is near <extra_id_1> in the city centre .",
     "<extra_id_0> Eagle <extra_id_1> the river <extra_id_2>"),
    ("name : Düsseldorf 4 | price : €30 ½", "Düsseldorf 4 costs €30 ™ ."),
    ("x<extra_id_0>y | zero\u200bwidth | x\u0085y", "<extra_id_9>. <extra_id_10> soft\u00adhyphen"),
]
# Id lists decoded with skip_special_tokens=True: sentinels, </s>, <pad> and <unk> (HF skips all four kinds).
T5_SP_DECODES = [[99, 13, 98, 1], [90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 1, 0, 0], [14, 99, 13, 11, 1],
                 [2, 3, 2], [13, 51, 15, 22, 11, 1]]
# Sources through the normalizer (full-width letters, a ligature) and with a sentinel, the last cut to src_len. On the
# bare graphs/t5-tiny (top-2 logit margins of 0.28 at least) they give `H` (69) eight times, <extra_id_2> (97) eight
# times (an empty text: HF's decode skips the sentinels), <pad> (0) eight times and `H` again.
T5_SP_GEN_SOURCES = ["Ｂｌｕｅ", "Ｙｏｕ", "Cambridge <extra_id_0>", "Ｂｌｕｅ Spice is a pub in ﬁne city centre ."]


def t5_sp_model_proto():
    """A SentencePiece Unigram model of 90 pieces trained on the E2E slice: T5's ids for <pad> 0, </s> 1, <unk> 2,
    no <s>, nmt_nfkc normalization; one thread and a fixed seed, so that reruns give the same bytes."""
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_texts()), model_writer=proto, model_type="unigram",
        vocab_size=100 - T5_SP_EXTRA_IDS, normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, character_coverage=0.9995, num_threads=1, minloglevel=2)
    return proto.getvalue()


def make_t5_sp_style(proto):
    """T5Tokenizer converted from the SentencePiece model (as from a checkpoint's spiece.model), saved without it."""
    import tempfile

    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "spiece.model"), "wb") as f:
            f.write(proto)
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=T5_SP_EXTRA_IDS)
        assert len(tok) == 100 and [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
        out = save(tok, "t5-sp-style")
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["normalizer"]["type"] == "Precompiled" and saved["normalizer"]["precompiled_charsmap"], saved
    sentinels = {t["content"]: t["id"] for t in saved["added_tokens"] if t["content"].startswith("<extra_id_")}
    assert sentinels == {f"<extra_id_{i}>": 99 - i for i in range(T5_SP_EXTRA_IDS)}, sentinels
    assert all(t["special"] for t in saved["added_tokens"])
    return out


def t5_sp_tokenizer(folder):
    """AutoTokenizer on the folder, checked against `T5TokenizerFast(tokenizer_file=...)` on every text here."""
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = AutoTokenizer.from_pretrained(folder)
    fast = T5TokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), extra_ids=T5_SP_EXTRA_IDS)
    assert type(tok).__name__ == "T5Tokenizer" and len(tok) == len(fast) == 100, (type(tok), len(tok), len(fast))
    for text in T5_SP_TEXTS + [t for pair in T5_SP_PAIRS for t in pair] + T5_SP_GEN_SOURCES:
        assert tok(text)["input_ids"] == fast(text)["input_ids"], text
    for ids in T5_SP_DECODES:
        assert tok.decode(ids, skip_special_tokens=True) == fast.decode(ids, skip_special_tokens=True), ids
    return tok


def t5_sp_cases(folder, model, proto):
    """As t5_cases, plus the ids of T5_SP_TEXTS alone, the sentinels' ids and HF's decode of T5_SP_DECODES. Where the
    SentencePiece model itself (`encode(text)` + </s>) gives other ids than HF, they are under sentencepiece_input_ids:
    it has no sentinels (it spells them out, `<` an unknown character), and U+0085 is whitespace to the converted
    tokenizer's WhitespaceSplit (Rust's char::is_whitespace) but an unknown character to SentencePiece."""
    import sentencepiece as spm

    tok = t5_sp_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    cases = [seq2seq_case(tok, s, t, model._shift_right) for s, t in T5_SP_PAIRS]
    assert all(len(c["input_ids"]) > 8 and len(c["labels"]) >= 6 for c in cases), cases
    texts = []
    for text in T5_SP_TEXTS:
        ids = tok(text)["input_ids"]
        texts.append({"text": text, "input_ids": ids, "tokens": tok.convert_ids_to_tokens(ids)})
        if sp.encode(text) + [tok.eos_token_id] != ids:
            texts[-1]["sentencepiece_input_ids"] = sp.encode(text) + [tok.eos_token_id]
    return {"tokenizer_class": "T5Tokenizer", "pad": tok.pad_token_id, "eos": tok.eos_token_id,
            "unk": tok.unk_token_id, "decoder_start_token_id": model.config.decoder_start_token_id,
            "special_tokens": dict(T5_SPECIALS),
            "sentinels": {f"<extra_id_{i}>": tok.convert_tokens_to_ids(f"<extra_id_{i}>")
                          for i in range(T5_SP_EXTRA_IDS)},
            "cases": cases, "texts": texts,
            "decodes": [{"ids": ids, "text": tok.decode(ids, skip_special_tokens=True)} for ids in T5_SP_DECODES]}


def write_t5_sp(model=None):
    model = t5_model() if model is None else model
    proto = t5_sp_model_proto()
    assert proto == t5_sp_model_proto(), "SentencePiece training is not deterministic"
    folder = make_t5_sp_style(proto)
    write_json(os.path.join(TOKENIZERS, "t5-sp-format-cases.json"),
               {"t5-sp-style": t5_sp_cases(folder, model, proto),
                "generate": t5_generate_reference(folder, model, t5_sp_tokenizer(folder), T5_SP_GEN_SOURCES)})


def mbart_cases(folder, cls):
    """HF's ids with src_lang / tgt_lang given to from_pretrained, the decoder inputs of the labels (mBART's
    shift_tokens_right: the last non-pad token first, then labels[:-1]), and the ids HF's truncation gives
    (`truncation=True`, max_length 8 for the source, 6 for the target: the language code and </s> are kept)."""
    from transformers import AutoTokenizer
    from transformers.models.mbart.modeling_mbart import shift_tokens_right

    pairs = e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]
    out = None
    by_pair = []
    for src_lang, tgt_lang in MBART_PAIRS:
        tok = AutoTokenizer.from_pretrained(folder, src_lang=src_lang, tgt_lang=tgt_lang)
        assert type(tok).__name__ == cls, type(tok)
        if out is None:
            out = {"tokenizer_class": cls, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "bos": tok.bos_token_id,
                   "lang_code_ids": {c: tok.convert_tokens_to_ids(c) for lang in MBART_PAIRS for c in lang}}
        cases = []
        for s, t in pairs:
            cases.append(seq2seq_case(tok, s, t, lambda l: shift_tokens_right(l, tok.pad_token_id)))
        by_pair.append({"src_lang": src_lang, "tgt_lang": tgt_lang, "cases": cases})
    out["pairs"] = by_pair
    return out


def seq2seq_cases(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    pairs = e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]
    return {"eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "cases": [{"source": s, "target": t, "input_ids": tok(s)["input_ids"],
                       "labels": tok(text_target=t)["input_ids"]} for s, t in pairs]}


def prompt_ids(tok, source):
    ids = tok(source)["input_ids"]
    # A tokenizer that ends a text with EOS itself (add_eos_token) has closed the source already.
    return ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]


def target_ids(tok, target):
    return tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def format_cases(folders):
    from transformers import AutoTokenizer

    pairs = e2e_pairs(os.path.join(ROOT, "examples/data/e2e_test.txt"))[:6]
    cases = {}
    for name, folder in folders.items():
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("x")["input_ids"]
        lead = next(i for i, t in enumerate(ids) if t not in tok.all_special_ids)
        trail = next(i for i, t in enumerate(reversed(ids)) if t not in tok.all_special_ids)
        cases[name] = {
            "eos": tok.eos_token_id,
            # The special tokens tokenizer(text) puts around a text.
            "specials_before": ids[:lead],
            "specials_after": ids[len(ids) - trail:],
            "cases": [{"source": s, "target": t, "prompt": prompt_ids(tok, s), "labelled": target_ids(tok, t)}
                      for s, t in pairs],
        }
    return cases


def peft_text_reference(folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(HERE, "llama-gqa-tiny/hf"), attn_implementation="eager",
                                                dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, os.path.join(HERE, "peft-decoders/adapter-llama-gqa-tiny")).eval()
    P = model.peft_config["default"].num_virtual_tokens
    rows, masks, labels = [], [], []
    for source, target in TEXT_EXAMPLES:
        p, t = prompt_ids(tok, source), target_ids(tok, target)
        assert len(p) + len(t) <= SEQ, (source, len(p) + len(t))
        pad = SEQ - len(p) - len(t)
        rows.append(p + t + [tok.eos_token_id] * pad)
        masks.append([1] * (len(p) + len(t)) + [0] * pad)
        labels.append([-100] * len(p) + t + [-100] * pad)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks), labels=torch.tensor(labels))
        cache = model.get_prompt(1)
        prefix = [(cache.layers[l].keys.clone(), cache.layers[l].values.clone()) for l in range(len(cache.layers))]
        texts, tokens = [], []
        for source, _ in TEXT_EXAMPLES:
            seq = torch.tensor([prompt_ids(tok, source)])
            new = []
            # One full forward per step, the prefix as a fresh cache, positions P + t (as PEFT's forward numbers them).
            for _ in range(NEW):
                n = seq.shape[1]
                step_cache = DynamicCache([(k.clone(), v.clone()) for k, v in prefix])
                logits = base(input_ids=seq, attention_mask=torch.ones(1, P + n, dtype=torch.int64),
                              cache=step_cache, position_ids=(P + torch.arange(n)).unsqueeze(0),
                              use_cache=False).logits[0, -1]
                t = int(logits.argmax())
                if t == tok.eos_token_id:
                    break
                new.append(t)
                seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
            tokens.append(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
    return {"seq": SEQ, "prefix_len": P, "eos": tok.eos_token_id, "loss": out.loss.item(), "greedy": tokens,
            "texts": texts}


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"  {os.path.relpath(path, ROOT)}")


def main(argv):
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if argv == ["t5"]:  # only t5-style and t5-format-cases.json
        return write_t5()
    if argv == ["t5-sp"]:  # only t5-sp-style and t5-sp-format-cases.json
        return write_t5_sp()
    assert not argv, f"usage: make_text_references.py [t5 | t5-sp], not {argv}"
    llama_style, llama_eos_style = make_llama_style()
    folders = {"llama-style": llama_style, "opt-style": make_opt_style(), "llama-eos-style": llama_eos_style,
               "qwen-style": make_qwen_style()}
    write_json(os.path.join(TOKENIZERS, "model-format-cases.json"), format_cases(folders))
    write_json(os.path.join(TOKENIZERS, "seq2seq-format-cases.json"), {"pegasus-style": seq2seq_cases(make_pegasus_style())})
    mbart = {"mbart-style": mbart_cases(make_mbart_style(), "MBartTokenizer"),
             "mbart50-style": mbart_cases(make_mbart50_style(), "MBart50Tokenizer")}
    mbart_tiny = os.path.join(HERE, "mbart-tiny/hf/config.json")
    if os.path.exists(mbart_tiny):  # graphs/make_seq2seq_fixtures.py's fixture numbers its tokens as mbart-style
        with open(mbart_tiny, encoding="utf-8") as f:
            cfg = json.load(f)
        assert cfg["decoder_start_token_id"] == mbart["mbart-style"]["lang_code_ids"]["ro_RO"], cfg
        assert cfg["vocab_size"] == 96
    write_json(os.path.join(TOKENIZERS, "mbart-format-cases.json"), mbart)
    nllb_style, nllb_legacy_style = make_nllb_style(legacy=False), make_nllb_style(legacy=True)
    check_nllb_config_decides(nllb_style, nllb_legacy_style)
    nllb = {"nllb-style": nllb_cases(nllb_style), "nllb-legacy-style": nllb_cases(nllb_legacy_style)}
    nllb["generate"] = nllb_generate_reference(nllb_style)
    write_json(os.path.join(TOKENIZERS, "nllb-format-cases.json"), nllb)
    write_json(os.path.join(TOKENIZERS, "blenderbot-small-format-cases.json"),
               {"blenderbot-small-style": blenderbot_small_cases(make_blenderbot_small_style())})
    write_t5()
    write_t5_sp()
    with open(os.path.join(HERE, "peft-decoders/text-e2e.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{s}||{t}\n" for s, t in TEXT_EXAMPLES)
    write_json(os.path.join(HERE, "peft-decoders/text-llama-gqa-tiny.json"), peft_text_reference(folders["llama-style"]))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main(sys.argv[1:]))
