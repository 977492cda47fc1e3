"""Reward model on the built-in task (K-wise rankings), or on HH-RLHF harmless pairs.

  python -m jaxrlhf.train --config configs/rm.py --workdir /tmp/rm
  python -m jaxrlhf.train --config configs/rm.py:data=hh,init_from=/tmp/sft_hh --workdir /tmp/rm_hh
Variants: size=tiny|small|base (fresh model), data=synthetic|hh|<path to a preference or ranking
file>, init_from=<local HF dir or an SFT stage dir>, k=<responses per prompt (built-in task)>.
"""
import os

from jaxrlhf.config import base_config, parse_arg

# The shared HH-RLHF harmless data sits beside the repository (../shared); read it in place.
HH_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                       "shared", "data", "hh-rlhf-harmless"))


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", data="synthetic", init_from="", steps=400, k=4)
    c = base_config("rm")
    c.model.preset = a.size
    c.train.steps = a.steps
    c.train.batch_size = 16
    c.train.lr = 1e-3
    c.train.warmup_steps = 20
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.save_every = 200
    c.data.buckets = (32, 64)
    c.data.max_k = a.k
    c.data.format = "ranking"
    if a.data == "hh":
        c.data.path = f"{HH_DIR}/train.jsonl.gz"
        c.data.format = "hh"
        c.data.on_bad_row = "skip"     # the file has a few rows with mismatched prefixes
        c.data.buckets = (128, 256, 512)
        c.eval_data.path = f"{HH_DIR}/test.jsonl.gz"
        c.eval_data.format = "hh"
        c.eval_data.on_bad_row = "skip"
        c.eval_data.buckets = (128, 256, 512)
        c.rm.center_data.path = ""     # centre on the chosen responses
    elif a.data != "synthetic":
        c.data.path = a.data
        c.data.format = "preference"
        c.rm.center_data.path = ""
    if a.init_from:
        c.init_from = a.init_from
        c.tokenizer = "auto"
    return c
