"""Token statistics: log-probabilities, entropy and masked moments.

Conventions shared by every function in `jaxrlhf.objectives`:

* Shapes live in names: B batch, T time (tokens), V vocabulary, K responses per prompt.
* Masks may be bool or float (0/1). Masked positions are removed with `jnp.where`, never by
  multiplication, so an inf or NaN stored at a masked position cannot turn into a NaN
  and receives exactly zero gradient.
* Maths runs in at least float32 (bf16/f16 inputs are upcast; float64 stays float64 so gradients
  can be checked by finite differences under `jax.enable_x64`).
* An all-masked reduction yields 0, never NaN.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Axis = int | Sequence[int] | None


def compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """The float dtype the maths runs in: the inputs' promoted dtype, at least float32."""
    return jnp.result_type(jnp.float32, *[jnp.asarray(x).dtype for x in xs])


def upcast(x: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
    """Casts `x` to `dtype` (default: at least float32)."""
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x) if dtype is None else dtype)


def as_bool_mask(mask: jax.Array) -> jax.Array:
    """A bool view of a bool or 0/1 float mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array,
                   temperature: float | jax.Array = 1.0) -> jax.Array:
    """Log-probability of each token under its own position's logits.

      logp[b, t] = log_softmax(logits[b, t] / temperature)[tokens[b, t]]

    Alignment: position t of `logits` scores token t of `tokens`; no shift happens here. For a
    causal LM the CALLER shifts: `token_logprobs(logits[:, :-1], tokens[:, 1:])`. Any leading
    shape works (`...xV` with `...`). Temperature divides the logits before the log-softmax, so
    the result is the log-probability of the sampling distribution at that temperature.
    An out-of-range id (e.g. an ignore index −100 at padding) gives NaN at that position (JAX's
    gather "fill" mode); the losses remove masked positions with `where`, value and gradient.

    Returns: logp_BxT in float32 (or float64 for float64 logits).
    """
    z = upcast(logits_BxTxV) / temperature
    logp_BxTxV = jax.nn.log_softmax(z, axis=-1)
    return jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits_BxTxV: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Entropy of the categorical distribution at every position.

      H[b, t] = −Σ_v p_v log p_v,   p = softmax(logits[b, t] / temperature)

    Entries with probability 0 (e.g. logits set to −inf by top-k) contribute 0, not NaN, in both
    the value and the gradient. Returns H_BxT (leading shape of logits), float32 or wider.
    """
    z = upcast(logits_BxTxV) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    live = p > 0
    plogp = jnp.where(live, p * jnp.where(live, logp, 0.0), 0.0)
    return -jnp.sum(plogp, axis=-1)


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None,
               keepdims: bool = False) -> jax.Array:
    """Σ x over positions where mask != 0 (float masks act as weights)."""
    x = upcast(x)
    m = jnp.asarray(mask)
    w = m.astype(x.dtype)
    return jnp.sum(jnp.where(as_bool_mask(m), x, 0.0) * w, axis=axis, keepdims=keepdims)


def masked_count(mask: jax.Array, axis: Axis = None, keepdims: bool = False,
                 dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Σ mask (the number of valid positions for a 0/1 mask)."""
    return jnp.sum(jnp.asarray(mask).astype(dtype), axis=axis, keepdims=keepdims)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den where den != 0, else 0 (gradient-safe: the denominator is never 0 inside)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None,
                keepdims: bool = False) -> jax.Array:
    """Mean of x over valid positions.

      mean = Σ_i m_i x_i / Σ_i m_i      (0 when Σ_i m_i = 0)

    `x` and `mask` have the same shape (e.g. BxT); `axis=None` reduces everything, `axis=1` gives
    one mean per row (B). Masked entries may hold inf/NaN.
    """
    x = upcast(x)
    return safe_divide(masked_sum(x, mask, axis, keepdims),
                       masked_count(mask, axis, keepdims, dtype=x.dtype))


def masked_var(x: jax.Array, mask: jax.Array, axis: Axis = None, unbiased: bool = True,
               keepdims: bool = False) -> jax.Array:
    """Variance of x over valid positions.

      var = Σ_i m_i (x_i − mean)² / n · (n / (n − 1) if unbiased),   n = Σ_i m_i

    `unbiased=True` (the default, as in TRL `masked_var`) applies Bessel's correction. Where TRL
    raises for n ≤ 1 we cannot (this runs under jit): the variance of n ≤ 1 values is 0.
    """
    x = upcast(x)
    mean = masked_mean(x, mask, axis, keepdims=True)
    centered = jnp.where(as_bool_mask(mask), x - mean, 0.0)
    n = masked_count(mask, axis, keepdims, dtype=x.dtype)
    ss = masked_sum(jnp.square(centered), mask, axis, keepdims)
    den = jnp.where(n > 1, n - 1.0, 0.0) if unbiased else n
    return safe_divide(ss, den)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, axis: Axis = None,
                  eps: float = 1e-8) -> jax.Array:
    """Whitens x over valid positions (e.g. advantage whitening).

      w = (x − mean) / sqrt(var + eps)        [+ mean again when shift_mean=False]

    with the masked mean and the UNBIASED masked variance, eps = 1e-8 (as TRL `masked_whiten`).
    Difference from TRL: masked positions are set to 0 in the output (TRL leaves whatever the
    formula gives there), so garbage at padding cannot leak into a later sum. An all-masked
    input gives all zeros. By default statistics are over the whole array (`axis=None`).
    """
    x = upcast(x)
    mean = masked_mean(x, mask, axis, keepdims=True)
    var = masked_var(x, mask, axis, unbiased=True, keepdims=True)
    valid = as_bool_mask(mask)
    whitened = (jnp.where(valid, x, mean) - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(valid, whitened, 0.0)
