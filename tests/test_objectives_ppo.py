"""PPO-ptx losses and loss aggregation against float64 NumPy loop references.

Also: overflow injection, zero gradient at masked tokens, micro-batch (gradient-accumulation)
invariance of every aggregation mode, and float64 gradient checks.
"""
import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from jax.test_util import check_grads

from jaxrlhf import objectives as obj

B, T, V = 4, 6, 5
MODES = ("token_mean", "seq_mean", "seq_sum")


def ref_aggregate(loss, mask, mode):
    rows = [[float(loss[b, t]) for t in range(loss.shape[1]) if mask[b, t]]
            for b in range(loss.shape[0])]
    rows = [r for r in rows if r]
    if not rows:
        return 0.0
    if mode == "token_mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if mode == "seq_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(map(sum, rows)) / len(rows)


def ref_policy(logp, old_logp, adv, mask, eps, dual_clip, mode):
    per_tok = np.zeros(mask.shape)
    clipped_active = np.zeros(mask.shape)
    ratio = np.ones(mask.shape)
    for b, t in np.ndindex(*mask.shape):
        if not mask[b, t]:
            continue
        lr = np.clip(float(logp[b, t]) - float(old_logp[b, t]), -20, 20)
        rho = np.exp(lr)
        a = float(adv[b, t])
        l1, l2 = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
        l = max(l1, l2)
        if dual_clip is not None and a < 0:
            l = min(l, -dual_clip * a)
        per_tok[b, t], clipped_active[b, t], ratio[b, t] = l, float(l2 > l1), rho
    valid_ratio = ratio[mask]
    metrics = {
        "clipfrac": clipped_active[mask].mean(),
        "ratio_mean": valid_ratio.mean(),
        "ratio_max": valid_ratio.max(),
        "approx_kl": np.mean([(r - 1) - np.log(r) for r in valid_ratio]),
    }
    return ref_aggregate(per_tok, mask, mode), metrics


def ref_value(v, v_old, ret, mask, eps, mode):
    per_tok = np.zeros(mask.shape)
    for b, t in np.ndindex(*mask.shape):
        if mask[b, t]:
            e1 = (float(v[b, t]) - float(ret[b, t])) ** 2
            if eps is None:
                per_tok[b, t] = e1
            else:
                vc = float(v_old[b, t]) + np.clip(float(v[b, t]) - float(v_old[b, t]), -eps, eps)
                per_tok[b, t] = max(e1, (vc - float(ret[b, t])) ** 2)
    return 0.5 * ref_aggregate(per_tok, mask, mode)


def np_log_softmax(z):
    z = z.astype(np.float64) - z.max()
    return z - np.log(np.exp(z).sum())


def ref_ptx(logits, tokens, mask, mode):
    nll = np.zeros(tokens.shape)
    for b, t in np.ndindex(*tokens.shape):
        if t >= 1 and mask[b, t]:
            nll[b, t] = -np_log_softmax(logits[b, t - 1])[tokens[b, t]]
    m = mask.copy()
    m[:, 0] = False
    return ref_aggregate(nll, m, mode)


def ref_entropy_agg(logits, mask, mode, temperature=1.0):
    ent = np.zeros(mask.shape)
    for b, t in np.ndindex(*mask.shape):
        lp = np_log_softmax(logits[b, t] / temperature)
        ent[b, t] = -(np.exp(lp) * lp).sum()
    return ref_aggregate(ent, mask, mode)


def response_mask(rng, empty_row=True):
    mask = np.zeros((B, T), bool)
    for b in range(B - 1 if empty_row else B):
        start = rng.integers(0, T - 1)
        mask[b, start:rng.integers(start + 1, T + 1)] = True
    return mask


def policy_inputs(rng):
    old_logp = -rng.random((B, T)).astype(np.float32) * 3
    logp = (old_logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    return logp, old_logp, adv


class PPOLossTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(mode=MODES, dual_clip=(None, 3.0))
    def test_policy_loss_matches_numpy(self, mode, dual_clip):
        rng = np.random.default_rng(0)
        logp, old_logp, adv = policy_inputs(rng)
        logp[0, :] = old_logp[0, :] + 2.0           # large ratios: clipping and dual clipping
        adv[0, :3] = -1.0
        mask = response_mask(rng)
        mask[0] = True
        fn = self.variant(lambda a, b, c, m: obj.ppo_policy_loss(
            a, b, c, m, clip_eps=0.2, dual_clip=dual_clip, agg=mode))
        loss, metrics = fn(logp, old_logp, adv, mask)
        ref_loss, ref_m = ref_policy(logp, old_logp, adv, mask, 0.2, dual_clip, mode)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for k, v in ref_m.items():
            np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(mode=("token_mean", "seq_mean"), clip_eps=(None, 0.1))
    def test_value_loss_matches_numpy(self, mode, clip_eps):
        rng = np.random.default_rng(1)
        v, v_old, ret = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
        mask = response_mask(rng)
        fn = self.variant(
            lambda a, b, c, m: obj.value_loss(a, b, c, m, clip_eps=clip_eps, agg=mode))
        loss, metrics = fn(v, v_old, ret, mask)
        np.testing.assert_allclose(loss, ref_value(v, v_old, ret, mask, clip_eps, mode), rtol=1e-5)
        r, vv = ret[mask].astype(np.float64), v[mask].astype(np.float64)
        np.testing.assert_allclose(metrics["explained_variance"], 1 - np.var(r - vv) / np.var(r),
                                   rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODES)
    def test_ptx_loss_matches_numpy(self, mode):
        rng = np.random.default_rng(2)
        logits = rng.normal(size=(B, T, V)).astype(np.float32)
        tokens = rng.integers(0, V, size=(B, T))
        mask = rng.random((B, T)) < 0.7
        loss, metrics = self.variant(lambda z, x, m: obj.ptx_loss(z, x, m, agg=mode))(
            logits, tokens, mask)
        np.testing.assert_allclose(loss, ref_ptx(logits, tokens, mask, mode), rtol=1e-5)
        self.assertEqual(float(metrics["ptx_num_tokens"]), mask[:, 1:].sum())

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppo_ptx_objective_combines_the_parts(self):
        rng = np.random.default_rng(3)
        logits = rng.normal(size=(B, T, V)).astype(np.float32)
        tokens = rng.integers(0, V, size=(B, T))
        temperature = 0.8
        logp = np.array([[np_log_softmax(logits[b, t] / temperature)[tokens[b, t]]
                          for t in range(T)] for b in range(B)])
        old_logp = (logp + rng.normal(size=(B, T)) * 0.2).astype(np.float32)
        adv = rng.normal(size=(B, T)).astype(np.float32)
        v, v_old, ret = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
        mask = response_mask(rng)
        ptx_logits = rng.normal(size=(2, T, V)).astype(np.float32)
        ptx_tokens = rng.integers(0, V, size=(2, T))
        ptx_mask = np.ones((2, T), bool)
        coefs = dict(vf_coef=0.7, entropy_coef=0.01, ptx_coef=2.0)

        def fn(z, x, ol, a, m, vv, vo, r, pz, px, pm):
            return obj.ppo_ptx_objective(z, x, ol, a, m, values_BxT=vv, old_values_BxT=vo,
                                         returns_BxT=r, ptx_logits_BxSxV=pz, ptx_tokens_BxS=px,
                                         ptx_mask_BxS=pm, temperature=temperature, clip_eps=0.2,
                                         vf_clip_eps=0.3, **coefs)

        total, metrics = self.variant(fn)(logits, tokens, old_logp, adv, mask, v, v_old, ret,
                                          ptx_logits, ptx_tokens, ptx_mask)
        ref = (ref_policy(logp, old_logp, adv, mask, 0.2, None, "token_mean")[0]
               + coefs["vf_coef"] * ref_value(v, v_old, ret, mask, 0.3, "token_mean")
               - coefs["entropy_coef"] * ref_entropy_agg(logits, mask, "token_mean", temperature)
               + coefs["ptx_coef"] * ref_ptx(ptx_logits, ptx_tokens, ptx_mask, "token_mean"))
        np.testing.assert_allclose(total, ref, rtol=1e-5)
        for key in ("policy_loss", "value_loss", "entropy", "ptx_loss", "approx_kl", "clipfrac",
                    "vf_clipfrac", "total_loss"):
            self.assertIn(key, metrics)
        # Plain PPO: no value terms, no ptx batch.
        plain, _ = obj.ppo_ptx_objective(logits, tokens, old_logp, adv, mask,
                                         temperature=temperature)
        np.testing.assert_allclose(
            plain, ref_policy(logp, old_logp, adv, mask, 0.2, None, "token_mean")[0], rtol=1e-5)

    def test_first_minibatch_ratio_is_one(self):
        rng = np.random.default_rng(4)
        logp, _, adv = policy_inputs(rng)
        mask = response_mask(rng)
        loss, m = obj.ppo_policy_loss(logp, logp, adv, mask, clip_eps=0.2)
        self.assertEqual(float(m["approx_kl"]), 0.0)
        self.assertEqual(float(m["clipfrac"]), 0.0)
        self.assertEqual(float(m["ratio_mean"]), 1.0)
        self.assertEqual(float(m["ratio_max"]), 1.0)
        np.testing.assert_allclose(loss, -adv[mask].mean(), rtol=1e-6)

    def test_overflow_injection_keeps_losses_and_gradients_finite(self):
        rng = np.random.default_rng(5)
        logp, old_logp, adv = policy_inputs(rng)
        mask = response_mask(rng)
        mask[0] = True
        signs = np.where(rng.random((B, T)) < 0.5, 1000.0, -1000.0)
        logp = np.where(mask, old_logp + signs, np.inf).astype(np.float32)   # log-ratio ±1000
        old_logp = np.where(mask, old_logp, -np.inf).astype(np.float32)
        adv = np.where(mask, adv, np.nan).astype(np.float32)
        v, v_old, ret = (np.where(mask, rng.normal(size=(B, T)) * 1e3, np.inf).astype(np.float32)
                         for _ in range(3))
        logits = rng.normal(size=(B, T, V)).astype(np.float32) * 100
        tokens = np.where(mask, rng.integers(0, V, size=(B, T)), -100)   # ignore index at padding
        for mode in MODES:
            for dual_clip in (None, 3.0):
                lfn = lambda a: obj.ppo_policy_loss(a, old_logp, adv, mask, dual_clip=dual_clip,
                                                    agg=mode)
                (loss, metrics), g = jax.value_and_grad(lfn, has_aux=True)(logp)
                self.assertTrue(np.isfinite(float(loss)), (mode, dual_clip))
                self.assertTrue(all(np.isfinite(float(x)) for x in metrics.values()))
                g = np.asarray(g)
                self.assertTrue(np.isfinite(g).all())
                np.testing.assert_array_equal(g[~mask], 0.0)
            vfn = lambda a: obj.value_loss(a, v_old, ret, mask, clip_eps=0.2, agg=mode)[0]
            loss, g = jax.value_and_grad(vfn)(v)
            self.assertTrue(np.isfinite(float(loss)))
            g = np.asarray(g)
            self.assertTrue(np.isfinite(g).all())
            np.testing.assert_array_equal(g[~mask], 0.0)
            pfn = lambda z: obj.ptx_loss(z, tokens, mask, agg=mode)[0]
            loss, g = jax.value_and_grad(pfn)(logits)
            self.assertTrue(np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all())
            np.testing.assert_array_equal(np.asarray(g)[:, :-1][~mask[:, 1:]], 0.0)

    def test_gradients_float64(self):
        rng = np.random.default_rng(6)
        mask = response_mask(rng)
        with jax.enable_x64(True):
            logp, old_logp, adv = (jnp.asarray(x, jnp.float64) for x in policy_inputs(rng))
            v, v_old, ret = (jnp.asarray(rng.normal(size=(B, T))) for _ in range(3))
            logits = jnp.asarray(rng.normal(size=(B, T, V)))
            tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
            # jit keeps check_grads' repeated evaluations cheap.
            check = lambda f, args: check_grads(jax.jit(f), args, order=1, modes=["rev"])
            for mode in MODES:
                check(lambda a: obj.ppo_policy_loss(a, old_logp, adv, mask, dual_clip=2.0,
                                                    agg=mode)[0], (logp,))
            check(lambda a: obj.value_loss(a, v_old, ret, mask, agg="seq_mean")[0], (v,))
            check(lambda z: obj.ptx_loss(z, tokens, mask)[0], (logits,))
            check(lambda z, vv: obj.ppo_ptx_objective(
                z, tokens, old_logp, adv, mask, values_BxT=vv, old_values_BxT=v_old,
                returns_BxT=ret, entropy_coef=0.1, ptx_logits_BxSxV=z, ptx_tokens_BxS=tokens,
                ptx_mask_BxS=mask, ptx_coef=0.5)[0], (logits, v))


def _policy(logp, old_logp, adv, mask, den, agg):
    return obj.ppo_policy_loss(logp, old_logp, adv, mask, agg=agg, **den)[0]


def _value(v, v_old, ret, mask, den, agg):
    return obj.value_loss(v, v_old, ret, mask, agg=agg, **den)[0]


def _ptx(logits, tokens, mask, den, agg):
    return obj.ptx_loss(logits, tokens, mask, agg=agg, **den)[0]


# Jitted once per (loss, agg, shape): hypothesis then only re-runs compiled code.
_LOSS_AND_GRAD = {name: jax.jit(jax.value_and_grad(fn), static_argnames="agg")
                  for name, fn in (("policy", _policy), ("value", _value), ("ptx", _ptx))}


def _micro_batch_inputs(rng):
    logp, old_logp, adv = policy_inputs(rng)
    mask = rng.random((B, T)) < rng.uniform(0.2, 0.9, size=(B, 1))
    v, v_old, ret = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    den = obj.aggregation_denominators(mask)
    ptx_den = obj.aggregation_denominators(mask[:, 1:])
    # name -> (differentiated input, other inputs, mask, global denominators)
    return mask, {"policy": (logp, (old_logp, adv), den), "value": (v, (v_old, ret), den),
                  "ptx": (logits, (tokens,), ptx_den)}


def test_micro_batch_slices_sum_to_the_full_batch():
    """Slice a batch into micro-batches with unequal valid counts: with the global denominators
    the micro-batch losses and gradients add up to the full-batch ones, in every mode."""
    rng = np.random.default_rng(7)
    mask, inputs = _micro_batch_inputs(rng)
    mask[0, :] = True
    mask[1:, :2] = False
    parts = (slice(0, 1), slice(1, B))
    x, others, den = inputs["policy"]
    for mode in MODES:
        fn = _LOSS_AND_GRAD["policy"]
        full, g_full = fn(x, *others, mask, den, agg=mode)
        micro = [fn(x[s], *[o[s] for o in others], mask[s], den, agg=mode) for s in parts]
        np.testing.assert_allclose(sum(float(l) for l, _ in micro), float(full), rtol=1e-5,
                                   atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(np.concatenate([np.asarray(g) for _, g in micro]), g_full,
                                   rtol=1e-5, atol=1e-7, err_msg=mode)
        # Without the global denominator the token mean of unequal micro-batches is NOT additive.
        if mode == "token_mean":
            local = [obj.ppo_policy_loss(x[s], others[0][s], others[1][s], mask[s])[0]
                     for s in parts]
            assert abs(float(np.mean(local)) - float(full)) > 1e-4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES),
       n_micro=st.integers(2, 3))
def test_micro_batch_partitions_sum_to_the_full_batch(seed, mode, n_micro):
    """Random partitions of the rows into micro-batches (a micro-batch = the same arrays with the
    other rows masked, so shapes stay fixed and nothing recompiles): losses and gradients with
    the global denominators add up to the full-batch ones for the policy, value and ptx losses."""
    rng = np.random.default_rng(seed)
    mask, inputs = _micro_batch_inputs(rng)
    assignment = rng.integers(0, n_micro, size=(B, 1))
    for name, (x, others, den) in inputs.items():
        fn = _LOSS_AND_GRAD[name]
        full, g_full = fn(x, *others, mask, den, agg=mode)
        micro = [fn(x, *others, mask & (assignment == i), den, agg=mode) for i in range(n_micro)]
        np.testing.assert_allclose(sum(float(l) for l, _ in micro), float(full), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
        np.testing.assert_allclose(sum(np.asarray(g) for _, g in micro), g_full, rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    # Local denominators (the default) give the full-batch value on the full batch.
    adv = inputs["policy"][1][1]
    np.testing.assert_allclose(obj.aggregate(adv, mask, mode), ref_aggregate(adv, mask, mode),
                               rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(0.05, 0.5))
def test_policy_gradient_is_zero_exactly_where_the_clip_is_active(seed, eps):
    rng = np.random.default_rng(seed)
    logp, old_logp, adv = policy_inputs(rng)
    mask = response_mask(rng, empty_row=False)
    g = np.asarray(jax.grad(lambda a: obj.ppo_policy_loss(a, old_logp, adv, mask,
                                                          clip_eps=eps)[0])(logp))
    rho = np.exp(logp.astype(np.float64) - old_logp)
    active = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    expected = np.where(mask & ~active, -adv * rho, 0.0) / mask.sum()
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)
