#!/usr/bin/env python3
"""Builds the GPT-2 tokenizer.json that pfxrun reads, and the test vectors that check the Rust side.

    /root/.cache/pfx/ref/bin/python graphs/tokenizers/make_gpt2_tokenizer.py [DIR_WITH_encoder.json_AND_vocab.bpe]

Input: the GPT-2 byte-level BPE files `encoder.json` (50,257 entries) and `vocab.bpe` (50,000 merges),
by default from /work/shared/data/gpt2-bpe (MIT; the LICENSE there is copied next to the output).
Needs only the `tokenizers` package from PyPI (pinned in graphs/requirements-ref.txt: tokenizers==0.23.3).

Writes
  graphs/tokenizers/gpt2/tokenizer.json            ByteLevel BPE, add_prefix_space=false, `<|endoftext|>` (50256)
                                                   as a special added token without whitespace stripping
  graphs/tokenizers/gpt2/LICENSE                   the licence of the BPE files
  runtime/tests/data/gpt2_tokenizer_cases.json     strings with the ids this tokenizer gives them, read by
                                                   runtime/tests/data.rs to check that the Rust crate agrees

The layout follows the tokenizer.json that Hugging Face ships for `gpt2` (normalizer none, ByteLevel
pre-tokenizer with the GPT-2 regex, ByteLevel post-processor and decoder). Reruns give identical files.
"""
import json
import shutil
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "graphs" / "tokenizers" / "gpt2"
CASES = ROOT / "runtime" / "tests" / "data" / "gpt2_tokenizer_cases.json"
EOS = "<|endoftext|>"

# Plain strings (no special tokens): the Rust encode must give the same ids and decode must give the string back.
STRINGS = [
    "Hello world",
    " Hello world",
    "The Eagle is a coffee shop near Burger King .",
    "  two  spaces,\ttab and\nnewline\n\n",
    "I'm sure it's 3.14159 or 2,718 -- isn't it? They'll see; we've won!!",
    "name : The Vaults | eatType : pub | priceRange : more than £ 30 | customer rating : 5 out of 5",
    "Unicode: café, naïve, Straße, Ελληνικά, 日本語のテキスト, emoji 🤖🚀 and a zero-width\u200bjoiner",
    "trailing space ",
    "",
    "MixedCASE wordsAnd123numbers456789",
]

# Strings containing the special token: its id must come out as one token, and decode must skip it.
WITH_SPECIAL = [
    " name : Alimentum | area : city centre <|endoftext|> There is a place in the city centre . <|endoftext|>",
    "<|endoftext|>",
    "a<|endoftext|>b",
]


def build(src: Path) -> Tokenizer:
    vocab = json.loads((src / "encoder.json").read_text(encoding="utf-8"))
    lines = (src / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    assert all(len(m) == 2 for m in merges)
    assert len(vocab) == 50257 and vocab[EOS] == 50256, (len(vocab), vocab.get(EOS))
    assert len(merges) == 50000, len(merges)

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # Already in the vocabulary: this marks it special (split out of any text, skipped by decode).
    tok.add_special_tokens([AddedToken(EOS, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)])
    assert tok.token_to_id(EOS) == 50256 and tok.get_vocab_size() == 50257
    return tok


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/data/gpt2-bpe")
    tok = build(src)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / "tokenizer.json"
    tok.save(str(path), pretty=False)
    shutil.copyfile(src / "LICENSE", OUT_DIR / "LICENSE")

    tok = Tokenizer.from_file(str(path))  # check what was written, not the in-memory object
    cases = []
    for s in STRINGS + WITH_SPECIAL:
        ids = tok.encode(s, add_special_tokens=False).ids
        decoded = tok.decode(ids, skip_special_tokens=True)
        if s in STRINGS:
            assert decoded == s, (s, decoded)
        cases.append({"text": s, "ids": ids, "decoded": decoded})
    # The table-to-text format tokenized in one piece, and as source part + target part: these must agree,
    # because the special token is a hard boundary (runtime/src/data.rs relies on this).
    src_part = " name : Alimentum | area : city centre " + EOS
    tgt_part = " There is a place in the city centre . " + EOS
    joint = tok.encode(src_part + tgt_part, add_special_tokens=False).ids
    split = tok.encode(src_part, add_special_tokens=False).ids + tok.encode(tgt_part, add_special_tokens=False).ids
    assert joint == split, (joint, split)

    CASES.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "made_by": "graphs/tokenizers/make_gpt2_tokenizer.py",
        "tokenizers_version": __import__("tokenizers").__version__,
        "eos_id": tok.token_to_id(EOS),
        "vocab_size": tok.get_vocab_size(),
        "cases": cases,
    }
    CASES.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes), {OUT_DIR / 'LICENSE'}, {CASES} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
