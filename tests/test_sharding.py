"""Sharded == unsharded on 8 fake CPU devices, and parameters really are sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrlhf import sharding as sh
from jaxrlhf.models import preset

CFG = preset("tiny", d_model=64, mlp_dim=96, n_layers=2)
MESHES = {"dp2_fsdp2_tp2": {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp8": {"fsdp": 8}}


def _loss_and_grads(model, tokens, mask):
    g, s = nnx.split(model)

    @jax.jit
    def f(st, tokens, mask):
        def loss(st):
            logits = nnx.merge(g, st)(tokens, mask)
            return jnp.mean(jax.nn.logsumexp(logits, -1) * mask)
        out = nnx.merge(g, st)(tokens, mask)
        return out, *jax.value_and_grad(loss)(st)

    return f(s, tokens, mask)


@pytest.fixture(scope="module")
def reference():
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 259)
    mask = jnp.ones((8, 16), jnp.int32).at[:3, :4].set(0)
    model = sh.init_sharded(CFG, "lm", seed=0)
    return tokens, mask, _loss_and_grads(model, tokens, mask)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_matches_single_device(reference, mesh_name):
    assert jax.device_count() == 8
    tokens, mask, (logits0, loss0, grads0) = reference
    mesh = sh.make_mesh(MESHES[mesh_name])
    model = sh.init_sharded(CFG, "lm", seed=0, mesh=mesh)
    state = nnx.state(model)
    # Parameters really are sharded: the big matrices are split over more than one device.
    wq = state["layers"]["attn"]["wq"][...]
    assert len(wq.sharding.device_set) == 8
    assert wq.addressable_shards[0].data.size < wq.size
    if mesh_name == "dp2_fsdp2_tp2":
        assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    else:
        assert wq.sharding.spec == P(None, "fsdp", None, None)
    batch = sh.shard_batch({"t": tokens, "m": mask}, mesh)
    logits, loss, grads = _loss_and_grads(model, batch["t"], batch["m"])
    np.testing.assert_allclose(logits, logits0, atol=1e-5)
    np.testing.assert_allclose(loss, loss0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, grads0)


def test_non_dividing_axes_are_replicated():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # vocab 259 is odd: the "tensor" axis is dropped rather than failing.
    assert sh.logical_to_spec(("vocab", "embed"), (259, 64), mesh) == P(None, "fsdp")
    assert sh.logical_to_spec(("batch", None), (4, 3), mesh) == P(("data", "fsdp"), None)
    assert sh.logical_to_spec(("batch", None), (2, 3), mesh) == P("data", None)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sh.make_mesh({"data": 8, "fsdp": 2})
    assert sh.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}).devices.size == 1
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        sh.make_mesh({"model": 8})
    assert sh.make_mesh({"data": 2, "tensor": -1}).shape["tensor"] == 4
