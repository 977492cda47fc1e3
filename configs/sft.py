"""SFT on the built-in synthetic task (default), or on local files / a local HF checkpoint.

  python -m jaxrlhf.train --config configs/sft.py --workdir /tmp/sft
  python -m jaxrlhf.train --config configs/sft.py:data=hh,init_from=/path/to/hf_model \
      --workdir /tmp/sft_hh
Variants: size=tiny|small|base (fresh model), data=synthetic|hh|<path to a jsonl/json/parquet/csv
file of {prompt, response} or {messages}>, init_from=<local HF dir> (tokenizer taken from it).
"""
import os

from jaxrlhf.config import base_config, parse_arg

# The shared HH-RLHF harmless data sits beside the repository (../shared); read it in place.
HH_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                       "shared", "data", "hh-rlhf-harmless"))


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", data="synthetic", init_from="", steps=600)
    c = base_config("sft")
    c.model.preset = a.size
    c.train.steps = a.steps
    c.train.batch_size = 32
    c.train.lr = 2e-3
    c.train.warmup_steps = 30
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.save_every = 200
    c.data.buckets = (32, 64)
    if a.data == "hh":
        # SFT on the chosen responses of the HH-RLHF harmless pairs.
        c.data.path = f"{HH_DIR}/train.jsonl.gz"
        c.data.format = "hh_sft"
        c.data.on_bad_row = "skip"     # a few rows have empty or mismatched responses
        c.data.buckets = (128, 256, 512)
        c.eval_data.on_bad_row = "skip"
        c.eval_data.buckets = (128, 256, 512)
        c.eval_data.path = f"{HH_DIR}/test.jsonl.gz"
        c.eval_data.format = "hh_sft"
    elif a.data != "synthetic":
        c.data.path = a.data
    if a.init_from:
        c.init_from = a.init_from
        c.tokenizer = "auto"
    return c
