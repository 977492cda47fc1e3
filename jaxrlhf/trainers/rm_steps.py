"""The reward model's pure step functions, shared by the `rm` and `rm_ensemble` stages (the
latter vmaps `train_step` over its members): the K-wise ranking loss with per-pair labels, the
contrastive term and the MetaRM update (the options are described in
`jaxrlhf.trainers.reward`), held-out evaluation sums, and the centring mean.

Batch keys: tokens, attention_mask [B, K, T]; ranks, valid [B, K] (see `jaxrlhf.data`);
pair_smoothing, pair_margin [B, K, K] (per-pair ε, m); meta_tokens, meta_attention_mask
[M, K', T'], meta_valid [M, K'] (the MetaRM meta batch).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxrlhf import objectives as obj
from jaxrlhf import sharding as shd
from jaxrlhf.data import build_dataset, ranked_pairs
from jaxrlhf.models import lora
from jaxrlhf.models.reward import last_hidden_and_rewards, sequence_rewards
from jaxrlhf.trainers import common

META = "meta"   # batch keys of the MetaRM meta batch: meta_tokens, meta_attention_mask, ...


def valid_responses(batch):
    """valid [B, K] without the padding rows of a last partial batch (batch_mask)."""
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


def ranking_terms(params, graphdef, batch, *, tie_mode: str, margin: float,
                  label_smoothing: float, center_coef: float = 0.0,
                  contrastive_coef: float = 0.0, contrastive_temperature: float = 0.05,
                  contrastive_dropout: float = 0.0):
    """(ranking loss, its metrics, contrastive loss) of one (micro-)batch. Per-pair ε and m
    come from batch["pair_smoothing"] / batch["pair_margin"] when present; the contrastive
    loss is 0 unless contrastive_coef (it needs batch["row_key"], one PRNG key per row)."""
    h, rewards = last_hidden_and_rewards(frozen_bias(params), graphdef, batch["tokens"],
                                         batch["attention_mask"])
    if "pair_margin" in batch:
        margin, label_smoothing = batch["pair_margin"], batch["pair_smoothing"]
    elif not margin:
        margin = None
    valid = valid_responses(batch)
    loss, m = obj.kwise_ranking_loss(rewards, batch["ranks"], valid, tie_mode=tie_mode,
                                     margin=margin, label_smoothing=label_smoothing,
                                     center_coef=center_coef)
    con = jnp.zeros((), jnp.float32)
    if contrastive_coef:
        con, _ = obj.pair_contrastive_loss(h, ranked_pairs(batch["ranks"], valid),
                                           batch["row_key"],
                                           temperature=contrastive_temperature,
                                           dropout=contrastive_dropout)
    return loss, m, con


def ranking_loss(params, graphdef, batch, **loss_kw):
    """(K-wise ranking loss, metrics) of a batch (`ranking_terms` without the contrastive
    term)."""
    loss, m, _ = ranking_terms(params, graphdef, batch, **loss_kw)
    return loss, m


def num_prompts_with_pairs(batch, tie_mode: str):
    valid = valid_responses(batch)
    pairs = ranked_pairs(batch["ranks"], valid)
    if tie_mode == "soft":
        k = valid.shape[-1]
        upper = jnp.triu(jnp.ones((k, k), jnp.bool_), 1)[None]
        pairs = pairs | (valid[:, :, None] & valid[:, None, :] & upper)
    return jnp.sum(jnp.any(pairs, axis=(1, 2)).astype(jnp.float32))


def train_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int,
               on_nonfinite: str, loss_kw, contrastive: Optional[Mapping[str, float]] = None,
               meta: Optional[Mapping[str, Any]] = None, base=None):
    """step(state, batch) -> (state, metrics): the K-wise ranking loss (+ the contrastive
    term with `contrastive` = {contrastive_coef, contrastive_temperature,
    contrastive_dropout}), or the MetaRM update with `meta` = {"lr": η, "first_order": bool}
    (the meta batch under the batch's meta_* keys). With `base` (frozen weights under LoRA)
    only state["params"] (adapters and score head) is differentiated and adapted."""
    contrastive = dict(contrastive or {})
    coef = float(contrastive.get("contrastive_coef", 0.0))
    moss = bool(coef) or meta is not None
    main = {k: v for k, v in batch.items() if not k.startswith(META + "_")}
    if coef:
        rng = jax.random.fold_in(state["rng"], state["step"])
        main["row_key"] = jax.random.split(rng, main["tokens"].shape[0])
    total = jnp.maximum(num_prompts_with_pairs(main, loss_kw["tie_mode"]), 1.0)

    def contribution(params, mb):
        loss, m, con = ranking_terms(params, graphdef, mb, **loss_kw, **contrastive)
        w = m["num_prompts"] / total
        aux = {"accuracy": m["accuracy"] * w, "mean_margin": m["mean_margin"] * w,
               "center_penalty": m["center_penalty"] * w, "num_pairs": m["num_pairs"]}
        out = loss * w
        if moss:
            aux["ranking_loss"] = loss * w
        if coef:
            out = out + coef * con / grad_accum
            aux["contrastive_loss"] = jax.lax.stop_gradient(con) / grad_accum
        return out, aux

    params = state["params"]
    if meta is None:
        loss, aux, grads = common.accumulate(contribution, params, main, grad_accum, base=base)
    else:
        meta_batch = {k[len(META) + 1:]: v for k, v in batch.items()
                      if k.startswith(META + "_")}
        j_of = lambda p: obj.difference_loss(
            sequence_rewards(lora.join(base, p), graphdef, meta_batch["tokens"],
                             meta_batch["attention_mask"]),
            meta_batch["valid"])
        adapted, pullback, j = jax.vjp(
            lambda p: obj.adapted_params(j_of, p, meta["lr"], first_order=meta["first_order"]),
            params, has_aux=True)
        loss, aux, g_adapted = common.accumulate(contribution, adapted, main, grad_accum,
                                                 base=base)
        (grads,) = pullback(g_adapted)
        aux["meta_difference_loss"] = j
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, on_nonfinite)
    metrics.update(loss=loss, **aux)
    return state, metrics


def make_eval_fn(graphdef, eval_batches, mesh, loss_kw, full=lambda p: p):
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
            out = jax.device_get(sums(full(state["params"]), common.to_global(b, mesh)))
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
        r = shd.host_array(reward_fn(params, tokens=g["tokens"], mask=g["attention_mask"]))
        keep = shd.host_array(g["batch_mask"]) > 0
        if r.ndim == 2:  # rankings [B, K]: the best response of each prompt
            keep = ((shd.host_array(g["ranks"]) == 0) & (shd.host_array(g["valid"]) > 0)
                    & keep[:, None])
        total += float(r[keep].sum())
        count += int(keep.sum())
        if count >= limit:
            break
    return (total / count if count else 0.0), count


