"""Stage `rm_ensemble`: M reward models trained together in ONE compiled step, then the
preference strength of every training pair (MOSS "Measuring the strength of
preferences").

Ensemble step. The members' parameters, optimizer states and rngs are stacked on a leading
axis M and `ensemble_train_step` is `jax.vmap` of the single-model `rm_steps.train_step` over
them, so member m follows exactly the update it would follow alone (tested step for step).
Diversity: member m is initialised from seed + m (with `init_from`, the trunk is the same
checkpoint and a fresh score head is drawn from seed + m, unless the checkpoint already has a
trained score head) and reads the training data in its own order (iterator seed + m; member 0
sees the same stream as a plain `rm` run with the same seed). A training batch is [B, M, ...]
(batch axis first, so it shards over the data axes like any batch; the member axis second),
each member's rows right-padded to the longest bucket of the M (padding does not change a
reward). All members share the optimizer hyper-parameters and the schedule.

Preference strength. For every ranked pair (chosen i, rejected j) of training row `index`,
d_m = r_m(x, y_i) − r_m(x, y_j) for each member, μ = mean_m d_m and σ = std_m d_m
(`jaxrlhf.objectives.preference_strength`). Written to `strength.jsonl` with
`strength_hist.png` (`jaxrlhf.data.preference_strength`); the strength options of the `rm`
stage (`config.rm`) use the file.

Outputs in stage_dir: member_<m>/hf (each member exported like an `rm` stage, centred on its
own), ensemble.json, strength.jsonl, strength_hist.png, summary.json, metrics.jsonl (member
means; `accuracy_min` / `accuracy_max` over members; eval also per member and the accuracy
of the ensemble-mean reward).

`jaxrlhf.models.reward.load_ensemble(dir)` stacks the exported members again, e.g. for PPO's
uncertainty-aware score mean_m r_m − λ·std_m r_m (`config.ppo.reward_ensemble`,
`config.ppo.uncertainty_coef`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import List

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrlhf import paths
from jaxrlhf import objectives as obj
from jaxrlhf import sharding as shd
from jaxrlhf.data import load_tokenizer, ranked_pairs
from jaxrlhf.data.preference_strength import STRENGTH_FILE, write_strength
from jaxrlhf.metrics import plot_curves, write_summary
from jaxrlhf.models.reward import (ENSEMBLE_FILE, member, member_rewards, stack_trees,
                                   stacked_shardings)
from jaxrlhf.options import RMOptions, parse
from jaxrlhf.trainers import common, rm_steps


# ------------------------------------------------------------------------------------------
# Pure functions.

def ensemble_train_step(state, batch, *, member_step):
    """step(state, batch) -> (state, metrics) for M members at once.

    state: {"step": (), "params", "opt_state": stacked [M, ...], "rng": [M, 2]};
    batch: every key [B, M, ...]. `member_step` is a single-model step (e.g.
    `rm_steps.train_step` with its options bound). Metrics are member means, plus the min and
    max accuracy; "finite" is the min (one non-finite member flags the step).
    """
    def one(params, opt_state, rng, mb):
        new, metrics = member_step({"step": state["step"], "params": params,
                                    "opt_state": opt_state, "rng": rng}, mb)
        return new["params"], new["opt_state"], metrics

    params, opt_state, m = jax.vmap(one, in_axes=(0, 0, 0, 1))(
        state["params"], state["opt_state"], state["rng"], batch)
    metrics = {k: jnp.mean(v) for k, v in m.items()}
    metrics["finite"] = jnp.min(m["finite"])
    if "accuracy" in m:
        metrics["accuracy_min"] = jnp.min(m["accuracy"])
        metrics["accuracy_max"] = jnp.max(m["accuracy"])
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new_state, metrics


# ------------------------------------------------------------------------------------------
# Data: M member streams in one batch.

def _pad_last(x: np.ndarray, length: int, value) -> np.ndarray:
    if x.shape[-1] == length:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]
    return np.pad(x, pad, constant_values=value)


class StackedIterator:
    """M member iterators -> batches with every key [B, M, ...]; tokens / attention_mask of
    all members right-padded to the longest T. state()/restore() cover all members."""

    def __init__(self, iterators: List, pad_id: int):
        self.iterators, self.pad_id = iterators, pad_id

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(it) for it in self.iterators]
        t = max(b["tokens"].shape[-1] for b in batches)
        for b in batches:
            b["tokens"] = _pad_last(b["tokens"], t, self.pad_id)
            b["attention_mask"] = _pad_last(b["attention_mask"], t, 0)
        return {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}

    def state(self) -> dict:
        s0 = self.iterators[0].state()
        return {"epoch": s0["epoch"], "position": s0["position"],
                "members": [it.state() for it in self.iterators]}

    def restore(self, state) -> None:
        for it, s in zip(self.iterators, state["members"]):
            it.restore(s)


# ------------------------------------------------------------------------------------------
# Preference strength.

def score_strength(stacked_params, graphdef, ds, mesh, batch_size: int) -> List[dict]:
    """Strength rows of every ranked pair of a ranking dataset (one pass, no shuffling)."""
    fn = jax.jit(functools.partial(member_rewards, graphdef=graphdef))
    it = ds.iterator(batch_size, shuffle=False, drop_remainder=False, num_epochs=1,
                     process_index=jax.process_index(), process_count=jax.process_count())
    rows = []
    for b in it:
        g = common.to_global(b, mesh)
        r = shd.host_array(fn(stacked_params, tokens=g["tokens"],
                                 mask=g["attention_mask"])).astype(np.float64)   # [M, B, K]
        ranks, valid = shd.host_array(g["ranks"]), shd.host_array(g["valid"]) > 0
        keep = shd.host_array(g["batch_mask"]) > 0
        index = shd.host_array(g["index"])
        ranked = ranked_pairs(ranks, valid) & keep[:, None, None]
        d = r[:, :, :, None] - r[:, :, None, :]                                  # [M, B, K, K]
        bs, i, j = np.nonzero(ranked)
        dd = d[:, bs, i, j]                                                      # [M, P]
        mu, sigma = obj.strength_stats(dd)
        for p in range(len(bs)):
            rows.append({"index": int(index[bs[p]]), "chosen": int(i[p]), "rejected": int(j[p]),
                         "mu": float(mu[p]), "sigma": float(sigma[p]),
                         "d": [float(x) for x in dd[:, p]]})
    return rows


# ------------------------------------------------------------------------------------------
# The stage.

def _has_trained_score_head(init_dir: str) -> bool:
    from jaxrlhf.models.hf_io import read_json
    archs = read_json(os.path.join(init_dir, "config.json")).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def init_members(config, mesh, init_dir: str, m_count: int):
    """(graphdef, stacked params [M, ...] laid out on the mesh, one member's param shardings,
    model config). Fresh members are member m = the model of seed + m, all drawn in one
    vmapped jit; with init_from every member gets the checkpoint's trunk."""
    from jaxrlhf import sharding as shd
    from jaxrlhf.config import model_config_from
    from jaxrlhf.models.transformer import Transformer
    seed = int(config.seed)
    if init_dir:
        base = common.build_model(config, "score", mesh, init_dir=init_dir, seed=seed)
        p0 = common.params_of(base)
        sh = common.param_shardings(base, mesh)
        fresh = not _has_trained_score_head(init_dir)
        params = []
        for m in range(m_count):
            p = dict(p0)
            if fresh:  # as hf_io draws a fresh head, but from seed + m
                d = base.cfg.d_model
                w = (1.0 / np.sqrt(d + 1)) * jax.random.normal(jax.random.key(seed + m), (d,),
                                                               jnp.float32)
                p["score_w"] = w.astype(p0["score_w"].dtype)
            params.append(p)
        stacked = jax.jit(stack_trees, out_shardings=stacked_shardings(sh, mesh))(params)
        return nnx.graphdef(base), stacked, sh, base.cfg
    cfg = model_config_from(config.model)

    def create(key):
        return nnx.to_pure_dict(nnx.split(Transformer(cfg, head="score", rngs=nnx.Rngs(key)))[1])

    graphdef, abstract = jax.eval_shape(
        lambda: nnx.split(Transformer(cfg, head="score", rngs=nnx.Rngs(seed))))
    sh = nnx.to_pure_dict(shd.state_shardings(abstract, mesh))
    keys = jnp.stack([jax.random.key(seed + m) for m in range(m_count)])
    stacked = jax.jit(jax.vmap(create), out_shardings=stacked_shardings(sh, mesh))(keys)
    return graphdef, stacked, sh, cfg


def make_eval_fn(graphdef, eval_batches, mesh, loss_kw, m_count: int):
    @jax.jit
    def sums(stacked, batch):
        def one(params):
            loss, m = rm_steps.ranking_loss(params, graphdef, batch, **loss_kw)
            n = m["num_prompts"]
            return {"loss": loss * n, "accuracy": m["accuracy"] * n, "num_prompts": n}
        per = jax.vmap(one)(stacked)
        r = member_rewards(stacked, graphdef, batch["tokens"], batch["attention_mask"])
        _, em = obj.kwise_ranking_loss(jnp.mean(r, 0), batch["ranks"],
                                       rm_steps.valid_responses(batch),
                                   tie_mode=loss_kw["tie_mode"])
        per["ensemble_accuracy"] = em["accuracy"] * em["num_prompts"]
        return per

    def evaluate(state):
        acc = {}
        for b in eval_batches():
            out = jax.device_get(sums(state["params"], common.to_global(b, mesh)))
            for k, v in out.items():
                acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
        if "num_prompts" not in acc or not acc["num_prompts"][0]:
            return {}
        n = acc["num_prompts"][0]
        out = {"loss": float(np.mean(acc["loss"]) / n),
               "accuracy": float(np.mean(acc["accuracy"]) / n),
               "ensemble_accuracy": float(acc["ensemble_accuracy"] / n), "num_prompts": n}
        for m in range(m_count):
            out[f"accuracy_member_{m}"] = float(acc["accuracy"][m] / n)
        return out

    return evaluate


def build(config, stage_dir: str) -> common.Stage:
    """M reward models in one vmapped step; `finish` exports each to stage_dir/member_<m>/hf
    and writes the preference strength of the training pairs."""
    if common.lora_options(config).enabled:
        raise ValueError("lora.rank / lora.adapter: the rm_ensemble stage trains full models "
                         "(each member its own weights); set lora.rank=0 or train the members "
                         "as separate rm stages with adapters.")
    mesh = common.mesh_from_config(config)
    tc, rc = common.train_options(config), parse(RMOptions, config.rm, "rm")
    m_count = int(rc.ensemble_size)
    init_dir = common.resolve_init_dir(config.init_from)
    tok_spec = common.tokenizer_spec(config, init_dir)
    tokenizer = load_tokenizer(tok_spec)
    graphdef, stacked, params_sh, model_cfg = init_members(config, mesh, init_dir, m_count)
    common.check_tokenizer(tokenizer, model_cfg, {"init_from": init_dir} if init_dir else {})
    train_ds, eval_ds = common.prepare_data(config, tokenizer, stage_dir)
    _, eval_batches = common.data_iterators(config, train_ds, eval_ds,
                                            batch_size=int(tc.batch_size))
    pi, pc = jax.process_index(), jax.process_count()
    train_iter = StackedIterator(
        [train_ds.iterator(int(tc.batch_size), seed=int(config.seed) + m, shuffle=True,
                           process_index=pi, process_count=pc) for m in range(m_count)],
        tokenizer.pad_id)
    loss_kw = dict(tie_mode=rc.tie_mode, margin=float(rc.margin),
                   label_smoothing=float(rc.label_smoothing),
                   center_coef=float(rc.center_loss_coef))

    optimizer, schedule = common.make_optimizer(tc)
    rep = NamedSharding(mesh, P())
    sp_sh = stacked_shardings(params_sh, mesh)
    os_sh = stacked_shardings(common.opt_state_shardings(optimizer, member(stacked, 0),
                                                         params_sh, mesh), mesh)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": stacked,
             "opt_state": jax.jit(jax.vmap(optimizer.init), out_shardings=os_sh)(stacked),
             "rng": jax.device_put(jnp.stack([jax.random.PRNGKey(int(config.seed) + m)
                                              for m in range(m_count)]), rep)}
    state_sh = {"step": rep, "params": sp_sh, "opt_state": os_sh, "rng": rep}
    member_step = functools.partial(rm_steps.train_step, graphdef=graphdef, optimizer=optimizer,
                                    schedule=schedule, grad_accum=int(tc.grad_accum),
                                    on_nonfinite=tc.on_nonfinite, loss_kw=loss_kw)
    step = common.compile_step(functools.partial(ensemble_train_step, member_step=member_step),
                               state_sh)

    def finish(result):
        stacked = result.state["params"]
        rows = score_strength(stacked, graphdef, train_ds, mesh, int(tc.batch_size))
        shifts, dirs = [], []
        for m in range(m_count):
            params = member(stacked, m)
            shift = 0.0
            if rc.center_on_sft:
                shift, _ = rm_steps.centring_mean(config, params, graphdef, tokenizer,
                                                  train_ds, mesh)
                params = dict(params, score_b=params["score_b"] - shift)
            shifts.append(shift)
            dirs.append(os.path.join(f"member_{m}", "hf"))
            if rc.export_hf:
                common.export_stage_model(nnx.merge(graphdef, params),
                                          os.path.join(stage_dir, dirs[-1]),
                                          tokenizer=tokenizer, tokenizer_spec_=tok_spec,
                                          stage="rm",
                                          extra={"reward_centring_shift": shift,
                                                 "ensemble_member": m})
        mu = np.asarray([r["mu"] for r in rows])
        sigma = np.asarray([r["sigma"] for r in rows])
        summary = {"stage": "rm_ensemble", "steps": int(tc.steps), "members": m_count,
                   **common.loop_summary(result), "centring_shifts": shifts, "strength_file": STRENGTH_FILE,
                   "strength_pairs": len(rows),
                   "strength_mu_mean": float(mu.mean()) if len(mu) else 0.0,
                   "strength_sigma_mean": float(sigma.mean()) if len(mu) else 0.0,
                   "strength_frac_mu_negative": float((mu < 0).mean()) if len(mu) else 0.0,
                   "data_rejected": train_ds.report.n_rejected}
        if pi == 0:
            write_strength(stage_dir, rows)
            with paths.open(os.path.join(stage_dir, ENSEMBLE_FILE), "w") as f:
                json.dump({"members": m_count, "member_dirs": dirs, "seed": int(config.seed),
                           "strength_file": STRENGTH_FILE}, f, indent=2)
            write_summary(stage_dir, summary)
            plot_curves(stage_dir, [["loss"], ["accuracy", "ensemble_accuracy"]],
                        title=f"Reward-model ensemble (M = {m_count})")
        return summary, nnx.merge(graphdef, member(stacked, 0))

    evaluate = (make_eval_fn(graphdef, eval_batches, mesh, loss_kw, m_count)
                if eval_ds is not None else None)
    return common.Stage(name="rm_ensemble", state=state, state_sh=state_sh, step=step,
                        batches=train_iter, total_steps=int(tc.steps), mesh=mesh,
                        evaluate=evaluate, finish=finish)


def run(config, stage_dir: str):
    """Trains (or resumes) M reward models in one vmapped step, exports each to
    stage_dir/member_<m>/hf and writes the preference strength of the training pairs."""
    return common.run_stage(build, config, stage_dir)
