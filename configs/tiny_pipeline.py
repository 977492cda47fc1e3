"""The built-in end-to-end run (the README's main job): SFT -> RM -> PPO on the synthetic
sorting task with a ~0.8M-parameter Llama-style model, on a 2-core CPU in minutes.

  python -m jaxrlhf.train --config configs/tiny_pipeline.py --workdir /tmp/run
Variants: seed=<n>, kl=<PPO kl_coef; 0 shows over-optimisation>, iterations=<PPO iterations>,
rounds=<iterated-RLHF rounds>.
"""
from jaxrlhf.config import parse_arg, pipeline_config, sibling_config


def get_config(arg=None):
    a = parse_arg(arg, seed=0, kl=0.05, iterations=60, rounds=1)
    sft, rm, ppo = (sibling_config(__file__, n) for n in ("sft", "rm", "ppo"))
    c = pipeline_config(sft.get_config(), rm.get_config(),
                        ppo.get_config(f"iterations={a.iterations},kl={a.kl}"))
    c.seed = a.seed
    c.pipeline.iterations = a.rounds
    for name in ("sft", "rm", "ppo"):
        for block in ("data", "eval_data", "ptx_data"):
            if block in c.pipeline[name]:   # ptx_data: PPO only
                c.pipeline[name][block].synthetic.seed = a.seed
    return c
