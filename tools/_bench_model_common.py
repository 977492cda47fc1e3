"""Helpers for `tools/bench_model.py` (training-step speed against PyTorch).

- `matmul_probe(n)`, `matmul_rate_gflops(n)`: the machine's fp32 matmul rate through XLA.
- `model_flops(cfg, ...)`: the model FLOPs of a forward or a training step (formula below).
- `to_hf_llama_rm(model)`: the same weights as a `transformers.LlamaForSequenceClassification`,
  through `jaxrlhf.models.save_hf` + `from_pretrained`.
- `median_times(fns, steps)`: interleaved timing of several step functions.

Model FLOPs (the PaLM appendix-B convention, "model" not "hardware" FLOPs: remat and the
optimizer are not counted). A matmul x[M, K] @ w[K, N] is 2·M·K·N FLOPs forward and twice
that backward (dx and dw), so 6·M·K·N for a training step. Per token:

  N_mm   = L · (D·H·Dh + 2·D·Kv·Dh + H·Dh·D + 3·D·F) + D·V_head
           (the matmul weights: q, k, v, o projections, SwiGLU gate/up/down, and the head:
           V_head = V for the LM head, 1 for the score head; the embedding lookup is a gather,
           not a matmul, and is not counted; norms and RoPE are elementwise, not counted)
  attn   = L · 2 · (2·T·H·Dh)   forward: q·kᵀ scores [T, T] per head (2·T·Dh per query)
           and probs·v (the same); ×3 for forward + backward.

  forward   = 2·N_mm·tokens + 4·L·T·H·Dh·tokens
  train     = 6·N_mm·tokens + 12·L·T·H·Dh·tokens

The attention term counts the full T×T score matrix ("non-causal" counting, PaLM's
6N + 12·L·H·Q·T) because both implementations compute it in full and mask; a causal count,
which skips the upper triangle, would be (T+1)/(2T) of it (`causal_attention` is reported too).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Sequence


def matmul_probe(n: int = 2048):
    """(blocking callable, FLOPs): an n×n @ n×n fp32 matmul through XLA on this process's
    threads, compiled and warm. Timed next to each measured step (see `median_times`), its
    median gives the machine's matmul rate under the same load as the step."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    for _ in range(2):
        f(a, b).block_until_ready()
    return (lambda: f(a, b).block_until_ready()), 2.0 * n ** 3


def matmul_rate_gflops(n: int = 2048, repeats: int = 10, threads: int = 2) -> Dict[str, float]:
    """fp32 GFLOP/s of `matmul_probe(n)`: {"median", "best"} (wall clock) and "cpu_median"
    (process CPU time / `threads`, see `median_times`) over `repeats` calls."""
    fn, flops = matmul_probe(n)
    wall, cpu = median_times({"mm": fn}, repeats, threads=threads)
    return {"median": flops / median(wall["mm"]) / 1e9, "best": flops / min(wall["mm"]) / 1e9,
            "cpu_median": flops / median(cpu["mm"]) / 1e9}


def torch_matmul_rate_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of the same matmul through PyTorch (median), for reference."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def matmul_params(cfg, head: str = "lm") -> int:
    """N_mm: parameters that take part in a matmul per token (see the module docstring)."""
    d, f, h, kv, dh = cfg.d_model, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head
    layer = d * h * dh + 2 * d * kv * dh + h * dh * d + (3 if cfg.mlp == "swiglu" else 2) * d * f
    return cfg.n_layers * layer + d * (cfg.vocab_size if head == "lm" else 1)


def model_flops(cfg, batch: int, seq: int, *, head: str = "lm", train: bool = True,
                causal_attention: bool = False) -> float:
    """Model FLOPs of one forward (train=False) or forward+backward (train=True) pass over
    `batch` sequences of length `seq`."""
    tokens = batch * seq
    n_mm = matmul_params(cfg, head)
    attn_fwd_per_token = 4 * cfg.n_layers * seq * cfg.n_heads * cfg.dim_per_head
    if causal_attention:
        attn_fwd_per_token = attn_fwd_per_token * (seq + 1) / (2 * seq)
    mult = 3 if train else 1
    return float(mult * (2 * n_mm + attn_fwd_per_token) * tokens)


def to_hf_llama_rm(model, attn_implementation=None):
    """A `transformers.LlamaForSequenceClassification` (num_labels=1, fp32, eval mode) with
    the weights of a jaxrlhf score-head model.

    Goes through the library's exporter: `jaxrlhf.models.save_hf` writes `model` (score head)
    to a temporary directory in HF's LlamaForSequenceClassification layout (score.weight =
    score_w[None]), and `AutoModelForSequenceClassification.from_pretrained(dir,
    dtype=torch.float32)` loads it back. `attn_implementation` is passed to `from_pretrained`
    (None: transformers' default).

    HF's score layer has no bias, so jaxrlhf's score_b is dropped: HF's logits are jaxrlhf's
    rewards minus score_b (`save_hf` records it in config.json as "jaxrlhf_score_bias",
    which transformers ignores, and warns when it is nonzero). It is one constant added to
    every reward, which cancels in r_chosen − r_rejected, and it is 0 at init."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification

    from jaxrlhf.models import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = AutoModelForSequenceClassification.from_pretrained(
            d, dtype=torch.float32, attn_implementation=attn_implementation)
    return hf.eval()


def median_times(fns: Dict[str, Callable[[], object]], steps: int,
                 threads: int = 2) -> tuple:
    """Runs each blocking fn `steps` times, interleaved (a, b, a, b, ...) so that load from
    other processes falls on all of them alike.

    Returns (wall, cpu): per name, the list of wall-clock seconds, and of process CPU
    seconds / `threads`. The second is a load-robust cross-check: on a busy machine the
    threads wait for a core and wall time grows, while the CPU time they burn stays close to
    what a quiet machine would take (it equals wall time when all `threads` threads are busy
    for the whole call; spinning while waiting counts as CPU time).
    """
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append((time.process_time() - c0) / threads)
    return wall, cpu


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))
