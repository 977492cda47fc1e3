"""Critic-free RL (GRPO and its family) with Python (verifiable) rewards.

  python -m jaxrlhf.train --config configs/grpo.py --workdir /tmp/grpo
      built-in sorting task: SFT (tiny model) -> GRPO in DIR/sft, DIR/grpo, a few minutes on
      a 2-core CPU; reward = the task's gold reward; held-out metric: exact-sort accuracy
  python -m jaxrlhf.train --config configs/grpo.py:sft=/tmp/run/sft --workdir /tmp/grpo_only
      the RL stage only, from a finished SFT stage (or any HF dir)
  python -m jaxrlhf.train --config configs/grpo.py:task=arithmetic,model=/tmp/smollm2 \\
      --workdir /tmp/grpo_smol
      a real chat model (e.g. SmolLM2-135M-Instruct) on the arithmetic task: "What is
      a + b? Answer with the number only." rendered with its chat template; reward = exact
      answer (+0.1 for a bare-number format); held-out greedy accuracy before and after

Variants: algo=grpo|dr_grpo|dapo|rloo|reinforce_pp|reinforce_pp_baseline|ppo (ppo: GAE with
a value head on the actor's trunk, same reward), k=<samples per prompt>, task=sort|arithmetic,
iterations=<n>, prompts=<prompts per iteration>, seed=<n>, sft=<a finished SFT stage dir>,
model=<a pretrained HF chat model dir: the RL stage from it with real-model defaults>,
lora=<rank> (adapters on a frozen base, `config.lora`; learning rates x10): the RL stage's.
"""
from jaxrlhf.config import (base_config, lora_variant, parse_arg, pipeline_config,
                            sibling_config)
from jaxrlhf.options import apply_algorithm

REWARDS = {
    # gold reward in [-1, 1]; the exact-match indicator is logged (weight 0) as the accuracy
    "sort": "jaxrlhf.rewards:sorting_gold, jaxrlhf.rewards:sorting_exact*0",
    "arithmetic": "jaxrlhf.rewards:arithmetic_exact, jaxrlhf.rewards:arithmetic_format*0.1",
}


def rl_config(a):
    c = base_config("ppo")
    c.seed = a.seed
    c.tokenizer = "auto"
    c.data.path = "synthetic"
    c.data.format = "prompt"
    c.data.synthetic.task = a.task
    c.data.synthetic.seed = a.seed
    c.train.log_every = 10
    c.train.save_every = 20
    c.train.eval_every = 0
    p = c.ppo
    p.actor_init = a.sft
    p.reward_fns = REWARDS[a.task]
    p.iterations = a.iterations
    p.rollout_batch = a.prompts
    p.samples_per_prompt = a.k
    p.minibatch_size = a.prompts * a.k // 2
    p.ppo_epochs = 2
    p.max_new_tokens = 16
    p.actor_lr = 5e-5
    p.critic_lr = 2e-4
    p.sample_every = 20
    p.gold_reward = False          # the gold reward IS the reward here
    p.eval_prompts = 256
    apply_algorithm(p, a.algo)
    if a.algo == "dapo":
        p.overlong_buffer = 4
    if a.task == "arithmetic":
        c.data.buckets = (8,)
        c.data.max_prompt_len = 8
        p.max_new_tokens = 8
        if a.algo == "dapo":
            p.overlong_buffer = 2
    if a.real:
        real_model_defaults(c, a)
    return c


def real_model_defaults(c, a):
    """A pretrained chat model: chat-rendered prompts, small batches, lr 1e-6, greedy eval."""
    c.data.synthetic.chat = True
    c.data.buckets = (96,)        # the question plus the template's system turn
    c.data.max_prompt_len = 96
    c.model.remat = "full"
    c.train.log_every = 1
    c.train.save_every = 10
    p = c.ppo
    p.rollout_batch = a.prompts
    p.minibatch_size = a.prompts * a.k     # one minibatch: scoring fused with the update
    p.ppo_epochs = 1
    p.max_new_tokens = 24
    p.actor_lr = 1e-6
    p.warmup_iterations = 2
    p.eval_prompts = 64
    p.eval_greedy = True
    p.sample_every = 5
    if a.algo == "dapo":
        p.overlong_buffer = 8


def get_config(arg=None):
    a = parse_arg(arg, algo="grpo", k=4, task="sort", iterations=60, prompts=16, seed=0,
                  sft="", model="", lora=0)
    if a.task not in REWARDS:
        raise ValueError(f"configs/grpo.py: task must be one of {sorted(REWARDS)}, "
                         f"got {a.task!r}")
    a.real = bool(a.model)
    if a.real:
        a.sft = a.model
        a.prompts = 8 if a.prompts == 16 else a.prompts
        a.iterations = 30 if a.iterations == 60 else a.iterations
    rl = rl_config(a)
    lora_variant(rl, a.lora)
    if a.sft:
        return rl
    sft = sibling_config(__file__, "sft").get_config()
    sft.seed = a.seed
    sft.data.synthetic.task = a.task
    sft.data.synthetic.seed = a.seed
    if a.task == "arithmetic":
        sft.train.steps = 1500
        sft.data.buckets = (16,)
    c = pipeline_config(sft, None, rl)
    c.seed = a.seed
    c.pipeline.rl_dir = a.algo
    return c
