"""jaxrlhf: the InstructGPT RLHF recipe in JAX / Flax NNX.

Layout (one concept per module):
  models/       decoder-only transformer (Llama, Qwen2/3, Mistral, Gemma 2/3, GPT-2), HF I/O, LoRA
  objectives/   pure RLHF math: ranking losses, KL, GAE, PPO-ptx
  data/         datasets, tokenizers, batching, the built-in synthetic task
  generation.py jit-compiled KV-cache sampler
  trainers/     pure jitted train steps for SFT, reward model and PPO
  sharding.py   device mesh and logical-axis sharding rules

With JAXRLHF_HOST_MALLOC=reuse, importing jaxrlhf tunes glibc malloc so XLA's per-step CPU
buffers are reused instead of page-faulted in at every step: faster for small models, but it
multiplies peak memory at real-model scale, so it is off by default (see
`jaxrlhf/_host_malloc.py`). Import jaxrlhf before jax for it to cover XLA's threads.
"""
from jaxrlhf._host_malloc import tune_host_malloc as _tune_host_malloc

_tune_host_malloc()

__version__ = "0.1.0"
