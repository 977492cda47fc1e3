"""Reward normalisation: running moments (parallel Welford / Chan merge) and the RM bias.

`RunningMoments` is a pytree of float32 scalars (count, mean, M2 = Σ (x − mean)²), updated by
merging each batch's moments with Chan et al.'s parallel formula

  n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

which is exact for any split of the stream (unlike a running mean of batch means) and
numerically stable. It checkpoints with the rest of the train state. `count` is float32, exact
up to 2²⁴ ≈ 1.7e7 samples; past that the merge weights are still accurate to ~1e-7.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.objectives.stats import masked_count, masked_mean, masked_sum, safe_divide


class RunningMoments(NamedTuple):
    """count, mean and M2 = Σ (x − mean)² of everything seen so far (float32 scalars)."""
    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def running_moments_init() -> RunningMoments:
    """Empty moments: count 0, mean 0, M2 0."""
    # Three buffers, not one shared zero: the moments live in donated train states, and XLA
    # refuses to donate one buffer twice.
    zero = lambda: jnp.zeros((), jnp.float32)
    return RunningMoments(count=zero(), mean=zero(), m2=zero())


def running_moments_merge(a: RunningMoments, b: RunningMoments) -> RunningMoments:
    """Chan's parallel merge of two sets of moments (either may be empty)."""
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * safe_divide(b.count, n)
    m2 = a.m2 + b.m2 + jnp.square(delta) * safe_divide(a.count * b.count, n)
    return RunningMoments(count=n, mean=mean, m2=m2)


def running_moments_update(state: RunningMoments, x: jax.Array,
                           mask: jax.Array | None = None) -> RunningMoments:
    """Adds every valid element of `x` (any shape; `mask` same shape, None = all) to the moments.

    A batch with no valid element leaves the state unchanged.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.ones(x.shape, jnp.bool_) if mask is None else mask
    count = masked_count(mask)
    mean = masked_mean(x, mask)
    m2 = masked_sum(jnp.square(jnp.where(mask != 0, x - mean, 0.0)), mask)
    return running_moments_merge(state, RunningMoments(count=count, mean=mean, m2=m2))


def running_moments_std(state: RunningMoments) -> jax.Array:
    """Unbiased standard deviation sqrt(M2 / (count − 1)); 0 for fewer than 2 samples."""
    return jnp.sqrt(safe_divide(state.m2, jnp.where(state.count > 1, state.count - 1.0, 0.0)))


def normalize_with_moments(x: jax.Array, state: RunningMoments, *, shift_mean: bool = True,
                           eps: float = 1e-8) -> jax.Array:
    """(x − mean) / (std + eps) with the running moments; shift_mean=False only scales x / std.

    Scaling without shifting (the default of some PPO setups) keeps the sign of the reward.
    """
    x = jnp.asarray(x, jnp.float32)
    std = running_moments_std(state)
    centered = x - state.mean if shift_mean else x
    return centered / (std + eps)


def reward_bias(rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The bias b that makes the mean reward on a reference set zero: b = −mean(rewards).

    InstructGPT sets the reward-model bias so that the SFT demonstrations score 0 on average.
    `rewards` is any shape (e.g. N scores of the reference set; `mask` drops padding rows).
    For a reference set too large for one batch, accumulate `RunningMoments` and use −mean.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    mask = jnp.ones(rewards.shape, jnp.bool_) if mask is None else mask
    return -masked_mean(rewards, mask)
