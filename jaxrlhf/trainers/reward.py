"""Reward-model training from K-wise rankings (InstructGPT).

r(x, y) is the scalar head at the last real token of prompt + response. All C(K,2) pairs of
a prompt come from ONE forward pass over its K responses; the loss is
`jaxrlhf.objectives.kwise_ranking_loss` (ties skipped or soft, margin, label smoothing from
`config.rm`). With gradient accumulation each micro-batch's loss is weighted by its number of
prompts over the whole batch's, so accumulation does not change the loss.

After training, the score bias is shifted so the mean reward of the SFT demonstrations
(`config.rm.center_data`; or the best-ranked training responses when its path is "") is 0,
and the model is exported with `save_hf` (score head) to `stage_dir/hf`.

Batch keys: tokens, attention_mask [B, K, T]; ranks, valid [B, K] (see `jaxrlhf.data`).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.data import build_dataset, load_tokenizer
from jaxrlhf.metrics import plot_curves, write_summary
from jaxrlhf.objectives import kwise_ranking_loss
from jaxrlhf.trainers import common


def sequence_rewards(params, graphdef, tokens, mask):
    """Rewards of [..., T] sequences (any leading shape): score at the last real token."""
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    model = nnx.merge(graphdef, params)
    h_last = model.last_hidden(tokens.reshape(-1, t), mask.reshape(-1, t))
    return model.apply_head(h_last[:, None])[:, 0].reshape(lead)


def _valid(batch):
    valid = batch["valid"] > 0
    if "batch_mask" in batch:
        valid = valid & (batch["batch_mask"][:, None] > 0)
    return valid


def frozen_bias(params):
    """`params` with the score bias out of the gradient. The ranking loss only sees reward
    differences, so its bias gradient is 0 anyway; freezing it keeps the centring term
    (rm.center_loss_coef) from moving the bias, which HF score heads cannot hold: centring
    then lives in the weights, and the post-hoc shift (rm.center_on_sft) stays the only
    bias."""
    return dict(params, score_b=jax.lax.stop_gradient(params["score_b"]))


def ranking_loss(params, graphdef, batch, *, tie_mode: str, margin: float,
                 label_smoothing: float, center_coef: float = 0.0):
    rewards = sequence_rewards(frozen_bias(params), graphdef, batch["tokens"],
                               batch["attention_mask"])
    if "pair_margin" in batch:  # rm_toolkit: per-pair ε, m from strength
        margin, label_smoothing = batch["pair_margin"], batch["pair_smoothing"]
    elif not margin:
        margin = None
    return kwise_ranking_loss(rewards, batch["ranks"], _valid(batch), tie_mode=tie_mode,
                              margin=margin, label_smoothing=label_smoothing,
                              center_coef=center_coef)


def num_prompts_with_pairs(batch, tie_mode: str):
    valid = _valid(batch)
    ranks = batch["ranks"]
    both = valid[:, :, None] & valid[:, None, :]
    if tie_mode == "soft":
        k = ranks.shape[-1]
        upper = jnp.triu(jnp.ones((k, k), jnp.bool_), 1)[None]
        pairs = both & ((ranks[:, :, None] < ranks[:, None, :]) | upper)
    else:
        pairs = both & (ranks[:, :, None] < ranks[:, None, :])
    return jnp.sum(jnp.any(pairs, axis=(1, 2)).astype(jnp.float32))


def train_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int,
               on_nonfinite: str, loss_kw):
    """step(state, batch) -> (state, metrics) for the K-wise ranking loss."""
    total = jnp.maximum(num_prompts_with_pairs(batch, loss_kw["tie_mode"]), 1.0)

    def contribution(params, mb):
        loss, m = ranking_loss(params, graphdef, mb, **loss_kw)
        w = m["num_prompts"] / total
        return loss * w, {"accuracy": m["accuracy"] * w, "mean_margin": m["mean_margin"] * w,
                          "center_penalty": m["center_penalty"] * w,
                          "num_pairs": m["num_pairs"]}

    loss, aux, grads = common.accumulate(contribution, state["params"], batch, grad_accum)
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, on_nonfinite)
    metrics.update(loss=loss, **aux)
    return state, metrics


def make_eval_fn(graphdef, eval_batches, mesh, loss_kw):
    @jax.jit
    def sums(params, batch):
        loss, m = ranking_loss(params, graphdef, batch, **loss_kw)
        n = m["num_prompts"]
        return {"loss": loss * n, "accuracy": m["accuracy"] * n,
                "mean_margin": m["mean_margin"] * n, "num_prompts": n,
                "center_penalty": m["center_penalty"] * n, "num_pairs": m["num_pairs"]}

    def evaluate(state):
        acc = {}
        for b in eval_batches():
            out = jax.device_get(sums(state["params"], common.to_global(b, mesh)))  # scalars
            for k, v in out.items():
                acc[k] = acc.get(k, 0.0) + float(v)
        n = acc.get("num_prompts", 0.0)
        if not n:
            return {}
        return {"loss": acc["loss"] / n, "accuracy": acc["accuracy"] / n,
                "mean_margin": acc["mean_margin"] / n, "num_prompts": n,
                "center_penalty": acc["center_penalty"] / n, "num_pairs": acc["num_pairs"]}

    return evaluate


def centring_mean(config, params, graphdef, tokenizer, train_ds, mesh) -> tuple[float, int]:
    """Mean reward of the SFT demonstrations (`rm.center_data`), or, when its path is "", of
    the best-ranked (rank 0) responses of the training rankings; at most rm.center_examples."""
    rc = config.rm
    limit = int(rc.center_examples)
    reward_fn = jax.jit(functools.partial(sequence_rewards, graphdef=graphdef))
    ds = build_dataset(rc.center_data, tokenizer) if rc.center_data.path else train_ds
    it = ds.iterator(int(config.train.batch_size), shuffle=False, drop_remainder=False,
                     num_epochs=1, process_index=jax.process_index(),
                     process_count=jax.process_count())
    total, count = 0.0, 0
    for b in it:
        g = common.to_global(b, mesh)
        r = common.host_array(reward_fn(params, tokens=g["tokens"], mask=g["attention_mask"]))
        keep = common.host_array(g["batch_mask"]) > 0
        if r.ndim == 2:  # rankings [B, K]: the best response of each prompt
            keep = ((common.host_array(g["ranks"]) == 0) & (common.host_array(g["valid"]) > 0)
                    & keep[:, None])
        total += float(r[keep].sum())
        count += int(keep.sum())
        if count >= limit:
            break
    return (total / count if count else 0.0), count


def run(config, stage_dir: str):
    """Trains (or resumes) the reward model in `stage_dir`; exports it to `stage_dir/hf`."""
    os.makedirs(stage_dir, exist_ok=True)
    common.maybe_initialize_distributed(config)
    mesh = common.mesh_from_config(config)
    init_dir = common.resolve_init_dir(config.init_from)
    tok_spec = common.tokenizer_spec(config, init_dir)
    tokenizer = load_tokenizer(tok_spec)
    model = common.build_model(config, "score", mesh, init_dir=init_dir, seed=int(config.seed))
    common.check_tokenizer(tokenizer, model.cfg, {"init_from": init_dir} if init_dir else {})
    train_ds, eval_ds = common.prepare_data(config, tokenizer, stage_dir)
    tc, rc = config.train, config.rm
    train_iter, eval_batches = common.data_iterators(config, train_ds, eval_ds,
                                                     batch_size=int(tc.batch_size))
    loss_kw = dict(tie_mode=rc.tie_mode, margin=float(rc.margin),
                   label_smoothing=float(rc.label_smoothing),
                   center_coef=float(rc.center_loss_coef))

    graphdef = nnx.graphdef(model)
    params = common.params_of(model)
    params_sh = common.param_shardings(model, mesh)
    optimizer, schedule = common.make_optimizer(tc)
    state, state_sh = common.init_train_state(params, optimizer, params_sh, mesh,
                                              int(config.seed))
    ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=tc.max_to_keep,
                        save_every=tc.save_every)
    # MOSS options of config.rm (jaxrlhf.trainers.rm_toolkit); None = all off.
    from jaxrlhf.trainers import rm_toolkit
    toolkit = rm_toolkit.setup(config, train_ds, tokenizer, mesh, stage_dir)
    if toolkit is not None:
        train_iter = toolkit.wrap_iterator(train_iter)
    step_fn, step_kw = (train_step, {}) if toolkit is None else (toolkit.step_fn,
                                                                 toolkit.step_kw)
    state, _ = common.restore_or_init(ckpt, state, state_sh, train_iter)
    step = common.compile_step(
        functools.partial(step_fn, graphdef=graphdef, optimizer=optimizer,
                          schedule=schedule, grad_accum=int(tc.grad_accum),
                          on_nonfinite=tc.on_nonfinite, loss_kw=loss_kw, **step_kw), state_sh)
    eval_fn = (make_eval_fn(graphdef, eval_batches, mesh, loss_kw)
               if eval_ds is not None else None)
    result = common.train_loop(
        name="rm", stage_dir=stage_dir, config=config, state=state, state_sh=state_sh,
        step_fn=step, train_iter=train_iter, mesh=mesh, eval_fn=eval_fn,
        total_steps=int(tc.steps), ckpt=ckpt)
    ckpt.close()

    params = result.state["params"]
    bias_shift, n_centre = 0.0, 0
    if rc.center_on_sft:
        bias_shift, n_centre = centring_mean(config, params, graphdef, tokenizer, train_ds,
                                             mesh)
        params = dict(params, score_b=params["score_b"] - bias_shift)
    model = nnx.merge(graphdef, params)
    if rc.export_hf:
        common.export_stage_model(model, os.path.join(stage_dir, "hf"), tokenizer=tokenizer,
                                  tokenizer_spec_=tok_spec, stage="rm",
                                  extra={"reward_centring_shift": bias_shift})
    summary = {"stage": "rm", "steps": int(tc.steps), "wall_time_s": result.wall_time,
               "skipped_steps": result.skipped_steps,
               **{f"train_{k}": v for k, v in result.last_metrics.items()},
               **{f"eval_{k}": v for k, v in result.eval_metrics.items()},
               **{f"eval_start_{k}": v for k, v in result.start_eval_metrics.items()},
               "centring_shift": bias_shift, "centring_examples": n_centre,
               "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
               "data_rejected": train_ds.report.n_rejected,
               **({"moss": toolkit.info} if toolkit is not None else {})}
    if jax.process_index() == 0:
        write_summary(stage_dir, summary)
        plot_curves(stage_dir, [["loss"], ["accuracy"], ["mean_margin"]], title="Reward model")
    return summary, model
