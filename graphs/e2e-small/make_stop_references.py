#!/usr/bin/env python3
"""Stop-string references: Hugging Face's `generate(stop_strings=..., tokenizer=...)` on the small E2E GPT-2 (hf/,
tokenizer.json), the bare model, greedy and beam search, for `pfxrun generate --no-prefix --stop TEXT`.

    /root/.cache/pfx/ref/bin/python graphs/e2e-small/make_stop_references.py

Writes graphs/e2e-small/stop-strings.json: for each case the prompt ids (pfx's GPT-2 framing, ' ' + source +
' <|endoftext|>', checked to be what the tokenizer gives), HF's new token ids (the end-of-sequence id left out) and
their text as pfxrun writes it (special tokens skipped, trimmed, newlines as spaces). Each case also records HF's text
without the stop strings (each setting changes at least one output: a stop that never fires tests nothing). CPU,
float32, deterministic.
"""
import json
import os

import transformers

from hf_generate import HERE, generate, load, prompt_ids
SOURCES = ["name : The Eagle | food : French | area : riverside",
           "name : Aromi | eatType : coffee shop | customer rating : 5 out of 5 | familyFriendly : no",
           "name : Blue Spice | priceRange : cheap | near : Burger King"]
# (stop strings, beams): a sentence end, a word (its leading space part of the string), two at once, beam search;
# then stops that end inside a token ("Ea" in " Eagle", " I" in " It": HF fires there too) and one across the
# prompt's special token (its text written out: "riverside <|endoftext|> The").
CASES = [(["."], 1), ([" is"], 1), (["food", " It"], 1), (["."], 3), ([" near"], 3),
         (["Ea"], 1), ([" I"], 1), (["|> The"], 1), (["Ea"], 3)]
MAX_NEW = 24


def main():
    model, tok, eos = load()
    out = {"about": "make_stop_references.py: HF generate with stop_strings on the bare e2e-small model",
           "transformers": transformers.__version__, "max_new": MAX_NEW, "cases": []}

    def run(ids, beams, stops):
        kw = dict(stop_strings=stops, tokenizer=tok) if stops else {}
        return generate(model, tok, ids, eos, max_new_tokens=MAX_NEW, num_beams=beams, **kw)

    for stops, beams in CASES:
        changed = 0
        for source in SOURCES:
            ids = prompt_ids(tok, source, eos)
            new, text = run(ids, beams, stops)
            _, free = run(ids, beams, None)
            changed += text != free
            # Greedy that stopped ends at a stop (one ending inside its last token); beam search's best may have ended
            # otherwise.
            full, before = tok.decode(ids + new), tok.decode(ids + new[:-1])
            start = len(os.path.commonprefix([full, before]))
            ends = any(i + len(s) > start for s in stops for i in range(len(full)) if full.startswith(s, i))
            assert ends or beams > 1 or text == free, (stops, text)
            out["cases"].append({"source": source, "stop": stops, "beams": beams, "prompt_ids": ids,
                                 "new_ids": new, "text": text, "text_without_stop": free})
            print(f"{stops!r:18} beams {beams}: {text!r}")
        assert changed, (stops, beams)  # a stop that changes no output tests nothing
    with open(os.path.join(HERE, "stop-strings.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
