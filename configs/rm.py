"""Reward model on the built-in task (K-wise rankings), or on HH-RLHF harmless pairs.

  python -m jaxrlhf.train --config configs/rm.py --workdir /tmp/rm
  python -m jaxrlhf.train --config configs/rm.py:data=hh,init_from=/tmp/sft_hh --workdir /tmp/rm_hh
Variants: size=tiny|small|base (fresh model), data=synthetic|hh|<path to a preference or ranking
file>, init_from=<local HF dir or an SFT stage dir>, steps=<n>, k=<responses per prompt
(built-in task)>, lora=<rank> (adapters on a frozen base, `config.lora`; learning rates x10).

With init_from (a pretrained model) the defaults are a fine-tuning recipe: lr 2e-5, batch 8
prompts, evaluation at step 0 and at the end (the whole held-out set), full
rematerialisation of each layer (memory), and centring in the weights
(rm.center_loss_coef = 0.01, no post-hoc bias) so that the exported model scores exactly the
same in transformers' AutoModelForSequenceClassification.
"""
from jaxrlhf.config import base_config, lora_variant, parse_arg

HH = "hh-rlhf-harmless"   # under config.data_root


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", data="synthetic", init_from="", steps=400, k=4, lora=0)
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
        c.data.path = f"{HH}/train.jsonl.gz"
        c.data.format = "hh"
        c.data.on_bad_row = "skip"     # the file has a few rows with mismatched prefixes
        c.data.buckets = (128, 256, 512)
        c.eval_data.path = f"{HH}/test.jsonl.gz"
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
        pretrained_defaults(c)
    lora_variant(c, a.lora)
    return c


def pretrained_defaults(c):
    """Fine-tuning defaults for a pretrained reward model."""
    c.train.lr = 2e-5
    c.train.warmup_steps = 10
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 0          # eval at step 0 and at the end (the whole held-out set)
    c.train.save_every = 50
    c.rm.center_loss_coef = 0.01    # centring in the weights: HF scores equal jaxrlhf's
    c.rm.center_on_sft = False
    c.rm.center_examples = 64
    c.model.remat = "full"          # recompute each layer in the backward pass: less peak
                                    # memory at about the same step time (README: "Memory
                                    # at real-model scale")
