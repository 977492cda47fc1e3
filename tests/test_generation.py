"""Tests of `jaxrlhf.generation`: KV-cache decoding, sampling distribution, padding, sharding."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxrlhf import generation as gen
from jaxrlhf import sharding as shd
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import init_model, positions_from_mask

EOS, PAD = 1, 0
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                  pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)


def make_model(cfg=CFG, seed=0, head_scale=20.0):
    """A random model whose LM head is scaled up so next-token distributions are peaked
    (logit std ~2) rather than near uniform: greedy has clear winners and temperature and
    truncation change the distribution visibly."""
    model = init_model(cfg, seed=seed)
    model.lm_head[...] = model.lm_head[...] * head_scale
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def left_padded(rows, length):
    """[B, length] tokens and mask with each row of `rows` right-aligned (left padding)."""
    toks = np.full((len(rows), length), PAD, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        toks[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


def prompts(batch=3, length=7, seed=0):
    rng = np.random.default_rng(seed)
    lens = [length - 2 * (i % 3) for i in range(batch)]  # rows of different real lengths
    return left_padded([rng.integers(3, CFG.vocab_size, n) for n in lens], length)


def full_forward_logprobs(model, result, prompt_len, **sampling):
    """What the PPO trainer does: one full forward over the rollout, then sampling_logprobs."""
    logits = model(result.tokens, result.mask)
    return gen.sampling_logprobs(logits[:, prompt_len - 1:-1], result.response_tokens,
                                 **sampling)


# ---------------------------------------------------------------------------------------
# The sampling distribution.

def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """NumPy statement of the documented rule (independent of the JAX implementation)."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kept = np.zeros_like(keep)
        kept[order[before < top_p]] = True
        p = np.where(kept, p, 0.0)
        p /= p.sum()
    return p


SAMPLING_CASES = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(top_k=3),
    dict(top_p=0.7),
    dict(temperature=1.5, top_k=5, top_p=0.9),
]


@pytest.mark.parametrize("opts", SAMPLING_CASES, ids=lambda o: str(o) or "plain")
def test_sample_tokens_chi_square(opts):
    """Empirical frequencies of 40k draws match the documented π (chi-square), removed
    tokens are never drawn, and the returned logprobs equal log π."""
    logits = jnp.asarray([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7], jnp.float32)
    n = 40_000
    toks, logps = gen.sample_tokens(jnp.broadcast_to(logits, (n, 8)), jax.random.key(3), **opts)
    p = reference_probs(logits, **opts)
    counts = np.bincount(np.asarray(toks), minlength=8)
    assert counts[p == 0].sum() == 0
    kept = p > 0
    _, pvalue = stats.chisquare(counts[kept], n * p[kept])
    assert pvalue > 1e-3, (counts, n * p)
    np.testing.assert_allclose(np.exp(np.asarray(logps)), p[np.asarray(toks)], rtol=1e-5)
    # sampling_logprobs is the same distribution, for every token of the vocabulary.
    all_lp = gen.sampling_logprobs(jnp.broadcast_to(logits, (1, 8, 8)),
                                   jnp.arange(8)[None], **opts)
    np.testing.assert_allclose(np.exp(np.asarray(all_lp[0])), p, atol=1e-6)


def test_generate_first_token_chi_square():
    """End to end: the first sampled token follows π(softmax(full-forward logits / T), top-k)."""
    cfg = CFG.replace(vocab_size=12)
    model = make_model(cfg, head_scale=10.0)
    n, opts = 4000, dict(temperature=0.8, top_k=6)
    toks, mask = left_padded([[3, 4, 5, 6]] * n, 4)
    res = gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=1,
                       eos_id=EOS, pad_id=PAD, **opts)
    logits = np.asarray(model(toks[:1], mask[:1])[0, -1])
    p = reference_probs(logits, **opts)
    counts = np.bincount(np.asarray(res.response_tokens[:, 0]), minlength=12)
    assert counts[p == 0].sum() == 0
    _, pvalue = stats.chisquare(counts[p > 0], n * p[p > 0])
    assert pvalue > 1e-3, (counts, n * p)


def test_greedy_returns_argmax_and_top_k_ties_are_kept():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 1.0, -2.0]])
    toks, lp = gen.sample_tokens(logits, None, greedy=True, top_k=2)
    assert int(toks[0]) == 1
    # top_k=2 keeps {1} and both tokens tied at the 2nd largest value.
    np.testing.assert_allclose(float(jnp.exp(lp[0])),
                               np.exp(3) / (np.exp(3) + 2 * np.exp(1)), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Decoding against the full forward.

def test_kv_cache_decoding_matches_full_forward(model):
    """Prefill + cached steps (1 and 3 tokens at a time) give the full forward's logits at
    every real position, for a left-padded batch."""
    toks, mask = prompts(batch=3, length=7)
    extra = jax.random.randint(jax.random.key(1), (3, 5), 3, CFG.vocab_size)
    all_toks = jnp.concatenate([toks, extra], axis=1)
    all_mask = jnp.concatenate([mask, jnp.ones_like(extra)], axis=1)
    want = np.asarray(model(all_toks, all_mask))
    pos = positions_from_mask(all_mask)

    layers = model.unstacked_layers()
    cache = model.init_cache(3, 12)
    got = []
    for lo, hi in [(0, 7), (7, 8), (8, 11), (11, 12)]:
        h, cache = model.hidden_cached(all_toks[:, lo:hi], all_mask[:, lo:hi], pos[:, lo:hi],
                                       cache, layers=layers)
        got.append(model.apply_head(h))
    got = np.asarray(jnp.concatenate(got, axis=1))
    real = np.asarray(all_mask) > 0
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)


def test_prefill_scan_equals_the_cached_forward_on_an_empty_cache(model):
    """`Transformer.prefill` (the sampler's scanned prefill) gives the keys / values that the
    cached forward writes into an empty cache, and its hidden state at each row's last real
    token, for a left-padded batch."""
    toks, mask = prompts(batch=3, length=7)
    pos = positions_from_mask(mask)
    last = jnp.max(jnp.where(mask > 0, jnp.arange(7), 0), axis=-1)[:, None]
    h, ks, vs = model.prefill(toks, mask, pos, last)
    want_h, cache = model.hidden_cached(toks, mask, pos, model.init_cache(3, 7), select=last)
    assert ks.shape == (CFG.n_layers, 3, CFG.n_kv_heads, CFG.dim_per_head, 7)   # keys: Dh, P
    assert vs.shape == (CFG.n_layers, 3, CFG.n_kv_heads, 7, CFG.dim_per_head)
    np.testing.assert_allclose(np.asarray(h), np.asarray(want_h), atol=2e-5, rtol=1e-5)
    # Real slots only: padding slots are masked out of every attention either way.
    real = np.asarray(mask, bool)
    real_k = np.broadcast_to(real[:, None, None, :], ks.shape[1:])
    real_v = np.broadcast_to(real[:, None, :, None], vs.shape[1:])
    for i in range(CFG.n_layers):
        for got, want, r in ((ks[i], cache.k[i], real_k), (vs[i], cache.v[i], real_v)):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got)[r], np.asarray(want)[r],
                                       atol=2e-5, rtol=1e-5)


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    _check_greedy_against_full_forward(model)


def test_greedy_with_sliding_window_layers():
    """Qwen3-style q/k norms and a 3-token window on layer 0: 6 generated tokens after a
    7-token prompt run well past the window, in the cache as in the full forward."""
    cfg = CFG.replace(family="qwen3", qk_norm=True, sliding_window=3,
                      layer_types=("sliding", "full"))
    _check_greedy_against_full_forward(make_model(cfg, seed=3))


def _check_greedy_against_full_forward(model):
    toks, mask = prompts(batch=3, length=7)
    n = 6
    res = gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=n, eos_id=-1,
                       pad_id=PAD, greedy=True)
    # Step by step: a buffer of P + n slots, slot P + i filled after step i (future slots
    # are masked, and causal attention never looks at them).
    buf = jnp.concatenate([toks, jnp.zeros((3, n), jnp.int32)], axis=1)
    buf_mask = jnp.concatenate([mask, jnp.zeros((3, n), jnp.int32)], axis=1)
    forward = jax.jit(model.__call__)
    for i in range(n):
        nxt = jnp.argmax(forward(buf, buf_mask)[:, 6 + i], axis=-1).astype(jnp.int32)
        buf = buf.at[:, 7 + i].set(nxt)
        buf_mask = buf_mask.at[:, 7 + i].set(1)
    np.testing.assert_array_equal(np.asarray(res.response_tokens), np.asarray(buf[:, 7:]))
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(buf))
    assert int(res.num_steps) == n and not bool(res.finished.any())


@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["plain", "truncated"])
def test_logprobs_equal_sampling_logprobs_of_full_forward(model, opts):
    """π_old recomputed by the trainer (full forward + sampling_logprobs) equals the
    rollout's logprobs: the first PPO minibatch has ratio 1."""
    toks, mask = prompts(batch=4, length=7)
    res = gen.generate(model, toks, mask, jax.random.key(5), max_new_tokens=10, eos_id=EOS,
                       pad_id=PAD, **opts)
    want = np.asarray(full_forward_logprobs(model, res, 7, **opts))
    m = np.asarray(res.response_mask) > 0
    np.testing.assert_allclose(np.asarray(res.logprobs)[m], want[m], atol=1e-5)
    assert np.all(np.asarray(res.logprobs)[~m] == 0)
    ratio = np.exp(np.asarray(res.logprobs)[m] - want[m])
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Padding, EOS, determinism.

def test_padding_invariance(model):
    """A prompt alone, inside a left-padded batch, or right-padded gives the same greedy
    tokens and logprobs; sampled logprobs also match the full forward in every layout."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, CFG.vocab_size, 5)
    others = [rng.integers(3, CFG.vocab_size, n) for n in (9, 2)]
    kw = dict(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True)
    alone = gen.generate(model, *left_padded([prompt], 5), jax.random.key(0), **kw)
    toks, mask = left_padded([others[0], prompt, others[1]], 9)
    batch = gen.generate(model, toks, mask, jax.random.key(0), **kw)
    right_toks = np.full((2, 9), PAD, np.int32)
    right_mask = np.zeros((2, 9), np.int32)
    right_toks[0] = others[0]
    right_mask[0] = 1
    right_toks[1, :5], right_mask[1, :5] = prompt, 1
    right = gen.generate(model, jnp.asarray(right_toks), jnp.asarray(right_mask),
                         jax.random.key(0), **kw)
    for other, row in ((batch, 1), (right, 1)):
        np.testing.assert_array_equal(np.asarray(other.response_tokens[row]),
                                      np.asarray(alone.response_tokens[0]))
        np.testing.assert_allclose(np.asarray(other.logprobs[row]),
                                   np.asarray(alone.logprobs[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(batch.response_tokens[0]),
                                  np.asarray(right.response_tokens[0]))


def test_tokens_after_eos_are_masked(model):
    toks, mask = prompts(batch=16, length=7, seed=2)
    n = 40
    res = gen.generate(model, toks, mask, jax.random.key(7), max_new_tokens=n,
                       eos_id=EOS, pad_id=PAD, temperature=1.5)
    resp = np.asarray(res.response_tokens)
    rmask = np.asarray(res.response_mask)
    fin = np.asarray(res.finished)
    assert fin.any(), "choose a seed where some row hits EOS"
    for b in range(16):
        hits = np.flatnonzero(resp[b] == EOS)
        length = hits[0] + 1 if len(hits) else n
        assert fin[b] == bool(len(hits))
        assert res.lengths[b] == length == rmask[b].sum()
        np.testing.assert_array_equal(rmask[b], np.arange(n) < length)
        assert np.all(resp[b, length:] == PAD)
        assert np.all(np.asarray(res.logprobs)[b, length:] == 0)
        assert np.all(np.asarray(res.logprobs)[b, :length] < 0)
    np.testing.assert_array_equal(np.asarray(res.tokens),
                                  np.concatenate([np.asarray(toks), resp], axis=1))
    np.testing.assert_array_equal(np.asarray(res.mask),
                                  np.concatenate([np.asarray(mask), rmask], axis=1))


def test_loop_stops_once_every_row_finished(model):
    toks, mask = left_padded([[5, 6, 7]] * 2, 3)
    free = gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=12, eos_id=-1,
                        pad_id=PAD, greedy=True)
    eos = int(free.response_tokens[0, 2])
    first = int(np.flatnonzero(np.asarray(free.response_tokens[0]) == eos)[0])
    res = gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=12, eos_id=eos,
                       pad_id=PAD, greedy=True)
    assert int(res.num_steps) == first + 1
    assert bool(res.finished.all()) and list(np.asarray(res.lengths)) == [first + 1] * 2
    assert np.all(np.asarray(res.response_tokens)[:, first + 1:] == PAD)


def test_any_of_several_stop_ids_ends_a_row(model):
    """eos_id may list several stop ids (EOS and a chat template's end-of-turn token): each row
    ends at the first of them, with the same tokens as an unconstrained run up to there."""
    rows = [[5, 6, 7], [9, 3, 4], [11, 12, 13]]
    toks, mask = left_padded(rows, 3)
    free = np.asarray(gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=10,
                                   eos_id=-1, pad_id=PAD, greedy=True).response_tokens)
    stops = (int(free[0, 1]), int(free[1, 3]))        # a token row 0 / row 1 produces
    res = gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=10,
                       eos_id=list(stops), pad_id=PAD, greedy=True)
    resp, lengths = np.asarray(res.response_tokens), np.asarray(res.lengths)
    for b in range(3):
        hits = np.flatnonzero(np.isin(free[b], stops))
        want = int(hits[0]) + 1 if len(hits) else 10
        assert lengths[b] == want and bool(res.finished[b]) == bool(len(hits))
        np.testing.assert_array_equal(resp[b, :want], free[b, :want])
        assert np.all(resp[b, want:] == PAD)
    assert gen.stop_ids([4, 2, 4]) == (2, 4) and gen.stop_ids(3) == (3,)


def test_same_rng_same_output(model):
    toks, mask = prompts(batch=4, length=7)
    kw = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD, top_p=0.95)
    a = gen.generate(model, toks, mask, jax.random.key(11), **kw)
    b = gen.generate(model, toks, mask, jax.random.key(11), **kw)
    c = gen.generate(model, toks, mask, jax.random.key(12), **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.response_tokens), np.asarray(c.response_tokens))


# ---------------------------------------------------------------------------------------
# Several samples per prompt (one prefill per prompt).

def assert_same_rollout(got, want):
    """Equal tokens, masks and lengths; logprobs equal to float rounding."""
    for name in ("tokens", "mask", "response_tokens", "response_mask", "finished", "lengths",
                 "num_steps"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                      np.asarray(getattr(want, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


@pytest.mark.parametrize("opts", [dict(temperature=0.9, top_k=30), dict(greedy=True)],
                         ids=["sampled", "greedy"])
def test_num_samples_equals_repeated_prompts(model, opts):
    """K samples per prompt from one prefill each give the rollout of the prompts repeated K
    times (prompt-major rows), for left-padded prompts of different lengths."""
    toks, mask = prompts(batch=3, length=7)
    k = 4
    kw = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD, **opts)
    shared = gen.generate(model, toks, mask, jax.random.key(6), num_samples=k, **kw)
    repeated = gen.generate(model, jnp.repeat(toks, k, 0), jnp.repeat(mask, k, 0),
                            jax.random.key(6), **kw)
    assert shared.tokens.shape == (3 * k, 17)
    assert_same_rollout(shared, repeated)
    resp = np.asarray(shared.response_tokens)
    if not opts.get("greedy"):
        assert len({tuple(r) for r in resp[:k]}) > 1   # K different samples of prompt 0
    else:
        np.testing.assert_array_equal(resp, np.repeat(resp[::k], k, axis=0))


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_num_samples_share_the_prompt_cache_under_sliding_windows(attention):
    """K samples keep one copy of each prompt's keys / values (the cache's shared prefix)
    and attend it before their own slots: with a 3-token window on layer 0 that the decode
    steps slide off the 7-token prompt, the rollout equals the repeated prompts' (which
    cache the prompt in every row), through the einsum path's grouped attention and through
    an implementation that takes the prefix repeated (`CachedKV.dense`)."""
    cfg = CFG.replace(family="qwen3", qk_norm=True, sliding_window=3,
                      layer_types=("sliding", "full"), attention=attention)
    model = make_model(cfg, seed=3)
    toks, mask = prompts(batch=2, length=7)
    kw = dict(max_new_tokens=6, eos_id=-1, pad_id=PAD, temperature=0.9)
    shared = gen.generate(model, toks, mask, jax.random.key(2), num_samples=3, **kw)
    repeated = gen.generate(model, jnp.repeat(toks, 3, 0), jnp.repeat(mask, 3, 0),
                            jax.random.key(2), **kw)
    assert_same_rollout(shared, repeated)
    want = full_forward_logprobs(model, shared, 7, temperature=0.9)
    np.testing.assert_allclose(np.asarray(shared.logprobs), want, atol=1e-5)


def test_num_samples_stops_early_once_every_row_finished(model):
    toks, mask = left_padded([[5, 6, 7], [9, 3]], 3)
    kw = dict(max_new_tokens=12, pad_id=PAD, greedy=True)
    free = gen.generate(model, toks, mask, jax.random.key(0), eos_id=-1, **kw)
    eos = int(free.response_tokens[0, 1])
    res = gen.generate(model, toks, mask, jax.random.key(0), eos_id=eos, num_samples=2, **kw)
    assert bool(res.finished.all()) and int(res.num_steps) < 12
    repeated = gen.generate(model, jnp.repeat(toks, 2, 0), jnp.repeat(mask, 2, 0),
                            jax.random.key(0), eos_id=eos, **kw)
    assert_same_rollout(res, repeated)
    with pytest.raises(ValueError, match="num_samples"):
        gen.generate(model, toks, mask, jax.random.key(0), eos_id=eos, max_new_tokens=2,
                     pad_id=PAD, num_samples=0)


# ---------------------------------------------------------------------------------------
# Compilation and sharding.

def test_compiles_once_per_bucket(model):
    toks, mask = prompts(batch=2, length=5)
    kw = dict(eos_id=EOS, pad_id=PAD, temperature=0.9)
    gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=3, **kw)
    before = gen.trace_count
    # New prompts, new rng, new weights of the same architecture: same bucket, no retrace.
    toks2, mask2 = prompts(batch=2, length=5, seed=9)
    gen.generate(model, toks2, mask2, jax.random.key(1), max_new_tokens=3, **kw)
    gen.generate(make_model(seed=4), toks, mask, jax.random.key(2), max_new_tokens=3, **kw)
    # The (graphdef, state) form a trainer passes hits the same compiled function.
    a = gen.generate(nnx.split(model), toks, mask, jax.random.key(0), max_new_tokens=3, **kw)
    b = gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=3, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert gen.trace_count == before
    gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=4, **kw)
    assert gen.trace_count == before + 1


def test_sharded_8_devices_equals_single_device(model):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = shd.shard_model(model, mesh)
    toks, mask = prompts(batch=8, length=7)
    for kw in (dict(greedy=True), dict(temperature=0.9, top_k=30)):
        kw.update(max_new_tokens=8, eos_id=EOS, pad_id=PAD)
        one = gen.generate(model, toks, mask, jax.random.key(4), **kw)
        many = gen.generate(sharded, toks, mask, jax.random.key(4), **kw)
        assert many.tokens.sharding.num_devices == 8
        np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(one.tokens))
        np.testing.assert_array_equal(np.asarray(many.response_mask),
                                      np.asarray(one.response_mask))
        np.testing.assert_allclose(np.asarray(many.logprobs), np.asarray(one.logprobs),
                                   atol=1e-5)


def test_num_samples_sharded_8_devices(model):
    """2 prompts x 4 samples on the 2x2x2 mesh: the prefill's 2 rows and the decode loop's 8
    are sharded differently; the result equals the single-device run on repeated prompts."""
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = shd.shard_model(model, mesh)
    toks, mask = prompts(batch=2, length=7)
    kw = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.9, top_k=30)
    many = gen.generate(sharded, toks, mask, jax.random.key(4), num_samples=4, **kw)
    one = gen.generate(model, jnp.repeat(toks, 4, 0), jnp.repeat(mask, 4, 0),
                       jax.random.key(4), **kw)
    assert many.tokens.sharding.num_devices == 8
    assert_same_rollout(many, one)


def test_rejects_bad_arguments(model):
    toks, mask = prompts(batch=2, length=5)
    kw = dict(eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=2, temperature=0.0,
                     **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=0, **kw)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(model, toks, mask, jax.random.key(0), max_new_tokens=2, top_p=0.0, **kw)


# ---------------------------------------------------------------------------------------
# The benchmark's HF copy of the weights (tools/_bench_common.py).

def test_hf_llama_copy_has_the_same_logits():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import _bench_common

    model = make_model(CFG.replace(rope_theta=500.0), head_scale=1.0)
    hf = _bench_common.to_hf_llama(model)
    toks, mask = prompts(batch=3, length=7)
    want = np.asarray(model(toks, mask))
    pos = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(np.asarray(toks)), position_ids=torch.tensor(pos),
                 attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
