"""Per-token KL estimators and the KL-penalised PPO reward (PPO-ptx).

With lr = log π(y_t) − log π_ref(y_t) for y_t sampled from π, the three estimators of
KL(π ‖ π_ref) of Schulman's note "Approximating KL divergence" are

  k1 = lr                      unbiased, can be negative per token
  k2 = lr² / 2                 biased, non-negative
  k3 = exp(−lr) − 1 + lr       unbiased, non-negative

k3 exponentiates, so lr is first clamped to ±LOG_RATIO_CLAMP (20) in float32; exp(20) ≈ 4.9e8
stays comfortably finite and gradients beyond the clamp are 0. The clamped lr is used in the
whole k3 expression (as OpenRLHF `compute_approx_kl`, which clamps at ±10) so the estimator
stays non-negative. k1 and k2 are exact and need no clamp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.objectives import registry
from jaxrlhf.objectives.stats import as_bool_mask, masked_count, masked_sum, safe_divide, upcast

LOG_RATIO_CLAMP = 20.0


def clamped_log_ratio(logp: jax.Array, ref_logp: jax.Array,
                      clamp: float = LOG_RATIO_CLAMP) -> jax.Array:
    """lr = clip(logp − ref_logp, −clamp, clamp), computed in float32 (or wider)."""
    return jnp.clip(upcast(logp) - upcast(ref_logp), -clamp, clamp)


@registry.register("kl", "k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k1 = lr = logp − ref_logp."""
    return upcast(logp) - upcast(ref_logp)


@registry.register("kl", "k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k2 = lr² / 2."""
    return 0.5 * jnp.square(upcast(logp) - upcast(ref_logp))


@registry.register("kl", "k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 = exp(−lr) − 1 + lr with lr clamped to ±LOG_RATIO_CLAMP before the exp."""
    lr = clamped_log_ratio(logp, ref_logp)
    return jnp.expm1(-lr) + lr


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from log-probs of tokens sampled from π.

    Args:
      logp: log π(y_t), any shape (typically BxT).
      ref_logp: log π_ref(y_t), same shape.
      kind: a name registered under "kl": "k1" (lr), "k2" (lr²/2), "k3" (exp(−lr) − 1 + lr).

    Returns: the estimate, same shape, float32 or wider. Masking is the caller's job (see
    `kl_penalized_rewards`); this function is elementwise.
    """
    return registry.get("kl", kind)(logp, ref_logp)


def last_token_index(mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Index of the last position with mask != 0 in each row, and whether the row has any.

    Found from the mask alone, so it is correct for left padding, right padding or both.
    Returns (index_B int32, has_any_B bool); index is 0 for an all-masked row.
    """
    valid = as_bool_mask(mask_BxT)
    T = valid.shape[-1]
    positions = jnp.arange(T, dtype=jnp.int32)
    index = jnp.max(jnp.where(valid, positions[None, :], -1), axis=-1)
    has_any = index >= 0
    return jnp.maximum(index, 0), has_any


def kl_penalized_rewards(score_B: jax.Array, logp_BxT: jax.Array, ref_logp_BxT: jax.Array,
                         mask_BxT: jax.Array, *, kl_coef: float | jax.Array, kind: str = "k1",
                         score_clip: float | None = None) -> tuple[jax.Array, dict]:
    """Per-token PPO rewards: KL penalty at every response token plus the score at the last one.

      r_t = −β · KL_t                         for every valid t   (KL_t = kl_estimate(kind))
      r_T* += clip(score, −score_clip, score_clip)   at T* = last t with mask_t = 1
      r_t = 0                                  at masked t

    Args:
      score_B: reward-model score r(x, y) per sequence (already normalised if wanted).
      logp_BxT / ref_logp_BxT: log π_old(y_t) and log π_ref(y_t), aligned with mask_BxT.
      mask_BxT: 1 on response tokens (bool or 0/1 float), any padding on either side.
      kl_coef: β, a Python float or a traced scalar (e.g. from the adaptive controller).
      kind: KL estimator name.
      score_clip: if given, the score is clipped to ±score_clip first.

    Returns: (rewards_BxT, metrics). Rows without a valid token get all-zero rewards (no score).
    Inputs at masked positions (even inf/NaN) cannot change the result.

    Metrics (means over rows that have ≥1 valid token):
      kl: Σ_t KL_t per sequence;  kl_per_token: token-mean KL over the batch;
      non_score_reward: Σ_t −β·KL_t per sequence;  score: the (clipped) score;
      total_reward: Σ_t r_t per sequence.
    """
    valid = as_bool_mask(mask_BxT)
    kl_BxT = kl_estimate(jnp.where(valid, logp_BxT, 0.0), jnp.where(valid, ref_logp_BxT, 0.0),
                         kind)
    kl_BxT = jnp.where(valid, kl_BxT, 0.0)
    dtype = kl_BxT.dtype
    non_score_BxT = -jnp.asarray(kl_coef, dtype) * kl_BxT

    score = upcast(score_B, dtype)
    if score_clip is not None:
        score = jnp.clip(score, -score_clip, score_clip)
    last_B, has_any_B = last_token_index(valid)
    score = jnp.where(has_any_B, score, 0.0)
    at_last_BxT = jnp.arange(valid.shape[-1])[None, :] == last_B[:, None]
    rewards_BxT = non_score_BxT + jnp.where(at_last_BxT & has_any_B[:, None], score[:, None], 0.0)
    rewards_BxT = jnp.where(valid, rewards_BxT, 0.0)

    n_rows = jnp.sum(has_any_B.astype(dtype))
    row_mean = lambda v_B: safe_divide(jnp.sum(jnp.where(has_any_B, v_B, 0.0)), n_rows)
    metrics = {
        "kl": row_mean(jnp.sum(kl_BxT, axis=-1)),
        "kl_per_token": safe_divide(masked_sum(kl_BxT, valid), masked_count(valid, dtype=dtype)),
        "non_score_reward": row_mean(jnp.sum(non_score_BxT, axis=-1)),
        "score": row_mean(score),
        "total_reward": row_mean(jnp.sum(rewards_BxT, axis=-1)),
    }
    return rewards_BxT, metrics
