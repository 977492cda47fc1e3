"""Token statistics against float64 NumPy references (loops), plus properties and gradients."""
import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from jax.test_util import check_grads

from jaxrlhf import objectives as obj

B, T, V = 3, 5, 7


def np_log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def ref_token_logprobs(logits, tokens, temperature=1.0):
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            out[b, t] = np_log_softmax(logits[b, t].astype(np.float64) / temperature)[tokens[b, t]]
    return out


def ref_entropy(logits):
    out = np.zeros(logits.shape[:-1])
    for idx in np.ndindex(*logits.shape[:-1]):
        lp = np_log_softmax(logits[idx].astype(np.float64))
        p = np.exp(lp)
        out[idx] = -sum(pi * li for pi, li in zip(p, lp) if pi > 0)
    return out


def ref_masked_stats(x, mask, unbiased=True):
    vals = [float(v) for v, m in zip(x.ravel(), mask.ravel()) if m]
    if not vals:
        return 0.0, 0.0
    mean = sum(vals) / len(vals)
    ss = sum((v - mean) ** 2 for v in vals)
    den = (len(vals) - 1) if unbiased else len(vals)
    return mean, (ss / den if den > 0 else 0.0)


def random_mask(rng, shape, p=0.6):
    return rng.random(shape) < p


class StatsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1.0, 0.7)
    def test_token_logprobs_matches_numpy(self, temperature):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
        tokens = rng.integers(0, V, size=(B, T))
        got = self.variant(obj.token_logprobs)(logits, tokens, temperature)
        np.testing.assert_allclose(got, ref_token_logprobs(logits, tokens, temperature),
                                   rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_matches_numpy_and_handles_minus_inf(self):
        rng = np.random.default_rng(1)
        logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
        logits[0, 0, :3] = -np.inf          # top-k style removal of vocabulary entries
        got = self.variant(obj.entropy)(logits)
        np.testing.assert_allclose(got, ref_entropy(logits), rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda z: obj.entropy(z).sum())(jnp.asarray(logits))
        self.assertTrue(np.isfinite(np.asarray(grad)).all())

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_masked_mean_var_match_numpy(self, unbiased):
        rng = np.random.default_rng(2)
        x = rng.normal(size=(B, T)).astype(np.float32)
        mask = random_mask(rng, (B, T))
        mask[1] = False                      # an all-masked row
        x_inf = np.where(mask, x, np.inf).astype(np.float32)   # garbage at masked positions
        mean = self.variant(obj.masked_mean)(x_inf, mask)
        var = self.variant(lambda a, m: obj.masked_var(a, m, unbiased=unbiased))(x_inf, mask)
        ref_mean, ref_var = ref_masked_stats(x, mask, unbiased)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-6)
        row_mean = self.variant(lambda a, m: obj.masked_mean(a, m, axis=1))(
            x_inf, mask.astype(np.float32))
        row_var = self.variant(lambda a, m: obj.masked_var(a, m, axis=1, unbiased=unbiased))(
            x_inf, mask)
        for b in range(B):
            rm, rv = ref_masked_stats(x[b], mask[b], unbiased)
            np.testing.assert_allclose(row_mean[b], rm, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(row_var[b], rv, rtol=1e-5, atol=1e-6)
        self.assertEqual(float(row_mean[1]), 0.0)
        self.assertEqual(float(row_var[1]), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_masked_whiten_matches_numpy(self, shift_mean):
        rng = np.random.default_rng(3)
        x = (rng.normal(size=(B, T)) * 4 + 2).astype(np.float32)
        mask = random_mask(rng, (B, T))
        got = self.variant(lambda a, m: obj.masked_whiten(a, m, shift_mean=shift_mean))(x, mask)
        mean, var = ref_masked_stats(x, mask, unbiased=True)
        ref = (x.astype(np.float64) - mean) / np.sqrt(var + 1e-8)
        if not shift_mean:
            ref = ref + mean
        ref = np.where(mask, ref, 0.0)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_masked_gives_zeros(self):
        x = np.full((B, T), np.nan, np.float32)
        mask = np.zeros((B, T), np.float32)
        for fn in (obj.masked_mean, obj.masked_var, obj.masked_whiten):
            out = self.variant(fn)(x, mask)
            np.testing.assert_array_equal(out, np.zeros_like(out))

    def test_masked_mean_gradient_is_zero_at_masked_positions(self):
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
        mask = random_mask(rng, (B, T))
        x = jnp.where(mask, x, jnp.inf)
        for fn in (obj.masked_mean, obj.masked_var, lambda a, m: obj.masked_whiten(a, m).sum()):
            g = np.asarray(jax.grad(lambda a: fn(a, mask))(x))
            self.assertTrue(np.isfinite(g).all())
            np.testing.assert_array_equal(g[~mask], 0.0)

    def test_gradients_float64(self):
        rng = np.random.default_rng(5)
        mask = random_mask(rng, (B, T))
        mask[0, :2] = True
        with jax.enable_x64(True):
            logits = jnp.asarray(rng.normal(size=(B, T, V)))
            tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
            x = jnp.asarray(rng.normal(size=(B, T)))
            check = lambda f, args: check_grads(jax.jit(f), args, order=1, modes=["rev"])
            check(lambda z: obj.token_logprobs(z, tokens, 0.8), (logits,))
            check(obj.entropy, (logits,))
            check(lambda a: obj.masked_var(a, mask), (x,))
            check(lambda a: obj.masked_whiten(a, mask), (x,))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e3), rel_offset=st.floats(-100, 100))
def test_whitened_valid_entries_have_zero_mean_unit_variance(seed, scale, rel_offset):
    # |offset| / scale stays ≤ 100: beyond that float32 cancellation, not the code, dominates.
    offset = rel_offset * scale
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, (B, T))
    mask[0, :2] = True                       # at least two valid values
    x = (rng.normal(size=(B, T)) * scale + offset).astype(np.float32)
    x[0, 0] += scale                         # make sure they are not all equal
    w = np.asarray(obj.masked_whiten(x, mask))
    vals = w[mask].astype(np.float64)
    np.testing.assert_allclose(vals.mean(), 0.0, atol=1e-3)
    np.testing.assert_allclose(vals.var(ddof=1), 1.0, rtol=1e-3)
    np.testing.assert_array_equal(w[~mask], 0.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_logprobs_are_normalised_and_entropy_bounded(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 5
    all_tokens = np.broadcast_to(np.arange(V), (B * T, V)).reshape(B, T, V)
    logp = obj.token_logprobs(logits[:, :, None, :].repeat(V, 2), all_tokens)
    np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(-1), 1.0, rtol=1e-5)
    ent = np.asarray(obj.entropy(logits))
    assert (ent >= -1e-6).all() and (ent <= np.log(V) + 1e-5).all()
