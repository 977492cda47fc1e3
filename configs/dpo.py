"""Direct preference optimisation (DPO, IPO, robust DPO, SimPO, K-wise Plackett-Luce DPO).

  python -m jaxrlhf.train --config configs/dpo.py --workdir /tmp/dpo
      built-in sorting task: SFT (tiny model) -> DPO on its K = 4 rankings (all pairs) in
      DIR/sft, DIR/dpo, minutes on a 2-core CPU
  python -m jaxrlhf.train --config configs/dpo.py:sft=/tmp/run/sft --workdir /tmp/dpo_only
      the DPO stage only, from a finished SFT stage (or any HF dir)
  python -m jaxrlhf.train --config configs/dpo.py:data=hh,model=/tmp/smollm2 --workdir /tmp/dpo_hh
      a real chat model on HH-RLHF harmless pairs (chat template of its tokenizer); held-out
      implicit-reward accuracy on the 200-pair test split before and after

Variants: loss=sigmoid|ipo|robust|simpo, ranking=pairs|plackett_luce (K-wise DPO), k=<responses
per built-in ranking>, beta=<β> (default 0.5 on the built-in task, 0.1 on HH / a real model, 2.0
for SimPO), eps=<label smoothing / robust flip rate>, steps=<n>, seed=<n>,
sft=<SFT stage dir>, model=<pretrained HF chat model dir>, data=synthetic|hh|<preference or
ranking file>, ref=cached|step (reference log-probs cached once or run in every step),
strength=<strength.jsonl of an rm_ensemble stage>, flip=<fraction of lowest-strength pairs
flipped>, soft=<1: soft labels from the strength>, noise=<label noise of the built-in labeller>,
rounds=<iterated online DPO rounds: sample K from the policy, label, continue DPO>,
lora=<rank> (adapters on a frozen base, `config.lora`; learning rates x10): the DPO stage's (its reference is then the frozen base, adapters off).
"""
from jaxrlhf.config import (base_config, lora_variant, parse_arg, pipeline_config,
                            sibling_config)

HH = "hh-rlhf-harmless"   # under config.data_root


def dpo_config(a):
    c = base_config("dpo")
    c.seed = a.seed
    c.init_from = a.sft
    c.tokenizer = "auto"
    c.train.steps = a.steps
    c.train.batch_size = 16
    c.train.lr = 5e-4
    c.train.warmup_steps = 10
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.save_every = 100
    c.data.buckets = (32, 64)
    c.data.max_k = a.k
    c.data.synthetic.seed = a.seed
    c.data.synthetic.label_noise = a.noise
    c.eval_data.synthetic.label_noise = a.noise
    d = c.dpo
    d.loss, d.ranking = a.loss, a.ranking
    d.beta = a.beta if a.beta > 0 else default_beta(a)
    d.label_smoothing = a.eps
    d.ref_logps = a.ref
    if a.loss == "simpo" and a.ranking == "plackett_luce":
        d.simpo_gamma = 0.0
    if a.strength:
        d.strength_file = a.strength
        d.flip_fraction = a.flip
        d.soft_labels = bool(a.soft)
    if a.data == "hh":
        c.data.path = f"{HH}/train.jsonl.gz"
        c.data.format = "hh"
        c.data.on_bad_row = "skip"
        c.data.buckets = (128, 256, 512)
        c.data.max_k = 2
        c.eval_data.path = f"{HH}/test.jsonl.gz"
        c.eval_data.format = "hh"
        c.eval_data.on_bad_row = "skip"
        c.eval_data.buckets = (128, 256, 512)
    elif a.data != "synthetic":
        c.data.path = a.data
        c.data.format = "ranking"
    if a.model:
        pretrained_defaults(c, a)
    return c


def default_beta(a):
    """β when the variant leaves it unset: SimPO's 2.0; 0.1 for a pretrained model (the DPO
    paper's); 0.5 on the built-in task, whose byte-level responses have large log-ratios
    (at 0.1 its policies drift far from the SFT model: KL 6-28 nats, lower gold reward)."""
    if a.loss == "simpo":
        return 2.0
    return 0.1 if (a.model or a.data != "synthetic") else 0.5


def pretrained_defaults(c, a):
    """A pretrained chat model: batch 8 pairs, lr 1e-6, 100 steps, evaluation on the whole
    held-out set at the start and the end, rows up to 384 tokens, full rematerialisation of
    each layer."""
    c.train.lr = 1e-6
    c.train.warmup_steps = 10
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.save_every = 50
    c.train.steps = 100 if a.steps == 300 else a.steps
    c.model.remat = "full"
    for block in (c.data, c.eval_data):
        block.max_len = 384
        block.buckets = (128, 256, 384)


def get_config(arg=None):
    a = parse_arg(arg, loss="sigmoid", ranking="pairs", k=4, beta=0.0, eps=0.0, steps=300,
                  seed=0, sft="", model="", data="synthetic", ref="cached", strength="",
                  flip=0.0, soft=0, noise=0.1, rounds=1, lora=0)
    if a.model:
        a.sft = a.model
    d = dpo_config(a)
    lora_variant(d, a.lora)
    if a.sft:
        return d
    sft = sibling_config(__file__, "sft").get_config()
    sft.seed = a.seed
    sft.data.synthetic.seed = a.seed
    c = pipeline_config(sft, None, d)
    c.seed = a.seed
    c.pipeline.iterations = a.rounds
    return c
