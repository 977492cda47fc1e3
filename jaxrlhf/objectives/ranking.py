"""Reward-model losses: pairwise and K-wise ranking (InstructGPT) and MOSS variants.

The MOSS ("Secrets of RLHF II") techniques are options of the two ranking losses:

* soft labels / label smoothing: `label_smoothing` ε (scalar or per pair) trains towards the
  target P(chosen ≻ rejected) = 1 − ε, i.e. ℓ = −[(1−ε) log σ(Δ) + ε log σ(−Δ)];
* adaptive margin: `margin` m (scalar or per pair), ℓ uses Δ = r_c − r_r − m;
* per-pair weights (e.g. from preference strength, 0 drops a pair);
* `contrastive_loss`: a SimCSE-style InfoNCE term to add to the ranking loss.

All log-sigmoids are `jax.nn.log_sigmoid`, finite for any finite Δ (|Δ| = 100 included), and
Δ = 0 gives exactly log 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.data.batching import ranked_pairs
from jaxrlhf.objectives.stats import as_bool_mask, compute_dtype, safe_divide, upcast

Scalar = float | jax.Array


def _smoothed_logsigmoid_loss(delta: jax.Array, label_smoothing: Scalar) -> jax.Array:
    """ℓ(Δ) = −[(1−ε) log σ(Δ) + ε log σ(−Δ)]; ε = 0 is the plain Bradley–Terry loss."""
    eps = jnp.asarray(label_smoothing, delta.dtype)
    return -((1.0 - eps) * jax.nn.log_sigmoid(delta) + eps * jax.nn.log_sigmoid(-delta))


def _win_score(diff: jax.Array) -> jax.Array:
    """1 if diff > 0, 0.5 if diff == 0 (a tie counts half), 0 otherwise."""
    return jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(diff.dtype)


def pair_masks(ranks_BxK: jax.Array, valid_BxK: jax.Array, tie_mode: str):
    """([B, K, K] ranked pairs (i above j), [B, K, K] tie pairs (equal ranks, i < j; all False
    under tie_mode="skip")) of a ranking batch."""
    if tie_mode not in ("skip", "soft"):
        raise ValueError(f"tie_mode must be 'skip' or 'soft', got {tie_mode!r}")
    valid = as_bool_mask(valid_BxK)
    ranks = jnp.where(valid, ranks_BxK, 0)
    k = ranks.shape[-1]
    ranked = ranked_pairs(ranks, valid)
    upper = jnp.triu(jnp.ones((k, k), jnp.bool_), k=1)[None]
    tied = (valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] == ranks[:, None, :])
            & upper)
    if tie_mode == "skip":
        tied = jnp.zeros_like(tied)
    return ranked, tied


def normalised_pair_loss(ranked_loss: jax.Array, tie_loss: jax.Array, ranked: jax.Array,
                         tied: jax.Array, pair_weights: jax.Array | None, dtype):
    """The K-wise normalisation of per-pair losses [B, K, K] (`kwise_ranking_loss`):
    Σ_b L_b / Σ_b W_b with L_b, W_b the weighted pair loss and weight sums over N_b pairs.
    Returns (loss, N_b [B], metric weights [B, K, K]: w_bij / N_b on ranked pairs, else 0)."""
    is_pair = ranked | tied
    per_pair = jnp.where(ranked, ranked_loss, jnp.where(tied, tie_loss, 0.0))
    w = jnp.ones(ranked.shape, dtype) if pair_weights is None else upcast(pair_weights, dtype)
    w = jnp.where(is_pair, w, 0.0)
    n_pairs_B = jnp.sum(is_pair.astype(dtype), axis=(1, 2))
    L_B = safe_divide(jnp.sum(jnp.where(is_pair, per_pair * w, 0.0), axis=(1, 2)), n_pairs_B)
    W_B = safe_divide(jnp.sum(w, axis=(1, 2)), n_pairs_B)
    loss = safe_divide(jnp.sum(L_B), jnp.sum(W_B))
    mw = jnp.where(ranked, safe_divide(w, n_pairs_B[:, None, None]), 0.0)
    return loss, n_pairs_B, mw


def pairwise_ranking_loss(r_chosen_B: jax.Array, r_rejected_B: jax.Array, *,
                          margin: Scalar | None = None, label_smoothing: Scalar = 0.0,
                          weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Bradley–Terry pairwise loss with optional margin, label smoothing and pair weights.

      Δ_i   = r_chosen,i − r_rejected,i − m_i
      ℓ_i   = −[(1 − ε_i) log σ(Δ_i) + ε_i log σ(−Δ_i)]
      loss  = Σ_i w_i ℓ_i / Σ_i w_i                    (0 if Σ w = 0)

    Args:
      r_chosen_B, r_rejected_B: rewards of the preferred and the other response.
      margin: m, scalar or B (MOSS adaptive margin); None = 0.
      label_smoothing: ε, scalar or B; a soft label p = P(chosen ≻ rejected) is ε = 1 − p.
      weights: w_B ≥ 0 (None = all 1). Metrics use the same weights.

    Returns: (loss, metrics) with metrics
      accuracy: weighted fraction with r_chosen > r_rejected (reward ties count 0.5; the margin
        is not part of it); mean_margin: weighted mean of r_chosen − r_rejected;
      chosen_reward_mean, rejected_reward_mean; num_pairs = Σ_i [w_i > 0].
    """
    dtype = compute_dtype(r_chosen_B, r_rejected_B)
    rc, rr = upcast(r_chosen_B, dtype), upcast(r_rejected_B, dtype)
    diff = rc - rr
    delta = diff if margin is None else diff - jnp.asarray(margin, dtype)
    per_pair = _smoothed_logsigmoid_loss(delta, label_smoothing)
    w = jnp.ones_like(diff) if weights is None else upcast(weights, dtype)
    w_sum = jnp.sum(w)
    wmean = lambda x: safe_divide(jnp.sum(jnp.where(w != 0, x, 0.0) * w), w_sum)
    loss = wmean(per_pair)
    metrics = {
        "loss": loss,
        "accuracy": wmean(_win_score(diff)),
        "mean_margin": wmean(diff),
        "chosen_reward_mean": wmean(rc),
        "rejected_reward_mean": wmean(rr),
        "num_pairs": jnp.sum((w > 0).astype(dtype)),
    }
    return loss, jax.lax.stop_gradient(metrics)


def kwise_ranking_loss(rewards_BxK: jax.Array, ranks_BxK: jax.Array, valid_BxK: jax.Array, *,
                       tie_mode: str = "skip", margin: Scalar | None = None,
                       label_smoothing: Scalar = 0.0,
                       pair_weights: jax.Array | None = None,
                       center_coef: Scalar = 0.0) -> tuple[jax.Array, dict]:
    """InstructGPT K-wise ranking loss, all pairs of a prompt from one set of K rewards.

    A pair (i, j) of prompt b exists when both responses are valid and rank_i < rank_j (rank 0
    is the best; equal ranks are a tie). With Δ_bij = r_bi − r_bj − m_bij:

      ℓ_bij = −[(1 − ε_bij) log σ(Δ_bij) + ε_bij log σ(−Δ_bij)]
      L_b   = Σ_{pairs} w_bij ℓ_bij / N_b,   W_b = Σ_{pairs} w_bij / N_b,   N_b = #pairs of b
      loss  = Σ_b L_b / Σ_b W_b                           (0 if there are no pairs at all)

    For K valid responses without ties N_b = C(K, 2), InstructGPT's normalisation; with unit
    weights W_b = 1, so loss = mean over prompts that have ≥1 pair of their mean pair loss.
    K = 2 reduces exactly to `pairwise_ranking_loss` (including its weights). Variable K per
    prompt: mark missing responses invalid (their rewards/ranks are ignored, even if inf).

    Centring in the weights (center_coef = c > 0; TRL's center_rewards_coefficient for K = 2,
    up to its factor 4): with r̄_b the mean reward of prompt b's valid responses,

      loss += c · Σ_{b with ≥1 pair} r̄_b² / #{b with ≥1 pair}

    which pulls each prompt's mean reward to 0 without touching the differences the ranking
    term sees, so the model needs no post-hoc bias (Hugging Face score heads have none).

    Ties: tie_mode="skip" (default) makes no pair from equal ranks; tie_mode="soft" adds one
    pair per tied (i < j) with the soft label 0.5 (ℓ = −½[log σ(Δ) + log σ(−Δ)]; margin and
    label smoothing do not apply to it, it counts in N_b, and its weight is pair_weights[b,i,j]).

    Args:
      rewards_BxK: rewards of the K responses per prompt (one forward pass).
      ranks_BxK: integer ranks, 0 = best.
      valid_BxK: which responses exist (bool or 0/1).
      tie_mode: "skip" or "soft".
      margin: scalar or BxKxK, margin[b, i, j] used when i ranks above j; None = 0.
      label_smoothing: scalar or BxKxK ε of the pair (i above j).
      pair_weights: BxKxK weights of the pair (i above j); None = 1.
      center_coef: weight c of the centring term (0 = off).

    Returns: (loss, metrics) with metrics
      accuracy: over ranked (non-tie) pairs, weighted like the loss, of [r_w > r_l] (reward ties
        0.5); mean_margin: same weighting of r_w − r_l; num_pairs: Σ_b N_b (tie pairs
        included in "soft" mode); num_prompts: prompts with ≥ 1 pair; center_penalty: the
        mean of r̄_b² over those prompts (reported whatever center_coef is).
    """
    dtype = compute_dtype(rewards_BxK)
    valid = as_bool_mask(valid_BxK)
    r = jnp.where(valid, upcast(rewards_BxK, dtype), 0.0)
    ranked, tied = pair_masks(ranks_BxK, valid, tie_mode)
    diff = r[:, :, None] - r[:, None, :]                                     # r_i − r_j
    delta = diff if margin is None else diff - jnp.asarray(margin, dtype)
    ranked_loss = _smoothed_logsigmoid_loss(delta, label_smoothing)
    tie_loss = _smoothed_logsigmoid_loss(diff, 0.5)
    loss, n_pairs_B, mw = normalised_pair_loss(ranked_loss, tie_loss, ranked, tied,
                                               pair_weights, dtype)
    has_pair_B = n_pairs_B > 0
    n_valid_B = jnp.sum(valid.astype(dtype), axis=-1)
    mean_r_B = safe_divide(jnp.sum(r, axis=-1), n_valid_B)
    center_penalty = safe_divide(jnp.sum(jnp.where(has_pair_B, jnp.square(mean_r_B), 0.0)),
                                 jnp.sum(has_pair_B.astype(dtype)))
    loss = loss + jnp.asarray(center_coef, dtype) * center_penalty

    wmean = lambda x: safe_divide(jnp.sum(x * mw), jnp.sum(mw))
    metrics = {
        "loss": loss,
        "accuracy": wmean(_win_score(diff)),
        "mean_margin": wmean(diff),
        "num_pairs": jnp.sum(n_pairs_B),
        "num_prompts": jnp.sum((n_pairs_B > 0).astype(dtype)),
        "center_penalty": center_penalty,
    }
    return loss, jax.lax.stop_gradient(metrics)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ‖x‖ with a gradient that stays finite at x = 0."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def contrastive_loss(z_chosen_BxD: jax.Array, z_rejected_BxD: jax.Array, *,
                     temperature: Scalar = 0.05,
                     z_chosen_view2_BxD: jax.Array | None = None,
                     z_rejected_view2_BxD: jax.Array | None = None,
                     mask_B: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """SimCSE-style InfoNCE over preference-pair difference representations (MOSS §contrastive).

    Each pair is represented by the difference of its responses' representations (e.g. the
    reward model's last-token hidden states), d_i = z_chosen,i − z_rejected,i, and by a second
    view d'_i of the same pair (z_*_view2: a second forward pass with different dropout, as in
    unsupervised SimCSE). The positive of d_i is d'_i; the other pairs of the batch are the
    negatives. With s(a, b) the cosine similarity and τ the temperature:

      ℓ_i  = −log [ exp(s(d_i, d'_i)/τ) / Σ_{j valid} exp(s(d_i, d'_j)/τ) ]
      loss = mean over valid i

    Without a second view (deterministic forward pass) d' = d: the positive similarity is the
    constant 1/τ and the loss only spreads different pairs' differences apart (the uniformity
    part of InfoNCE). Add it to the ranking loss with a coefficient chosen by the caller.

    Args:
      z_chosen_BxD, z_rejected_BxD: representations of the chosen / rejected responses.
      temperature: τ (SimCSE's 0.05).
      z_chosen_view2_BxD, z_rejected_view2_BxD: the second view (both or neither).
      mask_B: which pairs exist (None = all); invalid rows are neither anchors nor negatives.

    Returns: (loss, metrics) with contrastive_loss and contrastive_accuracy (fraction of anchors
    whose positive is the most similar candidate).
    """
    dtype = compute_dtype(z_chosen_BxD, z_rejected_BxD)
    d = upcast(z_chosen_BxD, dtype) - upcast(z_rejected_BxD, dtype)
    if (z_chosen_view2_BxD is None) != (z_rejected_view2_BxD is None):
        raise ValueError("give both z_chosen_view2_BxD and z_rejected_view2_BxD, or neither")
    if z_chosen_view2_BxD is None:
        d2 = d
    else:
        d2 = upcast(z_chosen_view2_BxD, dtype) - upcast(z_rejected_view2_BxD, dtype)
    B = d.shape[0]
    valid = jnp.ones((B,), jnp.bool_) if mask_B is None else as_bool_mask(mask_B)
    d = jnp.where(valid[:, None], d, 0.0)
    d2 = jnp.where(valid[:, None], d2, 0.0)
    sim_BxB = (_l2_normalize(d) @ _l2_normalize(d2).T) / temperature
    # A large finite negative (not −inf) for missing candidates: an all-invalid batch then
    # gives a finite log-softmax and gradient instead of NaN.
    logits_BxB = jnp.where(valid[None, :], sim_BxB, -1e9)
    logp_BxB = jax.nn.log_softmax(logits_BxB, axis=-1)
    per_anchor = -jnp.diagonal(jnp.where(valid[:, None] & valid[None, :], logp_BxB, 0.0))
    n = jnp.sum(valid.astype(dtype))
    loss = safe_divide(jnp.sum(jnp.where(valid, per_anchor, 0.0)), n)
    hit = jnp.argmax(logits_BxB, axis=-1) == jnp.arange(B)
    metrics = {
        "contrastive_loss": loss,
        "contrastive_accuracy": safe_divide(jnp.sum((hit & valid).astype(dtype)), n),
    }
    return loss, jax.lax.stop_gradient(metrics)


def pair_contrastive_loss(h_BxKxD: jax.Array, ranked_BxKxK: jax.Array, keys_B: jax.Array, *,
                          temperature: Scalar, dropout: float) -> tuple[jax.Array, dict]:
    """`contrastive_loss` over the ranked pairs (i above j) of K responses per prompt, each
    pair represented by h_i − h_j (e.g. reward-model hidden states at the last real token).
    The two views are feature dropout (rate `dropout`, inverted scaling, one key per row
    drawing both views' masks) of h; dropout = 0 makes the views coincide."""
    b, k, d = h_BxKxD.shape
    if dropout > 0.0:
        keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - dropout, (2, k, d)))(
            keys_B)                                                      # [B, 2, K, D]
        hv = jnp.where(keep, h_BxKxD[:, None] / (1.0 - dropout), 0.0)
        v1, v2 = hv[:, 0], hv[:, 1]
    else:
        v1 = v2 = h_BxKxD
    full = (b, k, k, d)
    chosen = lambda v: jnp.broadcast_to(v[:, :, None, :], full).reshape(-1, d)
    rejected = lambda v: jnp.broadcast_to(v[:, None, :, :], full).reshape(-1, d)
    return contrastive_loss(chosen(v1), rejected(v1), temperature=temperature,
                            z_chosen_view2_BxD=chosen(v2), z_rejected_view2_BxD=rejected(v2),
                            mask_B=ranked_BxKxK.reshape(-1))
