"""Loss aggregation over tokens and sequences, selectable by name ("loss_agg" registry).

Modes, for a per-token loss ℓ_BxT and response mask m_BxT (n_b = Σ_t m_bt valid tokens):

  "token_mean" (default)  Σ_b Σ_t m ℓ / N_tok          N_tok = Σ_b n_b
  "seq_mean"              Σ_b [n_b>0] (Σ_t m ℓ / n_b) / N_seq     N_seq = #{b : n_b > 0}
  "seq_sum"               Σ_b Σ_t m ℓ / N_seq         (token sum per sequence, mean over sequences)
  "seq_sum_norm"          Σ_b Σ_t m ℓ / (N_seq · T)   T = the padded length ℓ_BxT.shape[-1], a
                                                     constant (Dr. GRPO: no length normalisation)

"token_mean" is the default because it is what TRL and OpenRLHF PPO do (`masked_mean` over the
whole minibatch): every token weighs the same, so long responses are not down-weighted.

Micro-batch (gradient-accumulation) invariance. With the default local denominators a
micro-batch loss is normalised by its own N_tok / N_seq, so the mean of micro-batch losses
differs from the full-batch loss when micro-batches hold different numbers of valid tokens.
Pass the GLOBAL denominator of the whole batch (`num_tokens` for "token_mean", `num_seqs` for
"seq_mean"/"seq_sum"; `aggregation_denominators` computes both) and each micro-batch returns
its numerator / global denominator: the SUM of micro-batch losses (and gradients) then equals
the full-batch loss exactly, whatever the split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.objectives import registry
from jaxrlhf.objectives.stats import as_bool_mask, masked_count, safe_divide, upcast

DEFAULT_LOSS_AGG = "token_mean"


def _masked_loss(loss_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    return jnp.where(as_bool_mask(mask_BxT), upcast(loss_BxT), 0.0)


def _denominator(local: jax.Array, given: float | jax.Array | None) -> jax.Array:
    return local if given is None else jnp.asarray(given, local.dtype)


@registry.register("loss_agg", "token_mean")
def token_mean(loss_BxT: jax.Array, mask_BxT: jax.Array, *, num_tokens=None,
               num_seqs=None) -> jax.Array:
    """Σ_{b,t} m ℓ / N_tok (N_tok = `num_tokens` if given, else the local valid-token count)."""
    del num_seqs
    l = _masked_loss(loss_BxT, mask_BxT)
    return safe_divide(jnp.sum(l), _denominator(masked_count(mask_BxT, dtype=l.dtype), num_tokens))


def _num_valid_seqs(mask_BxT: jax.Array, dtype) -> jax.Array:
    return jnp.sum(jnp.any(as_bool_mask(mask_BxT), axis=-1).astype(dtype))


@registry.register("loss_agg", "seq_mean")
def seq_mean(loss_BxT: jax.Array, mask_BxT: jax.Array, *, num_tokens=None,
             num_seqs=None) -> jax.Array:
    """Σ_b (Σ_t m ℓ / n_b) / N_seq over sequences with n_b > 0."""
    del num_tokens
    l = _masked_loss(loss_BxT, mask_BxT)
    per_seq_B = safe_divide(jnp.sum(l, axis=-1), masked_count(mask_BxT, axis=-1, dtype=l.dtype))
    n_seqs = _denominator(_num_valid_seqs(mask_BxT, l.dtype), num_seqs)
    return safe_divide(jnp.sum(per_seq_B), n_seqs)


@registry.register("loss_agg", "seq_sum")
def seq_sum(loss_BxT: jax.Array, mask_BxT: jax.Array, *, num_tokens=None,
            num_seqs=None) -> jax.Array:
    """Σ_{b,t} m ℓ / N_seq: token sum per sequence, mean over sequences with n_b > 0."""
    del num_tokens
    l = _masked_loss(loss_BxT, mask_BxT)
    return safe_divide(jnp.sum(l), _denominator(_num_valid_seqs(mask_BxT, l.dtype), num_seqs))


@registry.register("loss_agg", "seq_sum_norm")
def seq_sum_norm(loss_BxT: jax.Array, mask_BxT: jax.Array, *, num_tokens=None,
                 num_seqs=None) -> jax.Array:
    """Σ_{b,t} m ℓ / (N_seq · T) with T = loss_BxT.shape[-1] (the maximum response length): every
    token weighs the same whatever its sequence's length (Dr. GRPO's constant normaliser)."""
    return seq_sum(loss_BxT, mask_BxT, num_tokens=num_tokens,
                   num_seqs=num_seqs) / loss_BxT.shape[-1]


def aggregate(loss_BxT: jax.Array, mask_BxT: jax.Array, mode: str = DEFAULT_LOSS_AGG, *,
              num_tokens: float | jax.Array | None = None,
              num_seqs: float | jax.Array | None = None) -> jax.Array:
    """Reduces a per-token loss ℓ_BxT to a scalar with the named mode (see module docstring).

    Masked positions (even inf/NaN) contribute nothing and get zero gradient. An all-masked
    batch gives 0. `num_tokens` / `num_seqs` are global denominators for micro-batching.
    """
    return registry.get("loss_agg", mode)(loss_BxT, mask_BxT, num_tokens=num_tokens,
                                          num_seqs=num_seqs)


def aggregation_denominators(mask_BxT: jax.Array) -> dict[str, jax.Array]:
    """Global denominators of a full batch: {"num_tokens": N_tok, "num_seqs": N_seq}.

    Compute them on the whole (mini)batch and pass them to every micro-batch's loss.
    """
    return {"num_tokens": masked_count(mask_BxT),
            "num_seqs": _num_valid_seqs(mask_BxT, jnp.float32)}
