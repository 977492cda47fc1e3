"""An ensemble of M reward models in one vmapped step + the preference strength of every
training pair (MOSS; stage `rm_ensemble`, see `jaxrlhf.trainers.rm_ensemble`).

  python -m jaxrlhf.train --config configs/rm_ensemble.py:m=4 --workdir /tmp/rm_ens
  python -m jaxrlhf.train --config configs/rm.py --workdir /tmp/rm_flip \\
      --config.rm.strength_file=/tmp/rm_ens/strength.jsonl --config.rm.flip_fraction=0.2
Variants: those of configs/rm.py (size, data, init_from, steps, k) plus m=<members>.
"""
from jaxrlhf.config import parse_arg, sibling_config


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", data="synthetic", init_from="", steps=400, k=4, m=4)
    base = ",".join(f"{k}={a[k]}" for k in ("size", "data", "init_from", "steps", "k"))
    c = sibling_config(__file__, "rm").get_config(base)
    c.stage = "rm_ensemble"
    c.rm.ensemble_size = a.m
    return c
