"""MetaRM (MOSS, "Secrets of RLHF II"; Dou et al. 2024): keep a reward model able to tell
apart the responses of a shifted policy.

With a preference batch X_t and an unlabelled meta batch X_s of responses sampled from the
new policy:

    J_θ(X_s)   = mean over pairs (y_i, y_j), i < j, of the same prompt of σ(|r_θ(y_i) − r_θ(y_j)|)
    θ'         = θ + η ∇_θ J_θ(X_s)                  (one ascent step on the difference loss)
    θ_{t+1}    = optimizer update of θ with ∇_θ L_θ'(X_t)   (L the ranking loss; through θ',
                 (I + η ∇²J) ∇L(θ'), second order; first order drops the ∇²J term)

`difference_loss` is J from the rewards; `adapted_params` is θ'. The reward-model stage
composes them with the ranking loss (`jaxrlhf.trainers.reward`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def difference_loss(rewards_BxK, valid_BxK):
    """J: mean over the pairs i < j of valid responses of each row of σ(|r_i − r_j|)."""
    valid = valid_BxK > 0
    k = rewards_BxK.shape[-1]
    upper = jnp.triu(jnp.ones((k, k), jnp.bool_), 1)[None]
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    s = jax.nn.sigmoid(jnp.abs(rewards_BxK[:, :, None] - rewards_BxK[:, None, :]))
    n = jnp.sum(pairs.astype(jnp.float32))
    return jnp.sum(jnp.where(pairs, s, 0.0)) / jnp.maximum(n, 1.0)


def adapted_params(objective: Callable, params, lr: float, *, first_order: bool = False):
    """(θ' = θ + lr · ∇_θ objective(θ), objective(θ)). With first_order the gradient is a
    constant for differentiation through θ' (no second-order term)."""
    j, g = jax.value_and_grad(objective)(params)
    if first_order:
        g = jax.lax.stop_gradient(g)
    return jax.tree.map(lambda a, b: a + lr * b.astype(a.dtype), params, g), j
