"""Attention implementations: the einsum path and `jax.nn.dot_product_attention` give the
same forward, gradients, selected rows and KV-cached decode on CPU, with left padding,
grouped-query heads and sliding windows; "auto" picks per backend and dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf.generation import generate
from jaxrlhf.models import ModelConfig, init_model
from jaxrlhf.models.transformer import attention_blocks, dot_product_attention, resolve_attention

# GQA (4 query heads over 2 kv heads), a sliding layer between full ones, 3 layers (unrolled).
BASE = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48,
            sliding_window=3, layer_types=("full", "sliding", "full"), dtype="float32",
            pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _batch(b=3, t=9):
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, 64, (b, t)), jnp.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, :4] = 0     # left padding: query rows 0-3 of row 0 have no allowed key
    mask[2, :1] = 0
    return tokens, jnp.asarray(mask)


def _pair(**kw):
    return [init_model(ModelConfig(**BASE, **kw, attention=a), seed=0)
            for a in ("einsum", "xla")]


def test_forward_and_gradients_match():
    tokens, mask = _batch()
    outs, grads = [], []
    for m in _pair():
        g, st = nnx.split(m)

        def loss(st):
            h = nnx.merge(g, st).hidden(tokens, mask)
            return jnp.sum((h * mask[..., None]) ** 2), h
        (_, h), gr = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
        assert np.isfinite(np.asarray(h)).all()   # padding query rows too
        outs.append(np.asarray(h)[np.asarray(mask) > 0])
        grads.append(jax.tree.leaves(gr))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        a, b = np.asarray(a), np.asarray(b)   # float32 sums in another order
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


def test_selected_rows_and_kv_cache_decode_match():
    tokens, mask = _batch()
    select = jnp.asarray([[6, 8], [3, 8], [7, 8]], jnp.int32)
    rows, gens = [], []
    for m in _pair():
        rows.append(np.asarray(m.hidden(tokens, mask, select=select)))
        r = generate(m, tokens, mask, jax.random.key(0), max_new_tokens=6, eos_id=-1,
                     pad_id=0, greedy=True)
        gens.append((np.asarray(r.response_tokens), np.asarray(r.logprobs)))
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gens[0][0], gens[1][0])     # past the 3-token window
    np.testing.assert_allclose(gens[0][1], gens[1][1], rtol=1e-5, atol=1e-5)


def test_auto_resolves_per_backend_dtype_and_model():
    cfg = ModelConfig(**BASE)
    assert cfg.attention == "auto"
    assert resolve_attention(cfg, "bfloat16", "cpu") == "einsum"
    assert resolve_attention(cfg, "bfloat16", "gpu") == "cudnn"
    assert resolve_attention(cfg, "float32", "gpu") == "xla"     # cuDNN's kernel is bf16/fp16
    assert resolve_attention(cfg, "bfloat16", "tpu") == "xla"
    assert resolve_attention(cfg.replace(head_dim=12), "bfloat16", "gpu") == "xla"
    capped = cfg.replace(attn_softcap=50.0)
    assert resolve_attention(capped, "bfloat16", "gpu") == "einsum"
    assert resolve_attention(cfg.replace(attention="xla"), "float32", "cpu") == "xla"
    with pytest.raises(ValueError, match="attn_softcap"):
        cfg.replace(attention="xla", attn_softcap=50.0)
    with pytest.raises(ValueError, match="attention must be one of"):
        cfg.replace(attention="flash")


def test_cudnn_falls_back_to_xla_where_the_kernel_is_unavailable():
    q = jnp.asarray(np.random.RandomState(1).randn(2, 5, 4, 8), jnp.float32)
    k = jnp.asarray(np.random.RandomState(2).randn(2, 5, 2, 8), jnp.float32)
    allowed = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
    want = dot_product_attention(q, k, k, allowed, 0.3, "xla")
    got = jax.jit(lambda q, k: dot_product_attention(q, k, k, allowed, 0.3, "cudnn"))(q, k)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_causal_blocks_skip_the_masked_triangle_with_the_same_rows():
    cfg = ModelConfig(**BASE)
    assert attention_blocks(cfg, 64) == [(0, 64)]                        # short: one block
    assert attention_blocks(cfg, 160) == [(0, 64), (64, 128), (128, 160)]
    assert attention_blocks(cfg, 1024) == [(a, a + 128) for a in range(0, 1024, 128)]
    assert attention_blocks(cfg.replace(attention_block=0), 1024) == [(0, 1024)]
    assert attention_blocks(cfg.replace(attention_block=50), 120) == [(0, 50), (50, 100),
                                                                     (100, 120)]
    tokens, mask = _batch(t=160)
    select = jnp.asarray([[150, 159]] * 3, jnp.int32)
    outs = []
    for block in (0, None):     # one block vs the auto blocks (3 of them)
        m = init_model(ModelConfig(**BASE, attention_block=block), seed=0)
        g, st = nnx.split(m)

        def loss(st):
            h = nnx.merge(g, st).hidden(tokens, mask)
            return jnp.sum((h * mask[..., None]) ** 2), h
        (_, h), gr = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
        outs.append((np.asarray(h)[np.asarray(mask) > 0], jax.tree.leaves(gr),
                     np.asarray(m.hidden(tokens, mask, select=select))))
    (h0, g0, s0), (h1, g1, s1) = outs
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s1, s0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())
