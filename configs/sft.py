"""SFT on the built-in synthetic task (default), or on local files / a local HF checkpoint.

  python -m jaxrlhf.train --config configs/sft.py --workdir /tmp/sft
  python -m jaxrlhf.train --config configs/sft.py:data=hh,init_from=/path/to/hf_model \
      --workdir /tmp/sft_hh
Variants: size=tiny|small|base (fresh model), data=synthetic|hh|<path to a jsonl/json/parquet/csv
file of {prompt, response} or {messages}>, init_from=<local HF dir> (tokenizer taken from it),
steps=<n>, lora=<rank> (adapters on a frozen base, `config.lora`; learning rate x10).

With init_from (a pretrained model) the defaults are a fine-tuning recipe: lr 1e-5, 10 warmup
steps, batch 8, evaluation at step 0 and at the end on the first 64 held-out rows (seconds,
not minutes, on a laptop CPU), full rematerialisation of each layer (memory). HH transcripts
are rendered with the model's chat template when its tokenizer has one
(data.chat_template="raw" keeps the raw text).
"""
from jaxrlhf.config import base_config, lora_variant, parse_arg

# Relative data paths are looked up under config.data_root ($JAXRLHF_DATA_ROOT, else the shared
# data folder beside the checkout).
HH = "hh-rlhf-harmless"


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", data="synthetic", init_from="", steps=600, lora=0)
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
        c.data.path = f"{HH}/train.jsonl.gz"
        c.data.format = "hh_sft"
        c.data.on_bad_row = "skip"     # a few rows have empty or mismatched responses
        c.data.buckets = (128, 256, 512)
        c.eval_data.on_bad_row = "skip"
        c.eval_data.buckets = (128, 256, 512)
        c.eval_data.path = f"{HH}/test.jsonl.gz"
        c.eval_data.format = "hh_sft"
    elif a.data != "synthetic":
        c.data.path = a.data
    if a.init_from:
        c.init_from = a.init_from
        c.tokenizer = "auto"
        pretrained_defaults(c)
    lora_variant(c, a.lora)
    return c


def pretrained_defaults(c):
    """Fine-tuning defaults for a pretrained model (what the toy's lr 2e-3 would destroy)."""
    c.train.lr = 1e-5
    c.train.warmup_steps = 10
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 0          # eval at step 0 and at the end
    c.train.eval_batches = 8        # the first 64 held-out rows
    c.train.save_every = 50
    c.model.remat = "full"          # recompute each layer in the backward pass: less peak
                                    # memory at about the same step time (README: "Memory
                                    # at real-model scale")
