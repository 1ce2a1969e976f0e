"""A job for tests/test_distributed.py: run under torchrun or as one process.

argv: OUT [FAIL_RANK]. Writes cfgen records of 5 prompts (batch size 2, so
3 batches) on a tiny Llama with a steering vector, rank 0 only, atomically.
"""

import json
import os
import sys

import pyvene as pv
import torch
from conftest import CharTokenizer, tiny_llama

import cfgen
from cfgen import distributed

torch.set_num_threads(1)
out = sys.argv[1]
fail_rank = int(sys.argv[2]) if len(sys.argv) > 2 else -1
model = tiny_llama(init=0.5)
vec = torch.linspace(-2, 2, 16)
steer = pv.IntervenableModel({"layer": 1, "component": "block_output",
                              "intervention": pv.AdditionIntervention(embed_dim=16, source_representation=vec)},
                             model)
tok = CharTokenizer()
prompts = ["abc", "hello there", "x", "a longer prompt here", "qq"]


def run(batch):
    if int(os.environ.get("RANK", "0")) == fail_rank:
        raise RuntimeError("planned failure")
    r = cfgen.generate(steer, tok, [p for _, p in batch], max_new_tokens=6, seed=[7 + i for i, _ in batch],
                       interventional=True)
    recs = r.to_records()
    for rec in recs:
        rec["prompt_index"] = batch[rec["prompt_index"]][0]
    return recs


with distributed.ranks() as ctx:
    batches = ctx.map_batches(run, prompts, batch_size=2)
    if ctx.rank == 0:
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for recs in batches:
                for rec in recs:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
        os.replace(tmp, out)
