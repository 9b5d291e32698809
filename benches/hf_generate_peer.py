#!/usr/bin/env python3
"""The CPU peer of `generate_tokens`: HF `generate` with a PEFT prefix (MLP reparametrization, as pfx's bench
bundle), random-init GPT-2 of the bench export's sizes, prompt 32, 64 new tokens (no early stop), torch limited
to N threads. Timing only: the weights are random, as in pfx's bench export. Prints one JSON line per case.

    /root/.cache/pfx/ref/bin/python benches/hf_generate_peer.py --threads 2 --layers 12 --hidden 768 --heads 12 \
        --vocab 50257 --positions 1024 --cases 1x1,8x1,1x5 --runs 5

`--check` instead compares `generate`'s greedy tokens with a plain loop over the PEFT model's forward (a tiny
model), which proves the prefix is in the timed computation.
"""
import argparse
import json
import os
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--prefix", type=int, default=10)
    p.add_argument("--mid", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--cases", default="1x1,8x1,1x5",
                   help="batch x beams, comma separated; BxKp: each prompt with a prefix of its own, which PEFT "
                        "cannot batch: generated one by one, the prompt encoder's weights swapped in for each")
    p.add_argument("--runs", type=int, default=5, help="timed calls per case; the median is reported")
    p.add_argument("--check", action="store_true")
    return p.parse_args()


def prefix_into_generate_cache(pm):
    """transformers 5.x hands `generate`'s own (empty) cache to the model while PEFT puts the prefix in
    `past_key_values`, and the model uses the former: the prefix would be dropped without a word. At the
    first step (empty cache), write PEFT's prefix into the cache the model will use."""
    prepare = pm.prepare_inputs_for_generation

    def with_prefix(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        if "cache" not in inputs:
            return inputs
        prefix = inputs.pop("past_key_values", None)
        if prefix is None:
            return inputs
        if inputs["cache"] is None:
            inputs["cache"] = prefix
        elif inputs["cache"].get_seq_length() == 0:
            for layer, kv in enumerate(prefix.layers):
                inputs["cache"].update(kv.keys, kv.values, layer)
        return inputs

    pm.prepare_inputs_for_generation = with_prefix


def build(args, torch):
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.positions, n_layer=args.layers,
                        n_embd=args.hidden, n_head=args.heads, bos_token_id=args.vocab - 1,
                        eos_token_id=args.vocab - 1)
    model = GPT2LMHeadModel(config).eval()
    pm = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.prefix,
                                                  prefix_projection=True, encoder_hidden_size=args.mid)).eval()
    with torch.no_grad():  # a prefix that changes the tokens, so that --check can tell it is used
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p))
    prefix_into_generate_cache(pm)
    return pm


def generate(pm, torch, ids, new, beams):
    with torch.no_grad():
        return pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, num_beams=beams, pad_token_id=0)


def check(args, torch):
    args.layers, args.hidden, args.heads, args.vocab, args.positions, args.mid = 2, 64, 2, 500, 128, 32
    pm = build(args, torch)
    ids = torch.randint(0, args.vocab, (2, 8))
    got = generate(pm, torch, ids, 8, 1)[:, 8:]
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            logits = pm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    same = torch.equal(got, seq[:, 8:])
    print(json.dumps(dict(check="generate with the prefix equals the forward loop", ok=same,
                          generate=got.tolist(), loop=seq[:, 8:].tolist())))
    return 0 if same else 1


def main():
    args = parse()
    # Before torch is imported: its OpenMP pool sizes itself from these.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    if args.check:
        return check(args, torch)
    pm = build(args, torch)
    for case in args.cases.split(","):
        own = case.endswith("p")
        batch, beams = (int(x) for x in case.rstrip("p").split("x"))
        ids = torch.randint(0, args.vocab, (batch, args.prompt))
        # Each prompt's prefix: the prompt encoder's weights shifted by i / 100 (any values time the same).
        base = {k: v.clone() for k, v in pm.prompt_encoder.state_dict().items()}
        users = [{k: v + i / 100 for k, v in base.items()} for i in range(batch)]

        def call():
            if not own:
                return generate(pm, torch, ids, args.new, beams)
            for i in range(batch):
                pm.prompt_encoder.load_state_dict(users[i])
                generate(pm, torch, ids[i:i + 1], args.new, beams)

        call()  # warm-up
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        print(json.dumps(dict(batch=batch, beams=beams, own_prefixes=own, median_s=median, times=times,
                              ms_per_token=median / args.new * 1e3)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
