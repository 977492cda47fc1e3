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
`python -m jaxrlhf.train` instead re-executes itself once with glibc's transparent-huge-page
malloc tunable (same module; JAXRLHF_HOST_MALLOC=default turns it off).
"""
from jaxrlhf._host_malloc import (reexec_train_cli_with_hugepages as _reexec_hugepages,
                                  tune_host_malloc as _tune_host_malloc)

_reexec_hugepages()
_tune_host_malloc()

__version__ = "0.1.0"
