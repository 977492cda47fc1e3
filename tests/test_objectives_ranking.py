"""Reward-model losses against float64 NumPy loop references, plus properties and gradients."""
import itertools
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from jax.test_util import check_grads

from jaxrlhf import objectives as obj

B, K, D = 4, 4, 6


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def ref_pair_loss(delta, eps):
    return -((1 - eps) * log_sigmoid(delta) + eps * log_sigmoid(-delta))


def win(d):
    return 1.0 if d > 0 else (0.5 if d == 0 else 0.0)


def ref_pairwise(rc, rr, margin, eps, w):
    rc, rr = rc.astype(np.float64), rr.astype(np.float64)
    num = den = acc = 0.0
    for i in range(len(rc)):
        d = rc[i] - rr[i]
        num += w[i] * ref_pair_loss(d - margin[i], eps[i])
        acc += w[i] * win(d)
        den += w[i]
    return num / den, acc / den


def ref_kwise(r, ranks, valid, tie_mode, margin, eps, w):
    """Loops over prompts and ordered pairs; returns (loss, accuracy, num_pairs)."""
    r = r.astype(np.float64)
    sum_L = sum_W = 0.0
    acc_num = acc_den = 0.0
    total_pairs = 0
    for b in range(r.shape[0]):
        pairs = []                                   # (loss, weight, ranked?, diff)
        for i, j in itertools.permutations(range(r.shape[1]), 2):
            if not (valid[b, i] and valid[b, j]):
                continue
            d = r[b, i] - r[b, j]
            if ranks[b, i] < ranks[b, j]:
                loss = ref_pair_loss(d - margin[b, i, j], eps[b, i, j])
                pairs.append((loss, w[b, i, j], True, d))
            elif ranks[b, i] == ranks[b, j] and i < j and tie_mode == "soft":
                pairs.append((ref_pair_loss(d, 0.5), w[b, i, j], False, d))
        n = len(pairs)
        total_pairs += n
        if n == 0:
            continue
        sum_L += sum(l * wt for l, wt, _, _ in pairs) / n
        sum_W += sum(wt for _, wt, _, _ in pairs) / n
        for _, wt, ranked, d in pairs:
            if ranked:
                acc_num += wt / n * win(d)
                acc_den += wt / n
    loss = sum_L / sum_W if sum_W else 0.0
    return loss, (acc_num / acc_den if acc_den else 0.0), total_pairs


def random_kwise(rng, ties=True):
    r = rng.normal(size=(B, K)).astype(np.float32) * 2
    ranks = rng.integers(0, K if not ties else K - 1, size=(B, K))
    valid = rng.random((B, K)) < 0.8
    valid[0] = True
    valid[1, 1:] = False                            # one prompt with a single response: no pair
    return r, ranks, valid


class RankingTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_pairwise_matches_numpy(self):
        rng = np.random.default_rng(0)
        rc, rr = (rng.normal(size=(8,)).astype(np.float32) for _ in range(2))
        rr[0] = rc[0]                                 # a reward tie counts 0.5
        margin = rng.random(8).astype(np.float32)
        eps = (rng.random(8) * 0.3).astype(np.float32)
        w = rng.random(8).astype(np.float32)
        w[1] = 0.0
        fn = self.variant(lambda a, b, m, e, ww: obj.pairwise_ranking_loss(
            a, b, margin=m, label_smoothing=e, weights=ww))
        loss, metrics = fn(rc, rr, margin, eps, w)
        ref_loss, ref_acc = ref_pairwise(rc, rr, margin, eps, w)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=1e-5)
        np.testing.assert_allclose(metrics["mean_margin"],
                                   np.sum(w * (rc - rr)) / np.sum(w), rtol=1e-4, atol=1e-6)
        self.assertEqual(float(metrics["num_pairs"]), 7.0)
        # Defaults: plain Bradley–Terry mean.
        loss0, m0 = self.variant(obj.pairwise_ranking_loss)(rc, rr)
        ref0, acc0 = ref_pairwise(rc, rr, np.zeros(8), np.zeros(8), np.ones(8))
        np.testing.assert_allclose(loss0, ref0, rtol=1e-5)
        np.testing.assert_allclose(m0["accuracy"], acc0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pairwise_extremes(self):
        rc = jnp.array([100.0, -100.0, 0.0, 3.0])
        rr = jnp.array([-0.0, 0.0, 0.0, 3.0])
        loss_fn = lambda a, b: obj.pairwise_ranking_loss(a, b, label_smoothing=0.1)[0]
        per_pair = [float(self.variant(obj.pairwise_ranking_loss)(rc[i:i + 1], rr[i:i + 1])[0])
                    for i in range(4)]
        self.assertTrue(np.isfinite(per_pair).all())
        np.testing.assert_allclose(per_pair[0], 0.0, atol=1e-30)
        np.testing.assert_allclose(per_pair[1], 100.0, rtol=1e-6)
        self.assertEqual(per_pair[2], float(np.float32(math.log(2))))
        self.assertEqual(per_pair[3], float(np.float32(math.log(2))))
        grads = jax.grad(loss_fn, argnums=(0, 1))(rc, rr)
        self.assertTrue(all(np.isfinite(np.asarray(g)).all() for g in grads))
        _, metrics = self.variant(obj.pairwise_ranking_loss)(rc, rr)
        np.testing.assert_allclose(metrics["accuracy"], (1 + 0 + 0.5 + 0.5) / 4)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("skip", "soft")
    def test_kwise_matches_numpy(self, tie_mode):
        rng = np.random.default_rng(1)
        r, ranks, valid = random_kwise(rng)
        margin = (rng.random((B, K, K)) * 0.5).astype(np.float32)
        eps = (rng.random((B, K, K)) * 0.2).astype(np.float32)
        w = rng.random((B, K, K)).astype(np.float32) + 0.1
        r_garbage = np.where(valid, r, np.inf).astype(np.float32)   # ignored where invalid
        fn = self.variant(lambda a, rk, v, m, e, ww: obj.kwise_ranking_loss(
            a, rk, v, tie_mode=tie_mode, margin=m, label_smoothing=e, pair_weights=ww))
        loss, metrics = fn(r_garbage, ranks, valid, margin, eps, w)
        ref_loss, ref_acc, ref_n = ref_kwise(r, ranks, valid, tie_mode, margin, eps, w)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=1e-5)
        self.assertEqual(float(metrics["num_pairs"]), ref_n)
        # Unweighted, no margin: the InstructGPT loss with its C(K,2)-style normalisation.
        loss_u, _ = self.variant(
            lambda a, rk, v: obj.kwise_ranking_loss(a, rk, v, tie_mode=tie_mode))(
                r_garbage, ranks, valid)
        zeros = np.zeros((B, K, K))
        np.testing.assert_allclose(
            loss_u, ref_kwise(r, ranks, valid, tie_mode, zeros, zeros, np.ones((B, K, K)))[0],
            rtol=1e-5)

    def test_kwise_instructgpt_normalisation(self):
        # K distinct ranks, all valid: per prompt −1/C(K,2) Σ_{pairs} log σ(r_w − r_l).
        rng = np.random.default_rng(2)
        r = rng.normal(size=(B, K)).astype(np.float32)
        ranks = np.stack([rng.permutation(K) for _ in range(B)])
        loss, metrics = obj.kwise_ranking_loss(r, ranks, np.ones((B, K), bool))
        expected = np.mean([
            -sum(log_sigmoid(float(r[b, i]) - float(r[b, j]))
                 for i in range(K) for j in range(K) if ranks[b, i] < ranks[b, j]) / math.comb(K, 2)
            for b in range(B)])
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        self.assertEqual(float(metrics["num_pairs"]), B * math.comb(K, 2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_kwise_with_k2_equals_pairwise_exactly(self):
        rng = np.random.default_rng(3)
        rc, rr = (rng.normal(size=(B,)).astype(np.float32) for _ in range(2))
        m = rng.random(B).astype(np.float32)
        e = (rng.random(B) * 0.2).astype(np.float32)
        w = rng.random(B).astype(np.float32)

        def to_kxk(x):
            out = np.zeros((B, 2, 2), np.float32)
            out[:, 0, 1] = x
            return out

        pair = self.variant(lambda a, b, mm, ee, ww: obj.pairwise_ranking_loss(
            a, b, margin=mm, label_smoothing=ee, weights=ww))
        kwise = self.variant(lambda r, mm, ee, ww: obj.kwise_ranking_loss(
            r, jnp.array([[0, 1]] * B), jnp.ones((B, 2)), margin=mm, label_smoothing=ee,
            pair_weights=ww))
        lp, mp = pair(rc, rr, m, e, w)
        lk, mk = kwise(np.stack([rc, rr], 1), to_kxk(m), to_kxk(e), to_kxk(w))
        self.assertEqual(float(lp), float(lk))
        self.assertEqual(float(mp["accuracy"]), float(mk["accuracy"]))
        np.testing.assert_allclose(mp["mean_margin"], mk["mean_margin"], rtol=1e-6)
        lp0, _ = obj.pairwise_ranking_loss(rc, rr)
        lk0, _ = obj.kwise_ranking_loss(np.stack([rc, rr], 1), np.array([[0, 1]] * B),
                                        np.ones((B, 2)))
        self.assertEqual(float(lp0), float(lk0))

    def test_kwise_no_pairs_is_zero_and_finite(self):
        r = jnp.array([[1.0, jnp.inf], [2.0, 3.0]])
        loss, metrics = obj.kwise_ranking_loss(r, jnp.array([[0, 1], [0, 0]]),
                                               jnp.array([[1, 0], [1, 1]]))
        self.assertEqual(float(loss), 0.0)
        self.assertEqual(float(metrics["num_pairs"]), 0.0)
        g = jax.jit(jax.grad(lambda x: obj.kwise_ranking_loss(
            x, jnp.array([[0, 1], [0, 1]]), jnp.array([[1, 0], [1, 1]]))[0]))(r)
        self.assertTrue(np.isfinite(np.asarray(g)).all())
        self.assertEqual(float(g[0, 1]), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_contrastive_matches_numpy(self, two_views):
        rng = np.random.default_rng(4)
        zc, zr, zc2, zr2 = (rng.normal(size=(B, D)).astype(np.float32) for _ in range(4))
        mask = np.array([1, 1, 0, 1], bool)
        tau = 0.1
        if two_views:
            fn = lambda a, b, c, d, m: obj.contrastive_loss(
                a, b, temperature=tau, z_chosen_view2_BxD=c, z_rejected_view2_BxD=d, mask_B=m)
            loss, metrics = self.variant(fn)(zc, zr, zc2, zr2, mask)
        else:
            fn = lambda a, b, m: obj.contrastive_loss(a, b, temperature=tau, mask_B=m)
            loss, metrics = self.variant(fn)(zc, zr, mask)
            zc2, zr2 = zc, zr
        d = (zc - zr).astype(np.float64)
        d2 = (zc2 - zr2).astype(np.float64)
        cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        idx = np.flatnonzero(mask)
        losses, hits = [], []
        for i in idx:
            logits = np.array([cos(d[i], d2[j]) / tau for j in idx])
            pos = list(idx).index(i)
            losses.append(-(logits[pos] - np.log(np.exp(logits).sum())))
            hits.append(np.argmax(logits) == pos)
        np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["contrastive_accuracy"], np.mean(hits))

    def test_gradients_float64(self):
        rng = np.random.default_rng(5)
        r, ranks, valid = random_kwise(rng)
        with jax.enable_x64(True):
            rc, rr = jnp.asarray(rng.normal(size=(B,))), jnp.asarray(rng.normal(size=(B,)))
            # jit keeps check_grads' repeated evaluations cheap.
            check = lambda f, args: check_grads(jax.jit(f), args, order=1, modes=["rev"])
            check(lambda a, b: obj.pairwise_ranking_loss(
                a, b, margin=0.3, label_smoothing=0.1, weights=jnp.arange(B) * 1.0)[0], (rc, rr))
            for tie_mode in ("skip", "soft"):
                check(lambda x: obj.kwise_ranking_loss(
                    x, ranks, valid, tie_mode=tie_mode, label_smoothing=0.05)[0],
                    (jnp.asarray(r, jnp.float64),))
            zs = [jnp.asarray(rng.normal(size=(B, D))) for _ in range(4)]
            check(lambda a, b, c, d: obj.contrastive_loss(
                a, b, temperature=0.5, z_chosen_view2_BxD=c, z_rejected_view2_BxD=d)[0],
                tuple(zs))

    def test_contrastive_zero_difference_stays_finite(self):
        z = jnp.ones((B, D))
        loss, grads = jax.jit(jax.value_and_grad(lambda a: obj.contrastive_loss(a, z)[0]))(z)
        self.assertTrue(np.isfinite(float(loss)))
        self.assertTrue(np.isfinite(np.asarray(grads)).all())
        loss, grads = jax.jit(jax.value_and_grad(lambda a: obj.contrastive_loss(
            a, z, mask_B=jnp.zeros((B,)))[0]))(z)
        self.assertEqual(float(loss), 0.0)
        self.assertTrue(np.isfinite(np.asarray(grads)).all())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tie_mode=st.sampled_from(["skip", "soft"]))
def test_kwise_permutation_and_invalid_invariance(seed, tie_mode):
    rng = np.random.default_rng(seed)
    r, ranks, valid = random_kwise(rng)
    loss, metrics = obj.kwise_ranking_loss(r, ranks, valid, tie_mode=tie_mode)
    assert float(loss) >= 0.0
    # Shuffling the K responses of each prompt (with their ranks and validity) changes nothing.
    perm = np.stack([rng.permutation(K) for _ in range(B)])
    take = lambda x: np.take_along_axis(x, perm, axis=1)
    loss_p, metrics_p = obj.kwise_ranking_loss(take(r), take(ranks), take(valid), tie_mode=tie_mode)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
    np.testing.assert_allclose(metrics_p["accuracy"], metrics["accuracy"], rtol=1e-5)
    # Rewards and ranks of invalid responses cannot matter.
    r_bad = np.where(valid, r, rng.normal(size=r.shape) * 1e4).astype(np.float32)
    ranks_bad = np.where(valid, ranks, rng.integers(-5, 5, size=ranks.shape))
    loss_b, _ = obj.kwise_ranking_loss(r_bad, ranks_bad, valid, tie_mode=tie_mode)
    assert float(loss_b) == float(loss)


@settings(max_examples=25, deadline=None)
@given(delta=st.floats(-100, 100), eps=st.floats(0.0, 0.5))
def test_pairwise_label_smoothing_symmetry_and_bounds(delta, eps):
    rc = jnp.array([delta], jnp.float32)
    zero = jnp.zeros((1,), jnp.float32)
    loss, _ = obj.pairwise_ranking_loss(rc, zero, label_smoothing=eps)
    swapped, _ = obj.pairwise_ranking_loss(zero, rc, label_smoothing=1.0 - eps)
    assert np.isfinite(float(loss)) and float(loss) >= 0.0
    # 1 − ε is rounded to float32 (spacing 2^-24 below 1), so the swapped call's effective ε
    # differs by up to 2^-24; the loss moves by |Δ| times that (76 · 6e-8 ≈ 5e-6 at ε = 1e-6).
    np.testing.assert_allclose(loss, swapped, rtol=1e-5, atol=1e-6 + abs(delta) * 2.0**-23)
    np.testing.assert_allclose(loss, ref_pair_loss(float(rc[0]), eps), rtol=1e-5, atol=1e-6)


def ref_center_penalty(r, ranks, valid, tie_mode):
    """Mean over prompts with >= 1 pair of (mean reward of the valid responses)^2, float64."""
    r = r.astype(np.float64)
    vals = []
    for b in range(r.shape[0]):
        idx = [k for k in range(r.shape[1]) if valid[b, k]]
        has_pair = any(ranks[b, i] < ranks[b, j] or (tie_mode == "soft" and i < j
                                                       and ranks[b, i] == ranks[b, j])
                       for i in idx for j in idx if i != j)
        if has_pair:
            vals.append(np.mean(r[b, idx]) ** 2)
    return float(np.mean(vals)) if vals else 0.0


@pytest.mark.parametrize("seed,tie_mode", [(0, "skip"), (1, "soft"), (2, "skip")])
def test_kwise_center_coef_adds_the_centring_penalty(seed, tie_mode):
    rng = np.random.default_rng(seed)
    r, ranks, valid = random_kwise(rng)
    r = r + 3.0                                          # an offset the penalty sees
    base, _ = obj.kwise_ranking_loss(r, ranks, valid, tie_mode=tie_mode)
    c = 0.37
    loss, m = obj.kwise_ranking_loss(r, ranks, valid, tie_mode=tie_mode, center_coef=c)
    want = ref_center_penalty(r, ranks, valid, tie_mode)
    np.testing.assert_allclose(float(m["center_penalty"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base) + c * want, rtol=1e-5)
    # Only the per-prompt mean is pulled: the gradient of the penalty term sums to
    # 2 c r̄_b / n_prompts * (per-response share) and vanishes for centred rewards.
    centred = np.where(valid, r - np.sum(np.where(valid, r, 0), 1, keepdims=True)
                       / np.maximum(valid.sum(1, keepdims=True), 1), 0).astype(np.float32)
    g = jax.grad(lambda x: obj.kwise_ranking_loss(x, ranks, valid, tie_mode=tie_mode,
                                                  center_coef=c)[0]
                 - obj.kwise_ranking_loss(x, ranks, valid, tie_mode=tie_mode)[0])(centred)
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)
