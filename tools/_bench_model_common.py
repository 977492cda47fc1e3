"""Helpers for `tools/bench_model.py` (training-step speed against PyTorch).

- `matmul_rate_gflops(n)`: the machine's fp32 matmul rate through XLA, median of repeats.
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


def matmul_rate_gflops(n: int = 2048, repeats: int = 10, threads: int = 2) -> Dict[str, float]:
    """fp32 GFLOP/s of an n×n @ n×n matmul through XLA on this process's threads.

    Returns {"median", "best"} (wall clock) and "cpu_median": the FLOPs over the process CPU
    time per call divided by `threads` (see `median_times`), over `repeats` calls after a
    warm-up.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    f(a, b).block_until_ready()
    wall, cpu = median_times({"mm": lambda: f(a, b).block_until_ready()}, repeats,
                             threads=threads)
    flops = 2 * n ** 3
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
    """A `transformers.LlamaForSequenceClassification` (num_labels=1, fp32) holding the
    weights of a jaxrlhf score-head model: the trunk as in `_bench_common.to_hf_llama`, and
    score.weight = score_w[None]. HF's score layer has no bias; jaxrlhf's score_b is a constant
    added to every reward, which cancels in r_chosen − r_rejected, so the loss is the same."""
    import torch
    from transformers import LlamaForSequenceClassification

    import _bench_common as bc

    cfg = model.cfg
    # The trunk: build a throw-away causal LM for the conversion (it needs an lm head; give
    # it a zero one of the right shape via a temporary attribute-free copy of the weights).
    lm_like = _ScoreAsLM(model)
    causal = bc.to_hf_llama(lm_like, attn_implementation)
    hf_cfg = bc.hf_llama_config(cfg)
    hf_cfg.num_labels = 1
    if attn_implementation:
        hf_cfg._attn_implementation = attn_implementation
    rm = LlamaForSequenceClassification(hf_cfg).to(torch.float32).eval()
    sd = {k[len("model."):]: v for k, v in causal.state_dict().items() if k.startswith("model.")}
    rm.model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        rm.score.weight.copy_(torch.from_numpy(np.asarray(model.score_w[...], np.float32))[None])
    return rm


class _ScoreAsLM:
    """Duck-typed view of a score-head model that `to_hf_llama` can read (a zero LM head)."""

    def __init__(self, model):
        import jax.numpy as jnp

        self.cfg = model.cfg.replace(tie_embeddings=False)
        self.embed = model.embed
        self.final_norm = model.final_norm
        self.layers = model.layers
        self.lm_head = _Value(jnp.zeros((self.cfg.d_model, self.cfg.vocab_size), jnp.float32))


class _Value:
    def __init__(self, v):
        self.v = v

    def __getitem__(self, idx):
        return self.v[idx]


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
