"""The objectives under `vmap` and under batch sharding over the 8 fake CPU devices."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrlhf import objectives as obj

B, T, V, K, M = 8, 6, 5, 3, 2


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), bool)
    for b in range(B - 1):
        start = rng.integers(0, T - 1)
        mask[b, start:rng.integers(start + 1, T + 1)] = True
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)
    return dict(
        mask=mask, logits=f(B, T, V), tokens=rng.integers(0, V, size=(B, T)),
        old_logp=-np.abs(f(B, T)), ref_logp=-np.abs(f(B, T)), values=f(B, T), score=f(B),
        rewards_K=f(B, K), ranks=rng.integers(0, K, size=(B, K)), valid=rng.random((B, K)) < 0.9,
    )


def _pipeline(x):
    """A PPO scoring + loss pass built only from objectives functions."""
    logp = obj.token_logprobs(x["logits"], x["tokens"])
    rewards, _ = obj.kl_penalized_rewards(x["score"], x["old_logp"], x["ref_logp"], x["mask"],
                                          kl_coef=0.1, kind="k3")
    adv, ret = obj.gae(rewards, x["values"], x["mask"], gamma=1.0, lam=0.95)
    adv = obj.masked_whiten(adv, x["mask"])
    total, metrics = obj.ppo_ptx_objective(
        x["logits"], x["tokens"], x["old_logp"], adv, x["mask"], values_BxT=x["values"] * 1.1,
        old_values_BxT=x["values"], returns_BxT=ret, entropy_coef=0.01,
        ptx_logits_BxSxV=x["logits"], ptx_tokens_BxS=x["tokens"], ptx_mask_BxS=x["mask"],
        ptx_coef=0.5)
    rm_loss, _ = obj.kwise_ranking_loss(x["rewards_K"], x["ranks"], x["valid"], tie_mode="soft")
    pair_loss, _ = obj.pairwise_ranking_loss(x["rewards_K"][:, 0], x["rewards_K"][:, 1],
                                             label_smoothing=0.1)
    con_loss, _ = obj.contrastive_loss(x["logits"][:, 0], x["logits"][:, 1], temperature=0.1)
    moments = obj.running_moments_update(obj.running_moments_init(), x["score"])
    return {"logp": logp, "adv": adv, "ret": ret, "total": total, "approx_kl": metrics["approx_kl"],
            "rm_loss": rm_loss, "pair_loss": pair_loss, "con_loss": con_loss, "moments": moments}


def test_sharded_batch_equals_unsharded():
    assert jax.device_count() == 8
    x = _inputs()
    expected = jax.jit(_pipeline)(x)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", *([None] * (a.ndim - 1)))))
    x_sharded = jax.tree.map(shard, x)
    assert len(x_sharded["logits"].sharding.device_set) == 8
    got = jax.jit(_pipeline)(x_sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got, expected)
    assert got["adv"].sharding.is_equivalent_to(x_sharded["values"].sharding, 2)


def test_vmap_over_an_ensemble_or_group_axis():
    xs = [_inputs(seed) for seed in (1, 2)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *xs)
    got = jax.jit(jax.vmap(_pipeline))(stacked)
    for m in range(M):
        expected = jax.jit(_pipeline)(xs[m])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[m], b, rtol=1e-5, atol=1e-6),
                     got, expected)
