"""An ensemble of M reward models in one vmapped step + the preference strength of every
training pair (MOSS; stage `rm_ensemble`, see `jaxrlhf.trainers.rm_ensemble`).

  python -m jaxrlhf.train --config configs/rm_ensemble.py:m=4 --workdir /tmp/rm_ens
  python -m jaxrlhf.train --config configs/rm.py --workdir /tmp/rm_flip \\
      --config.rm.strength_file=/tmp/rm_ens/strength.jsonl --config.rm.flip_fraction=0.2
Variants: those of configs/rm.py (size, data, init_from, steps, k) plus m=<members>.
"""
import importlib.util
import os

from jaxrlhf.config import parse_arg


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_jaxrlhf_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    a = parse_arg(arg, size="tiny", data="synthetic", init_from="", steps=400, k=4, m=4)
    base = ",".join(f"{k}={a[k]}" for k in ("size", "data", "init_from", "steps", "k"))
    c = _load("rm").get_config(base)
    c.stage = "rm_ensemble"
    c.rm.ensemble_size = a.m
    return c
