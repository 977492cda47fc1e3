"""A tiny name -> function registry, so configs pick RL math by name.

Kinds and what their functions look like:

    "advantage": (rewards_BxT, values_BxT, mask_BxT, *, gamma, lam) -> (advantages_BxT, returns_BxT)
    "outcome_advantage": (score_B, kl_BxT, mask_BxT, *, group_size, kl_coef, eps) -> advantages_BxT
                 critic-free estimators (`critic_free.py`: grpo, dr_grpo, rloo, reinforce_pp, ...)
    "kl":        (logp, ref_logp) -> per-token KL estimate (same shape)
    "loss_agg":  (loss_BxT, mask_BxT, *, num_tokens=None, num_seqs=None) -> scalar

The built-in entries are registered by the modules that define them (`advantages.py`,
`critic_free.py`, `kl.py`, `aggregation.py`) when `jaxrlhf.objectives` is imported. The PPO options name them
(`ppo.advantage_estimator`, `ppo.kl_estimator`, `ppo.loss_agg`; checked against `names(kind)`).
Example:

    advantage_fn = registry.get("advantage", "gae")
"""
from __future__ import annotations

from typing import Callable

KINDS = ("advantage", "outcome_advantage", "kl", "loss_agg")

_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; valid kinds: {sorted(_REGISTRY)}")


def register(kind: str, name: str, fn: Callable | None = None):
    """Registers `fn` under (kind, name). Usable directly or as a decorator.

    Re-registering an existing name raises, so two modules can never silently shadow each other.
    """
    _check_kind(kind)

    def _register(f: Callable) -> Callable:
        if name in _REGISTRY[kind] and _REGISTRY[kind][name] is not f:
            raise ValueError(f"{kind} {name!r} is already registered")
        _REGISTRY[kind][name] = f
        return f

    return _register if fn is None else _register(fn)


def get(kind: str, name: str) -> Callable:
    """Returns the function registered under (kind, name); ValueError lists the valid names."""
    _check_kind(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(
                f"unknown {kind} {name!r}; valid names: {sorted(_REGISTRY[kind])}") from None


def names(kind: str) -> tuple[str, ...]:
    """The registered names of one kind, sorted."""
    _check_kind(kind)
    return tuple(sorted(_REGISTRY[kind]))
