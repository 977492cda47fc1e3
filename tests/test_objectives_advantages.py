"""GAE against two float64 NumPy references (a TRL-style loop and a compress-the-mask loop)."""
import functools

import chex
import hypothesis.strategies as st
import jax
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings

from jaxrlhf import objectives as obj

B, T = 4, 7


def ref_gae_trl(rewards, values, mask, gamma, lam):
    """TRL / OpenRLHF loop over the whole row with rewards and values zeroed outside the mask."""
    r = np.where(mask, rewards, 0.0).astype(np.float64)
    v = np.where(mask, values, 0.0).astype(np.float64)
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        last = 0.0
        for t in reversed(range(r.shape[1])):
            next_v = v[b, t + 1] if t + 1 < r.shape[1] else 0.0
            delta = r[b, t] + gamma * next_v - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    adv = np.where(mask, adv, 0.0)
    return adv, np.where(mask, adv + v, 0.0)


def ref_gae_compressed(rewards, values, mask, gamma, lam):
    """Runs the textbook recursion on the valid positions only, then scatters back."""
    adv = np.zeros(mask.shape)
    ret = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        idx = np.flatnonzero(mask[b])
        r = rewards[b, idx].astype(np.float64)
        v = values[b, idx].astype(np.float64)
        a = np.zeros(len(idx))
        for k in reversed(range(len(idx))):
            next_v = v[k + 1] if k + 1 < len(idx) else 0.0
            next_a = a[k + 1] if k + 1 < len(idx) else 0.0
            a[k] = r[k] + gamma * next_v - v[k] + gamma * lam * next_a
        adv[b, idx] = a
        ret[b, idx] = a + v
    return adv, ret


def contiguous_mask(rng):
    mask = np.zeros((B, T), bool)
    for b in range(B - 1):                        # the last row stays empty
        start = rng.integers(0, T)
        mask[b, start:rng.integers(start + 1, T + 1)] = True
    return mask


class GAETest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.99, 0.95), (1.0, 1.0), (0.5, 0.0))
    def test_matches_trl_loop_on_contiguous_masks(self, gamma, lam):
        rng = np.random.default_rng(0)
        rewards, values = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
        mask = contiguous_mask(rng)
        adv, ret = self.variant(lambda r, v, m: obj.gae(r, v, m, gamma=gamma, lam=lam))(
            rewards, values, mask.astype(np.float32))
        ref_adv, ref_ret = ref_gae_trl(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(adv[B - 1], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_compressed_reference_with_holes_and_traced_coefficients(self):
        rng = np.random.default_rng(1)
        rewards, values = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
        mask = rng.random((B, T)) < 0.6
        adv, ret = self.variant(lambda r, v, m, g, l: obj.gae(r, v, m, gamma=g, lam=l))(
            rewards, values, mask, np.float32(0.9), np.float32(0.8))
        ref_adv, ref_ret = ref_gae_compressed(rewards, values, mask, 0.9, 0.8)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)

    def test_gamma_lam_one_gives_reward_to_go(self):
        rng = np.random.default_rng(2)
        rewards, values = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
        mask = contiguous_mask(rng)
        adv, ret = obj.gae(rewards, values, mask, gamma=1.0, lam=1.0)
        to_go = np.where(mask, np.cumsum(np.where(mask, rewards, 0)[:, ::-1], 1)[:, ::-1], 0)
        np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(adv, np.where(mask, to_go - values, 0), rtol=1e-5, atol=1e-5)
        mc_adv, mc_ret = obj.registry.get("advantage", "monte_carlo")(
            rewards, values, mask, gamma=1.0, lam=0.3)
        np.testing.assert_allclose(mc_ret, ret, rtol=1e-6)
        np.testing.assert_array_equal(obj.registry.get("advantage", "gae")(
            rewards, values, mask, gamma=1.0, lam=1.0)[0], adv)


# Outside jit a lax.scan with a fresh closure retraces on every call; compile it once.
_gae_jit = jax.jit(functools.partial(obj.gae, gamma=0.95, lam=0.9))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), garbage=st.sampled_from(["noise", "inf", "nan"]))
def test_masked_rewards_and_values_cannot_change_the_result(seed, garbage):
    rng = np.random.default_rng(seed)
    rewards, values = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(2))
    mask = rng.random((B, T)) < 0.6 if seed % 2 else contiguous_mask(rng)
    adv, ret = _gae_jit(rewards, values, mask)
    fill = {"noise": rng.normal(size=(B, T)) * 1e4, "inf": np.inf, "nan": np.nan}[garbage]
    bad = lambda x: np.where(mask, x, fill).astype(np.float32)
    adv2, ret2 = _gae_jit(bad(rewards), bad(values), mask)
    np.testing.assert_array_equal(adv, adv2)
    np.testing.assert_array_equal(ret, ret2)
    np.testing.assert_array_equal(np.asarray(adv)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(ret)[~mask], 0.0)
