"""A decoder-only transformer in flax.nnx covering the Llama, Qwen2, Qwen3, Mistral and GPT-2
families (Qwen3: per-head q/k RMSNorm; Mistral / Qwen sliding layers: a banded causal mask).

Layers are created stacked (`nnx.vmap` at init) and run with `jax.lax.scan`, so compile
time does not grow with depth. Every parameter carries logical axis names in its `axes`
metadata (see `jaxrlhf.sharding`). A stacked layer parameter has one more dimension than its
axes; the leading one is the "layers" axis.

Padding: attention takes a padding mask and explicit positions. Positions default to
`cumsum(mask) - 1`, so a left-padded row gives exactly the per-token results of the same row
unpadded. Query rows at padding positions produce finite garbage (never NaN) that callers
mask out.

Shapes: B batch, T query length, S key length (cache size), D d_model, H query heads,
K kv heads, G = H / K, Dh head dim, F mlp dim, V vocab, L layers.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.objectives.stats import token_logprobs

# Finite "minus infinity" for masked attention logits: a fully masked query row then gives a
# uniform softmax instead of NaN.
_MASK_VALUE = -1e30


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, *, std: Optional[float] = None,
           init: str = "normal") -> nnx.Param:
    """Creates an `nnx.Param` with logical `axes` metadata."""
    dtype = cfg.jnp_param_dtype
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def _add_adapters(module, cfg: ModelConfig, rngs: nnx.Rngs, prefix: str) -> None:
    """Low-rank adapters lora_a_<t> [in..., r] and lora_b_<t> [r, out...] (float32) for each
    target t of `cfg.lora_targets` whose weight `module` holds: A ~ U(±1/√in) and B = 0, so
    the adapted projection equals the base one until B is trained."""
    from jaxrlhf.models.config import LORA_TARGETS
    for t in cfg.lora_targets if cfg.lora_rank else ():
        mod, wname = LORA_TARGETS[t]
        if mod != prefix:
            continue
        w = getattr(module, wname)
        n_in = lora_in_dims(t)
        shape, axes = w[...].shape, w.get_metadata()["axes"]
        fan_in = math.prod(shape[:n_in])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.params(), shape[:n_in] + (cfg.lora_rank,), jnp.float32,
                               -bound, bound)
        setattr(module, "lora_a_" + t, nnx.Param(a, axes=tuple(axes[:n_in]) + (None,)))
        setattr(module, "lora_b_" + t, nnx.Param(
            jnp.zeros((cfg.lora_rank,) + shape[n_in:], jnp.float32),
            axes=(None,) + tuple(axes[n_in:])))


def lora_in_dims(target: str) -> int:
    """Leading weight dims that are the projection's input: 2 for "o" ([H, Dh, D]), else 1."""
    return 2 if target == "o" else 1


def _adapted(module, x, w, target: str):
    """linear(x, w) plus the adapter of `target` when the module has one:
    x W + (alpha / r) (x A) B, the scale applied to the rank-r activation."""
    y = linear(x, w)
    cfg = module.cfg
    if not cfg.lora_rank or target not in cfg.lora_targets:
        return y
    a, b = getattr(module, "lora_a_" + target)[...], getattr(module, "lora_b_" + target)[...]
    low = linear(x, a) * jnp.asarray(cfg.lora_scale(), x.dtype)
    return y + linear(low, b)


def _bcast(w, ndim: int):
    """Explicitly prepends unit dims so `w` broadcasts against an ndim-rank activation."""
    return w.reshape((1,) * (ndim - w.ndim) + w.shape)


def _flat_matmul(x, w):
    """x [..., K] @ w (leading axes flattened to K, trailing to N) -> [..., N], in x's dtype."""
    return x @ w.astype(x.dtype).reshape(x.shape[-1], -1)


@jax.custom_vjp
def linear(x_NxK, w_KxM):
    """x @ w: x [..., K] times a weight whose leading axes flatten to K and trailing axes to
    M ([D, H, Dh] for wq, [H, Dh, D] for wo, [D, F] ...). Returns [..., M] in x's dtype (the
    weight is cast to it).

    Same values and gradients as `x @ w.astype(x.dtype).reshape(K, M)`; the hand-written VJP
    only fixes how the backward matmuls are laid out and what is saved:
      * JAX's own transpose rule computes dw as dot(g, x) followed by a transpose, which XLA's
        CPU backend folds into a transposed COPY of the large [tokens, M] cotangent (fused
        with the elementwise backward of SwiGLU it cost ~10% of a base-preset training step).
        Here dw = xᵀ g is one dot reading both operands in place.
      * The residual is the weight as stored, not its cast/reshaped copy, so a layer scan
        does not stack per-layer copies of the weights for the backward pass.
    """
    return _flat_matmul(x_NxK, w_KxM)


def _linear_fwd(x, w):
    return _flat_matmul(x, w), (x, w)


def _linear_bwd(res, g):
    x, w = res
    k = x.shape[-1]
    w2 = w.astype(x.dtype).reshape(k, -1)
    g2 = g.reshape(-1, g.shape[-1])
    dx = jax.lax.dot_general(g2, w2, (((1,), (1,)), ((), ())))                   # g wᵀ
    dw = jax.lax.dot_general(x.reshape(-1, k), g2, (((0,), (0,)), ((), ())))   # xᵀ g
    return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, saving only its two inputs for the backward pass."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    dgate = g * up * (sig + silu * (1.0 - sig))
    return dgate.astype(gate.dtype), (g * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rms_norm(x, scale, eps: float, offset: float = 0.0):
    """x / rms(x) * (offset + scale) over the last axis, computed in float32, returned in x's
    dtype (offset 1 with a zero-initialised scale: Gemma)."""
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps)
    w = scale.astype(jnp.float32) + offset if offset else scale.astype(jnp.float32)
    return (y * _bcast(w, y.ndim)).astype(x.dtype)


def softcap(x, cap):
    """cap · tanh(x / cap) (Gemma 2's soft-capping); identity when cap is None."""
    return x if not cap else jnp.tanh(x / cap) * cap


class Norm(nnx.Module):
    """RMSNorm (Llama, Qwen2) or LayerNorm with bias (GPT-2), computed in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.offset = float(cfg.norm_offset)
        self.scale = _param(rngs, (cfg.d_model,), ("embed",), cfg,
                            init="zeros" if cfg.norm_offset else "ones")
        if cfg.norm == "layer":
            self.bias = _param(rngs, (cfg.d_model,), ("embed",), cfg, init="zeros")

    def __call__(self, x):
        if self.kind == "rms":
            return rms_norm(x, self.scale[...], self.eps, self.offset)
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (x * _bcast(self.scale[...].astype(jnp.float32), x.ndim)
                + _bcast(self.bias[...].astype(jnp.float32), x.ndim)).astype(dtype)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse RoPE frequencies [Dh/2], with llama3-style or linear frequency scaling when
    configured; `local`: a sliding layer's (base rope_local_theta, no scaling)."""
    dh = cfg.dim_per_head
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type"))
    if local or not scaling or kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        raise NotImplementedError(
            f"rope_scaling type {kind!r} is not supported (supported: 'llama3', 'linear').")
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`; short ones kept; in between, interpolate.
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxNxDh, positions_BxT, inv_freq):
    """Rotates halves (HF "rotate_half" layout): [x1, x2] -> [x1 c - x2 s, x2 c + x1 s].

    Computed as x * [c, c] + [x2, x1] * [-s, s] (bitwise the same values): full-width
    tables and one swap of halves make a single elementwise pass, ~3x faster on CPU (with
    its backward ~4x) than concatenating the two rotated halves.
    """
    angles = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos_full = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
    sin_signed = jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :]
    x = x_BxTxNxDh.astype(jnp.float32)
    half = x.shape[-1] // 2
    swapped = jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return (x * cos_full + swapped * sin_signed).astype(x_BxTxNxDh.dtype)


def select_rows(x_BxTx_, select):
    """Rows of a [B, T, ...] array along T: `select` is a static `slice` (the same rows of
    every sequence, a plain slice) or an int array [B, Q] (per-sequence rows, a gather)."""
    if isinstance(select, slice):
        return x_BxTx_[:, select]
    idx = select.reshape(select.shape + (1,) * (x_BxTx_.ndim - 2))
    return jnp.take_along_axis(x_BxTx_, idx, axis=1)


def resolve_attention(cfg: ModelConfig, dtype=None, backend: Optional[str] = None) -> str:
    """The attention implementation a forward uses ("einsum" | "xla" | "cudnn"): the
    config's, with "auto" resolved for this backend and compute dtype. cuDNN's fused kernel
    runs on a GPU in bf16 / fp16 with head_dim a multiple of 8 (at most 128 before Hopper,
    256 from it; `dot_product_attention` falls back to the XLA implementation when the
    kernel refuses a shape); TPU takes the XLA implementation; CPU keeps the einsum path
    (equal speed within noise, `tools/bench_attention.py`). Models with attention-logit
    soft-capping always take the einsum path."""
    if cfg.attention != "auto":
        return cfg.attention
    if cfg.attn_softcap is not None:
        return "einsum"
    if backend is None:
        backend = jax.default_backend()
    dt = jnp.dtype(dtype if dtype is not None else cfg.dtype)
    if backend in ("gpu", "cuda", "rocm"):
        if dt in (jnp.bfloat16, jnp.float16) and cfg.dim_per_head % 8 == 0 \
                and cfg.dim_per_head <= 256:
            return "cudnn"
        return "xla"
    if backend == "tpu":
        return "xla"
    return "einsum"


def attention_blocks(cfg: ModelConfig, t: int) -> list:
    """Query blocks [(start, end), ...] of a causal full forward over T positions: block
    [a, e) attends keys [0, e) only, since keys past e are masked for every query in it, so
    the masked upper triangle of the T x T scores is skipped (up to (n - 1) / 2n of the
    attention work in n blocks, and as much of its float32 logits memory). The rows equal
    one block's up to float rounding. `cfg.attention_block` positions per block; None =
    auto: max(64, ceil(T / 8)) for T >= 128 (at most 8 blocks), one block below; 0 = off."""
    c = cfg.attention_block
    if c is None:
        c = max(64, -(-t // 8)) if t >= 128 else t
    if not c or c >= t:
        return [(0, t)]
    return [(a, min(a + c, t)) for a in range(0, t, c)]


def dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS, scale: float,
                          implementation: str):
    """`jax.nn.dot_product_attention` with our boolean mask [B, T, S] (causal, padding and
    sliding window already in it) and grouped-query heads (H a multiple of K); [B, T, H, Dh].
    Masked logits take jax's large finite negative, so a row with no allowed key (a left
    padding query) gets a finite output as in the einsum path. When cuDNN refuses the
    shapes or dtype (it raises while tracing) the XLA implementation is used."""
    kw = dict(mask=allowed_BxTxS[:, None], scale=scale)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                                                implementation="cudnn", **kw)
        except (NotImplementedError, ValueError, RuntimeError) as e:
            logging.log_first_n(logging.WARNING, "cuDNN attention unavailable (%s); using the "
                                "XLA implementation.", 1, str(e).splitlines()[0][:200])
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                                        implementation="xla", **kw)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads, optional biases, RoPE or none."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head
        std = 0.02
        self.wq = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), cfg, std=std)
        self.wk = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg, std=std)
        self.wv = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg, std=std)
        self.wo = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), cfg,
                         std=std / math.sqrt(2 * cfg.n_layers))
        if cfg.qkv_bias:
            self.bq = _param(rngs, (h, dh), ("heads", "head_dim"), cfg, init="zeros")
            self.bk = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.bv = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.out_bias:
            self.bo = _param(rngs, (d,), ("embed",), cfg, init="zeros")
        if cfg.qk_norm:
            init = "zeros" if cfg.norm_offset else "ones"
            self.q_norm = _param(rngs, (dh,), ("head_dim",), cfg, init=init)
            self.k_norm = _param(rngs, (dh,), ("head_dim",), cfg, init=init)
        _add_adapters(self, cfg, rngs, "attn")

    def qkv(self, x_BxTxD, positions_BxT, select=None, local=None):
        """Queries [B, T, H, Dh] and keys / values [B, T, K, Dh]; with `select` (see
        `select_rows`) the queries only at the selected rows, [B, Q, H, Dh]. `local`: the
        layer is a sliding one (its RoPE base is rope_local_theta when that is set)."""
        cfg, dt = self.cfg, x_BxTxD.dtype
        # Projections as flat [D, N*Dh] matmuls (a free reshape of the [D, N, Dh] weights).
        # (One matmul over concatenated q/k/v weights was ~2-7% faster on 2 CPU cores but
        # changes float rounding between batch shapes, so the PPO scoring pass and the update
        # minibatches would no longer give bitwise-equal log-probs: ratio 1 exactly is kept.)
        proj = lambda x, w, t: _adapted(self, x, w[...], t).reshape(
            x.shape[:2] + (-1, cfg.dim_per_head))
        x_q, q_pos = x_BxTxD, positions_BxT
        if select is not None:
            x_q, q_pos = select_rows(x_BxTxD, select), select_rows(positions_BxT, select)
        q = proj(x_q, self.wq, "q")
        k, v = proj(x_BxTxD, self.wk, "k"), proj(x_BxTxD, self.wv, "v")
        if cfg.qkv_bias:
            q = q + _bcast(self.bq[...].astype(dt), 4)
            k = k + _bcast(self.bk[...].astype(dt), 4)
            v = v + _bcast(self.bv[...].astype(dt), 4)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.norm_eps, cfg.norm_offset)
            k = rms_norm(k, self.k_norm[...], cfg.norm_eps, cfg.norm_offset)
        if cfg.positions == "rope":
            inv_freq = rope_inv_freq(cfg)
            if cfg.rope_local_theta is not None and local is not None:
                inv_freq = jnp.where(local, rope_inv_freq(cfg, local=True), inv_freq)
            q = apply_rope(q, q_pos, inv_freq)
            k = apply_rope(k, positions_BxT, inv_freq)
        return q, k, v

    def attend(self, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS, causal=False):
        """softmax(q k^T * attn_scale + mask) v with query heads grouped over kv heads,
        through the config's attention implementation (`resolve_attention`), then the
        output projection. `causal`: keys j > query i are masked (a full forward), which
        the einsum path uses to skip them (`attention_blocks`)."""
        cfg, dt = self.cfg, q_BxTxHxDh.dtype
        b, t, h, dh = q_BxTxHxDh.shape
        impl = resolve_attention(cfg, dt)
        if isinstance(k_BxSxKxDh, CachedKV):   # keys / values in the cache's layout
            if impl == "einsum":
                return self._output(self._attend_cached(q_BxTxHxDh, k_BxSxKxDh, allowed_BxTxS))
            k_BxSxKxDh, v_BxSxKxDh = k_BxSxKxDh.dense()
        if impl == "einsum":
            blocks = attention_blocks(cfg, t) if causal and t == k_BxSxKxDh.shape[1] else []
            if len(blocks) > 1:
                out = jnp.concatenate(
                    [self._attend_einsum(q_BxTxHxDh[:, a:e], k_BxSxKxDh[:, :e],
                                         v_BxSxKxDh[:, :e], allowed_BxTxS[:, a:e, :e])
                     for a, e in blocks], axis=1)
            else:
                out = self._attend_einsum(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS)
        else:
            out = dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS,
                                        cfg.attn_scale, impl).reshape(b, t, h * dh)
        return self._output(out)

    def _output(self, out_BxTxHDh):
        """The output projection (+ bias) of the heads' outputs [B, T, H * Dh]."""
        # One flat contraction (`linear` flattens wo to [H*Dh, D]): with two contracting dims
        # (h, e) XLA's CPU layout assignment transposed (copied) wo at every call instead.
        out = _adapted(self, out_BxTxHDh, self.wo[...], "o")
        if self.cfg.out_bias:
            out = out + _bcast(self.bo[...].astype(out.dtype), 3)
        return out

    def _attend_cached(self, q_BxTxHxDh, kv: "CachedKV", allowed_BxTxS):
        """The einsum path's attention against keys [B, K, Dh, S] and values [B, K, S, Dh]
        (`CachedKV`): both matmuls batched over (b, k) with the G·T queries of a kv head as
        rows, q [G·T, Dh] @ kᵀ [Dh, S] then p [G·T, S] @ v [S, Dh], each cache buffer read
        in place (on 2 CPU cores 30-40% faster per decode step than keys [B, K, S, Dh] as the
        left operand). Same attention weights as `_attend_einsum` (`_probs`).

        With a shared prefix (`kv.prefix_k`, `allowed_BxTxS` over its P slots then the S
        row slots) the R rows of a prompt group query its prefix together: batched over
        (group, k), [R·G·T, Dh] @ [Dh, P] and [R·G·T, P] @ [P, Dh], so each group's prefix is
        read once per step rather than once per row; one softmax covers both parts."""
        cfg, dt = self.cfg, q_BxTxHxDh.dtype
        b, t, h, dh = q_BxTxHxDh.shape
        kh, s = cfg.n_kv_heads, kv.k.shape[-1]
        g = h // kh
        q = q_BxTxHxDh.reshape(b, t, kh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, dh)
        batched = lambda x, y: jax.lax.dot_general(x, y, (((3,), (2,)), ((0, 1), (0, 1))))
        logits = batched(q, kv.k.astype(dt))
        if kv.prefix_k is not None:
            groups, p = kv.prefix_k.shape[0], kv.prefix_k.shape[-1]
            rows = b // groups
            # [B, K, X, Y] <-> [groups, K, rows·X, Y]: a group's rows side by side.
            to_group = lambda x: x.reshape((groups, rows) + x.shape[1:]).transpose(
                0, 2, 1, 3, 4).reshape(groups, kh, rows * x.shape[2], x.shape[3])
            to_rows = lambda x: x.reshape(groups, kh, rows, -1, x.shape[-1]).transpose(
                0, 2, 1, 3, 4).reshape(b, kh, -1, x.shape[-1])
            logits = jnp.concatenate(
                [to_rows(batched(to_group(q), kv.prefix_k.astype(dt))), logits], axis=-1)
            s = s + p
        probs = self._probs(logits.reshape(b, kh, g, t, s), allowed_BxTxS, dt)
        probs = probs.reshape(b, kh, g * t, s)
        if kv.prefix_k is None:
            out = batched(probs, kv.v.astype(dt))
        else:
            out = (to_rows(batched(to_group(probs[..., :p]), kv.prefix_v.astype(dt)))
                   + batched(probs[..., p:], kv.v.astype(dt)))
        out = out.reshape(b, kh, g, t, dh)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)

    def _probs(self, logits_BxKxGxTxS, allowed_BxTxS, dt):
        """The einsum paths' attention weights: float32 logits (soft-capped when the config
        says), masked to a large finite negative (a row with no allowed key gets a uniform
        softmax, not NaN), float32 softmax, cast to dt."""
        logits = logits_BxKxGxTxS.astype(jnp.float32)
        logits = softcap(logits * self.cfg.attn_scale, self.cfg.attn_softcap)
        logits = jnp.where(allowed_BxTxS[:, None, None, :, :], logits, _MASK_VALUE)
        return jax.nn.softmax(logits, axis=-1).astype(dt)

    def _attend_einsum(self, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, allowed_BxTxS):
        """The einsum path (attention weights from `_probs`); returns [B, T, H * Dh]."""
        dt = q_BxTxHxDh.dtype
        b, t, h, dh = q_BxTxHxDh.shape
        kh = self.cfg.n_kv_heads
        q = q_BxTxHxDh.reshape(b, t, kh, h // kh, dh)
        probs = self._probs(jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxDh), allowed_BxTxS, dt)
        # Output with the batch dims (b, k) leading, then transpose: XLA's CPU dot then needs
        # no operand transpose (a copy of the operand per call otherwise).
        out = jnp.einsum("bkgts,bskd->bkgtd", probs, v_BxSxKxDh)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)


class MLP(nnx.Module):
    """SwiGLU (Llama/Qwen2) or GELU-tanh (GPT-2) feed-forward block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.mlp_dim
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        if cfg.mlp in ("swiglu", "geglu"):
            self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg, std=0.02)
            self.w_up = _param(rngs, (d, f), ("embed", "mlp"), cfg, std=0.02)
            self.w_down = _param(rngs, (f, d), ("mlp", "embed"), cfg, std=out_std)
            if cfg.mlp_bias:
                self.b_gate = _param(rngs, (f,), ("mlp",), cfg, init="zeros")
                self.b_up = _param(rngs, (f,), ("mlp",), cfg, init="zeros")
                self.b_down = _param(rngs, (d,), ("embed",), cfg, init="zeros")
        else:
            self.w_fc = _param(rngs, (d, f), ("embed", "mlp"), cfg, std=0.02)
            self.w_proj = _param(rngs, (f, d), ("mlp", "embed"), cfg, std=out_std)
            if cfg.mlp_bias:
                self.b_fc = _param(rngs, (f,), ("mlp",), cfg, init="zeros")
                self.b_proj = _param(rngs, (d,), ("embed",), cfg, init="zeros")
        _add_adapters(self, cfg, rngs, "mlp")

    def __call__(self, x_BxTxD):
        cfg, dt = self.cfg, x_BxTxD.dtype

        def dense(x, name):  # x @ w_<name> (+ b_<name> when the config has MLP biases)
            y = _adapted(self, x, getattr(self, "w_" + name)[...], name)
            if not cfg.mlp_bias:
                return y
            return y + _bcast(getattr(self, "b_" + name)[...].astype(dt), y.ndim)

        if cfg.mlp == "swiglu":
            h = swiglu(dense(x_BxTxD, "gate"), dense(x_BxTxD, "up"))
            return dense(h, "down")
        if cfg.mlp == "geglu":
            h = jax.nn.gelu(dense(x_BxTxD, "gate"), approximate=True) * dense(x_BxTxD, "up")
            return dense(h, "down")
        return dense(jax.nn.gelu(dense(x_BxTxD, "fc"), approximate=True), "proj")


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.post_norms = cfg.post_norms
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.post_norms:
            self.post_attn_norm = Norm(cfg, rngs=rngs)
            self.post_mlp_norm = Norm(cfg, rngs=rngs)

    def __call__(self, x, positions_BxT, kv_fn, select=None, local=None, causal=False):
        """`kv_fn(k, v) -> (keys, values, allowed)` supplies the attended keys (cache or not);
        `causal`: they are the queries' own positions under a causal mask (a full forward),
        so attention may skip the masked upper triangle (`Attention.attend`).
        With `select` (see `select_rows`) the block computes its output only at the selected
        rows [B, Q, D]: queries, attention output and MLP there, keys and values everywhere.
        `local`: whether this is a sliding layer (its RoPE base, `Attention.qkv`). With
        post_norms (Gemma) each branch is normed again before its residual add."""
        q, k, v = self.attn.qkv(self.attn_norm(x), positions_BxT, select, local)
        keys, values, allowed = kv_fn(k, v)
        if select is not None:
            x, allowed = select_rows(x, select), select_rows(allowed, select)
        a = self.attn.attend(q, keys, values, allowed, causal=causal and select is None)
        return self._residuals(x, a)

    def _residuals(self, x, a):
        """x + attention output a, then + the MLP of that (each branch normed again with
        post_norms)."""
        x = x + (self.post_attn_norm(a) if self.post_norms else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(m) if self.post_norms else m)

    def shared_prefix(self, x_pair, positions_pair, allowed_pair, group: int, local=None):
        """The block on a batch whose rows come in groups of `group` sharing their first S
        positions, held once per group: (prefix [B/group, S, D], rows [B, Q, D]) -> same.
        The prefix attends causally within itself; row r's queries attend the keys of its
        group's prefix followed by its own, with `allowed_pair` = (prefix mask
        [B/group, S, S], rows' mask [B, Q, S + Q]). Equals `__call__` on the full rows
        (prefix repeated) at those positions, up to float rounding."""
        (xp, xr), (pp, pr), (ap, ar) = x_pair, positions_pair, allowed_pair
        qp, kp, vp = self.attn.qkv(self.attn_norm(xp), pp, None, local)
        qr, kr, vr = self.attn.qkv(self.attn_norm(xr), pr, None, local)
        keys = jnp.concatenate([jnp.repeat(kp, group, axis=0), kr], axis=1)
        values = jnp.concatenate([jnp.repeat(vp, group, axis=0), vr], axis=1)
        return (self._residuals(xp, self.attn.attend(qp, kp, vp, ap, causal=True)),
                self._residuals(xr, self.attn.attend(qr, keys, values, ar)))


class CachedKV(NamedTuple):
    """One layer's keys [B, K, Dh, S] and values [B, K, S, Dh] in the cache's layout, passed
    as the keys of `Attention.attend` (values None). `prefix_k` [G, K, Dh, P] / `prefix_v`
    [G, K, P, Dh]: keys / values of a prompt shared by each group of B / G consecutive rows,
    attended before the rows' own slots (`KVCache.prefix_k`); None without one."""
    k: jax.Array
    v: jax.Array
    prefix_k: Optional[jax.Array] = None
    prefix_v: Optional[jax.Array] = None

    @staticmethod
    def of(k_BxTxKxDh, v_BxTxKxDh, dtype) -> "CachedKV":
        """Keys / values as `qkv` gives them, [B, T, K, Dh], in the cache's layouts and
        dtype."""
        return CachedKV(k_BxTxKxDh.transpose(0, 2, 3, 1).astype(dtype),
                        jnp.swapaxes(v_BxTxKxDh, 1, 2).astype(dtype))

    def dense(self):
        """(keys, values) [B, P + S, K, Dh]: the shared prefix repeated for its rows, then the
        rows' own slots (for the attention implementations that take plain arrays)."""
        k, v = self.k.transpose(0, 3, 1, 2), jnp.swapaxes(self.v, 1, 2)
        if self.prefix_k is None:
            return k, v
        rep = k.shape[0] // self.prefix_k.shape[0]
        pk = jnp.repeat(self.prefix_k.transpose(0, 3, 1, 2), rep, axis=0).astype(k.dtype)
        pv = jnp.repeat(jnp.swapaxes(self.prefix_v, 1, 2), rep, axis=0).astype(v.dtype)
        return jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)


class KVCache(NamedTuple):
    """Key/value cache of a decoder, a plain pytree (jit / while_loop friendly).

    k: per-layer keys [B, K, Dh, S], v: per-layer values [B, K, S, Dh] (tuples of L),
    kv-head-major: the layouts the attention matmuls read in place (batch dims b, k leading;
    q kᵀ with the slots as columns, p v with them as rows: `Attention._attend_cached`),
    where a [B, S, K, Dh] buffer would be transposed (copied) per layer and step, and
    [B, K, S, Dh] keys make the slower left operand. mask: [B, S] int32, 1 where a slot holds
    a real (non-padding) token. index: int32 scalar, the next slot to write; every row writes
    the same slot (prompts are left-padded), so slot order is causal order.

    prefix_k / prefix_v / prefix_mask: a prompt shared by groups of B / G consecutive rows (K
    samples of one prompt), stored once per group: per-layer keys [G, K, Dh, P] and values
    [G, K, P, Dh], mask [G, P]; its P slots come before every row slot (row slot j is
    position P + j of the sequence), and k / v / mask then hold the rows' own slots only.
    None (the default): no shared prefix.
    """
    k: tuple
    v: tuple
    mask: jax.Array
    index: jax.Array
    prefix_k: Optional[tuple] = None
    prefix_v: Optional[tuple] = None
    prefix_mask: Optional[jax.Array] = None


def remat_policy(name: str):
    """Maps a remat name from the config to a `jax.checkpoint` policy (None = no remat)."""
    cp = jax.checkpoint_policies
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }[name]


def positions_from_mask(mask_BxT):
    """Position of each token among the real tokens of its row: cumsum(mask) - 1, >= 0."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def balanced_chunk(t: int, c: int) -> int:
    """Positions per chunk when `t` positions are processed at most `c` at a time: the
    fewest chunks, n = ceil(t / c), made equal, ceil(t / n) <= c, so that padding the last
    chunk computes fewer than n extra positions (t = 191, c = 128: two chunks of 96, where
    chunks of 128 would compute 65 padding positions, a third more LM-head work)."""
    n = -(-t // c)
    return -(-t // n)


class Transformer(nnx.Module):
    """Decoder-only transformer with an LM head ("lm") or a scalar head ("score").

    `model(tokens_BxT, mask_BxT)` returns logits_BxTxV (lm) or scores_BxT (score). The score
    head is applied at every position; a reward is the score at the last real token.
    """

    def __init__(self, cfg: ModelConfig, *, head: str = "lm", rngs: nnx.Rngs):
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}.")
        self.cfg = cfg
        self.head = head
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg,
                            std=0.02)
        if cfg.positions == "learned":
            self.pos_embed = _param(rngs, (cfg.max_positions, cfg.d_model), (None, "embed"),
                                    cfg, std=0.01)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r):
            return Block(cfg, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = Norm(cfg, rngs=rngs)
        if head == "lm" and not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg,
                                  std=0.02)
        if head == "score":
            self.score_w = _param(rngs, (cfg.d_model,), ("embed",), cfg,
                                  std=1.0 / math.sqrt(cfg.d_model + 1))
            self.score_b = _param(rngs, (), (), cfg, init="zeros")

    # ----------------------------------------------------------------------------------
    def embed_tokens(self, tokens_BxT, positions_BxT):
        dt = self.cfg.jnp_dtype
        x = jnp.take(self.embed[...], tokens_BxT, axis=0)
        if self.cfg.embed_scale != 1.0:   # HF multiplies in the weight's dtype
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        x = x.astype(dt)
        if self.cfg.positions == "learned":
            x = x + jnp.take(self.pos_embed[...], positions_BxT, axis=0).astype(dt)
        return x

    def _run_layers(self, x, positions_BxT, kv_fn_for_layer, carry_extra=None, select=None,
                    apply_block=None):
        """Scans the stacked layers. `kv_fn_for_layer(extra, layer_idx)` returns a kv_fn and
        a function giving the new `extra` (used to thread the KV cache through the scan).
        With `select` and an unrolled scan (shallow models) the last layer runs after the scan
        and outputs only the selected rows (`Block.__call__`); a rolled scan runs all layers
        on every row and the selected rows are taken after it. `apply_block(block, x, idx)`
        replaces the block call (x any pytree; no kv_fn, extra or select)."""
        graphdef, state = nnx.split(self.layers)
        policy = remat_policy(self.cfg.remat)

        def layer_fn(select):
            def step(h, extra, layer_state, idx):
                block = nnx.merge(graphdef, layer_state)
                if apply_block is not None:
                    return apply_block(block, h, idx), extra
                kv_fn, get_extra = kv_fn_for_layer(extra, idx)
                return (block(h, positions_BxT, kv_fn, select, self._is_local(idx), causal=True),
                        get_extra())
            if policy is None:
                return step
            return jax.checkpoint(step, policy=policy, prevent_cse=False)

        all_rows = layer_fn(None)

        def body(carry, xs):
            return all_rows(*carry, *xs), None

        n_layers, unroll = self.cfg.n_layers, self.cfg.layer_scan_unroll()
        if select is not None and unroll < n_layers - 1:
            # A rolled scan over the first L - 1 layers would scan a slice of the stacked
            # weights, which XLA copies ((L-1)/L of every layer weight, per forward: 0.4 GB
            # for a 135M model). Deep models run all L layers in the scan and take the
            # selected rows after it, giving up the last layer's smaller query set (1/L of
            # one layer's work) instead.
            carry, _ = jax.lax.scan(body, (x, carry_extra),
                                    (state, jnp.arange(n_layers, dtype=jnp.int32)),
                                    unroll=unroll)
            return select_rows(carry[0], select), carry[1]
        n_scan = n_layers - (select is not None)
        scanned = state if select is None else jax.tree.map(lambda a: a[:n_scan], state)
        carry = (x, carry_extra)
        if n_scan:
            idxs = jnp.arange(n_scan, dtype=jnp.int32)
            unroll = min(self.cfg.layer_scan_unroll(), n_scan)
            carry, _ = jax.lax.scan(body, carry, (scanned, idxs), unroll=unroll)
        if select is not None:
            last = jax.tree.map(lambda a: a[n_scan], state)
            carry = layer_fn(select)(*carry, last, jnp.int32(n_scan))
        return carry

    def hidden(self, tokens_BxT, mask_BxT=None, positions_BxT=None, select=None,
               group: int = 1):
        """Final-norm hidden states [B, T, D] of a full (uncached) causal forward.

        `select`: only these positions' hidden states are wanted -- a static `slice` of T or
        an int array [B, Q] of per-sequence positions (`select_rows`); returns [B, Q, D].
        In a shallow model (unrolled layer scan) the last layer then computes its queries,
        attention output and MLP only at those rows (its keys and values at every position),
        skipping (1 - Q/T) of that layer's work: PPO reads log-probs and values at the N
        response positions only, a reward model its score at the last real token. The rows
        equal the full forward's up to the float rounding of the smaller matmuls. A deep
        model (rolled scan) computes every row and selects after the last layer
        (`_run_layers`).

        `group` > 1 with a slice `select` [s, e), s > 0: the caller promises that rows come
        in consecutive groups of `group` with equal tokens and mask before s (K samples of
        one prompt). The positions before s then run once per group (`_hidden_shared_prefix`)
        and nothing past e runs: the same rows up to float rounding, (1 - (B/group · s +
        B · (e - s)) / (B · T)) of the trunk's work saved (29% for 8 samples of a 64-token
        prompt with 128 new tokens).
        """
        if mask_BxT is None:
            mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
        if positions_BxT is None:
            positions_BxT = positions_from_mask(mask_BxT)
        if group > 1 and isinstance(select, slice):
            start, stop, stride = select.indices(tokens_BxT.shape[1])
            if stride == 1 and 0 < start < stop:
                return self._hidden_shared_prefix(tokens_BxT, mask_BxT, positions_BxT,
                                                  start, stop, group)
        allowed_for = self._causal_masks(mask_BxT)

        def kv_fn_for_layer(extra, idx):
            mask = allowed_for(idx)
            return (lambda k, v: (k, v, mask)), (lambda: extra)

        x = self.embed_tokens(tokens_BxT, positions_BxT)
        x, _ = self._run_layers(x, positions_BxT, kv_fn_for_layer, select=select)
        return self.final_norm(x)

    def _hidden_shared_prefix(self, tokens_BxT, mask_BxT, positions_BxT, start: int,
                              stop: int, group: int):
        """`hidden(select=slice(start, stop), group=group)`: positions [0, start) of the
        first row of each group and positions [start, stop) of every row, carried through
        the layer scan as a pair (`Block.shared_prefix`); returns [B, stop - start, D]."""
        b = tokens_BxT.shape[0]
        if b % group:
            raise ValueError(f"hidden: batch {b} is not a multiple of group={group}.")
        allowed_for = self._causal_masks(mask_BxT[:, :stop])
        x = self.embed_tokens(tokens_BxT[:, :stop], positions_BxT[:, :stop])
        pair = (x[::group, :start], x[:, start:])
        positions = (positions_BxT[::group, :start], positions_BxT[:, start:stop])

        def apply_block(block, xs, idx):
            allowed = allowed_for(idx)
            masks = (allowed[::group, :start, :start], allowed[:, start:])
            return block.shared_prefix(xs, positions, masks, group, self._is_local(idx))

        (_, x), _ = self._run_layers(pair, None, None, apply_block=apply_block)
        return self.final_norm(x)

    def prefill(self, tokens_BxP, mask_BxP, positions_BxP, select):
        """The sampler's prefill: a full causal forward of the prompts through the rolled
        layer scan (`_run_layers`), keeping every layer's keys and values.

        Returns (final-norm hidden states at the `select` rows [B, Q, D], keys
        [L, B, K, Dh, P] and values [L, B, K, P, Dh] in the cache dtype, in the layouts
        `KVCache` holds them). The
        attention is the one `hidden_cached` computes on an empty cache (query i attends
        real prompt tokens j <= i); compiled as one scanned layer instead of L unrolled ones,
        which takes a third off the sampler's compile time (SmolLM2, GRPO shape: 6.3 -> 4.2 s).
        """
        cfg = self.cfg
        b, p = tokens_BxP.shape
        allowed_for = self._causal_masks(mask_BxP)
        v_shape = (cfg.n_layers, b, cfg.n_kv_heads, p, cfg.dim_per_head)
        k_shape = (cfg.n_layers, b, cfg.n_kv_heads, cfg.dim_per_head, p)
        empty = (jnp.zeros(k_shape, cfg.jnp_dtype), jnp.zeros(v_shape, cfg.jnp_dtype))

        def kv_fn_for_layer(extra, idx):
            mask, seen = allowed_for(idx), {}

            def kv_fn(k, v):
                seen["kv"] = (k, v)
                return k, v, mask

            def get_extra():
                zero = jnp.zeros((), jnp.int32)
                at = (jnp.asarray(idx, jnp.int32), zero, zero, zero, zero)
                new = CachedKV.of(*seen["kv"], extra[0].dtype)
                return tuple(jax.lax.dynamic_update_slice(buf, x[None], at)
                             for buf, x in zip(extra, new))
            return kv_fn, get_extra

        x = self.embed_tokens(tokens_BxP, positions_BxP)
        x, (ks, vs) = self._run_layers(x, positions_BxP, kv_fn_for_layer, carry_extra=empty,
                                       select=select)
        return self.final_norm(x), ks, vs

    def _causal_masks(self, mask_BxT):
        """layer index -> the attention mask [B, T, T] of a full causal forward: query i
        attends real tokens j <= i, and sliding layers only keys within the window (rows are
        left-padded, real tokens contiguous, so index differences are position differences)."""
        t = mask_BxT.shape[1]
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        allowed = causal[None] & (mask_BxT[:, None, :] > 0)
        rows = jnp.arange(t, dtype=jnp.int32)
        return self._layer_masks(allowed, rows[:, None] - rows[None, :])

    def _is_local(self, idx):
        """Whether layer `idx` (int or traced) is a sliding layer, when that changes its RoPE
        (rope_local_theta); None otherwise."""
        if self.cfg.rope_local_theta is None or not self.cfg.positions == "rope":
            return None
        flags = self.cfg.sliding_layers()
        if isinstance(idx, int):
            return flags[idx]
        return jnp.asarray(flags)[idx]

    def _layer_masks(self, allowed_BxTxS, distance_TxS):
        """layer index (int or traced) -> that layer's attention mask: `allowed` for full
        layers, `allowed` & (distance < sliding_window) for sliding ones (`distance` = query
        slot - key slot)."""
        flags = self.cfg.sliding_layers()
        if not any(flags):
            return lambda idx: allowed_BxTxS
        banded = allowed_BxTxS & (distance_TxS < self.cfg.sliding_window)[None]
        if all(flags):
            return lambda idx: banded
        table = jnp.asarray(flags)

        def pick(idx):
            if isinstance(idx, int):
                return banded if flags[idx] else allowed_BxTxS
            return jnp.where(table[idx], banded, allowed_BxTxS)
        return pick

    def last_hidden(self, tokens_BxT, mask_BxT):
        """Final-norm hidden state at each row's last real token [B, D] (`hidden` with
        `select` = that position: the last layer runs one query per row)."""
        rows_Bx1 = last_token_index(mask_BxT)[:, None]
        return self.hidden(tokens_BxT, mask_BxT, select=rows_Bx1)[:, 0]

    def apply_head(self, h_BxTxD):
        """LM head -> logits [B,T,V] in float32; score head -> scores [B,T] in float32."""
        dt = h_BxTxD.dtype
        if self.head == "score":
            s = h_BxTxD @ self.score_w[...].astype(dt)
            return s.astype(jnp.float32) + self.score_b[...].astype(jnp.float32)
        return self.logits(h_BxTxD, self.lm_head_weight())

    def logits(self, h, w_DxV):
        """The LM logits h @ W in float32, soft-capped when the config says so (Gemma 2)."""
        return softcap(linear(h, w_DxV).astype(jnp.float32), self.cfg.final_softcap)

    def lm_head_weight(self):
        """The LM head's [D, V] weight (the embedding's transpose when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None):
        return self.apply_head(self.hidden(tokens_BxT, mask_BxT, positions_BxT))

    def target_logprobs(self, h_BxTxD, targets_BxT):
        """log softmax(apply_head(h))[target] [B, T] (float32) of an LM head, chunked over
        positions as `head_reduce` says."""
        return self.head_reduce(h_BxTxD, token_logprobs, targets_BxT)

    def head_reduce(self, h_BxTxD, fn, *per_position):
        """fn(logits [B, c, V] float32, *per_position chunks [B, c, ...]) over the positions of
        `h`, c at a time, concatenated back to [B, T, ...] (fn returns an array or a tuple of
        arrays, each [B, c, ...]).

        With `cfg.logits_chunk_size(B)` = c > 0 and T > c, the positions are processed in
        n = ceil(T / c) chunks of `balanced_chunk(T, c)` <= c positions each (T padded up to n
        equal chunks; the padding is dropped): each chunk's logits are computed, reduced by
        `fn` and freed, and recomputed in the backward pass (`jax.checkpoint`), so the
        [B, T, V] logits and their softmax never exist at once. Same values as the unchunked
        path up to float rounding. Otherwise one call on the whole [B, T, V] logits.
        """
        b, t, d = h_BxTxD.shape
        c = self.cfg.logits_chunk_size(b)
        if not c or t <= c:
            return fn(self.apply_head(h_BxTxD).astype(jnp.float32), *per_position)
        c = balanced_chunk(t, c)
        n = -(-t // c)
        pad = n * c - t

        def chunks(x):   # [B, T, ...] -> [n, B, c, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return x.reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)

        w = self.lm_head_weight()

        @jax.checkpoint
        def chunk(w, h_c, *xs):
            return fn(self.logits(h_c, w), *xs)

        out = jax.lax.map(lambda xs: chunk(w, *xs),
                          (chunks(h_BxTxD), *(chunks(x) for x in per_position)))
        unchunk = lambda y: y.swapaxes(0, 1).reshape(b, n * c, *y.shape[3:])[:, :t]
        return jax.tree.map(unchunk, out)

    # ----------------------------------------------------------------------------------
    # Cached (incremental) forward, for decoding.

    def init_cache(self, batch: int, max_len: int, dtype=None, place=None) -> KVCache:
        """An empty cache of `max_len` slots; `place` (e.g. a sharding constraint) is applied
        to every k / v buffer."""
        cfg = self.cfg
        v_shape = (batch, cfg.n_kv_heads, max_len, cfg.dim_per_head)
        k_shape = (batch, cfg.n_kv_heads, cfg.dim_per_head, max_len)
        place = place or (lambda x: x)
        zeros = lambda shape: place(jnp.zeros(shape, dtype or cfg.jnp_dtype))
        layers = range(cfg.n_layers)
        return KVCache(k=tuple(zeros(k_shape) for _ in layers),
                       v=tuple(zeros(v_shape) for _ in layers),
                       mask=jnp.zeros((batch, max_len), jnp.int32),
                       index=jnp.zeros((), jnp.int32))

    def unstacked_layers(self) -> list:
        """The L decoder blocks as separate modules holding per-layer (unstacked) weights.

        Why the cached forward does not scan the stacked layers: inside a decode
        `while_loop`, a scan slices each layer's weights out of the stacked arrays with a
        dynamic index, and XLA (CPU) copies that slice before every matmul — every step then
        reads and writes all weights once more, 3x the memory traffic of the matmuls alone.
        Slicing once per rollout, outside the loop, and unrolling the L layers in the step
        leaves only the reads the matmuls need. Compile time grows with L.
        """
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
                for i in range(self.cfg.n_layers)]

    def hidden_cached(self, tokens_BxT, mask_BxT, positions_BxT, cache: KVCache, *,
                      select=None, layers=None):
        """Runs T new tokens against the cache: they are written to slots [index, index + T);
        query i attends slot j when j <= index + i and slot j holds a real token, and every
        real slot of the cache's shared prefix, if it has one (`KVCache.prefix_k`). Returns
        (final-norm hidden [B, T, D], updated cache); with `select` (as in `hidden`) the
        hidden states of those rows only, [B, Q, D] (the last layer's queries and MLP then
        run there only; every layer's keys and values are cached). `layers` are the
        `unstacked_layers()` (taken once by a caller that decodes many steps)."""
        layers = self.unstacked_layers() if layers is None else layers
        t = tokens_BxT.shape[1]
        s = cache.mask.shape[1]
        start = cache.index
        zero = jnp.zeros((), jnp.int32)
        kv_mask = jax.lax.dynamic_update_slice(cache.mask, mask_BxT.astype(jnp.int32),
                                               (zero, start))
        slot = jnp.arange(s, dtype=jnp.int32)
        qpos = start + jnp.arange(t, dtype=jnp.int32)
        allowed_BxTxS = (slot[None, :] <= qpos[:, None])[None] & (kv_mask[:, None, :] > 0)
        distance_TxS = qpos[:, None] - slot[None, :]
        if cache.prefix_mask is not None:   # the shared prefix's P slots come first
            groups, p = cache.prefix_mask.shape
            prefix_BxP = jnp.repeat(cache.prefix_mask, tokens_BxT.shape[0] // groups, axis=0)
            allowed_BxTxS = jnp.concatenate(
                [jnp.broadcast_to((prefix_BxP > 0)[:, None, :], (prefix_BxP.shape[0], t, p)),
                 allowed_BxTxS], axis=-1)
            distance_TxS = jnp.concatenate(
                [p + qpos[:, None] - jnp.arange(p, dtype=jnp.int32)[None, :], distance_TxS],
                axis=-1)
        allowed_for = self._layer_masks(allowed_BxTxS, distance_TxS)
        x = self.embed_tokens(tokens_BxT, positions_BxT)
        new_k, new_v = [], []
        shared = cache.prefix_k or (None,) * len(layers), cache.prefix_v or (None,) * len(layers)
        for i, (block, k_cache, v_cache) in enumerate(zip(layers, cache.k, cache.v)):
            def kv_fn(k_BxTxKxDh, v_BxTxKxDh, k_cache=k_cache, v_cache=v_cache, i=i):
                new = CachedKV.of(k_BxTxKxDh, v_BxTxKxDh, k_cache.dtype)
                ks = jax.lax.dynamic_update_slice(k_cache, new.k, (zero, zero, zero, start))
                vs = jax.lax.dynamic_update_slice(v_cache, new.v, (zero, zero, start, zero))
                new_k.append(ks)
                new_v.append(vs)
                return CachedKV(ks, vs, shared[0][i], shared[1][i]), None, allowed_for(i)
            x = block(x, positions_BxT, kv_fn, select if i == len(layers) - 1 else None,
                      self._is_local(i))
        cache = cache._replace(k=tuple(new_k), v=tuple(new_v), mask=kv_mask, index=start + t)
        return self.final_norm(x), cache

    def decode(self, tokens_BxT, mask_BxT, positions_BxT, cache: KVCache):
        """Cached forward: (logits_BxTxV or scores_BxT, updated cache)."""
        h, cache = self.hidden_cached(tokens_BxT, mask_BxT, positions_BxT, cache)
        return self.apply_head(h), cache


def last_token_index(mask_BxT):
    """Index of the last real token of each row (0 for an all-padding row)."""
    t = mask_BxT.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(mask_BxT > 0, idx, 0), axis=-1)


def gather_last(values_BxT, mask_BxT):
    """values[b, last real token of row b] — the reward of a score head."""
    idx = last_token_index(mask_BxT)
    return jnp.take_along_axis(values_BxT, idx[:, None], axis=-1)[:, 0]


def init_model(cfg: ModelConfig, head: str = "lm", seed: int = 0) -> Transformer:
    """Creates a model with random weights (unsharded; see `jaxrlhf.sharding` for sharded)."""
    return Transformer(cfg, head=head, rngs=nnx.Rngs(seed))
