"""Supervised fine-tuning: next-token cross-entropy on response tokens.

Batch keys (from `jaxrlhf.data`): tokens, attention_mask, loss_mask [B, T]; loss_mask[t] = 1
when tokens[t] is a target predicted from position t-1 (response tokens and their EOS, even
when pad == eos). Loss = Σ masked NLL / number of target tokens of the whole batch, so
gradient accumulation (train.grad_accum) gives the same loss and gradient.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.data import load_tokenizer
from jaxrlhf.metrics import plot_curves, write_summary
from jaxrlhf.options import SFTOptions, parse
from jaxrlhf.trainers import common


def nll_sums(params, graphdef, batch):
    """(Σ NLL over target tokens, number of target tokens) of a batch."""
    model = nnx.merge(graphdef, params)
    tokens = batch["tokens"]
    h = model.hidden(tokens, batch["attention_mask"])
    lp = model.target_logprobs(h[:, :-1], tokens[:, 1:])   # chunked over a large vocabulary
    m = batch["loss_mask"][:, 1:] > 0
    if "batch_mask" in batch:
        m = m & (batch["batch_mask"][:, None] > 0)
    return jnp.sum(jnp.where(m, -lp, 0.0)), jnp.sum(m.astype(jnp.float32))


def train_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int,
               on_nonfinite: str, base=None):
    """step(state, batch) -> (state, metrics): one AdamW step on the masked LM loss (of the
    adapters only, with `base` the frozen rest of the parameters)."""
    num_tokens = jnp.maximum(jnp.sum((batch["loss_mask"][:, 1:] > 0).astype(jnp.float32)), 1.0)

    def contribution(params, mb):
        nll, n = nll_sums(params, graphdef, mb)
        return nll / num_tokens, {"tokens": n}

    loss, aux, grads = common.accumulate(contribution, state["params"], batch, grad_accum,
                                         base=base)
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, on_nonfinite)
    metrics.update(loss=loss, tokens=aux["tokens"])
    return state, metrics


def make_eval_fn(graphdef, eval_batches, mesh, full=lambda p: p):
    sums = jax.jit(functools.partial(nll_sums, graphdef=graphdef))

    def evaluate(state):
        tot, n = 0.0, 0.0
        for b in eval_batches():
            s, c = sums(full(state["params"]), batch=common.to_global(b, mesh))
            tot, n = tot + float(s), n + float(c)
        if n == 0:
            return {}
        loss = tot / n
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": n}

    return evaluate


def build(config, stage_dir: str) -> common.Stage:
    """The SFT stage: model (init_from or fresh), data, AdamW state, the jitted step."""
    mesh = common.mesh_from_config(config)
    init_dir = common.resolve_init_dir(config.init_from)
    tok_spec = common.tokenizer_spec(config, init_dir)
    tokenizer = load_tokenizer(tok_spec)
    model = common.build_model(config, "lm", mesh, init_dir=init_dir, seed=int(config.seed))
    common.check_tokenizer(tokenizer, model.cfg, {"init_from": init_dir} if init_dir else {})
    train_ds, eval_ds = common.prepare_data(config, tokenizer, stage_dir)
    tc, so = common.train_options(config), parse(SFTOptions, config.sft, "sft")
    train_iter, eval_batches = common.data_iterators(config, train_ds, eval_ds,
                                                     batch_size=int(tc.batch_size))
    tr = common.trainable(config, model, mesh, seed=int(config.seed))
    del model
    common.log_main(f"[sft] {tr.describe()}")
    graphdef = tr.graphdef
    optimizer, schedule = common.make_optimizer(tc)
    state, state_sh = common.init_train_state(tr.params, optimizer, tr.shardings, mesh,
                                              int(config.seed))
    step = common.compile_step(
        functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                          schedule=schedule, grad_accum=int(tc.grad_accum),
                          on_nonfinite=tc.on_nonfinite),
        state_sh, None, base=tr.base, base_sh=tr.base_sh)

    def finish(result):
        model = tr.merged_model(result.state["params"])
        if so.export_hf:
            common.export_stage_model(model, os.path.join(stage_dir, "hf"),
                                      tokenizer=tokenizer, tokenizer_spec_=tok_spec,
                                      stage="sft", **common.lora_export_kw(tr, stage_dir,
                                                                           init_dir))
        summary = {"stage": "sft", "steps": int(tc.steps), **common.loop_summary(result),
                   **tr.param_counts(result.state["params"]),
                   "data_rejected": train_ds.report.n_rejected}
        if jax.process_index() == 0:
            write_summary(stage_dir, summary)
            plot_curves(stage_dir, [["loss"], ["perplexity"], ["grad_norm"]], title="SFT")
        return summary, model

    return common.Stage(
        name="sft", state=state, state_sh=state_sh, step=step, batches=train_iter,
        total_steps=int(tc.steps), mesh=mesh, finish=finish,
        evaluate=(make_eval_fn(graphdef, eval_batches, mesh, tr.full)
                  if eval_ds is not None else None))


def run(config, stage_dir: str):
    """Trains (or resumes) SFT in `stage_dir`; exports the model to `stage_dir/hf`."""
    return common.run_stage(build, config, stage_dir)
