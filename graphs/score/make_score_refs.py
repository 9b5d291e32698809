#!/usr/bin/env python3
"""Reference values for `pfx_runtime::score` (runtime/tests/score.rs), computed by the reference packages.

    python3 -m venv /root/.cache/pfx/score-ref
    /root/.cache/pfx/score-ref/bin/pip install -r graphs/score/requirements.txt
    /root/.cache/pfx/score-ref/bin/python graphs/score/make_score_refs.py [--mteval PATH/mteval-v13a-sig.pl]

Writes, next to this script:
  sample.hyp / sample.refs   an E2E-format sample (one hypothesis a line; reference groups separated by
                             blank lines) built from 60 MRs of the E2E test set (shared/data/e2e/test.txt)
  expected.json              the packages' scores on it, plus tiny hand cases, plus package versions
  porter_nltk.tsv            word <TAB> NLTK PorterStemmer (default NLTK_EXTENSIONS mode) stem, for every
                             lowercased token of the E2E test set (what our METEOR's stem stage must reproduce)

Everything is deterministic (seeded); a rerun rewrites identical files. Nothing here runs our Rust code.

Packages and what they give (all on whitespace tokens unless said otherwise):
  sacrebleu   corpus BLEU (tokenize='none'; also '13a', and '13a' + lowercase = mteval-v13a's normalisation)
  rouge-score RougeScorer(['rougeL']).score_multi, mean F-measure
  nltk        corpus_nist (n=5); meteor_score with a WordNet stub that has no synsets (exact + stem stages only)
  pycocoevalcap  Cider (coco-caption's CIDEr-D: n=4, sigma=6, clipping, x10)
  mteval-v13a-sig.pl (optional, --mteval): the E2E challenge's official BLEU/NIST scorer (Perl), as
              tuetschek/e2e-metrics runs it (lowercased, 13a tokenization, NIST-5 with 9-gram info tables)
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from importlib.metadata import version

import sacrebleu
from nltk.stem.porter import PorterStemmer
from nltk.translate.meteor_score import meteor_score
from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer

HERE = os.path.dirname(os.path.abspath(__file__))
# shared/ lies beside the repository (/work/shared next to /work/main)
E2E_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "e2e"))
E2E_TEST = os.path.join(E2E_DIR, "test.txt")
E2E_VALID = os.path.join(E2E_DIR, "valid.txt")
N_MRS = 60
SEED = 20240531


class NoSynonyms:
    """Stands in for nltk.corpus.wordnet: no synsets, so METEOR's synonym stage never matches."""

    def synsets(self, _word):
        return []


STEMMER = PorterStemmer()  # NLTK_EXTENSIONS, what meteor_score uses by default
NO_WN = NoSynonyms()


def read_e2e_groups(path):
    """[(mr, [ref, ...]), ...] in file order; consecutive lines with the same MR form a group."""
    groups = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            mr, ref = line.split("||", 1)
            ref = ref.strip()
            if groups and groups[-1][0] == mr:
                groups[-1][1].append(ref)
            else:
                groups.append((mr, [ref]))
    return groups


def perturb(sentence, rng):
    """A lightly damaged sentence: drop one word, swap two neighbours, maybe recase one word."""
    words = sentence.split()
    if len(words) > 4:
        del words[rng.randrange(len(words))]
    if len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    if words and rng.random() < 0.5:
        i = rng.randrange(len(words))
        words[i] = words[i].upper() if rng.random() < 0.5 else words[i].lower()
    return " ".join(words)


def build_sample():
    groups = read_e2e_groups(E2E_TEST)
    rng = random.Random(SEED)
    picked = sorted(rng.sample(range(len(groups) - 1), N_MRS))
    hyps, refs = [], []
    for k, gi in enumerate(picked):
        mr, group = groups[gi]
        group = list(group)
        kind = k % 4
        if kind in (0, 1) and len(group) > 1:
            # one of its own references, taken out of the group and damaged
            hyp = group.pop(rng.randrange(len(group)))
            hyp = perturb(hyp, rng) if kind == 0 else hyp
        elif kind == 2:
            # a reference of the next MR in the file (usually the same restaurant, other attributes)
            hyp = rng.choice(groups[gi + 1][1])
        else:
            # a reference of a random MR
            hyp = rng.choice(groups[rng.randrange(len(groups))][1])
        hyps.append(hyp)
        refs.append(group)
    # edge cases inside the corpus: an empty hypothesis, a one-word one, a punctuation-only one
    hyps[5] = ""
    hyps[11] = refs[11][0].split()[0]
    hyps[17] = "."
    return hyps, refs


def ref_streams(refs):
    """sacrebleu's layout: one stream per reference slot, None where a group has fewer references."""
    width = max(len(g) for g in refs)
    return [[g[j] if j < len(g) else None for g in refs] for j in range(width)]


def bleu(hyps, refs, tokenize="none", lowercase=False):
    return sacrebleu.corpus_bleu(hyps, ref_streams(refs), tokenize=tokenize, lowercase=lowercase).score


def rouge_l(hyps, refs):
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    f = [scorer.score_multi(g, h)["rougeL"].fmeasure for h, g in zip(hyps, refs)]
    return 100.0 * sum(f) / len(f)


def nist_nltk(hyps, refs):
    """None where NLTK divides by zero (no hypothesis in the corpus has n words for some n <= 5)."""
    try:
        return corpus_nist([[r.split() for r in g] for g in refs], [h.split() for h in hyps], n=5)
    except ZeroDivisionError:
        return None


def cider(hyps, refs):
    gts = {i: list(g) for i, g in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def meteor(hyps, refs):
    m = [
        meteor_score([r.split() for r in g], h.split(), stemmer=STEMMER, wordnet=NO_WN)
        for h, g in zip(hyps, refs)
    ]
    return 100.0 * sum(m) / len(m)


def mteval(script, hyps, refs):
    """The official E2E BLEU/NIST: mteval-v13a-sig.pl on SGML files laid out as e2e-metrics lays them
    (reference slots padded with empty segments)."""
    width = max(len(g) for g in refs)

    def write(path, settype, sets):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f'<{settype}set setid="e2e" srclang="any" trglang="en">\n')
            for k, segs in enumerate(sets):
                sysid = settype if len(sets) == 1 else f"{settype}_{k}"
                fh.write(f'<doc docid="test" genre="news" origlang="any" sysid="{sysid}">\n<p>\n')
                for i, s in enumerate(segs, start=1):
                    fh.write(f'<seg id="{i}">{s}</seg>\n')
                fh.write("</p>\n</doc>\n")
            fh.write(f"</{settype}set>")

    with tempfile.TemporaryDirectory() as tmp:
        ref_sets = [[g[j] if j < len(g) else "" for g in refs] for j in range(width)]
        write(f"{tmp}/ref.sgm", "ref", ref_sets)
        write(f"{tmp}/tst.sgm", "tst", [hyps])
        write(f"{tmp}/src.sgm", "src", [[""] * len(hyps)])
        out = subprocess.check_output(
            ["perl", script, "-r", f"{tmp}/ref.sgm", "-s", f"{tmp}/src.sgm", "-t", f"{tmp}/tst.sgm",
             "-f", f"{tmp}/stats.txt"],
            stderr=subprocess.STDOUT,
        ).decode()
    nist = float(re.search(r"NIST score = ([0-9.]+)", out).group(1))
    bleu_ = float(re.search(r"BLEU score = ([0-9.]+)", out).group(1))
    return {"bleu": 100.0 * bleu_, "nist": nist}


def all_scores(hyps, refs, mteval_script):
    out = {
        "bleu": bleu(hyps, refs),
        "bleu_13a": bleu(hyps, refs, tokenize="13a"),
        "bleu_13a_lc": bleu(hyps, refs, tokenize="13a", lowercase=True),
        "rouge_l": rouge_l(hyps, refs),
        "nist_nltk": nist_nltk(hyps, refs),
        "cider": cider(hyps, refs),
        "meteor_nltk_nosyn": meteor(hyps, refs),
    }
    if mteval_script:
        m = mteval(mteval_script, hyps, refs)
        out["mteval_bleu"] = m["bleu"]
        out["mteval_nist"] = m["nist"]
    return out


# Tiny corpora: name, hypotheses, reference groups. Scores come from the packages like the sample's.
HAND_CASES = [
    ("identical", ["the cat sat on the mat", "a dog ran in the park today"],
     [["the cat sat on the mat"], ["a dog ran in the park today"]]),
    ("disjoint", ["red green blue yellow"], [["one two three four five"]]),
    ("multi_ref_clip", ["the the the the the the the"], [["the cat is on the mat", "there is a cat on the mat"]]),
    ("brevity", ["the cat sat"], [["the cat sat on the mat", "the cat sat on a mat today"]]),
    ("reordered", ["mat the on sat cat the", "park the in ran dog a"],
     [["the cat sat on the mat"], ["a dog ran in the park"]]),
    ("stems_and_case", ["The Cats are running quickly near the rivers"],
     [["the cat is running quick near the river", "cats run by the riverside"]]),
    ("e2e_like", ["Blue Spice is a coffee shop in the city centre .",
                  "The Vaults is a cheap pub near Café Adriatic ."],
     [["A coffee shop in the city centre area called Blue Spice .",
       "Blue Spice is a coffee shop in city centre ."],
      ["The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £30 .",
       "Near Café Adriatic is The Vaults , a cheap pub with a rating of 5 out of 5 ."]]),
]


# Words that reach every Porter rule (the paper's examples and NLTK's special cases), added to the E2E
# vocabulary for porter_nltk.tsv.
PORTER_EXTRA = """caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated troubled sized
hopping tanned falling hissing fizzed failing filing happy sky relational conditional rational valenci
hesitanci digitizer conformabli radicalli differentli vileli analogousli vietnamization predication
operator feudalism decisiveness hopefulness callousness formaliti sensitiviti sensibiliti triplicate
formative formalize electriciti electrical hopeful goodness revival allowance inference airliner
gyroscopic adjustable defensible irritant replacement adjustment dependent adoption homologou communism
activate angulariti homologous effective bowdlerize probate rate cease controll roll generalizations
oscillators dying lying tying skies news innings inning outings canning howe proceed exceed succeed cried
died spied fried archaeology analogi analogy fulli carefully yelling toy syzygy sayings enjoying
enjoyed ied ies eed bed ing ying by my ay is as us yyy crying flying trying agreeing seeing fitted
fizzing hoping hopped filled tolled falls fall capable totally specially physically tally rally
fully hopefully sky's don't £20 café 5 20-25 x""".split()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mteval", help="path to mteval-v13a-sig.pl (from tuetschek/e2e-metrics), optional")
    args = ap.parse_args()

    hyps, refs = build_sample()
    with open(f"{HERE}/sample.hyp", "w", encoding="utf-8") as fh:
        fh.write("".join(h + "\n" for h in hyps))
    with open(f"{HERE}/sample.refs", "w", encoding="utf-8") as fh:
        fh.write("\n".join("".join(r + "\n" for r in g) for g in refs))

    expected = {
        "about": "made by graphs/score/make_score_refs.py from the reference packages; BLEU, ROUGE-L, METEOR "
                 "on 0-100, NIST and CIDEr raw",
        "versions": {p: version(p) for p in ("sacrebleu", "rouge-score", "nltk", "pycocoevalcap")},
        "sample": {"n_hyp": len(hyps), **all_scores(hyps, refs, args.mteval)},
        "hand_cases": [
            {"name": name, "hyps": h, "refs": r, **all_scores(h, r, args.mteval)} for name, h, r in HAND_CASES
        ],
    }
    if args.mteval:
        expected["versions"]["mteval"] = "mteval-v13a-sig.pl of tuetschek/e2e-metrics (Perl, XML::Twig)"
    with open(f"{HERE}/expected.json", "w", encoding="utf-8") as fh:
        json.dump(expected, fh, indent=1, ensure_ascii=False)
        fh.write("\n")

    vocab = {w.lower() for path in (E2E_TEST, E2E_VALID) for _, g in read_e2e_groups(path) for r in g
             for w in r.split()}
    vocab = sorted(vocab | set(PORTER_EXTRA))
    with open(f"{HERE}/porter_nltk.tsv", "w", encoding="utf-8") as fh:
        for w in vocab:
            fh.write(f"{w}\t{STEMMER.stem(w)}\n")
    print(json.dumps(expected["sample"], indent=1), file=sys.stderr)
    print(f"{len(vocab)} words in porter_nltk.tsv", file=sys.stderr)


if __name__ == "__main__":
    main()
