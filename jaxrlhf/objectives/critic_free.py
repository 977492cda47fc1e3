"""Critic-free advantages from one scalar score per response ("outcome" rewards), and the
score shaping the critic-free family uses. Rows are prompt-major groups: with K samples per
prompt, rows g·K .. g·K + K − 1 are the K responses to prompt g.

Every estimator ("outcome_advantage" registry kind) has the signature

    fn(score_B, kl_BxT, mask_BxT, *, group_size, kl_coef, eps) -> advantages_BxT

and works in two steps. (1) A per-sequence baselined score Â_b from the K scores of its group
(or the raw score). (2) Per-token rewards r_t = −β·KL_t at every valid token, plus Â_b at the
row's last valid token, and the advantage is the reward-to-go A_t = Σ_{s ≥ t, valid} r_s
(γ = 1). With β = 0 (no KL in the reward) A_t = Â_b at every token of the row.

  "grpo"        Â = (r − mean_g) / (std_g + ε)      std_g unbiased (÷ K − 1), as TRL/OpenRLHF
  "dr_grpo"     Â = r − mean_g                        (no std division; Liu et al. 2025)
  "rloo"        Â = r − mean_{j≠i} r_j = K/(K−1)·(r − mean_g)    (leave-one-out baseline)
  "reinforce_pp"           A_t = reward-to-go of the raw score, then (A − μ)/(σ + ε) over
                           every valid token of the batch (REINFORCE++; Hu 2025)
  "reinforce_pp_baseline"  the same with r − mean_g as the score (REINFORCE++-baseline)

The group estimators need K ≥ 2 (the stage checks it). Outputs at masked positions are 0;
a row with no valid token gets no score.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.objectives import registry
from jaxrlhf.objectives.kl import last_token_index
from jaxrlhf.objectives.stats import (as_bool_mask, masked_count, masked_sum, safe_divide,
                                      upcast)


def _groups(score_B: jax.Array, group_size: int) -> jax.Array:
    b = score_B.shape[0]
    if b % group_size:
        raise ValueError(f"batch {b} is not a whole number of groups of {group_size}")
    return upcast(score_B).reshape(b // group_size, group_size)


def group_mean(score_B: jax.Array, group_size: int) -> jax.Array:
    """mean_g of each row's group, broadcast back to [B]."""
    g = _groups(score_B, group_size)
    return jnp.repeat(jnp.mean(g, axis=1), group_size)


def group_std(score_B: jax.Array, group_size: int) -> jax.Array:
    """Unbiased standard deviation (÷ K − 1) of each row's group, broadcast back to [B]."""
    g = _groups(score_B, group_size)
    return jnp.repeat(jnp.std(g, axis=1, ddof=1), group_size)


def uniform_groups(score_B: jax.Array, group_size: int) -> jax.Array:
    """[B] bool: the row's group has K equal scores (its group-relative advantage is 0 and it
    carries no learning signal; DAPO's dynamic sampling drops such groups)."""
    g = _groups(score_B, group_size)
    same = jnp.all(g == g[:, :1], axis=1)
    return jnp.repeat(same, group_size)


def overlong_penalty(lengths_B: jax.Array, max_len: int, buffer: int,
                     factor: float = 1.0) -> jax.Array:
    """DAPO's soft overlong punishment, added to the score (≤ 0):

      0                                  |y| ≤ L_max − L_buf
      factor · ((L_max − L_buf) − |y|) / L_buf    L_max − L_buf < |y| ≤ L_max
      −factor                            |y| > L_max

    `lengths_B` counts response tokens (the stop token included), `max_len` = L_max,
    `buffer` = L_buf > 0.
    """
    length = upcast(lengths_B)
    soft = max_len - buffer
    pen = jnp.where(length <= soft, 0.0, (soft - length) / buffer)
    return factor * jnp.where(length > max_len, -1.0, pen)


def _reward_to_go(seq_score_B, kl_BxT, mask_BxT, kl_coef):
    """A_t = Σ_{s ≥ t, valid} (−β·KL_s + [s = last] · score) over each row's valid tokens."""
    valid = as_bool_mask(mask_BxT)
    dtype = jnp.result_type(jnp.float32, seq_score_B.dtype, kl_BxT.dtype)
    last_B, has_any_B = last_token_index(valid)
    at_last = (jnp.arange(valid.shape[-1])[None, :] == last_B[:, None]) & has_any_B[:, None]
    r = jnp.where(valid, -jnp.asarray(kl_coef, dtype) * upcast(kl_BxT, dtype), 0.0)
    r = r + jnp.where(at_last, upcast(seq_score_B, dtype)[:, None], 0.0)
    r = jnp.where(valid, r, 0.0)
    togo = jnp.flip(jnp.cumsum(jnp.flip(r, -1), axis=-1), -1)
    return jnp.where(valid, togo, 0.0)


def _batch_normalised(adv_BxT, mask_BxT, eps):
    valid = as_bool_mask(mask_BxT)
    n = masked_count(valid, dtype=adv_BxT.dtype)
    mean = safe_divide(masked_sum(adv_BxT, valid), n)
    var = safe_divide(masked_sum(jnp.square(adv_BxT - mean), valid), n - 1.0)
    return jnp.where(valid, (adv_BxT - mean) / (jnp.sqrt(var) + eps), 0.0)


@registry.register("outcome_advantage", "grpo")
def grpo_advantages(score_B, kl_BxT, mask_BxT, *, group_size: int, kl_coef=0.0,
                    eps: float = 1e-6):
    """GRPO (Shao et al. 2024): Â_i = (r_i − mean_g) / (std_g + ε), std_g unbiased."""
    adv = (upcast(score_B) - group_mean(score_B, group_size)) / (
        group_std(score_B, group_size) + eps)
    return _reward_to_go(adv, kl_BxT, mask_BxT, kl_coef)


@registry.register("outcome_advantage", "dr_grpo")
def dr_grpo_advantages(score_B, kl_BxT, mask_BxT, *, group_size: int, kl_coef=0.0,
                       eps: float = 1e-6):
    """Dr. GRPO (Liu et al. 2025): Â_i = r_i − mean_g (no std division)."""
    del eps
    adv = upcast(score_B) - group_mean(score_B, group_size)
    return _reward_to_go(adv, kl_BxT, mask_BxT, kl_coef)


@registry.register("outcome_advantage", "rloo")
def rloo_advantages(score_B, kl_BxT, mask_BxT, *, group_size: int, kl_coef=0.0,
                    eps: float = 1e-6):
    """RLOO (Ahmadian et al. 2024): Â_i = r_i − (1/(K−1)) Σ_{j≠i} r_j."""
    del eps
    k = group_size
    r = upcast(score_B)
    sums = group_mean(score_B, k) * k
    adv = r - (sums - r) / (k - 1)
    return _reward_to_go(adv, kl_BxT, mask_BxT, kl_coef)


@registry.register("outcome_advantage", "reinforce_pp")
def reinforce_pp_advantages(score_B, kl_BxT, mask_BxT, *, group_size: int = 1, kl_coef=0.0,
                            eps: float = 1e-6):
    """REINFORCE++: A_t = Σ_{s≥t} (−β·KL_s + [s = last]·r), normalised over every valid token
    of the batch: (A − μ) / (σ + ε), σ unbiased."""
    del group_size
    return _batch_normalised(_reward_to_go(upcast(score_B), kl_BxT, mask_BxT, kl_coef),
                             mask_BxT, eps)


@registry.register("outcome_advantage", "reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(score_B, kl_BxT, mask_BxT, *, group_size: int,
                                     kl_coef=0.0, eps: float = 1e-6):
    """REINFORCE++-baseline: REINFORCE++ with the group-mean-subtracted score r − mean_g."""
    adv = upcast(score_B) - group_mean(score_B, group_size)
    return _batch_normalised(_reward_to_go(adv, kl_BxT, mask_BxT, kl_coef), mask_BxT, eps)


# Estimators that compare a row with the other samples of its prompt (need K ≥ 2).
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
