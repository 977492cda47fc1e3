"""Advantage estimators: generalised advantage estimation by a reverse `lax.scan`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.objectives import registry
from jaxrlhf.objectives.stats import as_bool_mask, compute_dtype


@registry.register("advantage", "gae")
def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *,
        gamma: float | jax.Array, lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over the valid tokens.

      δ_t = r_t + γ V_{t'} − V_t          t' = next valid position after t; V_{t'} = 0 if none
      A_t = δ_t + γλ A_{t'}               (A = 0 beyond the last valid token)
      R_t = A_t + V_t                     (returns, the critic's regression target)

    Computed by one reverse `lax.scan` over time whose carry (V_{t'}, A_{t'}) is only updated at
    valid positions: masked positions are skipped as if absent. So values/rewards at masked
    positions (prompt, padding, even inf/NaN) cannot change anything, and the value after the
    response never leaks in. Outputs at masked positions are 0.

    For the usual contiguous response mask this is exactly the TRL / OpenRLHF recursion (they
    zero values and rewards beyond the response and bootstrap with 0 after the last token).
    Difference: a hole inside the mask is skipped (the recursion jumps over it) rather than
    treated as a step with V = r = 0 that breaks the chain — a masked token is not a timestep.

    γ = λ = 1 gives A_t = Σ_{s≥t} r_s − V_t, i.e. returns = reward-to-go.

    Args:
      rewards_BxT: per-token rewards (e.g. from `kl_penalized_rewards`).
      values_BxT: critic values V(s_t), aligned with rewards.
      mask_BxT: 1 on response tokens (bool or 0/1 float).
      gamma, lam: discount γ and GAE λ (Python floats or traced scalars).

    Returns: (advantages_BxT, returns_BxT), float32 or wider.
    """
    dtype = compute_dtype(rewards_BxT, values_BxT)
    valid_TxB = as_bool_mask(mask_BxT).T
    r_TxB = jnp.where(valid_TxB, rewards_BxT.T.astype(dtype), 0.0)
    v_TxB = jnp.where(valid_TxB, values_BxT.T.astype(dtype), 0.0)
    gamma = jnp.asarray(gamma, dtype)
    gamma_lam = gamma * jnp.asarray(lam, dtype)

    def step(carry, inputs):
        next_value_B, next_adv_B = carry
        r_B, v_B, valid_B = inputs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = delta_B + gamma_lam * next_adv_B
        new_carry = (jnp.where(valid_B, v_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
        return new_carry, jnp.where(valid_B, adv_B, 0.0)

    zeros_B = jnp.zeros(r_TxB.shape[1], dtype)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TxB, v_TxB, valid_TxB), reverse=True)
    advantages_BxT = adv_TxB.T
    returns_BxT = jnp.where(valid_TxB.T, advantages_BxT + v_TxB.T, 0.0)
    return advantages_BxT, returns_BxT


@registry.register("advantage", "monte_carlo")
def monte_carlo_advantages(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array,
                           *, gamma: float | jax.Array,
                           lam: float | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Monte-Carlo advantages: GAE with λ = 1 (`lam` is ignored, kept for a uniform signature).

      R_t = Σ_{s≥t} γ^{s−t} r_s (over valid s),   A_t = R_t − V_t
    """
    del lam
    return gae(rewards_BxT, values_BxT, mask_BxT, gamma=gamma, lam=1.0)
