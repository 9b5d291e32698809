#!/usr/bin/env python3
"""Greedy generation from a baked decoder bundle (`pfxc bake`) with ONNX Runtime and numpy alone: no pfx, no torch.

A baked bundle is plain ONNX (prefill.onnx and decode.onnx sharing weights.bin, the prefix folded in as constants),
so any ONNX runtime can serve it: C, C++, C#, Java, JavaScript, mobile. This script is the whole protocol, written
out for porting; `pfxrun generate` does the same (plus beam search, sampling, batching of many inputs, the
generation config's settings).

    pfxc bake bundle/ --prefix run/prefix.safetensors -o baked/
    python3 examples/run_baked.py baked/ --ids "31 7 4" --ids "5 5 90" [--max-new 16] [--min-new 0] [--eos ID]

Prints each prompt's new token ids on a line (the end-of-sequence token not included). Needs numpy and onnxruntime.

The protocol, with R rows, a prompt length TP, a prefix of P positions and a cache of C slots (`manifest.json`:
`generation.rows`, `generation.prompt_len`, `prefix_len`, `generation.capacity`):
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
"""
import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="a folder written by `pfxc bake` (a decoder's)")
    ap.add_argument("--ids", action="append", required=True, help="a prompt's token ids, space-separated")
    ap.add_argument("--max-new", type=int, help="new tokens at most (default: the bundle's)")
    ap.add_argument("--min-new", type=int, default=0, help="no end-of-sequence before this many new tokens")
    ap.add_argument("--eos", type=int, action="append",
                    help="end-of-sequence id (default: the bundle's, from the export's config; none: no early stop)")
    args = ap.parse_args()

    with open(os.path.join(args.bundle, "manifest.json")) as f:
        m = json.load(f)
    if not m.get("baked") or m.get("family") == "bart" or "prefill" not in m.get("graphs", {}):
        sys.exit(f"{args.bundle}: not a baked decoder bundle with generation graphs (run `pfxc bake` on a bundle "
                 f"compiled with --max-new above 0; BART's encode/decode graphs follow another protocol)")
    gen = m["generation"]
    r, tp, c, p = gen["rows"], gen["prompt_len"], gen["capacity"], m["prefix_len"]
    max_new = min(args.max_new or gen["max_new"], gen["max_new"])
    eos = args.eos or m.get("eos_token_ids") or ([m["eos_token_id"]] if "eos_token_id" in m else [])
    pad = eos[0] if eos else 0  # masked out: any id does
    prompts = [[int(t) for t in s.split()] for s in args.ids]
    for i, q in enumerate(prompts):
        if not 1 <= len(q) <= tp:
            sys.exit(f"prompt {i} has {len(q)} tokens; the bundle takes 1 to {tp}")

    def session(name):
        return ort.InferenceSession(os.path.join(args.bundle, m["graphs"][name]), providers=["CPUExecutionProvider"])

    prefill, decode = session("prefill"), session("decode")
    takes = {s: {i.name for i in s.get_inputs()} for s in (prefill, decode)}
    caches = [i for i in decode.get_inputs() if i.name.startswith("past_key_values.")]

    def run(s, feeds):
        names = [o.name for o in s.get_outputs()]
        return dict(zip(names, s.run(names, {k: v for k, v in feeds.items() if k in takes[s]})))

    for start in range(0, len(prompts), r):
        batch = prompts[start:start + r]
        real = [len(q) for q in batch] + [1] * (r - len(batch))  # idle rows hold one pad token
        ids = np.full((r, tp), pad, dtype=np.int64)
        mask = np.zeros((r, tp), dtype=np.int64)
        pos = np.full((r, tp), p, dtype=np.int64)
        for row, n in enumerate(real):
            ids[row, tp - n:] = batch[row] if row < len(batch) else [pad]
            mask[row, tp - n:] = 1
            pos[row, tp - n:] = p + np.arange(n)
        out = run(prefill, {"input_ids": ids, "attention_mask": np.hstack([np.ones((r, p), np.int64), mask]),
                            "position_ids": pos})
        cache = {}
        for i in caches:
            present = out[i.name.replace("past_key_values.", "present.")]
            cache[i.name] = np.zeros((r, present.shape[1], c, present.shape[3]), dtype=present.dtype)
            cache[i.name][:, :, :p + tp] = present
        slots = np.zeros((r, c), dtype=np.int64)
        slots[:, :p] = 1
        slots[:, p:p + tp] = mask
        new = [[] for _ in range(r)]
        done = [row >= len(batch) for row in range(r)]
        logits = out["logits"][:, -1]
        for n in range(max_new):
            if n < args.min_new:
                logits = logits.copy()
                logits[:, eos] = -np.inf
            tokens = logits.argmax(-1)
            for row, t in enumerate(tokens):
                if not done[row]:
                    if int(t) in eos:
                        done[row] = True
                    else:
                        new[row].append(int(t))
            if all(done) or n + 1 == max_new:
                break
            slot = p + tp + n
            feeds = dict(cache)
            feeds.update(input_ids=tokens[:, None].astype(np.int64),
                         position_ids=np.array([[p + real[row] + n] for row in range(r)], dtype=np.int64),
                         attention_mask=np.hstack([slots, np.ones((r, 1), np.int64)]))
            out = run(decode, feeds)
            for name in cache:
                cache[name][:, :, slot] = out[name.replace("past_key_values.", "present.")][:, :, 0]
            slots[:, slot] = 1
            logits = out["logits"][:, -1]
        for row in range(len(batch)):
            print(" ".join(map(str, new[row])))


if __name__ == "__main__":
    main()
