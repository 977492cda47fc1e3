"""Uncertainty-aware reward (MOSS, "Secrets of RLHF II"): the score of an RM ensemble,
penalised where its members disagree,

    r(x, y) = mean_m r_m(x, y) − λ · std_m r_m(x, y)     (population std over M members)
"""
from __future__ import annotations

import jax.numpy as jnp


def uncertainty_reward(rewards_MxB, coef: float):
    """mean − coef · std over the leading member axis."""
    return jnp.mean(rewards_MxB, axis=0) - coef * jnp.std(rewards_MxB, axis=0)
