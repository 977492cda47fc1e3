"""Direct preference optimisation on pairs and K-wise rankings.

Every loss here takes one score per response, s_BxK, computed by the caller from one forward
pass per response (K passes per prompt, never one per pair):

  DPO, IPO, robust DPO   s_i = log π(y_i | x) − log π_ref(y_i | x)   (summed over response tokens)
  SimPO                  s_i = log π(y_i | x) / |y_i|                  (no reference model)

and the implicit reward of response i is β·s_i.

`preference_loss`: all ranked pairs (i above j) of a prompt, z_ij = β (s_i − s_j) − m_ij
(− γ for SimPO), normalised exactly like the reward model's `kwise_ranking_loss` (mean over a
prompt's pairs, then over prompts; per-pair weights), so K = 2 is the usual pairwise loss and
the MOSS per-pair labels (ε_ij, m_ij) plug in as they do for the reward model:

  sigmoid  (DPO; ε > 0: conservative DPO / label smoothing)
           ℓ = −(1 − ε) log σ(z) − ε log σ(−z)
  robust   (robust DPO, unbiased under label flips with rate ε < ½)
           ℓ = [−(1 − ε) log σ(z) + ε log σ(−z)] / (1 − 2ε)
  ipo      (IPO, squared loss towards a finite margin; τ = β; a soft label p = 1 − ε moves the
           target to (p − ½)/β, so ε = ½ (a tie) has target 0)
           ℓ = (z − (½ − ε))² / β²       (= (h − 1/(2β))² for h = s_i − s_j, m = ε = 0)
  simpo    the sigmoid loss on SimPO scores with the target margin γ in z

Ties (equal ranks) under tie_mode="soft": one pair per tied (i < j) with target ½:
−½[log σ(z) + log σ(−z)] (sigmoid, robust, simpo; z = β(s_i − s_j)) or z²/β² (ipo); under
"skip" they make no pair (as for the reward model).

`plackett_luce_loss`: K-wise DPO, the negative log Plackett–Luce likelihood of the whole
ranking under the implicit rewards u_i = β s_i (the softmax generalisation of Bradley–Terry;
K = 2 is exactly the sigmoid DPO loss):

  ℓ_b  = −Σ_{i ∈ S_b} [u_i − log Σ_{j ∈ R_b(i)} exp(u_j)],   loss = mean over prompts with S_b ≠ ∅
  skip:  R(i) = {i} ∪ {j valid : rank_j > rank_i},  S = {i valid : some j ranks strictly below i}
  soft:  R(i) = {j valid : rank_j ≥ rank_i} (Breslow's ties),  S = {i valid : |R(i)| > 1}

so under "skip" a tie adds no constraint and under "soft" tied responses are pulled together
(an all-tied pair gives −log σ(Δ) − log σ(−Δ), twice the soft tie term above).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.objectives.ranking import _win_score, normalised_pair_loss, pair_masks
from jaxrlhf.objectives.stats import as_bool_mask, compute_dtype, safe_divide, upcast

Scalar = float | jax.Array

DPO_LOSSES = ("sigmoid", "robust", "ipo", "simpo")
RANKING_LOSSES = ("pairs", "plackett_luce")


def dpo_pair_loss(z: jax.Array, loss: str, *, beta: Scalar, label_smoothing: Scalar = 0.0
                  ) -> jax.Array:
    """Per-pair loss of z = β (s_i − s_j) − margin for response i preferred to j (module
    docstring); elementwise."""
    eps = jnp.asarray(label_smoothing, z.dtype)
    if loss in ("sigmoid", "simpo"):
        return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    if loss == "robust":
        return (-(1.0 - eps) * jax.nn.log_sigmoid(z)
                + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    if loss == "ipo":
        return jnp.square(z - (0.5 - eps)) / jnp.square(jnp.asarray(beta, z.dtype))
    raise ValueError(f"unknown DPO loss {loss!r}; valid: {DPO_LOSSES}")


def dpo_tie_loss(z: jax.Array, loss: str, *, beta: Scalar) -> jax.Array:
    """Per-pair loss of a tie (target ½), z = β (s_i − s_j)."""
    if loss == "ipo":
        return jnp.square(z) / jnp.square(jnp.asarray(beta, z.dtype))
    return dpo_pair_loss(z, "sigmoid", beta=beta, label_smoothing=0.5)


def preference_loss(scores_BxK: jax.Array, ranks_BxK: jax.Array, valid_BxK: jax.Array, *,
                    loss: str = "sigmoid", beta: Scalar = 0.1, label_smoothing: Scalar = 0.0,
                    margin: Scalar | None = None, simpo_gamma: Scalar = 0.0,
                    tie_mode: str = "skip", pair_weights: jax.Array | None = None
                    ) -> tuple[jax.Array, dict]:
    """DPO-family loss over all ranked pairs of K responses per prompt (module docstring).

    Args:
      scores_BxK: s_i per response (log-ratio to the reference; SimPO: mean token log-prob).
      ranks_BxK: integer ranks, 0 = best; valid_BxK: which responses exist.
      loss: "sigmoid" | "robust" | "ipo" | "simpo".
      beta: β; label_smoothing: ε, scalar or [B, K, K] (pair i above j); margin: m, scalar or
        [B, K, K] (None = 0); simpo_gamma: γ (SimPO only).
      tie_mode: "skip" or "soft"; pair_weights: [B, K, K] (None = 1).

    Returns: (loss, metrics): accuracy (ranked pairs with s_i > s_j; equal scores count ½),
    reward_margin (mean β (s_i − s_j)), weighted like the loss; num_pairs; num_prompts (with
    ≥ 1 pair).
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}; valid: {DPO_LOSSES}")
    dtype = compute_dtype(scores_BxK)
    valid = as_bool_mask(valid_BxK)
    s = jnp.where(valid, upcast(scores_BxK, dtype), 0.0)
    ranked, tied = pair_masks(ranks_BxK, valid, tie_mode)
    beta = jnp.asarray(beta, dtype)
    diff = beta * (s[:, :, None] - s[:, None, :])                       # β (s_i − s_j)
    z = diff if margin is None else diff - jnp.asarray(margin, dtype)
    if loss == "simpo":
        z = z - jnp.asarray(simpo_gamma, dtype)
    ranked_loss = dpo_pair_loss(z, loss, beta=beta, label_smoothing=label_smoothing)
    tie_loss = dpo_tie_loss(diff, loss, beta=beta)
    out, n_pairs_B, mw = normalised_pair_loss(ranked_loss, tie_loss, ranked, tied,
                                              pair_weights, dtype)
    wmean = lambda x: safe_divide(jnp.sum(x * mw), jnp.sum(mw))
    metrics = {"accuracy": wmean(_win_score(diff)), "reward_margin": wmean(diff),
               "num_pairs": jnp.sum(n_pairs_B),
               "num_prompts": jnp.sum((n_pairs_B > 0).astype(dtype))}
    return out, jax.lax.stop_gradient(metrics)


def plackett_luce_loss(scores_BxK: jax.Array, ranks_BxK: jax.Array, valid_BxK: jax.Array, *,
                       beta: Scalar = 0.1, tie_mode: str = "skip") -> tuple[jax.Array, dict]:
    """K-wise DPO: mean over prompts of the negative log Plackett–Luce likelihood of the ranking
    under u = β s (module docstring). Metrics as `preference_loss` (over the ranked pairs, each
    prompt's pairs weighted 1/N_b) plus num_prompts."""
    dtype = compute_dtype(scores_BxK)
    valid = as_bool_mask(valid_BxK)
    ranked, _ = pair_masks(ranks_BxK, valid, "skip")                   # i strictly above j
    ranks = jnp.where(valid, ranks_BxK, 0)
    u = jnp.where(valid, jnp.asarray(beta, dtype) * upcast(scores_BxK, dtype), 0.0)
    k = u.shape[-1]
    both = valid[:, :, None] & valid[:, None, :]
    if tie_mode == "skip":
        in_set = ranked | (jnp.eye(k, dtype=jnp.bool_)[None] & both)   # R(i): i and below
        has_term = jnp.any(ranked, axis=-1)
    elif tie_mode == "soft":
        in_set = both & (ranks[:, None, :] >= ranks[:, :, None])
        has_term = valid & (jnp.sum(in_set, axis=-1) > 1)
    else:
        raise ValueError(f"tie_mode must be 'skip' or 'soft', got {tie_mode!r}")
    # A large finite negative outside R(i) keeps logsumexp and its gradient finite.
    lse = jax.nn.logsumexp(jnp.where(in_set, u[:, None, :], -1e30), axis=-1)
    terms = jnp.where(has_term, u - lse, 0.0)
    has_prompt = jnp.any(has_term, axis=-1)
    n_prompts = jnp.sum(has_prompt.astype(dtype))
    out = safe_divide(-jnp.sum(terms), n_prompts)
    n_ranked_B = jnp.sum(ranked.astype(dtype), axis=(1, 2))
    mw = jnp.where(ranked, safe_divide(jnp.ones((), dtype), n_ranked_B)[:, None, None], 0.0)
    diff = u[:, :, None] - u[:, None, :]
    wmean = lambda x: safe_divide(jnp.sum(x * mw), jnp.sum(mw))
    metrics = {"accuracy": wmean(_win_score(diff)), "reward_margin": wmean(diff),
               "num_pairs": jnp.sum(n_ranked_B), "num_prompts": n_prompts}
    return out, jax.lax.stop_gradient(metrics)


def ranking_ends(x_BxK: jax.Array, ranks_BxK: jax.Array, valid_BxK: jax.Array):
    """(mean over prompts of x at the best-ranked response, mean at the worst-ranked one,
    number of prompts with two distinct ranks); for "chosen" / "rejected" metrics of rankings
    (ties at the top or bottom: the mean over the tied responses)."""
    dtype = compute_dtype(x_BxK)
    valid = as_bool_mask(valid_BxK)
    big = jnp.iinfo(jnp.int32).max
    best = jnp.min(jnp.where(valid, ranks_BxK, big), axis=-1, keepdims=True)
    worst = jnp.max(jnp.where(valid, ranks_BxK, -1), axis=-1, keepdims=True)
    has = (best[:, 0] < worst[:, 0])
    x = upcast(x_BxK, dtype)

    def end(sel):
        sel = sel & valid & has[:, None]
        per_b = safe_divide(jnp.sum(jnp.where(sel, x, 0.0), -1), jnp.sum(sel.astype(dtype), -1))
        return per_b

    n = jnp.sum(has.astype(dtype))
    return (safe_divide(jnp.sum(end(ranks_BxK == best)), n),
            safe_divide(jnp.sum(end(ranks_BxK == worst)), n), n)
