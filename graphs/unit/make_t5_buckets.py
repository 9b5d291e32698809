#!/usr/bin/env python3
"""HF's T5 relative position buckets (transformers' `T5Attention._relative_position_bucket`) for key - query from
-300 to 300, one-way (decoder) and both ways (encoder), for T5's defaults (32 buckets, max distance 128) and the
fixtures' (8, 16): graphs/unit/t5-buckets.json, which compiler/src/compile/t5.rs's unit test reads.

    /root/.cache/pfx/ref/bin/python graphs/unit/make_t5_buckets.py
"""
import json
import os

import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

HERE = os.path.dirname(os.path.abspath(__file__))
REL = range(-300, 301)


def main():
    out = {"about": "make_t5_buckets.py", "transformers": transformers.__version__, "rel": [REL.start, REL.stop - 1],
           "cases": []}
    for bidirectional in (False, True):
        for buckets, distance in ((32, 128), (8, 16)):
            b = T5Attention._relative_position_bucket(torch.tensor(list(REL)), bidirectional=bidirectional,
                                                      num_buckets=buckets, max_distance=distance)
            out["cases"].append({"bidirectional": bidirectional, "buckets": buckets, "max_distance": distance,
                                 "bucket": b.tolist()})
    with open(os.path.join(HERE, "t5-buckets.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")


if __name__ == "__main__":
    main()
