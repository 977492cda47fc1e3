"""KL estimators and KL-penalised rewards against float64 NumPy loop references."""
import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings

from jaxrlhf import objectives as obj

B, T = 4, 6


def ref_kl(logp, ref_logp, kind):
    lr = logp.astype(np.float64) - ref_logp.astype(np.float64)
    if kind == "k1":
        return lr
    if kind == "k2":
        return lr ** 2 / 2
    lr = np.clip(lr, -20, 20)
    return np.exp(-lr) - 1 + lr


def ref_rewards(score, logp, ref_logp, mask, kl_coef, kind, score_clip):
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        last = None
        for t in range(mask.shape[1]):
            if mask[b, t]:
                out[b, t] = -kl_coef * ref_kl(logp[b, t:t + 1], ref_logp[b, t:t + 1], kind)[0]
                last = t
        if last is not None:
            s = float(score[b])
            if score_clip is not None:
                s = min(max(s, -score_clip), score_clip)
            out[b, last] += s
    return out


def random_response_mask(rng):
    """Left padding (prompt), a contiguous response, right padding; one empty row."""
    mask = np.zeros((B, T), bool)
    for b in range(B - 1):
        start = rng.integers(0, T)
        end = rng.integers(start + 1, T + 1)
        mask[b, start:end] = True
    return mask


class KLTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("k1", "k2", "k3")
    def test_kl_estimate_matches_numpy(self, kind):
        rng = np.random.default_rng(0)
        logp, ref_logp = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
        logp[0, 0], ref_logp[0, 1] = 30.0, 30.0        # beyond the k3 clamp
        got = self.variant(lambda a, b: obj.kl_estimate(a, b, kind))(logp, ref_logp)
        np.testing.assert_allclose(got, ref_kl(logp, ref_logp, kind), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(obj.registry.get("kl", kind)(logp, ref_logp), got)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("k1", None), ("k3", 1.5), ("k2", 0.5))
    def test_kl_penalized_rewards_matches_numpy(self, kind, score_clip):
        rng = np.random.default_rng(1)
        logp, ref_logp = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
        score = (rng.normal(size=(B,)) * 2).astype(np.float32)
        mask = random_response_mask(rng)
        fn = self.variant(lambda s, a, b, m, c: obj.kl_penalized_rewards(
            s, a, b, m, kl_coef=c, kind=kind, score_clip=score_clip))
        rewards, metrics = fn(score, logp, ref_logp, mask.astype(np.float32), 0.1)
        ref = ref_rewards(score, logp, ref_logp, mask, 0.1, kind, score_clip)
        np.testing.assert_allclose(rewards, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rewards[B - 1], 0.0)      # empty row: no score, no NaN
        kl_seq = [ref_kl(logp[b][mask[b]], ref_logp[b][mask[b]], kind).sum() for b in range(B - 1)]
        np.testing.assert_allclose(metrics["kl"], np.mean(kl_seq), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["total_reward"], ref.sum(1)[:B - 1].mean(), rtol=1e-5,
                                   atol=1e-6)

    def test_kl_zero_when_policy_equals_reference(self):
        logp = jnp.asarray(np.random.default_rng(2).normal(size=(B, T)), jnp.float32)
        for kind in ("k1", "k2", "k3"):
            np.testing.assert_array_equal(obj.kl_estimate(logp, logp, kind), 0.0)

    def test_overflow_and_masked_garbage(self):
        rng = np.random.default_rng(3)
        mask = random_response_mask(rng)
        logp = rng.normal(size=(B, T)).astype(np.float32)
        ref_logp = logp.copy()
        ref_logp[mask] += np.where(rng.random(mask.sum()) < 0.5, 1000.0, -1000.0)
        logp_bad = np.where(mask, logp, np.inf).astype(np.float32)
        ref_bad = np.where(mask, ref_logp, -np.inf).astype(np.float32)
        score = rng.normal(size=(B,)).astype(np.float32)
        for kind in ("k1", "k2", "k3"):
            def total(a, b):
                return obj.kl_penalized_rewards(score, a, b, mask, kl_coef=0.1, kind=kind)[0].sum()
            value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(logp_bad, ref_bad)
            self.assertTrue(np.isfinite(float(value)), kind)
            for g in grads:
                g = np.asarray(g)
                self.assertTrue(np.isfinite(g).all(), kind)
                np.testing.assert_array_equal(g[~mask], 0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["k1", "k2", "k3"]))
def test_rewards_ignore_masked_inputs_and_score_sits_at_last_token(seed, kind):
    rng = np.random.default_rng(seed)
    mask = random_response_mask(rng)
    logp, ref_logp = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
    score = rng.normal(size=(B,)).astype(np.float32)
    rewards, _ = obj.kl_penalized_rewards(score, logp, ref_logp, mask, kl_coef=0.2, kind=kind)
    noise = lambda x: np.where(mask, x, rng.normal(size=x.shape) * 1e3).astype(np.float32)
    rewards2, _ = obj.kl_penalized_rewards(score, noise(logp), noise(ref_logp), mask, kl_coef=0.2,
                                           kind=kind)
    np.testing.assert_array_equal(rewards, rewards2)
    # Without the KL term the score is the only reward, at the last valid token of each row.
    only_score, _ = obj.kl_penalized_rewards(score, logp, ref_logp, mask, kl_coef=0.0, kind=kind)
    for b in range(B):
        expected = np.zeros(T, np.float32)
        if mask[b].any():
            expected[np.flatnonzero(mask[b])[-1]] = score[b]
        np.testing.assert_array_equal(only_score[b], expected)
    # k2 and k3 are non-negative.
    if kind != "k1":
        assert (np.asarray(obj.kl_estimate(logp, ref_logp, kind)) >= 0).all()
