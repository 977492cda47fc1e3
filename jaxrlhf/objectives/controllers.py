"""KL-coefficient controllers as pytree state + pure update (they checkpoint with the rest).

  fixed:     β stays constant.
  adaptive:  β ← β · (1 + K · clip(KL / KL_target − 1, −0.2, 0.2) · n / horizon)
             (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2;
             K is the proportional gain, n the number of samples since the last update.)

TRL's and OpenRLHF's `AdaptiveKLController` are this rule with K = 1, which is our default.
Every field of the state is a float32 array (hyper-parameters included), so a restored
checkpoint resumes exactly and `kl_controller_update` can be jitted. The update dispatches on
the state's type, which is static under jit.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Scalar = float | jax.Array


class FixedKLController(NamedTuple):
    """State of the fixed controller: β."""
    kl_coef: jax.Array


class AdaptiveKLController(NamedTuple):
    """State of the adaptive controller: β and its (checkpointed) hyper-parameters."""
    kl_coef: jax.Array
    target: jax.Array
    horizon: jax.Array
    gain: jax.Array


KLControllerState = FixedKLController | AdaptiveKLController


def _f32(x: Scalar) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def init_fixed_kl_controller(kl_coef: Scalar) -> FixedKLController:
    """A controller whose β never changes."""
    return FixedKLController(kl_coef=_f32(kl_coef))


def init_adaptive_kl_controller(init_kl_coef: Scalar, target: Scalar, horizon: Scalar,
                                gain: Scalar = 1.0) -> AdaptiveKLController:
    """The Ziegler et al. (2019) proportional controller.

    Args:
      init_kl_coef: β₀.  target: KL_target (nats per sequence, as measured by the caller).
      horizon: samples over which a full ±20% step is taken.  gain: K (default 1, as TRL).
    """
    return AdaptiveKLController(kl_coef=_f32(init_kl_coef), target=_f32(target),
                                horizon=_f32(horizon), gain=_f32(gain))


def kl_controller_init(kind: str, *, kl_coef: Scalar, target: Scalar | None = None,
                       horizon: Scalar | None = None, gain: Scalar = 1.0) -> KLControllerState:
    """Config entry point: kind "fixed" or "adaptive" (which needs target and horizon)."""
    if kind == "fixed":
        return init_fixed_kl_controller(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("the adaptive KL controller needs target and horizon")
        return init_adaptive_kl_controller(kl_coef, target, horizon, gain)
    raise ValueError(f"unknown KL controller {kind!r}; valid: ['adaptive', 'fixed']")


def kl_controller_update(state: KLControllerState, current_kl: Scalar,
                         n_steps: Scalar) -> KLControllerState:
    """One controller step after a PPO iteration. Pure; jit-able.

      fixed:    state unchanged
      adaptive: e = clip(current_kl / target − 1, −0.2, 0.2)
                β ← β · (1 + gain · e · n_steps / horizon)

    Args:
      state: a controller state. current_kl: measured KL (same unit as target).
      n_steps: number of samples (e.g. sequences) the KL was measured over.
    """
    if isinstance(state, FixedKLController):
        return state
    if isinstance(state, AdaptiveKLController):
        error = jnp.clip(_f32(current_kl) / state.target - 1.0, -0.2, 0.2)
        mult = 1.0 + state.gain * error * _f32(n_steps) / state.horizon
        return state._replace(kl_coef=state.kl_coef * mult)
    raise TypeError(f"not a KL controller state: {type(state).__name__}")
