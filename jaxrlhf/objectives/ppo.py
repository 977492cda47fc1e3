"""PPO-ptx losses: clipped policy loss, clipped value loss, pretraining (ptx) LM loss.

Every loss returns (loss, metrics). Loss aggregation is the `agg` option (default
"token_mean"; see `aggregation.py`), with optional global denominators `num_tokens` /
`num_seqs` that make the sum of micro-batch losses equal the full-batch loss exactly.
Metrics are plain masked means over the tokens of the call (diagnostics, not micro-batch
invariant) and are computed under `stop_gradient`.

Overflow safety: inputs at masked positions are replaced with `where` before any arithmetic
(inf there cannot create a NaN, and masked tokens get exactly zero gradient), and log-ratios are
clamped to ±LOG_RATIO_CLAMP (20) in float32 before `exp`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.objectives.aggregation import DEFAULT_LOSS_AGG, aggregate
from jaxrlhf.objectives.kl import LOG_RATIO_CLAMP, clamped_log_ratio
from jaxrlhf.objectives.stats import (as_bool_mask, entropy, masked_mean, masked_var, safe_divide,
                                      token_logprobs, upcast)

Scalar = float | jax.Array


def _masked_max(x: jax.Array, valid: jax.Array) -> jax.Array:
    """max of x over valid positions, 0 if there are none."""
    return jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0)


def ppo_policy_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array,
                    mask_BxT: jax.Array, *, clip_eps: Scalar = 0.2,
                    clip_eps_high: Scalar | None = None, dual_clip: Scalar | None = None,
                    agg: str = DEFAULT_LOSS_AGG, num_tokens: Scalar | None = None,
                    num_seqs: Scalar | None = None) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate (Schulman et al. 2017), optionally dual-clipped (Ye et al. 2020).

      ρ_t  = exp(clip(logp_t − old_logp_t, ±20))
      ℓ_t  = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε_high))       = −min(ρA, clip(ρ)A)
      ε_high = ε unless `clip_eps_high` is given (DAPO's "clip higher": ε_high > ε lets the
      probability of an unlikely token with A > 0 grow further before the clip)
      dual clip c > 1:  ℓ_t = min(ℓ_t, −c A_t)  where A_t < 0   (caps the loss of a huge ρ)
      loss = agg_t(ℓ_t)

    Args:
      logp_BxT: log π_θ(y_t) (differentiated).
      old_logp_BxT: log π_old(y_t) from the rollout (treated as a constant).
      advantages_BxT: A_t (constant; whiten beforehand if wanted).
      mask_BxT: 1 on response tokens.
      clip_eps: ε (the lower clip). clip_eps_high: ε_high or None (= ε).
      dual_clip: c (> 1) or None.
      agg, num_tokens, num_seqs: aggregation (see `aggregation.aggregate`).

    Metrics: policy_loss; approx_kl = masked mean of k3 for KL(π_old ‖ π_θ), i.e.
    (ρ − 1) − log ρ; clipfrac = fraction of tokens where the clipped branch is active
    (clipped ℓ > unclipped ℓ, as TRL `pg_clipfrac`); ratio_mean, ratio_max; dual_clipfrac when
    dual clipping is on.
    """
    valid = as_bool_mask(mask_BxT)
    logp = jnp.where(valid, upcast(logp_BxT), 0.0)
    old_logp = jnp.where(valid, upcast(jax.lax.stop_gradient(old_logp_BxT), logp.dtype), 0.0)
    adv = jnp.where(valid, upcast(jax.lax.stop_gradient(advantages_BxT), logp.dtype), 0.0)

    log_ratio = clamped_log_ratio(logp, old_logp, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = jnp.maximum(unclipped, clipped)
    metrics = {}
    if dual_clip is not None:
        capped = jnp.minimum(per_token, -dual_clip * adv)
        dual_active = (adv < 0) & (capped < per_token)
        per_token = jnp.where(adv < 0, capped, per_token)
        metrics["dual_clipfrac"] = masked_mean(dual_active.astype(logp.dtype), valid)
    loss = aggregate(per_token, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs)

    sg_lr, sg_ratio = jax.lax.stop_gradient(log_ratio), jax.lax.stop_gradient(ratio)
    metrics.update({
        "policy_loss": jax.lax.stop_gradient(loss),
        "approx_kl": masked_mean(jnp.expm1(sg_lr) - sg_lr, valid),
        "clipfrac": masked_mean((clipped > unclipped).astype(logp.dtype), valid),
        "ratio_mean": masked_mean(sg_ratio, valid),
        "ratio_max": _masked_max(sg_ratio, valid),
    })
    return loss, jax.lax.stop_gradient(metrics)


def value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array,
               mask_BxT: jax.Array, *, clip_eps: Scalar | None = 0.2,
               agg: str = DEFAULT_LOSS_AGG, num_tokens: Scalar | None = None,
               num_seqs: Scalar | None = None) -> tuple[jax.Array, dict]:
    """Clipped value loss (PPO2 / TRL / OpenRLHF).

      V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
      ℓ_t    = ½ max((V_t − R_t)², (V_clip,t − R_t)²)
      loss   = agg_t(ℓ_t)             (clip_eps=None: ℓ_t = ½ (V_t − R_t)²)

    Args:
      values_BxT: V_φ(s_t) (differentiated). old_values_BxT: rollout values (constant).
      returns_BxT: R_t = A_t + V_old,t from `gae` (constant). mask_BxT: 1 on response tokens.

    Metrics: value_loss; vf_clipfrac (fraction of tokens where the clipped branch is larger, as
    TRL); value_mean; returns_mean; value_mse = masked mean of (V − R)²;
    explained_variance = 1 − Var(R − V)/Var(R) (0 when Var(R) = 0).
    """
    valid = as_bool_mask(mask_BxT)
    v = jnp.where(valid, upcast(values_BxT), 0.0)
    v_old = jnp.where(valid, upcast(jax.lax.stop_gradient(old_values_BxT), v.dtype), 0.0)
    ret = jnp.where(valid, upcast(jax.lax.stop_gradient(returns_BxT), v.dtype), 0.0)

    unclipped = jnp.square(v - ret)
    if clip_eps is None:
        per_token = unclipped
        clipfrac = jnp.zeros((), v.dtype)
    else:
        v_clip = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
        clipped = jnp.square(v_clip - ret)
        per_token = jnp.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).astype(v.dtype), valid)
    loss = 0.5 * aggregate(per_token, valid, agg, num_tokens=num_tokens, num_seqs=num_seqs)

    sg_v = jax.lax.stop_gradient(v)
    var_ret = masked_var(ret, valid, unbiased=False)
    metrics = {
        "value_loss": loss,
        "vf_clipfrac": clipfrac,
        "value_mean": masked_mean(sg_v, valid),
        "returns_mean": masked_mean(ret, valid),
        "value_mse": masked_mean(jax.lax.stop_gradient(unclipped), valid),
        "explained_variance": jnp.where(
            var_ret > 0, 1.0 - safe_divide(masked_var(ret - sg_v, valid, unbiased=False), var_ret),
            0.0),
    }
    return loss, jax.lax.stop_gradient(metrics)


def ptx_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, mask_BxT: jax.Array, *,
             agg: str = DEFAULT_LOSS_AGG, num_tokens: Scalar | None = None,
             num_seqs: Scalar | None = None) -> tuple[jax.Array, dict]:
    """Next-token LM loss on pretraining text (the "ptx" term of PPO-ptx).

      ℓ_t  = −log softmax(logits[:, t−1])[tokens[:, t]]     for t = 1..T−1
      loss = agg over targets with mask[:, t] = 1

    Unlike `token_logprobs`, this function DOES the causal shift itself: `logits_BxTxV` is the
    model output for the unshifted `tokens_BxT`, `mask_BxT` is aligned with the tokens, and
    mask[:, 1:] selects which targets count (mask[:, 0] is never a target). A global
    `num_tokens` must therefore count mask[:, 1:].

    Metrics: ptx_loss, ptx_num_tokens (number of targets in this call).
    """
    logp_BxT1 = token_logprobs(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
    target_mask = as_bool_mask(mask_BxT)[:, 1:]
    loss = aggregate(-logp_BxT1, target_mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    metrics = {"ptx_loss": loss, "ptx_num_tokens": jnp.sum(target_mask.astype(jnp.float32))}
    return loss, jax.lax.stop_gradient(metrics)


def ppo_ptx_objective(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, old_logp_BxT: jax.Array,
    advantages_BxT: jax.Array, mask_BxT: jax.Array, *,
    values_BxT: jax.Array | None = None, old_values_BxT: jax.Array | None = None,
    returns_BxT: jax.Array | None = None,
    ptx_logits_BxSxV: jax.Array | None = None, ptx_tokens_BxS: jax.Array | None = None,
    ptx_mask_BxS: jax.Array | None = None,
    temperature: Scalar = 1.0, clip_eps: Scalar = 0.2, dual_clip: Scalar | None = None,
    vf_clip_eps: Scalar | None = 0.2, vf_coef: Scalar = 0.5, entropy_coef: Scalar = 0.0,
    ptx_coef: Scalar = 0.0, agg: str = DEFAULT_LOSS_AGG,
    num_tokens: Scalar | None = None, num_seqs: Scalar | None = None,
    ptx_num_tokens: Scalar | None = None, ptx_num_seqs: Scalar | None = None,
) -> tuple[jax.Array, dict]:
    """The PPO-ptx loss to MINIMISE, from the actor's logits on the response tokens.

      total = policy_loss + vf_coef · value_loss − entropy_coef · entropy + ptx_coef · ptx_loss

    where entropy = agg_t H(softmax(logits_t / temperature)) over response tokens and the policy
    log-probs are logp_t = token_logprobs(logits_t, tokens_t, temperature), i.e. the SAME
    tempered distribution the rollout sampled from (so ρ = 1 on the first minibatch).

    Alignment: like `token_logprobs`, logits_BxTxV[:, t] must already be the prediction FOR
    tokens_BxT[:, t] (the caller shifts); old_logp, advantages and mask are aligned the same way.
    The ptx batch (`ptx_*`, unshifted, see `ptx_loss`) is optional; with ptx_coef = 0 or no
    ptx batch this is plain PPO. The value terms are optional too (pass all three of values,
    old_values, returns): for an actor and critic in one loss the gradient of `total` w.r.t.
    the critic is vf_coef · ∇value_loss and w.r.t. the actor the rest.

    `agg`, `num_tokens`, `num_seqs` apply to the policy, value and entropy terms (the response
    mask); `ptx_num_tokens`, `ptx_num_seqs` to the ptx term. Returns (total, metrics): the
    metrics of each part plus "entropy" and "total_loss".
    """
    valid = as_bool_mask(mask_BxT)
    logp_BxT = token_logprobs(logits_BxTxV, tokens_BxT, temperature)
    total, metrics = ppo_policy_loss(logp_BxT, old_logp_BxT, advantages_BxT, valid,
                                     clip_eps=clip_eps, dual_clip=dual_clip, agg=agg,
                                     num_tokens=num_tokens, num_seqs=num_seqs)
    metrics = dict(metrics)
    ent = aggregate(entropy(logits_BxTxV, temperature), valid, agg, num_tokens=num_tokens,
                    num_seqs=num_seqs)
    total = total - entropy_coef * ent
    metrics["entropy"] = jax.lax.stop_gradient(ent)

    value_args = (values_BxT, old_values_BxT, returns_BxT)
    if any(a is not None for a in value_args):
        if any(a is None for a in value_args):
            raise ValueError("value terms need all of values_BxT, old_values_BxT, returns_BxT")
        v_loss, v_metrics = value_loss(values_BxT, old_values_BxT, returns_BxT, valid,
                                       clip_eps=vf_clip_eps, agg=agg, num_tokens=num_tokens,
                                       num_seqs=num_seqs)
        total = total + vf_coef * v_loss
        metrics.update(v_metrics)

    if ptx_logits_BxSxV is not None:
        if ptx_tokens_BxS is None or ptx_mask_BxS is None:
            raise ValueError("the ptx term needs ptx_logits_BxSxV, ptx_tokens_BxS, ptx_mask_BxS")
        p_loss, p_metrics = ptx_loss(ptx_logits_BxSxV, ptx_tokens_BxS, ptx_mask_BxS, agg=agg,
                                     num_tokens=ptx_num_tokens, num_seqs=ptx_num_seqs)
        total = total + ptx_coef * p_loss
        metrics.update(p_metrics)

    metrics["total_loss"] = jax.lax.stop_gradient(total)
    return total, metrics
