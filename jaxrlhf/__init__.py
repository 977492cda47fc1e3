"""jaxrlhf: the InstructGPT RLHF recipe in JAX / Flax NNX.

Layout (one concept per module):
  models/       decoder-only transformer (Llama / Qwen2 / GPT-2 families), HF weight I/O
  objectives/   pure RLHF math: ranking losses, KL, GAE, PPO-ptx
  data/         datasets, tokenizers, batching, the built-in synthetic task
  generation.py jit-compiled KV-cache sampler
  trainers/     pure jitted train steps for SFT, reward model and PPO
  sharding.py   device mesh and logical-axis sharding rules
"""

__version__ = "0.1.0"
