"""PPO-ptx on the built-in task from a finished SFT and RM stage.

  python -m jaxrlhf.train --config configs/ppo.py:sft=/tmp/run/sft,rm=/tmp/run/rm --workdir /tmp/ppo
Variants: sft=<SFT stage dir or HF dir>, rm=<RM stage dir or HF dir>, iterations=<n>,
kl=<kl_coef>, ptx=<ptx_coef>, critic=separate|shared.
"""
from jaxrlhf.config import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, sft="", rm="", iterations=60, kl=0.05, ptx=0.0, critic="separate")
    c = base_config("ppo")
    c.data.path = "synthetic"
    c.data.format = "prompt"
    c.data.buckets = (16, 32)
    c.data.max_prompt_len = 16
    c.ptx_data.path = "synthetic"
    c.ptx_data.buckets = (32,)
    c.train.log_every = 10
    c.train.save_every = 20
    c.train.eval_every = 0      # held-out policy eval before and after PPO only
    p = c.ppo
    p.actor_init, p.reward_init = a.sft, a.rm
    p.iterations = a.iterations
    p.kl_coef = a.kl
    p.ptx_coef = a.ptx
    p.critic = a.critic
    p.rollout_batch = 64
    p.minibatch_size = 32
    p.ppo_epochs = 2
    p.max_new_tokens = 16
    p.actor_lr = 5e-5
    p.critic_lr = 2e-4
    p.sample_every = 20
    return c
