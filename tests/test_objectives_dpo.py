"""DPO-family losses against float64 NumPy loop references, plus their defining properties."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrlhf import objectives as obj
from jaxrlhf.objectives import dpo

B, K = 5, 4


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def ref_pair(z, loss, beta, eps):
    if loss in ("sigmoid", "simpo"):
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    if loss == "robust":
        return (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    return (z - (0.5 - eps)) ** 2 / beta ** 2


def ref_tie(z, loss, beta):
    if loss == "ipo":
        return z ** 2 / beta ** 2
    return -0.5 * (log_sigmoid(z) + log_sigmoid(-z))


def ref_preference(s, ranks, valid, *, loss, beta, eps, margin, gamma, tie_mode, w):
    """Loops over prompts and ordered pairs; (loss, accuracy, reward margin)."""
    s = s.astype(np.float64)
    sum_l = sum_w = acc_n = acc_d = mar_n = 0.0
    for b in range(s.shape[0]):
        pairs = []
        for i, j in itertools.permutations(range(s.shape[1]), 2):
            if not (valid[b, i] and valid[b, j]):
                continue
            d = beta * (s[b, i] - s[b, j])
            if ranks[b, i] < ranks[b, j]:
                z = d - margin[b, i, j] - (gamma if loss == "simpo" else 0.0)
                pairs.append((ref_pair(z, loss, beta, eps[b, i, j]), w[b, i, j], True, d))
            elif ranks[b, i] == ranks[b, j] and i < j and tie_mode == "soft":
                pairs.append((ref_tie(d, loss, beta), w[b, i, j], False, d))
        n = len(pairs)
        if not n:
            continue
        sum_l += sum(l * wt for l, wt, _, _ in pairs) / n
        sum_w += sum(wt for _, wt, _, _ in pairs) / n
        for _, wt, is_ranked, d in pairs:
            if is_ranked:
                acc_n += wt / n * (1.0 if d > 0 else 0.5 if d == 0 else 0.0)
                mar_n += wt / n * d
                acc_d += wt / n
    return sum_l / sum_w, acc_n / acc_d, mar_n / acc_d


def ref_plackett_luce(s, ranks, valid, *, beta, tie_mode):
    u = beta * s.astype(np.float64)
    total, n = 0.0, 0
    for b in range(u.shape[0]):
        idx = [i for i in range(u.shape[1]) if valid[b, i]]
        nll, terms = 0.0, 0
        for i in idx:
            if tie_mode == "skip":
                below = [j for j in idx if ranks[b, j] > ranks[b, i]]
                if not below:
                    continue
                group = [i] + below
            else:
                group = [j for j in idx if ranks[b, j] >= ranks[b, i]]
                if len(group) < 2:
                    continue
            nll -= u[b, i] - np.log(np.sum(np.exp(u[b, group])))
            terms += 1
        if terms:
            total += nll
            n += 1
    return total / n


def random_case(seed, ties=True):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, K)) * 3
    ranks = np.stack([rng.permutation(K) for _ in range(B)])
    if ties:
        ranks[0, :2] = 1                     # a tie inside a ranking
        ranks[1] = [0, 0, 0, 0]              # all tied: no ranked pair
    valid = np.ones((B, K), bool)
    valid[2, 3] = False                      # a missing response (its score is ignored)
    s[2, 3] = np.inf
    valid[3, 2:] = False                     # a pair
    ranks = np.where(valid, ranks, -1)
    eps = rng.uniform(0, 0.3, (B, K, K))
    margin = rng.normal(size=(B, K, K))
    w = rng.uniform(0.2, 2.0, (B, K, K))
    return s, ranks, valid, eps, margin, w


@pytest.mark.parametrize("loss", dpo.DPO_LOSSES)
@pytest.mark.parametrize("tie_mode", ["skip", "soft"])
def test_preference_loss_matches_numpy(loss, tie_mode):
    s, ranks, valid, eps, margin, w = random_case(0)
    beta, gamma = 0.7, 0.4
    got, m = dpo.preference_loss(jnp.asarray(s, jnp.float32), ranks, valid, loss=loss,
                                 beta=beta, label_smoothing=jnp.asarray(eps),
                                 margin=jnp.asarray(margin), simpo_gamma=gamma,
                                 tie_mode=tie_mode, pair_weights=jnp.asarray(w))
    want, acc, mar = ref_preference(np.where(valid, s, 0.0), ranks, valid, loss=loss,
                                    beta=beta, eps=eps, margin=margin, gamma=gamma,
                                    tie_mode=tie_mode, w=w)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    np.testing.assert_allclose(float(m["accuracy"]), acc, rtol=1e-5)
    np.testing.assert_allclose(float(m["reward_margin"]), mar, rtol=1e-4, atol=1e-5)
    assert np.isfinite(float(got))


def test_sigmoid_dpo_is_the_reward_models_ranking_loss_on_implicit_rewards():
    s, ranks, valid, eps, margin, w = random_case(1)
    beta = 0.3
    s = np.where(valid, s, 0.0)
    got, _ = dpo.preference_loss(s, ranks, valid, beta=beta, label_smoothing=jnp.asarray(eps),
                                 margin=jnp.asarray(margin), tie_mode="soft",
                                 pair_weights=jnp.asarray(w))
    want, _ = obj.kwise_ranking_loss(beta * s, ranks, valid, tie_mode="soft",
                                     margin=jnp.asarray(margin),
                                     label_smoothing=jnp.asarray(eps),
                                     pair_weights=jnp.asarray(w))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_pairwise_dpo_closed_form():
    """K = 2: −log σ(β[(logπ_w − logπ_ref,w) − (logπ_l − logπ_ref,l)]), averaged."""
    rng = np.random.default_rng(2)
    pw, pl, rw, rl = (rng.normal(size=8) * 5 for _ in range(4))
    s = np.stack([pw - rw, pl - rl], 1)
    ranks = np.tile([0, 1], (8, 1))
    beta = 0.1
    got, m = dpo.preference_loss(s, ranks, np.ones((8, 2)), beta=beta)
    want = np.mean(-log_sigmoid(beta * ((pw - rw) - (pl - rl))))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean((pw - rw) > (pl - rl)))
    # IPO: (h − 1/(2β))²
    got, _ = dpo.preference_loss(s, ranks, np.ones((8, 2)), loss="ipo", beta=beta)
    np.testing.assert_allclose(float(got), np.mean((s[:, 0] - s[:, 1] - 1 / (2 * beta)) ** 2),
                               rtol=1e-5)


def test_robust_dpo_is_unbiased_under_label_flips():
    """E over a flip with probability ε of the robust loss = the clean sigmoid loss."""
    z = np.linspace(-6, 6, 25)
    for eps in (0.0, 0.1, 0.3):
        rob = lambda x: dpo.dpo_pair_loss(jnp.asarray(x), "robust", beta=1.0,
                                          label_smoothing=eps)
        expected = (1 - eps) * np.asarray(rob(z)) + eps * np.asarray(rob(-z))
        np.testing.assert_allclose(expected, -log_sigmoid(z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie_mode", ["skip", "soft"])
def test_plackett_luce_matches_numpy(tie_mode):
    s, ranks, valid, *_ = random_case(3)
    got, m = dpo.plackett_luce_loss(jnp.asarray(s, jnp.float32), ranks, valid, beta=0.8,
                                    tie_mode=tie_mode)
    want = ref_plackett_luce(np.where(valid, s, 0.0), ranks, valid, beta=0.8,
                             tie_mode=tie_mode)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    _, pm = dpo.preference_loss(jnp.asarray(s, jnp.float32), ranks, valid, beta=0.8)
    np.testing.assert_allclose(float(m["accuracy"]), float(pm["accuracy"]), rtol=1e-6)


def test_plackett_luce_with_two_responses_is_dpo():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(6, 2)) * 4
    ranks = np.stack([rng.permutation(2) for _ in range(6)])
    pl, _ = dpo.plackett_luce_loss(s, ranks, np.ones((6, 2)), beta=0.5)
    pairs, _ = dpo.preference_loss(s, ranks, np.ones((6, 2)), beta=0.5)
    np.testing.assert_allclose(float(pl), float(pairs), rtol=1e-6)
    # an all-tied pair under "soft": −log σ(Δ) − log σ(−Δ), twice the soft tie term
    tie, _ = dpo.plackett_luce_loss(s[:1], np.zeros((1, 2)), np.ones((1, 2)), beta=0.5,
                                    tie_mode="soft")
    d = 0.5 * (s[0, 0] - s[0, 1])
    np.testing.assert_allclose(float(tie), -log_sigmoid(d) - log_sigmoid(-d), rtol=1e-6)


def test_plackett_luce_properties_and_gradient():
    s, ranks, valid, *_ = random_case(5, ties=False)
    s = np.where(valid, s, 0.0)
    f = lambda x: dpo.plackett_luce_loss(x, ranks, valid, beta=0.5)[0]
    base = float(f(jnp.asarray(s)))
    # shift invariance per prompt (only differences of implicit rewards matter)
    np.testing.assert_allclose(float(f(jnp.asarray(s + np.arange(B)[:, None] * 7.0))), base,
                               rtol=1e-5)
    # the right order is a lower loss than the reversed one
    ordered = np.where(valid, -ranks.astype(np.float64) * 10, 0.0)
    assert float(f(jnp.asarray(ordered))) < float(f(jnp.asarray(-ordered)))
    check_grads(f, (jnp.asarray(s, jnp.float64) if jax.config.jax_enable_x64
                    else jnp.asarray(s, jnp.float32),), order=1, modes=["rev"], atol=2e-2,
                rtol=2e-2)
    # finite loss and gradient at extreme implicit rewards
    g = jax.grad(f)(jnp.asarray(s * 1e4, jnp.float32))
    assert np.isfinite(float(f(jnp.asarray(s * 1e4, jnp.float32)))) and np.isfinite(g).all()


def test_preference_loss_has_no_gradient_from_missing_or_tied_skip():
    s, ranks, valid, *_ = random_case(6)
    s = np.where(valid, s, 0.0)
    g = jax.grad(lambda x: dpo.preference_loss(x, ranks, valid, beta=0.5)[0])(
        jnp.asarray(s, jnp.float32))
    assert np.all(np.asarray(g)[~valid] == 0)
    assert np.all(np.asarray(g)[1] == 0)           # the all-tied prompt


def test_ranking_ends():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    ranks = np.array([[2, 0, 1], [0, 0, 1], [0, 0, 0]])
    valid = np.ones((3, 3), bool)
    best, worst, n = dpo.ranking_ends(x, ranks, valid)
    assert float(n) == 2
    np.testing.assert_allclose(float(best), (2.0 + 4.5) / 2)
    np.testing.assert_allclose(float(worst), (1.0 + 6.0) / 2)


def test_invalid_names():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo.preference_loss(np.zeros((1, 2)), np.array([[0, 1]]), np.ones((1, 2)), loss="x")
    with pytest.raises(ValueError, match="tie_mode"):
        dpo.plackett_luce_loss(np.zeros((1, 2)), np.array([[0, 1]]), np.ones((1, 2)),
                               tie_mode="x")
