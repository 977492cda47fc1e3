"""The built-in end-to-end run (the README's main job): SFT -> RM -> PPO on the synthetic
sorting task with a ~0.8M-parameter Llama-style model, on a 2-core CPU in minutes.

  python -m jaxrlhf.train --config configs/tiny_pipeline.py --workdir /tmp/run
Variants: seed=<n>, kl=<PPO kl_coef; 0 shows over-optimisation>, iterations=<PPO iterations>,
rounds=<iterated-RLHF rounds>.
"""
import importlib.util
import os

from jaxrlhf.config import parse_arg, pipeline_config


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_jaxrlhf_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    a = parse_arg(arg, seed=0, kl=0.05, iterations=60, rounds=1)
    c = pipeline_config(_load("sft").get_config(), _load("rm").get_config(),
                        _load("ppo").get_config(f"iterations={a.iterations},kl={a.kl}"))
    c.seed = a.seed
    c.pipeline.iterations = a.rounds
    for name in ("sft", "rm", "ppo"):
        for block in ("data", "eval_data", "ptx_data"):
            c.pipeline[name][block].synthetic.seed = a.seed
    return c
