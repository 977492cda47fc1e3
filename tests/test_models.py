"""Model invariants: padding invariance, KV cache == full forward, heads, remat, dtypes.

HF parity of the three families lives in test_hf_io.py (committed fixtures).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.models import ModelConfig, gather_last, init_model, positions_from_mask, preset

# A few small configs covering every architectural switch (keep shapes few: compile time).
CONFIGS = {
    "llama": preset("tiny", d_model=64, mlp_dim=96, n_layers=2),
    "qwen2_llama3rope": preset("tiny", d_model=64, mlp_dim=96, n_layers=2, family="qwen2",
                               qkv_bias=True, tie_embeddings=True,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8}),
    # per-head q/k norm; layer 1 slides over 3 tokens (sequences here are 9-12 long)
    "qwen3_sliding": preset("tiny", d_model=64, mlp_dim=96, n_layers=2, family="qwen3",
                            qk_norm=True, tie_embeddings=True, sliding_window=3,
                            layer_types=("full", "sliding")),
    "mistral_sliding": preset("tiny", d_model=64, mlp_dim=96, n_layers=2, family="mistral",
                              sliding_window=4),
    # Gemma 3: (1 + w) norms, post-norms, GeGLU, embedding scale, q/k norms, soft-capping,
    # layer 0 slides over 3 tokens with its own RoPE base
    "gemma3_sliding": preset("tiny", d_model=64, mlp_dim=96, n_layers=2, family="gemma3",
                             mlp="geglu", norm_offset=1.0, post_norms=True, qk_norm=True,
                             embed_scale=8.0, query_pre_attn_scalar=24.0, attn_softcap=5.0,
                             final_softcap=10.0, tie_embeddings=True, sliding_window=3,
                             layer_types=("sliding", "full"), rope_local_theta=100.0),
    "gpt2": ModelConfig(family="gpt2", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                        mlp_dim=128, norm="layer", mlp="gelu", positions="learned",
                        max_positions=32, qkv_bias=True, out_bias=True, mlp_bias=True,
                        tie_embeddings=True),
}


def _tokens(b, t, seed=0, vocab=256):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, dtype=jnp.int32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return init_model(CONFIGS[request.param], seed=1)


def test_num_params_matches_config(model):
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert n == model.cfg.num_params("lm")


def test_left_padding_invariance(model):
    """A row alone and the same row left-padded inside a batch give the same logits."""
    toks = _tokens(2, 12)
    alone = model(toks[:1, :9])
    pad = 3
    padded = jnp.concatenate([jnp.full((1, pad), 256, jnp.int32), toks[:1, :9]], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 9), jnp.int32)], 1)
    batch_toks = jnp.concatenate([padded, toks[1:]], axis=0)
    batch_mask = jnp.concatenate([mask, jnp.ones((1, 12), jnp.int32)], axis=0)
    out = model(batch_toks, batch_mask)
    np.testing.assert_allclose(out[0, pad:], alone[0], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))  # pad query rows are finite garbage, not NaN


def test_kv_cache_matches_full_forward(model):
    """Prefill a left-padded prompt, decode token by token: logits equal the full forward."""
    b, t, p = 2, 10, 5
    toks = _tokens(b, t, seed=2)
    mask = jnp.ones((b, t), jnp.int32).at[0, :2].set(0)  # row 0 left-padded by 2
    pos = positions_from_mask(mask)
    full = model(toks, mask)
    cache = model.init_cache(b, t + 2)
    out, cache = model.decode(toks[:, :p], mask[:, :p], pos[:, :p], cache)
    outs = [out]
    for i in range(p, t):
        o, cache = model.decode(toks[:, i:i + 1], mask[:, i:i + 1], pos[:, i:i + 1], cache)
        outs.append(o)
    got = jnp.concatenate(outs, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=2e-5,
                               rtol=1e-4)
    assert int(cache.index) == t


def test_score_head_and_last_token():
    cfg = CONFIGS["llama"]
    m = init_model(cfg, head="score", seed=3)
    toks = _tokens(3, 8, seed=4)
    mask = jnp.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
    scores = m(toks, mask)
    assert scores.shape == (3, 8) and scores.dtype == jnp.float32
    r = gather_last(scores, mask)
    np.testing.assert_allclose(r, [scores[0, 7], scores[1, 7], scores[2, 4]])
    # Right padding does not change the reward of the right-padded row.
    alone = m(toks[2:3, :5])
    np.testing.assert_allclose(r[2], alone[0, 4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_layers,scan_unroll,remat", [(2, None, "none"), (1, None, "none"),
                                                       (3, 1, "full")])
def test_hidden_select_equals_full_forward_rows(n_layers, scan_unroll, remat):
    """`hidden(select=...)` (last layer at the selected rows only) gives the full forward's
    rows and the same parameter gradients, for a static slice and per-row indices (the
    reward model's last token); covers a 1-layer model (no scan), a rolled scan and remat.
    Weights are 3x the init's so attention is peaked (at init it is ~uniform and a query
    at the wrong position would hardly change the output): giving the selected queries
    position + 1 moves the rows by ~2 and the gradients by ~45% (measured), against float
    rounding of ~2e-6 and ~1e-6 here."""
    cfg = CONFIGS["llama"].replace(n_layers=n_layers, scan_unroll=scan_unroll, remat=remat)
    toks = _tokens(3, 9, seed=8)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [1] * 6 + [0] * 3], jnp.int32)
    rows = jnp.array([[8, 2], [0, 5], [5, 5]], jnp.int32)
    g, s = nnx.split(init_model(cfg, head="score", seed=7))
    s = jax.tree.map(lambda x: 3.0 * x, s)

    def both(st):
        model = nnx.merge(g, st)
        full = model.hidden(toks, mask)
        pairs = [(model.hidden(toks, mask, select=slice(3, 8)), full[:, 3:8]),
                 (model.hidden(toks, mask, select=rows),
                  jnp.stack([full[i, rows[i]] for i in range(3)])),
                 (model.last_hidden(toks, mask), full[jnp.arange(3), jnp.array([8, 8, 5])])]
        ws = [jax.random.normal(jax.random.key(i), a.shape) for i, (a, _) in enumerate(pairs)]
        return (sum(jnp.sum(w * a) for w, (a, _) in zip(ws, pairs)),
                sum(jnp.sum(w * b) for w, (_, b) in zip(ws, pairs)), pairs)

    _, _, pairs = jax.jit(both)(s)
    for a, b in pairs:
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    g_sel = jax.jit(jax.grad(lambda st: both(st)[0]))(s)
    g_ref = jax.jit(jax.grad(lambda st: both(st)[1]))(s)
    for a, b in zip(jax.tree.leaves(g_sel), jax.tree.leaves(g_ref)):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("name,n_layers,remat", [("llama", 3, "full"),
                                                  ("gemma3_sliding", 2, "none")])
def test_shared_prompt_forward_equals_the_full_forward(name, n_layers, remat):
    """`hidden(select=slice(P - 1, T - 1), group=K)` on 3 prompts x 4 samples (each prompt
    left-padded differently, repeated over its K rows; a response with padding) runs each
    prompt once and gives the same rows and parameter gradients as the full forward: rolled
    scan with remat, and Gemma 3's sliding window, local RoPE, post-norms and soft-capping.
    Weights 3x the init's (peaked attention): with rows reading another group's prompt keys
    (jnp.tile for jnp.repeat in `Block.shared_prefix`) half of the rows' values mismatch."""
    cfg = CONFIGS[name].replace(n_layers=n_layers, remat=remat, scan_unroll=1)
    groups, k, p, n = 3, 4, 6, 5
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, 256, (groups, p))
    prompt_mask = np.ones((groups, p), np.int32)
    prompt_mask[0, :2] = prompt_mask[2, :1] = 0
    toks = np.concatenate([np.repeat(prompt * prompt_mask, k, 0),
                           rng.integers(3, 256, (groups * k, n))], 1)
    mask = np.concatenate([np.repeat(prompt_mask, k, 0), np.ones((groups * k, n), np.int32)], 1)
    mask[5, -2:] = 0
    toks, mask = jnp.asarray(toks, jnp.int32), jnp.asarray(mask)
    g, s = nnx.split(init_model(cfg, seed=2))
    s = jax.tree.map(lambda x: 3.0 * x, s)
    sel = slice(p - 1, p + n - 1)
    w = jax.random.normal(jax.random.key(4), (groups * k, n, cfg.d_model))

    def loss(st, group):
        return jnp.sum(w * nnx.merge(g, st).hidden(toks, mask, select=sel, group=group))

    rows = {kk: jax.jit(lambda st, kk=kk: nnx.merge(g, st).hidden(toks, mask, select=sel,
                                                                  group=kk))(s) for kk in (1, k)}
    assert rows[k].shape == rows[1].shape == (groups * k, n, cfg.d_model)
    np.testing.assert_allclose(rows[k], rows[1], atol=3e-5, rtol=1e-5)
    grads = {kk: jax.jit(jax.grad(loss), static_argnums=1)(s, kk) for kk in (1, k)}
    for a, b in zip(jax.tree.leaves(grads[k]), jax.tree.leaves(grads[1])):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), np.abs(a - b).max()


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_loss_and_grads(remat):
    cfg = CONFIGS["llama"]
    toks = _tokens(2, 8, seed=5)

    def loss_and_grad(c):
        m = init_model(c, seed=6)
        g, s = nnx.split(m)

        def loss(st):
            return jnp.mean(nnx.merge(g, st)(toks) ** 2)

        return jax.jit(jax.value_and_grad(loss))(s)

    l0, g0 = loss_and_grad(cfg)
    l1, g1 = loss_and_grad(cfg.replace(remat=remat))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bf16_compute_close_to_fp32():
    cfg = CONFIGS["llama"]
    toks = _tokens(2, 8, seed=7)
    f32 = init_model(cfg, seed=8)(toks)
    bf = init_model(cfg.replace(dtype="bfloat16"), seed=8)(toks)
    assert bf.dtype == jnp.float32  # logits always float32
    np.testing.assert_allclose(bf, f32, atol=0.05 * float(jnp.abs(f32).max()))


def test_compile_time_flat_in_depth():
    """Layers are scanned: the jaxpr of an 8-layer model is no bigger than a 2-layer one."""
    def n_eqns(n_layers):
        m = init_model(CONFIGS["llama"].replace(n_layers=n_layers), seed=0)
        g, s = nnx.split(m)
        return len(jax.make_jaxpr(lambda st: nnx.merge(g, st)(_tokens(1, 4)))(s).eqns)

    assert n_eqns(8) == n_eqns(2)


def test_config_errors():
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="mamba")
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="sometimes")
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_target_logprobs_equal_the_full_logits(tied):
    """cfg.logits_chunk: the targets' log-probs (T = 11, not a multiple of the chunk 4) and
    their gradients with respect to the hidden states and every parameter equal the
    unchunked [B, T, V] computation."""
    cfg = preset("tiny", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=48,
                 tie_embeddings=tied)
    graphdef, params = nnx.split(init_model(cfg, seed=3))
    toks = _tokens(2, 12, seed=5)
    h = jax.random.normal(jax.random.key(6), (2, 11, 32))
    weights = jax.random.uniform(jax.random.key(7), (2, 11))

    def loss(params, h, chunk):
        model = nnx.merge(graphdef, params)
        model.cfg = model.cfg.replace(logits_chunk=chunk)
        lp = model.target_logprobs(h, toks[:, 1:])
        return jnp.sum(lp * weights), lp

    (full, lp_full), g_full = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, h, 0)
    (chunked, lp_chunked), g_chunked = jax.jit(
        jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(params, h, 4)
    (_, lp_eight), g_eight = jax.jit(   # two balanced chunks of 6 (1 padding position)
        jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)(params, h, 8)
    want = jax.nn.log_softmax(nnx.merge(graphdef, params).apply_head(h), -1)
    np.testing.assert_allclose(np.asarray(lp_full), np.take_along_axis(
        np.asarray(want), np.asarray(toks[:, 1:])[..., None], -1)[..., 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lp_chunked), np.asarray(lp_full), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(lp_eight), np.asarray(lp_full), rtol=1e-6,
                               atol=1e-6)
    for g in (g_chunked, g_eight):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Auto (None): chunks of 128 for a large vocabulary only.
    assert cfg.logits_chunk is None and cfg.logits_chunk_size() == 0
    assert cfg.replace(vocab_size=49152).logits_chunk_size() == 128
    # ... and at most 1,024 rows x positions per chunk (at least 8 positions).
    assert cfg.replace(vocab_size=49152).logits_chunk_size(8) == 128
    assert cfg.replace(vocab_size=49152).logits_chunk_size(32) == 32
    assert cfg.replace(vocab_size=49152).logits_chunk_size(1000) == 8
    assert cfg.replace(vocab_size=49152, logits_chunk=16).logits_chunk_size(32) == 16
    # The positions split into the fewest chunks, of equal size: little padding.
    from jaxrlhf.models.transformer import balanced_chunk
    assert balanced_chunk(191, 128) == 96 and balanced_chunk(512, 128) == 128
    assert balanced_chunk(11, 8) == 6 and balanced_chunk(11, 4) == 4
    for t in range(1, 300):
        for c in (1, 4, 8, 64, 128):
            k = balanced_chunk(t, c)
            n = -(-t // c)
            assert k <= c and n * k >= t and n * k - t < n, (t, c, k)


def test_chunked_head_reduce_with_a_tuple_output():
    """Transformer.head_reduce with several outputs (the RL stage's sampling log-probs and
    entropy at temperature 0.7 with top-k): chunked values and gradients equal the full
    [B, T, V] computation."""
    from jaxrlhf.generation import sampling_logprobs
    from jaxrlhf.objectives import entropy
    cfg = preset("tiny", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=48)
    graphdef, params = nnx.split(init_model(cfg, seed=3))
    toks = _tokens(2, 12, seed=5)[:, 1:]
    h = jax.random.normal(jax.random.key(6), (2, 11, 32))
    fn = lambda z, y: (sampling_logprobs(z, y, temperature=0.7, top_k=50), entropy(z, 0.7))

    def loss(params, chunk):
        model = nnx.merge(graphdef, params)
        model.cfg = model.cfg.replace(logits_chunk=chunk)
        lp, ent = model.head_reduce(h, fn, toks)
        return jnp.sum(lp) + 0.3 * jnp.sum(ent), (lp, ent)

    (_, full), g_full = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (_, chunked), g_chunked = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                      static_argnums=1)(params, 4)
    want = fn(nnx.merge(graphdef, params).apply_head(h), toks)
    for a, b, c in zip(chunked, full, want):
        assert a.shape == (2, 11)
        np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
