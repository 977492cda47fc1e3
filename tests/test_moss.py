"""MOSS reward-model toolkit: vmapped ensemble == M independent models step for step;
preference strength == NumPy; flip / soft-label / adaptive-margin options change the loss
exactly as specified; contrastive term; MetaRM step == a hand-written two-step reference;
uncertainty-aware PPO score; the stages run end to end."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer_utils import load_config, read_jsonl, shrink

from jaxrlhf.data import build_dataset
from jaxrlhf.models import init_model, preset
from jaxrlhf.objectives import contrastive_loss
from jaxrlhf.data.preference_strength import (STRENGTH_PLOT, StrengthTable, read_strength,
                                              write_strength)
from jaxrlhf.models.reward import (load_ensemble, member, member_rewards, sequence_rewards,
                                   stack_trees)
from jaxrlhf.objectives import pair_labels, uncertainty_reward
from jaxrlhf.rollout import ModelReward
from jaxrlhf.trainers import common, rm_ensemble, rm_steps, runner

TINY = preset("tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64)
LOSS_KW = dict(tie_mode="skip", margin=0.0, label_smoothing=0.0)


def _optimizer(steps=10):
    cfg = shrink(load_config("rm")).train
    cfg.steps = steps
    return common.make_optimizer(cfg)


def _params(seed):
    model = init_model(TINY, head="score", seed=seed)
    return nnx.graphdef(model), common.params_of(model)


@functools.lru_cache(maxsize=None)
def _pairs_ds(n=24):
    """Preference pairs (K = 2) of the built-in task, short buckets."""
    return build_dataset(dict(path="synthetic", format="preference", buckets=(24,),
                              synthetic=dict(num_examples=n, label_noise=0.25)), "byte")


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------
# Ensemble.

def test_vmapped_ensemble_equals_independent_members():
    m_count, steps = 3, 2
    optimizer, schedule = _optimizer()
    graphdef, _ = _params(0)
    members = [_params(s)[1] for s in range(m_count)]
    it = rm_ensemble.StackedIterator(
        [_pairs_ds().iterator(8, seed=s) for s in range(m_count)], pad_id=0)
    batches = [next(it) for _ in range(steps)]
    assert batches[0]["tokens"].shape[:2] == (8, m_count)
    # Member m reads the data in its own order: member 0 is the plain iterator of seed 0.
    np.testing.assert_array_equal(batches[0]["index"][:, 0],
                                  next(_pairs_ds().iterator(8, seed=0))["index"])
    assert not np.array_equal(batches[0]["index"][:, 0], batches[0]["index"][:, 1])

    member_step = functools.partial(rm_steps.train_step, graphdef=graphdef, optimizer=optimizer,
                                    schedule=schedule, grad_accum=1, on_nonfinite="stop",
                                    loss_kw=LOSS_KW)
    stacked = stack_trees(members)
    ens = {"step": jnp.zeros((), jnp.int32), "params": stacked,
           "opt_state": jax.vmap(optimizer.init)(stacked),
           "rng": jnp.stack([jax.random.PRNGKey(s) for s in range(m_count)])}
    ens_step = jax.jit(functools.partial(rm_ensemble.ensemble_train_step,
                                         member_step=member_step))
    singles = [{"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p),
                "rng": jax.random.PRNGKey(s)} for s, p in enumerate(members)]
    one_step = jax.jit(member_step)
    for b in batches:
        ens, em = ens_step(ens, {k: jnp.asarray(v) for k, v in b.items()})
        losses = []
        for m in range(m_count):
            singles[m], sm = one_step(singles[m], {k: jnp.asarray(v[:, m]) for k, v in b.items()})
            losses.append(float(sm["loss"]))
            _close(member(ens["params"], m), singles[m]["params"])
            _close(member(ens["opt_state"], m), singles[m]["opt_state"])
        np.testing.assert_allclose(float(em["loss"]), np.mean(losses), rtol=1e-5)
    assert int(ens["step"]) == steps


def test_strength_statistics_match_numpy(tmp_path):
    m_count = 3
    graphdef, _ = _params(0)
    members = [_params(s)[1] for s in range(m_count)]
    stacked = stack_trees(members)
    ds = _pairs_ds()
    mesh = common.mesh_from_config(shrink(load_config("rm")))
    rows = rm_ensemble.score_strength(stacked, graphdef, ds, mesh, batch_size=16)
    assert len(rows) == len(ds.rows)   # one ranked pair per preference row
    # Reference: each member alone, rewards of chosen (slot 0) and rejected (slot 1), NumPy.
    it = ds.iterator(16, shuffle=False, drop_remainder=False, num_epochs=1)
    ref = {}
    for b in it:
        d = []
        for p in members:
            r = np.asarray(sequence_rewards(p, graphdef, jnp.asarray(b["tokens"]),
                                                   jnp.asarray(b["attention_mask"])), np.float64)
            d.append(r[:, 0] - r[:, 1])
        d = np.stack(d)
        for i in np.nonzero(b["batch_mask"])[0]:
            ref[int(b["index"][i])] = (d[:, i].mean(), d[:, i].std())
    for r in rows:
        assert (r["chosen"], r["rejected"]) == (0, 1)
        np.testing.assert_allclose([r["mu"], r["sigma"]], ref[r["index"]], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.mean(r["d"]), r["mu"], rtol=1e-6, atol=1e-9)
    path = write_strength(str(tmp_path), rows)
    back = read_strength(path)
    assert [(r["index"], r["mu"]) for r in back] == [(r["index"], r["mu"]) for r in rows]
    assert os.path.getsize(tmp_path / STRENGTH_PLOT) > 1000


# ------------------------------------------------------------------------------------------
# Strength options.

def _strength_setup(k=2):
    """A batch, rewards, and a strength table with known μ for every pair of the batch."""
    graphdef, params = _params(0)
    b = next(_pairs_ds().iterator(8, seed=0))
    rng = np.random.default_rng(0)
    rows = [{"index": int(i), "chosen": 0, "rejected": 1, "mu": float(rng.normal()),
             "sigma": 0.1} for i in range(len(_pairs_ds().examples))]
    r = np.asarray(sequence_rewards(params, graphdef, jnp.asarray(b["tokens"]),
                                           jnp.asarray(b["attention_mask"])), np.float64)
    return graphdef, params, b, rows, r


def _loss(params, graphdef, batch, **kw):
    loss, _ = rm_steps.ranking_loss(params, graphdef, {k: jnp.asarray(v) for k, v in batch.items()},
                                  **(LOSS_KW | kw))
    return float(loss)


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def test_flip_equals_training_on_swapped_ranks():
    graphdef, params, b, rows, _ = _strength_setup()
    table = StrengthTable.from_rows(rows, k=2, flip_fraction=0.25)
    n_flip = round(0.25 * len(rows))
    assert table.flip.sum() == n_flip
    lowest = sorted(rows, key=lambda r: r["mu"])[:n_flip]
    assert {r["index"] for r in lowest} == set(np.nonzero(table.flip[:, 0, 1])[0].tolist())
    mu, flip = table.lookup(b)
    eps, m = pair_labels(mu, flip)
    flipped_rows = flip[:, 0, 1]
    assert 0 < flipped_rows.sum() < len(flipped_rows)   # the batch mixes both kinds
    swapped = dict(b, ranks=np.where(flipped_rows[:, None], b["ranks"][:, ::-1], b["ranks"]))
    np.testing.assert_allclose(
        _loss(params, graphdef, dict(b, pair_smoothing=eps, pair_margin=m)),
        _loss(params, graphdef, swapped), rtol=1e-6)
    # Plain per-pair arrays (nothing flipped, ε = 0, m = 0) give the default loss.
    eps0, m0 = pair_labels(mu, np.zeros_like(flip))
    np.testing.assert_allclose(_loss(params, graphdef, dict(b, pair_smoothing=eps0,
                                                            pair_margin=m0)),
                               _loss(params, graphdef, b), rtol=1e-7)


def test_soft_labels_and_adaptive_margin_change_the_loss_as_specified():
    graphdef, params, b, rows, r = _strength_setup()
    table = StrengthTable.from_rows(rows, k=2)
    mu, flip = table.lookup(b)
    mu01 = mu[:, 0, 1]
    diff = r[:, 0] - r[:, 1]
    # Soft labels: target p = σ(μ / T).
    t = 0.7
    eps, m = pair_labels(mu, flip, soft_labels=True, soft_label_temperature=t)
    p = 1.0 / (1.0 + np.exp(-mu01 / t))
    want = np.mean(-(p * _logsig(diff) + (1 - p) * _logsig(-diff)))
    np.testing.assert_allclose(_loss(params, graphdef, dict(b, pair_smoothing=eps,
                                                            pair_margin=m)), want, rtol=1e-5)
    # Adaptive margin: m = margin + clip(α μ, ±c).
    alpha, cmax, base = 2.0, 1.5, 0.25
    eps, m = pair_labels(mu, flip, margin=base, adaptive_margin=alpha,
                                    adaptive_margin_max=cmax)
    marg = base + np.clip(alpha * mu01, -cmax, cmax)
    assert np.any(np.abs(alpha * mu01) > cmax)   # the clip is exercised
    want = np.mean(-_logsig(diff - marg))
    np.testing.assert_allclose(_loss(params, graphdef, dict(b, pair_smoothing=eps,
                                                            pair_margin=m)), want, rtol=1e-5)
    # Flipping leaves soft labels (ε and m) and the adaptive margin m unchanged; with hard
    # labels it only turns ε = 0 into ε = 1.
    all_flip = np.ones_like(flip)
    np.testing.assert_allclose(pair_labels(mu, flip, soft_labels=True),
                               pair_labels(mu, all_flip, soft_labels=True), atol=1e-7)
    (e0, m0), (e1, m1) = (pair_labels(mu, f, adaptive_margin=alpha)
                          for f in (flip, all_flip))
    np.testing.assert_allclose(m0, m1, atol=1e-7)
    assert np.all(e0 == 0.0) and np.all(e1 == 1.0)


def test_strength_lookup_for_rankings_and_missing_pairs():
    rows = [{"index": 3, "chosen": 2, "rejected": 0, "mu": 1.5, "sigma": 0.0},
            {"index": 3, "chosen": 0, "rejected": 1, "mu": -0.5, "sigma": 0.0},
            {"index": 3, "chosen": 2, "rejected": 1, "mu": 0.5, "sigma": 0.0}]
    table = StrengthTable.from_rows(rows, k=3, flip_fraction=1 / 3)
    batch = {"index": np.array([3]), "ranks": np.array([[1, 2, 0]]),
             "valid": np.ones((1, 3), np.int32)}
    mu, flip = table.lookup(batch)
    assert mu[0, 2, 0] == 1.5 and mu[0, 0, 1] == -0.5 and mu[0, 2, 1] == 0.5
    assert flip[0, 0, 1] and flip.sum() == 1
    with pytest.raises(ValueError, match="no strength for data row 4"):
        table.lookup(dict(batch, index=np.array([4])))


# ------------------------------------------------------------------------------------------
# Contrastive term and MetaRM.

def test_contrastive_term_matches_infonce_on_pair_differences():
    graphdef, params = _params(0)
    b = {k: jnp.asarray(v) for k, v in next(_pairs_ds().iterator(8, seed=0)).items()}
    b["row_key"] = jax.random.split(jax.random.PRNGKey(0), 8)

    @functools.partial(jax.jit, static_argnames="dropout")
    def losses(p, batch, dropout):
        return rm_steps.ranking_terms(
            p, graphdef, batch, **LOSS_KW, contrastive_coef=0.3, contrastive_temperature=0.1,
            contrastive_dropout=dropout)

    loss, _, con = losses(params, b, 0.0)
    # Reference: hidden states at the last real token, d = h(chosen) − h(rejected).
    model = nnx.merge(graphdef, params)
    tok, mask = b["tokens"].reshape(16, -1), b["attention_mask"].reshape(16, -1)
    h = np.asarray(model.hidden(tok, mask))
    last = np.asarray(mask).shape[1] - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)
    hl = h[np.arange(16), last].reshape(8, 2, -1)
    want, _ = contrastive_loss(hl[:, 0], hl[:, 1], temperature=0.1)
    np.testing.assert_allclose(float(con), float(want), rtol=1e-4)
    np.testing.assert_allclose(float(loss), _loss(params, graphdef, b), rtol=1e-5)
    # Dropout views: a real positive pair (loss below the no-view uniformity value is not
    # guaranteed, but it differs and stays finite); the ranking loss is untouched.
    loss2, _, con2 = losses(params, b, 0.2)
    assert np.isfinite(float(con2)) and float(con2) != float(con)
    assert float(loss2) == float(loss)


def test_meta_rm_step_equals_two_step_reference(first_order=False):
    """The default (second-order) MetaRM step; the first-order variant runs end to end below."""
    graphdef, params = _params(0)
    optimizer, schedule = _optimizer()
    b = next(_pairs_ds().iterator(8, seed=0))
    meta = next(_pairs_ds().iterator(6, seed=5))   # unlabeled pairs: ranks are ignored
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    batch.update({"meta_" + k: jnp.asarray(meta[k]) for k in ("tokens", "attention_mask",
                                                              "valid")})
    eta = 0.5
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": optimizer.init(params), "rng": jax.random.PRNGKey(0)}
    new, metrics = jax.jit(functools.partial(
        rm_steps.train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
        grad_accum=1, on_nonfinite="stop", loss_kw=LOSS_KW,
        meta={"lr": eta, "first_order": first_order}))(state, batch)

    # Hand-written reference: J = mean_i σ(|r(y_i1) − r(y_i2)|) on the meta pairs; ascend
    # θ' = θ + η ∇J(θ); L = −mean log σ(r_c − r_r) at θ'; descend θ with ∇_θ L(θ').
    mt, mm = jnp.asarray(meta["tokens"]), jnp.asarray(meta["attention_mask"])

    def J(p):
        r = sequence_rewards(p, graphdef, mt, mm)
        return jnp.mean(jax.nn.sigmoid(jnp.abs(r[:, 0] - r[:, 1])))

    def L(p):
        r = sequence_rewards(p, graphdef, batch["tokens"], batch["attention_mask"])
        return -jnp.mean(jax.nn.log_sigmoid(r[:, 0] - r[:, 1]))

    def adapted(p):
        return jax.tree.map(lambda a, g: a + eta * g, p, jax.grad(J)(p))

    @jax.jit   # one program for the whole reference (L(θ') comes with its gradient)
    def reference(p):
        if first_order:
            loss, grads = jax.value_and_grad(L)(adapted(p))
        else:
            loss, grads = jax.value_and_grad(lambda q: L(adapted(q)))(p)
        updates, _ = optimizer.update(grads, state["opt_state"], p)
        return jax.tree.map(lambda a, u: a + u, p, updates), loss, J(p)

    want, want_loss, want_j = reference(params)
    _close(new["params"], want, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["meta_difference_loss"]), float(want_j), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# PPO score and end-to-end stages.

def test_uncertainty_reward_is_mean_minus_lambda_std():
    graphdef, _ = _params(0)
    members = [_params(s)[1] for s in range(3)]
    b = next(_pairs_ds().iterator(8, seed=0))
    tok, mask = jnp.asarray(b["tokens"][:, 0]), jnp.asarray(b["attention_mask"][:, 0])
    r = np.stack([np.asarray(sequence_rewards(p, graphdef, tok, mask)) for p in members])
    got = ModelReward(graphdef, ensemble_coef=0.7)(stack_trees(members), tok, mask)
    np.testing.assert_allclose(np.asarray(got), r.mean(0) - 0.7 * r.std(0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(uncertainty_reward(
        member_rewards(stack_trees(members), graphdef, tok, mask), 0.7)), np.asarray(got))


def test_ensemble_stage_then_rm_with_every_option(tmp_path):
    ens_dir = str(tmp_path / "ens")
    cfg = shrink(load_config("rm_ensemble", "m=2"), steps=1)
    cfg.data.max_k = 2
    cfg.train.eval_batches = 1
    cfg.rm.center_on_sft = False
    summary, _ = runner.run(cfg, ens_dir)
    assert summary["members"] == 2 and summary["strength_pairs"] > 0
    rows = read_jsonl(os.path.join(ens_dir, "strength.jsonl"))
    assert len(rows[0]["d"]) == 2
    graphdef, stacked, _ = load_ensemble(ens_dir)
    assert jax.tree.leaves(stacked)[0].shape[0] == 2

    meta_file = tmp_path / "meta.jsonl"
    with open(meta_file, "w") as f:
        for p, a, c in (("abc>", "abc", "acb"), ("dcba>", "abcd", "abdd"), ("ba>", "ab", "b")):
            f.write(json.dumps({"prompt": p, "responses": [a, c]}) + "\n")
    cfg = shrink(load_config("rm"), steps=1)
    cfg.data.max_k = 2
    cfg.train.eval_batches = 1
    cfg.rm.center_on_sft = False
    rc = cfg.rm
    rc.strength_file = os.path.join(ens_dir, "strength.jsonl")
    rc.flip_fraction, rc.soft_labels, rc.adaptive_margin = 0.2, True, 1.0
    rc.contrastive_coef, rc.meta_rm, rc.meta_data = 0.1, True, str(meta_file)
    rc.meta_batch_size, rc.meta_first_order = 2, True
    summary, _ = runner.run(cfg, str(tmp_path / "rm"))
    assert summary["moss"]["flipped_pairs"] == round(0.2 * len(rows))
    assert summary["moss"]["meta_rows"] == 3
    train = [r for r in read_jsonl(str(tmp_path / "rm" / "metrics.jsonl"))
             if r.get("split") == "train"]
    assert all(np.isfinite(r["loss"]) and "meta_difference_loss" in r for r in train)
