"""Shared helpers for the benchmark scripts in `tools/`.

- `pin_cpu_threads(n)`: restrict this process (XLA and PyTorch) to n CPU cores. Call it
  before importing jax/torch so both libraries size their thread pools to n.
- `memory_bandwidth_gbps()`, `matmul_gflops()`: the machine's memory bandwidth (copy and
  read) and fp32 matmul rate, measured in the calling process (the same run as the timings).
- `to_hf_llama(model)`: the same weights as a `transformers.LlamaForCausalLM` (PyTorch, fp32).
- `param_bytes(state)`, `timed(fn)`: bytes of a pytree; best-of-k wall time.
"""
from __future__ import annotations

import os
import time
from typing import Callable, List, Optional, Tuple

import numpy as np

# First, before jax and torch start threads: tunes glibc malloc for XLA's per-step buffers
# (`jaxrlhf/_host_malloc.py`), exactly as `python -m jaxrlhf.train` runs. It applies to the
# whole process, so the PyTorch side of every comparison runs with the same allocator.
import jaxrlhf  # noqa: E402,F401


def pin_cpu_threads(n: int) -> List[int]:
    """Pins the process to the first `n` allowed cores and sets thread-count env vars.

    Call before importing jax (XLA sizes its pool from the affinity mask) and torch.
    Returns the cores used.
    """
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cores)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return cores


def timed(fn: Callable[[], object], repeats: int = 3) -> Tuple[float, object]:
    """(best wall seconds over `repeats` calls, last result). `fn` must block until done."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def memory_bandwidth_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """The machine's memory bandwidth (GB/s) from a 256 MB float32 array, best of `repeats`.

      copy_gbps:   nbytes / t of a numpy copy (bytes moved, each read once and written once)
      copy_traffic_gbps: 2 * nbytes / t of the same copy (read + write traffic, the STREAM
                   "copy" convention)
      read_gbps:   nbytes / t of a numpy sum (read only)
      floor_gbps:  max(copy_traffic_gbps, read_gbps): the rate at which a kernel that only
                   reads (a decode step reading weights and cache) can at best stream bytes;
                   the largest measured number, so a floor computed from it is the lowest.
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    t_copy, _ = timed(lambda: np.copyto(dst, src), repeats)
    t_read, _ = timed(lambda: src.sum(), repeats)
    out = {"bytes": int(src.nbytes), "copy_gbps": src.nbytes / t_copy / 1e9,
           "copy_traffic_gbps": 2 * src.nbytes / t_copy / 1e9,
           "read_gbps": src.nbytes / t_read / 1e9}
    out["floor_gbps"] = max(out["copy_traffic_gbps"], out["read_gbps"])
    return out


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matmul through XLA (uses the process's CPU threads)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t, _ = timed(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / t / 1e9


def param_bytes(tree) -> int:
    """Total bytes of the arrays in a pytree (e.g. an `nnx.State`)."""
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype")))


def hf_llama_config(cfg):
    """A `transformers.LlamaConfig` for a jaxrlhf Llama-family `ModelConfig`."""
    from transformers import LlamaConfig

    if cfg.norm != "rms" or cfg.mlp != "swiglu" or cfg.positions != "rope":
        raise ValueError("to_hf_llama needs a Llama-style config (rms norm, swiglu, rope).")
    if cfg.qkv_bias != cfg.out_bias:
        raise ValueError("HF Llama has one attention_bias for q/k/v/o; got "
                         f"qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}.")
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        rope = dict(cfg.rope_scaling, rope_theta=float(cfg.rope_theta))
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
        tie_word_embeddings=cfg.tie_embeddings, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def to_hf_llama(model, attn_implementation: Optional[str] = None):
    """A `transformers.LlamaForCausalLM` (fp32, eval mode) with `model`'s weights.

    Layouts (jaxrlhf stacked [L, ...] -> HF per layer l; HF Linear weights are [out, in]):
      embed [V, D] -> embed_tokens.weight;  lm_head [D, V] -> lm_head.weight = lm_head.T
      wq/wk/wv [L, D, H, Dh] -> {q,k,v}_proj.weight = w[l].reshape(D, H*Dh).T
      wo [L, H, Dh, D] -> o_proj.weight = wo[l].reshape(H*Dh, D).T
      w_gate / w_up [L, D, F], w_down [L, F, D] -> {gate,up,down}_proj.weight = w[l].T
      attn_norm / mlp_norm / final_norm scale -> input_layernorm / post_attention_layernorm
      / model.norm weight. Both use the rotate_half RoPE layout, so no permutation.
    """
    import torch
    from transformers import LlamaForCausalLM

    cfg = model.cfg
    hf_cfg = hf_llama_config(cfg)
    if attn_implementation:
        hf_cfg._attn_implementation = attn_implementation
    hf = LlamaForCausalLM(hf_cfg).to(torch.float32).eval()

    def t(x):
        return torch.from_numpy(np.array(x, dtype=np.float32))

    layers = model.layers
    attn, mlp = layers.attn, layers.mlp
    d = cfg.d_model
    sd = {"model.embed_tokens.weight": t(model.embed[...]),
          "model.norm.weight": t(model.final_norm.scale[...])}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = t(model.lm_head[...]).T
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        for name in ("q", "k", "v"):
            w = np.asarray(getattr(attn, "w" + name)[...][l], np.float32)
            sd[p + f"self_attn.{name}_proj.weight"] = t(w.reshape(d, -1)).T
            if cfg.qkv_bias:
                sd[p + f"self_attn.{name}_proj.bias"] = t(
                    np.asarray(getattr(attn, "b" + name)[...][l]).reshape(-1))
        wo = np.asarray(attn.wo[...][l], np.float32)
        sd[p + "self_attn.o_proj.weight"] = t(wo.reshape(-1, d)).T
        if cfg.out_bias:
            sd[p + "self_attn.o_proj.bias"] = t(attn.bo[...][l])
        for name in ("gate", "up", "down"):
            sd[p + f"mlp.{name}_proj.weight"] = t(getattr(mlp, "w_" + name)[...][l]).T
            if cfg.mlp_bias:
                sd[p + f"mlp.{name}_proj.bias"] = t(getattr(mlp, "b_" + name)[...][l])
        sd[p + "input_layernorm.weight"] = t(layers.attn_norm.scale[...][l])
        sd[p + "post_attention_layernorm.weight"] = t(layers.mlp_norm.scale[...][l])
    missing, unexpected = hf.load_state_dict(
        {k: v.contiguous() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}.")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf
