"""Preference strength (MOSS, "Secrets of RLHF II"): how strongly an ensemble of M reward
models agrees with each labelled pair, and the per-pair labels it suggests. Host-side NumPy.

For a ranked pair (chosen i, rejected j) and members m = 1..M,

    d_m = r_m(x, y_i) − r_m(x, y_j),   μ = mean_m d_m,   σ = std_m d_m (population, ddof 0)

Low μ (μ < 0, the bottom ~20%) suggests a wrong label, μ near 0 an ambiguous pair.

Per-pair (ε, m) for the generalised Bradley–Terry term of `kwise_ranking_loss`,
ℓ = −[(1 − ε) log σ(Δ) + ε log σ(−Δ)], Δ = r_chosen − r_rejected − m:

  soft labels      ε(μ) = 1 − σ(μ / T): the target P(chosen ≻ rejected) is the ensemble's own
                   Bradley–Terry probability (replaces the constant label smoothing)
  adaptive margin  m(μ) = margin + clip(α·μ, −c, +c)
  flipped pairs    trained as "rejected ≻ chosen" with the (ε, m) the swapped pair (strength −μ)
                   would get; in the un-swapped frame (ε, m) ← (1 − ε(−μ), −m(−μ)), exactly the
                   loss of the pair with its ranks swapped. ε(μ) and m(μ) − margin are odd in μ,
                   so flipping changes nothing for soft labels and the adaptive part of the
                   margin: they follow the ensemble, not the label.
"""
from __future__ import annotations

import numpy as np


def strength_stats(d_MxN):
    """(μ, σ) over the member axis: mean and population std (ddof = 0) of d_m, float64."""
    d = np.asarray(d_MxN, np.float64)
    return d.mean(axis=0), d.std(axis=0)


def pair_labels(mu, flip, *, label_smoothing: float = 0.0, margin: float = 0.0,
                soft_labels: bool = False, soft_label_temperature: float = 1.0,
                adaptive_margin: float = 0.0, adaptive_margin_max: float = 5.0):
    """Per-pair (ε, m) from the strength mean μ and the flip decisions (module docstring);
    float32 arrays of μ's shape."""
    mu = np.asarray(mu, np.float64)

    def eps_of(x):
        if soft_labels:
            return 1.0 - 1.0 / (1.0 + np.exp(-x / soft_label_temperature))
        return np.full_like(x, label_smoothing)

    def margin_of(x):
        m = np.full_like(x, margin)
        if adaptive_margin:
            m = m + np.clip(adaptive_margin * x, -adaptive_margin_max, adaptive_margin_max)
        return m

    eps = np.where(flip, 1.0 - eps_of(-mu), eps_of(mu))
    m = np.where(flip, -margin_of(-mu), margin_of(mu))
    return eps.astype(np.float32), m.astype(np.float32)
