"""Critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++), DAPO's clip-higher, overlong
shaping and dynamic-sampling mask, and the Dr. GRPO aggregation, against float64 NumPy loop
references."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrlhf import objectives as obj

K, G, T = 4, 3, 6          # samples per prompt, prompts, response length
B = K * G


def ref_seq_scores(score, name, k):
    """Per-sequence baselined score of each estimator, by explicit loops."""
    out = np.zeros(len(score))
    for g in range(len(score) // k):
        grp = [float(x) for x in score[g * k:(g + 1) * k]]
        mean = sum(grp) / k
        std = np.sqrt(sum((x - mean) ** 2 for x in grp) / (k - 1))
        for i, r in enumerate(grp):
            others = grp[:i] + grp[i + 1:]
            out[g * k + i] = {"grpo": (r - mean) / (std + 1e-6),
                              "dr_grpo": r - mean,
                              "rloo": r - sum(others) / (k - 1),
                              "reinforce_pp": r,
                              "reinforce_pp_baseline": r - mean}[name]
    return out


def ref_advantages(score, kl, mask, name, k, beta):
    seq = ref_seq_scores(score, name, k)
    adv = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        idx = np.flatnonzero(mask[b])
        for j, t in enumerate(idx):
            later = idx[j:]
            adv[b, t] = sum(-beta * float(kl[b, s]) for s in later) + seq[b]
    if name.startswith("reinforce_pp"):
        vals = adv[mask]
        mean = vals.mean()
        std = np.sqrt(((vals - mean) ** 2).sum() / (len(vals) - 1))
        adv = np.where(mask, (adv - mean) / (std + 1e-6), 0.0)
    return adv


def inputs(seed):
    rng = np.random.default_rng(seed)
    score = rng.normal(size=B)
    score[:K] = 0.5                      # a group of equal scores
    kl = rng.normal(size=(B, T)) * 0.3
    kl[~np.ones((B, T), bool)] = 0
    mask = np.zeros((B, T), bool)
    for b in range(B):
        mask[b, :rng.integers(1, T + 1)] = True
    mask[5] = False                      # a row without tokens
    kl[~mask] = np.inf                   # garbage at masked positions changes nothing
    return score, kl, mask


class EstimatorTest(chex.TestCase):

    @parameterized.product(name=("grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"), beta=(0.0, 0.1))
    def test_matches_numpy_float64(self, name, beta):
        score, kl, mask = inputs(0)
        fn = obj.registry.get("outcome_advantage", name)
        with jax.enable_x64(True):
            got = fn(jnp.asarray(score), jnp.asarray(kl), jnp.asarray(mask), group_size=K,
                     kl_coef=beta, eps=1e-6)
            assert got.dtype == jnp.float64
        want = ref_advantages(score, np.where(mask, kl, 0.0), mask, name, K, beta)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)

    def test_float32_matches_float64_reference(self):
        score, kl, mask = inputs(1)
        got = jax.jit(lambda s, k_, m: obj.grpo_advantages(s, k_, m, group_size=K,
                                                           kl_coef=0.05))(
            score.astype(np.float32), kl.astype(np.float32), mask)
        want = ref_advantages(score, np.where(mask, kl, 0.0), mask, "grpo", K, 0.05)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)

    def test_rloo_is_rescaled_dr_grpo(self):
        score, kl, mask = (x.astype(np.float32) if x.dtype == np.float64 else x
                           for x in inputs(2))
        a = obj.rloo_advantages(score, kl, mask, group_size=K)
        b = obj.dr_grpo_advantages(score, kl, mask, group_size=K)
        np.testing.assert_allclose(a, b * K / (K - 1), rtol=1e-5, atol=1e-6)

    def test_equal_group_has_zero_advantage_and_every_token_the_sequence_value(self):
        score, kl, mask = inputs(3)
        score, kl = score.astype(np.float32), kl.astype(np.float32)
        adv = np.asarray(obj.grpo_advantages(score, kl, mask, group_size=K))
        assert np.all(adv[:K] == 0.0)
        for b in range(K, B):
            vals = adv[b][mask[b]]
            if len(vals):
                np.testing.assert_allclose(vals, vals[0], rtol=1e-6)
        assert np.all(adv[~mask] == 0.0)

    def test_reinforce_pp_is_normalised_over_valid_tokens(self):
        score, kl, mask = inputs(4)
        score, kl = score.astype(np.float32), kl.astype(np.float32)
        adv = np.asarray(obj.reinforce_pp_advantages(score, kl, mask, kl_coef=0.1),
                         np.float64)
        vals = adv[mask]
        assert abs(vals.mean()) < 1e-5 and abs(vals.std(ddof=1) - 1.0) < 1e-4

    def test_ragged_batch_raises(self):
        with pytest.raises(ValueError, match="groups of 4"):
            obj.grpo_advantages(np.zeros(6), np.zeros((6, 2)), np.ones((6, 2)), group_size=4)


def test_uniform_groups_and_group_stats():
    score = np.array([1., 1., 1., 1., 0., 1., 0., 1., 2., 2., 2., 2.001])
    np.testing.assert_array_equal(obj.uniform_groups(score, 4),
                                  [True] * 4 + [False] * 4 + [False] * 4)
    np.testing.assert_allclose(obj.group_mean(score, 4)[4:8], 0.5)
    np.testing.assert_allclose(obj.group_std(score, 4)[4:8], np.std([0, 1, 0, 1], ddof=1),
                               rtol=1e-6)


def test_overlong_penalty_matches_the_piecewise_rule():
    max_len, buf = 16, 4
    lengths = np.arange(0, 20)

    def ref(n):
        if n <= max_len - buf:
            return 0.0
        if n <= max_len:
            return 0.5 * ((max_len - buf) - n) / buf
        return -0.5
    np.testing.assert_allclose(obj.overlong_penalty(lengths, max_len, buf, 0.5),
                               [ref(n) for n in lengths], rtol=1e-6)


def test_seq_sum_norm_divides_by_sequences_times_length():
    rng = np.random.default_rng(0)
    loss = rng.normal(size=(5, 7))
    mask = rng.random((5, 7)) < 0.6
    mask[2] = False
    n_seq = mask.any(-1).sum()
    want = (loss * mask).sum() / (n_seq * 7)
    np.testing.assert_allclose(obj.aggregate(loss, mask, "seq_sum_norm"), want, rtol=1e-6)
    # Micro-batches with the global denominator sum to the full-batch loss.
    d = obj.aggregation_denominators(mask)
    parts = sum(float(obj.aggregate(loss[s], mask[s], "seq_sum_norm", **d))
                for s in (slice(0, 2), slice(2, 5)))
    np.testing.assert_allclose(parts, want, rtol=1e-6)


def test_clip_higher_matches_numpy():
    rng = np.random.default_rng(0)
    old = -rng.random((3, 5)) * 2
    logp = old + rng.normal(size=(3, 5)) * 0.4
    adv = rng.normal(size=(3, 5))
    mask = np.ones((3, 5), bool)
    lo, hi = 0.2, 0.28
    rho = np.exp(logp - old)
    per = np.maximum(-adv * rho, -adv * np.clip(rho, 1 - lo, 1 + hi))
    loss, m = obj.ppo_policy_loss(logp.astype(np.float32), old.astype(np.float32),
                                  adv.astype(np.float32), mask, clip_eps=lo,
                                  clip_eps_high=hi)
    np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
    sym, _ = obj.ppo_policy_loss(logp, old, adv, mask, clip_eps=lo)
    assert float(sym) != float(loss)   # the high clip is in effect on these inputs
