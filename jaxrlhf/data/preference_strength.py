"""Preference-strength files (MOSS): strength.jsonl, its plot, and the table that turns it
into per-pair arrays for ranking batches.

strength.jsonl has one row per ranked pair of a ranking dataset,
{index, chosen, rejected, mu, sigma, d: [d_m]}: `index` is the data row, `chosen` / `rejected`
the response slots, μ and σ the ensemble mean and std of d_m = r_m(chosen) − r_m(rejected)
(`jaxrlhf.objectives.preference_strength`). Written by the `rm_ensemble` stage and
`tools/preference_strength.py`; read by the `rm` stage's strength options (`config.rm`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import List, Mapping

import numpy as np

from jaxrlhf import paths
from jaxrlhf.data.batching import ranked_pairs
from jaxrlhf.metrics import save_figure

STRENGTH_FILE = "strength.jsonl"
STRENGTH_PLOT = "strength_hist.png"


def read_strength(path: str) -> list[dict]:
    """Rows of a strength.jsonl: {index, chosen, rejected, mu, sigma, ...}."""
    rows = []
    with paths.open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append({"index": int(r["index"]), "chosen": int(r["chosen"]),
                             "rejected": int(r["rejected"]), "mu": float(r["mu"]),
                             "sigma": float(r.get("sigma", 0.0))})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a strength row ({e}); expected "
                                 "{index, chosen, rejected, mu, sigma}") from e
    if not rows:
        raise ValueError(f"{path} has no strength rows")
    return rows


def write_strength(out_dir: str, rows: List[dict], *, plot: bool = True) -> str:
    """Writes out_dir/strength.jsonl (and the plot); returns the file's path."""
    paths.makedirs(out_dir)
    path = paths.join(out_dir, STRENGTH_FILE)
    paths.write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    if plot:
        plot_strength(paths.join(out_dir, STRENGTH_PLOT), rows)
    return path


def plot_strength(path: str, rows: List[dict], title: str = "Preference strength"):
    """Histograms of μ and σ, and σ against μ; the bottom-20% μ threshold is marked."""
    try:   # a Figure of its own: pyplot's backend is left alone
        from matplotlib.figure import Figure
    except ImportError:
        return None
    mu = np.asarray([r["mu"] for r in rows])
    sigma = np.asarray([r["sigma"] for r in rows])
    q20 = float(np.quantile(mu, 0.2)) if len(mu) else 0.0
    fig = Figure(figsize=(13, 3.6))
    ax = fig.subplots(1, 3)
    ax[0].hist(mu, bins=60, color="tab:blue", alpha=0.85)
    ax[0].axvline(0.0, color="k", lw=1)
    ax[0].axvline(q20, color="tab:red", ls="--", lw=1, label=f"20% quantile {q20:.2f}")
    ax[0].set_xlabel("mean μ of r(chosen) − r(rejected)")
    ax[0].legend(fontsize=8)
    ax[1].hist(sigma, bins=60, color="tab:orange", alpha=0.85)
    ax[1].set_xlabel("std σ over ensemble members")
    ax[2].scatter(mu, sigma, s=3, alpha=0.3)
    ax[2].set_xlabel("μ")
    ax[2].set_ylabel("σ")
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(f"{title} ({len(mu)} pairs)")
    fig.tight_layout()
    return save_figure(fig, path)


@dataclasses.dataclass
class StrengthTable:
    """μ and the flip decision of every pair, as dense [N, K, K] arrays indexed by
    (row index, chosen slot, rejected slot); NaN μ = no strength for that pair. The
    ⌊f·N + ½⌋ pairs with the lowest μ (ties by file order) are flipped for flip_fraction f."""

    mu: np.ndarray
    flip: np.ndarray
    path: str = ""

    @classmethod
    def from_rows(cls, rows, k: int, flip_fraction: float = 0.0, path: str = ""):
        n = max(r["index"] for r in rows) + 1
        mu = np.full((n, k, k), np.nan)
        flip = np.zeros((n, k, k), bool)
        for r in rows:
            if not (0 <= r["chosen"] < k and 0 <= r["rejected"] < k):
                raise ValueError(f"{path}: pair ({r['chosen']}, {r['rejected']}) of row "
                                 f"{r['index']} does not fit K = {k} responses")
            mu[r["index"], r["chosen"], r["rejected"]] = r["mu"]
        if not 0.0 <= flip_fraction <= 1.0:
            raise ValueError(f"rm.flip_fraction must be in [0, 1], got {flip_fraction}")
        n_flip = int(math.floor(flip_fraction * len(rows) + 0.5))
        if n_flip:
            mus = np.asarray([r["mu"] for r in rows])
            for i in np.argsort(mus, kind="stable")[:n_flip]:
                r = rows[int(i)]
                flip[r["index"], r["chosen"], r["rejected"]] = True
        return cls(mu, flip, path)

    def lookup(self, batch: Mapping[str, np.ndarray]):
        """(μ, flip) [B, K, K] of a ranking batch; raises if a ranked pair has no strength."""
        idx = np.asarray(batch["index"]).astype(np.int64)
        ranked = ranked_pairs(np.asarray(batch["ranks"]), np.asarray(batch["valid"]))
        inside = idx < self.mu.shape[0]
        mu = np.where(inside[:, None, None], self.mu[np.minimum(idx, self.mu.shape[0] - 1)],
                      np.nan)
        flip = self.flip[np.minimum(idx, self.mu.shape[0] - 1)] & inside[:, None, None]
        missing = ranked & np.isnan(mu)
        if missing.any():
            b, i, j = (int(x[0]) for x in np.nonzero(missing))
            raise ValueError(
                f"{self.path or 'strength table'} has no strength for data row {int(idx[b])} "
                f"pair (chosen {i}, rejected {j}). The strength file must come from the same "
                "data config (an rm_ensemble stage on this data, or tools/preference_strength.py).")
        return np.nan_to_num(mu), flip
