#!/usr/bin/env python3
"""Greedy generation from a baked bundle (`pfxc bake`) with ONNX Runtime and numpy alone: no pfx, no torch.

A baked bundle is plain ONNX (its generation graphs sharing weights.bin, the prefix folded in as constants), so any
ONNX runtime can serve it: C, C++, C#, Java, JavaScript, mobile. This script is the whole protocol, written out for
porting; `pfxrun generate` does the same (plus beam search, sampling, batching of many inputs, the generation
config's other settings, text in and out).

    pfxc bake bundle/ --prefix run/prefix.safetensors -o baked/
    python3 examples/run_baked.py baked/ --ids "31 7 4" --ids "5 5 90" [--max-new 16] [--min-new 0]

Prints each input's new token ids on a line (the end-of-sequence token not included). Needs numpy and onnxruntime.

Decoders (GPT-2's family): R rows, a prompt length TP, a prefix of P positions and a cache of C slots
(`manifest.json`: `generation.rows`, `generation.prompt_len`, `prefix_len`, `generation.capacity`).
- prefill: `input_ids` [R, TP], prompts left-padded (with the end-of-sequence id); `attention_mask` [R, P + TP]: 1 for
  the prefix, then the prompt's mask; `position_ids` [R, TP]: P, P + 1, ... over the real tokens (pads: P). It
  returns the last position's `logits` [R, 1, V] and `present.<l>.{key,value}` [R, heads, P + TP, D], the first
  P + TP slots of each layer's cache [R, heads, C, D].
- decode, once per new token: `input_ids` [R, 1] (the tokens just chosen); `position_ids` [R, 1]: P + the row's real
  prompt length + tokens generated before this one; `past_key_values.<l>.{key,value}`: the caches; `attention_mask`
  [R, C + 1]: the cache slots' mask, then 1 for the new token. It returns `logits` and the new token's
  `present.<l>.{key,value}` [R, heads, 1, D], which go into the next free slot (P + TP, then P + TP + 1, ...), whose
  mask becomes 1.
An export whose graphs number positions themselves (Bloom's ALiBi) has no `position_ids` input: it is left out.

Encoder-decoders (BART's family; `bart.generation` in the manifest: `rows` R, `src_len` S, `capacity` C,
`self_prefix` P, `cross_prefix` P', `first_position`):
- encode: `input_ids` [R, S], sources right-padded (with `bart.pad_token_id`), `attention_mask` [R, S]. It returns
  `cross.<l>.{key,value}` [R, heads, P' + S, D] and `self_prefix.<l>.{key,value}` [R, heads, P, D].
- decode, once per token fed (first the decoder start, `bart.generation_start_token_id`): `input_ids` [R, 1];
  `position_ids` [R, 1]: `first_position` + tokens fed before; `past_key_values.<l>.encoder.{key,value}`: the cross
  keys and values; `encoder_attention_mask` [R, P' + S]: 1 for the cross prefix, then the source's mask;
  `past_key_values.<l>.decoder.{key,value}` [R, heads, C, D]: the self cache, the prefix in its first P slots;
  `attention_mask` [R, C + 1]: the self cache's mask (1 for the prefix and each token fed), then 1. The new token's
  `present.<l>.decoder.{key,value}` go into the next free slot (P, then P + 1, ...).
A bundle compiled with languages (`pfxc compile --src-lang --tgt-lang`) needs the target language's id: as the decoder
start (`--start`, mBART-cc25) or as the forced first token (`--first`, mBART-50, NLLB, M2M100), as `pfxrun generate`
reads them from the bundle's tokenizer.
"""
import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort


class Graphs:
    """The bundle's generation graphs, fed only the inputs each declares."""

    def __init__(self, bundle, m):
        self.sessions = {name: ort.InferenceSession(os.path.join(bundle, file), providers=["CPUExecutionProvider"])
                         for name, file in m["graphs"].items()}

    def inputs(self, name):
        return self.sessions[name].get_inputs()

    def run(self, name, feeds):
        s = self.sessions[name]
        names = [o.name for o in s.get_outputs()]
        takes = {i.name for i in s.get_inputs()}
        return dict(zip(names, s.run(names, {k: v for k, v in feeds.items() if k in takes})))


class Decoder:
    """R left-padded prompts through prefill, then one token at a time through decode."""

    def __init__(self, graphs, m):
        gen = m["generation"]
        self.g, self.r, self.tp, self.c, self.p = graphs, gen["rows"], gen["prompt_len"], gen["capacity"], m["prefix_len"]
        self.caches = [i.name for i in graphs.inputs("decode") if i.name.startswith("past_key_values.")]

    def start(self, prompts, pad):
        r, tp, p = self.r, self.tp, self.p
        self.real = [len(q) for q in prompts] + [1] * (r - len(prompts))  # idle rows hold one pad token
        ids, mask = np.full((r, tp), pad, dtype=np.int64), np.zeros((r, tp), dtype=np.int64)
        pos = np.full((r, tp), p, dtype=np.int64)
        for row, n in enumerate(self.real):
            ids[row, tp - n:] = prompts[row] if row < len(prompts) else [pad]
            mask[row, tp - n:] = 1
            pos[row, tp - n:] = p + np.arange(n)
        out = self.g.run("prefill", {"input_ids": ids, "position_ids": pos,
                                     "attention_mask": np.hstack([np.ones((r, p), np.int64), mask])})
        self.cache = {}
        for name in self.caches:
            present = out[name.replace("past_key_values.", "present.")]
            self.cache[name] = np.zeros((r, present.shape[1], self.c, present.shape[3]), dtype=present.dtype)
            self.cache[name][:, :, :p + tp] = present
        self.slots = np.zeros((r, self.c), dtype=np.int64)
        self.slots[:, :p] = 1
        self.slots[:, p:p + tp] = mask
        self.next_slot = p + tp
        return out["logits"][:, -1]

    def step(self, tokens, n):
        """Feeds new token n (from 0) of every row."""
        r, slot = self.r, self.next_slot
        feeds = dict(self.cache)
        feeds.update(input_ids=tokens[:, None].astype(np.int64),
                     position_ids=np.array([[self.p + self.real[row] + n] for row in range(r)], dtype=np.int64),
                     attention_mask=np.hstack([self.slots, np.ones((r, 1), np.int64)]))
        out = self.g.run("decode", feeds)
        for name in self.cache:
            self.cache[name][:, :, slot] = out[name.replace("past_key_values.", "present.")][:, :, 0]
        self.slots[:, slot] = 1
        self.next_slot += 1
        return out["logits"][:, -1]


class Seq2Seq:
    """R right-padded sources through encode, then the decoder start and one token at a time through decode."""

    def __init__(self, graphs, m, start=None):
        b = m["bart"]
        gen = b["generation"]
        self.g, self.r, self.s, self.c = graphs, gen["rows"], gen["src_len"], gen["capacity"]
        self.p, self.pc, self.first = gen["self_prefix"], gen["cross_prefix"], gen["first_position"]
        self.start_token = b["generation_start_token_id"] if start is None else start
        self.pad = b["pad_token_id"]
        self.decode_inputs = [i.name for i in graphs.inputs("decode")]

    def start(self, sources, _pad):
        r, s, c, p, pc = self.r, self.s, self.c, self.p, self.pc
        ids, mask = np.full((r, s), self.pad, dtype=np.int64), np.zeros((r, s), dtype=np.int64)
        for row, src in enumerate(sources):
            ids[row, :len(src)] = src
            mask[row, :len(src)] = 1
        out = self.g.run("encode", {"input_ids": ids, "attention_mask": mask})
        self.feeds = {"encoder_attention_mask": np.hstack([np.ones((r, pc), np.int64), mask])}
        for name in self.decode_inputs:
            if ".encoder." in name:  # past_key_values.<l>.encoder.<kind> <- cross.<l>.<kind>
                _, l, _, kind = name.split(".")
                self.feeds[name] = out[f"cross.{l}.{kind}"]
            elif ".decoder." in name:
                _, l, _, kind = name.split(".")
                prefix = out[f"self_prefix.{l}.{kind}"]
                cache = np.zeros((r, prefix.shape[1], c, prefix.shape[3]), dtype=prefix.dtype)
                cache[:, :, :p] = prefix
                self.feeds[name] = cache
        self.slots = np.zeros((r, c), dtype=np.int64)
        self.slots[:, :p] = 1
        self.next_slot, self.fed = p, 0
        return self.feed(np.full(r, self.start_token, dtype=np.int64))

    def feed(self, tokens):
        r, slot = self.r, self.next_slot
        self.feeds.update(input_ids=tokens[:, None].astype(np.int64),
                          position_ids=np.full((r, 1), self.first + self.fed, dtype=np.int64),
                          attention_mask=np.hstack([self.slots, np.ones((r, 1), np.int64)]))
        out = self.g.run("decode", self.feeds)
        if slot < self.c:  # the last step's keys and values are never read again
            for name in self.feeds:
                if ".decoder." in name:
                    self.feeds[name][:, :, slot] = out[name.replace("past_key_values.", "present.")][:, :, 0]
            self.slots[:, slot] = 1
        self.next_slot += 1
        self.fed += 1
        return out["logits"][:, -1]

    def step(self, tokens, _n):
        return self.feed(tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="a folder written by `pfxc bake`")
    ap.add_argument("--ids", action="append", required=True, help="a prompt's (or source's) token ids, space-separated")
    ap.add_argument("--max-new", type=int, help="new tokens at most (default: the bundle's)")
    ap.add_argument("--min-new", type=int, default=0, help="no end-of-sequence before this many new tokens")
    ap.add_argument("--eos", type=int, action="append",
                    help="end-of-sequence id (default: the bundle's, from the export's config)")
    ap.add_argument("--no-eos", action="store_true", help="no end-of-sequence stop: always --max-new tokens")
    ap.add_argument("--first", type=int, help="force the first new token (mBART-50's, NLLB's or M2M100's target language)")
    ap.add_argument("--start", type=int, help="the decoder's start token (default: the bundle's; mBART-cc25's target "
                                              "language)")
    ap.add_argument("--no-forced-eos", action="store_true",
                    help="do not force the config's forced_eos_token_id as the last token at --max-new")
    args = ap.parse_args()

    try:
        with open(os.path.join(args.bundle, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"{args.bundle}: no readable manifest.json ({e}): give a folder written by `pfxc bake`")
    seq2seq = m.get("family") == "bart"
    wanted = {"encode", "decode"} if seq2seq else {"prefill", "decode"}
    if not m.get("baked") or not wanted <= set(m.get("graphs", {})):
        sys.exit(f"{args.bundle}: not a baked bundle with generation graphs (run `pfxc bake` on a bundle compiled "
                 f"with --max-new above 0)")
    languages = m.get("bart", {}).get("languages")
    if languages and args.start is None and args.first is None:
        # Which token starts the decoder, or is forced first, follows the tokenizer's style (pfxrun reads it).
        sys.exit(f"{args.bundle} translates {languages.get('source')} -> {languages.get('target')}: give the target "
                 f"language's id (in the bundle's tokenizer.json) as --start (mBART-cc25, whose decoder starts with it) or "
                 f"--first (mBART-50, NLLB, M2M100, whose decoder starts with </s> and forces it first)")
    model = Seq2Seq(Graphs(args.bundle, m), m, args.start) if seq2seq else Decoder(Graphs(args.bundle, m), m)
    bundle_max = m["generation"]["max_new"]
    max_new = bundle_max if args.max_new is None else args.max_new
    if not 1 <= max_new <= bundle_max:
        sys.exit(f"--max-new must be between 1 and {bundle_max} (the bundle's)")
    eos = [] if args.no_eos else (args.eos or m.get("eos_token_ids") or
                                   ([m["eos_token_id"]] if "eos_token_id" in m else []))
    forced_eos = None if args.no_forced_eos else m.get("forced_eos_token_id")
    pad = eos[0] if eos else 0  # masked out: any id does
    try:
        inputs = [[int(t) for t in s.split()] for s in args.ids]
    except ValueError as e:
        sys.exit(f"--ids takes token ids (whole numbers) separated by spaces: {e}")
    longest = m["bart"]["generation"]["src_len"] if seq2seq else m["generation"]["prompt_len"]
    vocab = m["vocab"]
    for i, q in enumerate(inputs):
        if not 1 <= len(q) <= longest:
            sys.exit(f"input {i} has {len(q)} tokens; the bundle takes 1 to {longest}")
        if any(not 0 <= t < vocab for t in q):
            sys.exit(f"input {i} holds an id outside the vocabulary (0 to {vocab - 1}): {q}")
    for flag, t in (("--first", args.first), ("--start", args.start), ("--eos", None if not args.eos else max(args.eos))):
        if t is not None and not 0 <= t < vocab:
            sys.exit(f"{flag} {t} is outside the vocabulary (0 to {vocab - 1})")

    r = model.r
    for start in range(0, len(inputs), r):
        batch = inputs[start:start + r]
        logits = model.start(batch, pad)
        new, done = [[] for _ in range(r)], [row >= len(batch) for row in range(r)]
        for n in range(max_new):
            logits = logits.copy()
            if n < args.min_new:
                logits[:, eos] = -np.inf
            tokens = logits.argmax(-1)
            # Forced tokens win over the logits (HF's forced_bos_token_id / forced_eos_token_id).
            if n == 0 and args.first is not None:
                tokens[:] = args.first
            if n + 1 == max_new and forced_eos is not None:
                tokens[:] = forced_eos
            for row, t in enumerate(tokens):
                if not done[row]:
                    if int(t) in eos:
                        done[row] = True
                    else:
                        new[row].append(int(t))
            if all(done) or n + 1 == max_new:
                break
            logits = model.step(tokens, n)
        for row in range(len(batch)):
            print(" ".join(map(str, new[row])))


if __name__ == "__main__":
    main()
