"""KL controllers, running reward moments and the registry: pytree state + pure updates."""
import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxrlhf import objectives as obj
from jaxrlhf.objectives import registry


def ref_adaptive(beta, target, horizon, gain, kls, n):
    out = []
    for kl in kls:
        err = min(max(kl / target - 1.0, -0.2), 0.2)
        beta = beta * (1.0 + gain * err * n / horizon)
        out.append(beta)
    return out


class ControllerTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_adaptive_matches_numpy(self):
        kls = [0.0, 3.0, 6.1, 50.0, 5.9, 6.0]
        state = obj.kl_controller_init("adaptive", kl_coef=0.2, target=6.0, horizon=10_000,
                                       gain=0.5)
        update = self.variant(obj.kl_controller_update)
        got = []
        for kl in kls:
            state = update(state, kl, 256)
            got.append(float(state.kl_coef))
        np.testing.assert_allclose(got, ref_adaptive(0.2, 6.0, 10_000, 0.5, kls, 256), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fixed_never_changes(self):
        state = obj.kl_controller_init("fixed", kl_coef=0.05)
        new = self.variant(obj.kl_controller_update)(state, 123.0, 64)
        self.assertIsInstance(new, obj.FixedKLController)
        np.testing.assert_allclose(new.kl_coef, 0.05)

    def test_state_is_a_checkpointable_pytree_and_resume_is_exact(self):
        kls = np.random.default_rng(0).random(8) * 12
        state = obj.init_adaptive_kl_controller(0.1, target=6.0, horizon=1000.0)
        leaves = jax.tree_util.tree_leaves(state)
        self.assertEqual(len(leaves), 4)
        self.assertTrue(all(l.dtype == jnp.float32 and l.shape == () for l in leaves))
        update = jax.jit(obj.kl_controller_update)
        uninterrupted = state
        for kl in kls:
            uninterrupted = update(uninterrupted, kl, 32)
        resumed = state
        for kl in kls[:3]:
            resumed = update(resumed, kl, 32)
        # "Save" as plain numpy leaves and restore into the same structure.
        treedef = jax.tree_util.tree_structure(resumed)
        saved = [np.asarray(l) for l in jax.tree_util.tree_leaves(resumed)]
        resumed = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(l) for l in saved])
        for kl in kls[3:]:
            resumed = update(resumed, kl, 32)
        chex.assert_trees_all_equal(resumed, uninterrupted)

    def test_init_errors(self):
        with pytest.raises(ValueError, match="target and horizon"):
            obj.kl_controller_init("adaptive", kl_coef=0.1)
        with pytest.raises(ValueError, match="adaptive"):
            obj.kl_controller_init("pid", kl_coef=0.1)


class RunningMomentsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_over_masked_batches(self):
        rng = np.random.default_rng(1)
        update = self.variant(obj.running_moments_update)
        state = obj.running_moments_init()
        seen = []
        for _ in range(3):
            x = (rng.normal(size=(4, 5)) * 3 + 1).astype(np.float32)
            mask = rng.random((4, 5)) < 0.7
            state = update(state, np.where(mask, x, np.nan).astype(np.float32), mask)
            seen.extend(x[mask].astype(np.float64))
        state = update(state, np.full((2, 5), np.inf, np.float32), np.zeros((2, 5), bool))
        np.testing.assert_allclose(state.count, len(seen))
        np.testing.assert_allclose(state.mean, np.mean(seen), rtol=1e-5)
        np.testing.assert_allclose(obj.running_moments_std(state), np.std(seen, ddof=1), rtol=1e-5)
        x = rng.normal(size=(6,)).astype(np.float32)
        np.testing.assert_allclose(
            obj.normalize_with_moments(x, state),
            (x - np.mean(seen)) / (np.std(seen, ddof=1) + 1e-8), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            obj.normalize_with_moments(x, state, shift_mean=False),
            x / (np.std(seen, ddof=1) + 1e-8), rtol=1e-4, atol=1e-6)

    def test_empty_and_single_sample(self):
        state = obj.running_moments_init()
        self.assertEqual(float(obj.running_moments_std(state)), 0.0)
        state = obj.running_moments_update(state, jnp.array([2.5]))
        self.assertEqual(float(state.mean), 2.5)
        self.assertEqual(float(obj.running_moments_std(state)), 0.0)

    def test_reward_bias_zeroes_the_reference_mean(self):
        rng = np.random.default_rng(2)
        scores = (rng.normal(size=(37,)) * 2 + 5).astype(np.float32)
        mask = rng.random(37) < 0.8
        bias = obj.reward_bias(np.where(mask, scores, np.inf).astype(np.float32), mask)
        np.testing.assert_allclose(bias, -scores[mask].astype(np.float64).mean(), rtol=1e-6)
        np.testing.assert_allclose(np.mean(scores[mask] + bias), 0.0, atol=1e-5)
        self.assertEqual(float(obj.reward_bias(jnp.zeros((0,)))), 0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_chan_merge_equals_one_pass_for_any_split(seed, cuts):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(40,)) * rng.uniform(0.1, 10) + rng.uniform(-10, 10)).astype(np.float32)
    bounds = [0, *sorted(cuts), 40]
    state = obj.running_moments_init()
    padded = np.zeros((40,), np.float32)              # one fixed shape: nothing recompiles
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk_mask = (np.arange(40) >= lo) & (np.arange(40) < hi)
        state = obj.running_moments_update(state, np.where(chunk_mask, x, padded), chunk_mask)
    np.testing.assert_allclose(state.count, 40)
    np.testing.assert_allclose(state.mean, x.astype(np.float64).mean(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(obj.running_moments_std(state), x.astype(np.float64).std(ddof=1),
                               rtol=1e-4)


def test_registry_lookup_and_errors():
    assert registry.names("kl") == ("k1", "k2", "k3")
    assert registry.names("advantage") == ("gae", "monte_carlo")
    assert registry.names("loss_agg") == ("seq_mean", "seq_sum", "seq_sum_norm", "token_mean")
    assert registry.names("outcome_advantage") == ("dr_grpo", "grpo", "reinforce_pp",
                                                   "reinforce_pp_baseline", "rloo")
    assert registry.get("advantage", "gae") is obj.gae
    with pytest.raises(ValueError, match=r"valid names: \['k1', 'k2', 'k3'\]"):
        registry.get("kl", "k4")
    with pytest.raises(ValueError, match="valid kinds"):
        registry.get("optimizer", "adam")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("kl", "k1", lambda a, b: a - b)

    @registry.register("loss_agg", "test_only_max")
    def _max(loss_BxT, mask_BxT, *, num_tokens=None, num_seqs=None):
        return jnp.max(jnp.where(mask_BxT, loss_BxT, -jnp.inf))

    try:
        loss = jnp.array([[1.0, 5.0], [3.0, 2.0]])
        mask = jnp.array([[True, False], [True, True]])
        assert float(obj.aggregate(loss, mask, "test_only_max")) == 3.0
    finally:
        del registry._REGISTRY["loss_agg"]["test_only_max"]
