#!/usr/bin/env python3
"""Length-limit references: Hugging Face's `generate` on the small E2E GPT-2 (hf/, tokenizer.json), the bare model,
with generation settings that count the prompt (`max_length`, `min_length`), greedy and beam search, for
`pfxrun generate --no-prefix` on a bundle compiled from an export whose generation_config.json holds them.

    /root/.cache/pfx/ref/bin/python graphs/e2e-small/make_length_references.py

Writes graphs/e2e-small/length-limits.json: the bundle's `max_new` (HF is given it as `max_new_tokens` where the
settings set no `max_length`, as pfx caps a generation there), and for each setting and source the prompt ids (pfx's
GPT-2 framing, ' ' + source + ' <|endoftext|>'), HF's new token ids (the end-of-sequence id left out) and their text
as pfxrun writes it. One prompt per `generate` call: HF counts a batch's padding as prompt, pfx each prompt's own
tokens. The sources' prompts have 10 to 26 tokens, so one `max_length` leaves each a different number of new tokens;
each setting changes at least one output from HF's without it. CPU, float32, deterministic.
"""
import json
import os

import transformers

from hf_generate import HERE, generate, load, prompt_ids
SOURCES = ["name : The Eagle | food : French | area : riverside",
           "name : Aromi | eatType : coffee shop | customer rating : 5 out of 5 | familyFriendly : no",
           "name : Blue Spice | priceRange : cheap | near : Burger King",
           "name : Zizzi"]
# The bundle generates at most this many tokens (and takes prompts of up to PROMPT_LEN).
MAX_NEW, PROMPT_LEN = 40, 32
# generation_config.json settings: max_length cutting some outputs (each prompt's limit its own), min_length past
# where the model ends, both, a forced last token at max_length, and beam search judging its best live beam at
# max_length ("never" with a length penalty above 0).
SETTINGS = [{"max_length": 36},
            {"max_length": 36, "num_beams": 3},
            {"min_length": 42},
            {"max_length": 48, "min_length": 42, "num_beams": 3},
            {"max_length": 36, "forced_eos_token_id": 2047},
            {"max_length": 36, "forced_eos_token_id": 2047, "num_beams": 3},
            {"max_length": 40, "num_beams": 3, "length_penalty": 2.0, "early_stopping": "never"}]


def main():
    model, tok, eos = load()
    out = {"about": "make_length_references.py: HF generate with max_length/min_length on the bare e2e-small model",
           "transformers": transformers.__version__, "max_new": MAX_NEW, "prompt_len": PROMPT_LEN, "cases": []}

    def run(ids, settings):
        # Where the settings set no max_length, HF generates up to the bundle's limit, as pfx does.
        limit = {} if "max_length" in settings else {"max_new_tokens": MAX_NEW}
        return generate(model, tok, ids, eos, **settings, **limit)

    for settings in SETTINGS:
        changed = 0
        for source in SOURCES:
            ids = prompt_ids(tok, source, eos)
            assert len(ids) <= PROMPT_LEN, ids
            assert settings.get("max_length", 0) - len(ids) <= MAX_NEW
            new, text = run(ids, settings)
            beams = {k: v for k, v in settings.items() if k in ("num_beams", "length_penalty", "early_stopping")}
            _, free = run(ids, beams)
            changed += text != free
            out["cases"].append({"source": source, "settings": settings, "prompt_ids": ids, "new_ids": new,
                                 "text": text, "text_without": free})
            print(f"{json.dumps(settings):70} {len(ids):2} +{len(new):2}: {text!r}")
        assert changed, settings  # a setting that changes no output tests nothing
    with open(os.path.join(HERE, "length-limits.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
