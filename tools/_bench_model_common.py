"""Helpers for `tools/bench_model.py` (training-step speed against PyTorch).

- `matmul_probe(n)`, `matmul_rate_gflops(n)`: the machine's fp32 matmul rate through XLA.
- `model_flops(cfg, ...)`: the model FLOPs of a forward or a training step (formula below).
- `to_hf_llama_rm(model)`: the same weights as a `transformers.LlamaForSequenceClassification`.
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

import numpy as np


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
    the weights of a jaxrlhf score-head model: the trunk converted by
    `_bench_common.to_hf_llama` (through an LM-head model holding the same trunk weights),
    and score.weight = score_w[None]. HF's score layer has no bias; jaxrlhf's score_b is one
    constant added to every reward, which cancels in r_chosen − r_rejected."""
    import torch
    from flax import nnx
    from transformers import LlamaForSequenceClassification

    import _bench_common as bc
    from jaxrlhf.models.transformer import init_model

    cfg = model.cfg
    lm = init_model(cfg, head="lm")
    lm_params = nnx.to_pure_dict(nnx.state(lm))
    rm_params = nnx.to_pure_dict(nnx.state(model))
    lm_params.update({k: v for k, v in rm_params.items() if k in lm_params})
    state = nnx.state(lm)
    nnx.replace_by_pure_dict(state, lm_params)
    nnx.update(lm, state)
    causal = bc.to_hf_llama(lm, attn_implementation)

    hf_cfg = bc.hf_llama_config(cfg)
    hf_cfg.num_labels = 1
    if attn_implementation:
        hf_cfg._attn_implementation = attn_implementation
    rm = LlamaForSequenceClassification(hf_cfg).to(torch.float32).eval()
    trunk = {k[len("model."):]: v for k, v in causal.state_dict().items()
             if k.startswith("model.")}
    rm.model.load_state_dict(trunk, strict=True)
    with torch.no_grad():
        rm.score.weight.copy_(torch.from_numpy(np.array(model.score_w[...], np.float32))[None])
    return rm


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
