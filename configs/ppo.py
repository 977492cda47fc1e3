"""PPO-ptx from a finished SFT and RM stage: on the built-in task, or on HH-RLHF prompts.

  python -m jaxrlhf.train --config configs/ppo.py:sft=/tmp/run/sft,rm=/tmp/run/rm --workdir /tmp/ppo
  python -m jaxrlhf.train --config configs/ppo.py:data=hh,sft=/tmp/sft_hh,rm=/tmp/rm_hh \
      --workdir /tmp/ppo_hh
Variants: sft=<SFT stage dir or HF dir>, rm=<RM stage dir or HF dir>, data=synthetic|hh,
iterations=<n>, kl=<kl_coef>, ptx=<ptx_coef>, critic=separate|shared,
lora=<rank> (adapters on a frozen base, `config.lora`; learning rates x10).

The tokenizer is the SFT directory's (config.tokenizer = "auto"). data=hh takes its prompts
from the HH-RLHF harmless transcripts (rendered with the chat template of the SFT model's
tokenizer; over-long prompts lose their oldest turns) with pretrained-model defaults: 8 prompts
per iteration, one fused update per iteration, 64 new tokens, actor lr 2e-6, critic lr 1e-5,
held-out evaluation on 16 test prompts before and after.
"""
from jaxrlhf.config import base_config, lora_variant, parse_arg

HH = "hh-rlhf-harmless"   # under config.data_root


def get_config(arg=None):
    a = parse_arg(arg, sft="", rm="", data="synthetic", iterations=60, kl=0.05, ptx=0.0,
                  critic="separate", lora=0)
    c = base_config("ppo")
    c.tokenizer = "auto"
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
    if a.data == "hh":
        hh_prompts(c)
    elif a.data != "synthetic":
        raise ValueError(f"configs/ppo.py: data must be synthetic or hh, got {a.data!r}")
    lora_variant(c, a.lora)
    return c


def hh_prompts(c):
    """HH-RLHF prompts and defaults for a pretrained chat model."""
    for block, split in ((c.data, "train"), (c.eval_data, "test")):
        block.path = f"{HH}/{split}.jsonl.gz"
        block.format = "hh_prompt"
        block.on_bad_row = "skip"
        block.buckets = (64, 128, 192)
        block.max_prompt_len = 192
    c.train.log_every = 1
    c.train.save_every = 10
    c.model.remat = "full"      # trained models recompute layers in the backward pass (memory)
    p = c.ppo
    p.rollout_batch = 8
    p.minibatch_size = 8        # one minibatch: the scoring pass is fused with the update
    p.ppo_epochs = 1
    p.max_new_tokens = 64
    p.actor_lr = 2e-6
    p.critic_lr = 1e-5
    p.warmup_iterations = 2
    p.eval_prompts = 16
    p.sample_every = 5
    p.gold_reward = False
