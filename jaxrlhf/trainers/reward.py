"""Reward-model training from K-wise rankings (InstructGPT), with the MOSS options
("Secrets of RLHF II") of `config.rm`.

r(x, y) is the scalar head at the last real token of prompt + response. All C(K,2) pairs of
a prompt come from ONE forward pass over its K responses; the loss is
`jaxrlhf.objectives.kwise_ranking_loss` (ties skipped or soft, margin, label smoothing,
centring in the weights). With gradient accumulation each micro-batch's loss is weighted by
its number of prompts over the whole batch's, so accumulation does not change the loss.

MOSS options (all off by default):
  strength      rm.strength_file (strength.jsonl of an rm_ensemble stage) with rm.soft_labels,
                rm.adaptive_margin, rm.flip_fraction: per-pair (ε, m) computed on the host
                (`jaxrlhf.objectives.pair_labels`) reach the step as batch["pair_smoothing"],
                batch["pair_margin"] [B, K, K]
  contrastive   rm.contrastive_coef > 0: + coef · InfoNCE over the ranked pairs' differences of
                final hidden states (`jaxrlhf.objectives.pair_contrastive_loss`), feature-dropout
                views keyed by fold_in(state.rng, step); the ranking loss uses the dropout-free
                rewards; with grad accumulation, the mean over micro-batches
  MetaRM        rm.meta_rm: a meta batch of unlabelled policy samples per step (rm.meta_data, or
                sampled from rm.meta_actor into stage_dir/meta_samples.jsonl); the ranking loss
                is taken at θ' = θ + η∇J(θ) (`jaxrlhf.objectives.metarm`) and the optimizer
                updates θ with its gradient through θ'

After training, the score bias is shifted so the mean reward of the SFT demonstrations
(`config.rm.center_data`; or the best-ranked training responses when its path is "") is 0
(rm.center_on_sft), and the model is exported with `save_hf` (score head) to `stage_dir/hf`.

The step functions live in `jaxrlhf.trainers.rm_steps` (shared with `rm_ensemble`).
"""
from __future__ import annotations

import functools
import json
import os

import jax
from flax import nnx

from jaxrlhf import paths
from jaxrlhf import objectives as obj
from jaxrlhf.data import JointIterator, load_tokenizer
from jaxrlhf.metrics import plot_curves, write_summary
from jaxrlhf.options import RMOptions, parse
from jaxrlhf.trainers import common
from jaxrlhf.trainers.rm_steps import META, centring_mean, make_eval_fn, train_step

# ------------------------------------------------------------------------------------------
# MOSS options: per-pair labels from a strength file, the MetaRM meta set.

def sample_meta_examples(config, rc: RMOptions, train_ds, tokenizer, mesh) -> list[dict]:
    """rm.meta_num_prompts prompts (the built-in task's prompt stream, else the training rows'
    prompts) with rm.meta_k responses each sampled from rm.meta_actor."""
    from jaxrlhf import rollout as ro
    from jaxrlhf.data import SyntheticTask
    from jaxrlhf.data.metarm import prompt_dataset
    from jaxrlhf.models import load_hf
    actor = load_hf(common.resolve_init_dir(rc.meta_actor), head="lm", mesh=mesh)
    n = int(rc.meta_num_prompts)
    if config.data.path == "synthetic":
        task = SyntheticTask.from_config(config.data.synthetic)
        prompts = [e["prompt"] for e in task.prompt_examples(n, split="train")]
    else:
        prompts = list(dict.fromkeys(ex["prompt"] for ex in train_ds.examples))[:n]
    base = jax.random.PRNGKey(int(config.seed) + 4242)
    out = ro.sample_texts(
        actor, prompt_dataset(prompts, train_ds, tokenizer),
        ro.Sampling(int(rc.meta_max_new_tokens), float(rc.meta_temperature)),
        k=int(rc.meta_k), batch_size=int(config.train.batch_size),
        key_fn=lambda i, j: jax.random.fold_in(base, i * 1000 + j), tokenizer=tokenizer,
        mesh=mesh, skip_ids=(tokenizer.eos_id,))
    return [{"prompt": prompts[i], "responses": [t for t, _ in out[i]]} for i in sorted(out)]


def _with_pair_labels(batch, *, table, label_kw):
    batch["pair_smoothing"], batch["pair_margin"] = obj.pair_labels(*table.lookup(batch),
                                                                    **label_kw)
    return batch


def strength_pair_labels(opts, train_ds):
    """(batch -> batch with per-pair (ε, m) under "pair_smoothing" / "pair_margin", info for
    summary.json) from the strength file of `opts` (rm or dpo options: strength_file,
    flip_fraction, label_smoothing, margin, soft_labels, soft_label_temperature,
    adaptive_margin, adaptive_margin_max); (None, {}) without a strength file."""
    from jaxrlhf.data.preference_strength import StrengthTable, read_strength
    if not opts.strength_file:
        return None, {}
    rows = read_strength(opts.strength_file)
    table = StrengthTable.from_rows(rows, train_ds.num_responses, float(opts.flip_fraction),
                                    opts.strength_file)
    label_kw = dict(label_smoothing=float(opts.label_smoothing), margin=float(opts.margin),
                    soft_labels=bool(opts.soft_labels),
                    soft_label_temperature=float(opts.soft_label_temperature),
                    adaptive_margin=float(opts.adaptive_margin),
                    adaptive_margin_max=float(opts.adaptive_margin_max))
    info = dict(strength_pairs=len(rows), flipped_pairs=int(table.flip.sum()))
    return functools.partial(_with_pair_labels, table=table, label_kw=label_kw), info


def moss_options(config, rc: RMOptions, train_ds, tokenizer, mesh, stage_dir: str,
                 train_iter):
    """(training batches, extra train_step options, info for summary.json) for the MOSS
    options `rc` (config.rm); (train_iter, {}, None) when all are off."""
    from jaxrlhf.data.metarm import meta_dataset, read_meta_file
    if not rc.moss:
        return train_iter, {}, None
    pair_labels, info = strength_pair_labels(rc, train_ds)
    extras = {}
    if rc.meta_rm:
        if rc.meta_data:
            examples = read_meta_file(rc.meta_data)
        else:
            examples = sample_meta_examples(config, rc, train_ds, tokenizer, mesh)
            if jax.process_index() == 0:
                with paths.open(os.path.join(stage_dir, "meta_samples.jsonl"), "w") as f:
                    for e in examples:
                        f.write(json.dumps(e) + "\n")
        meta_ds = meta_dataset(examples, train_ds, tokenizer)
        info.update(meta_rows=len(meta_ds.rows))
        extras[META] = (meta_ds.iterator(int(rc.meta_batch_size), seed=int(config.seed) + 17,
                                         shuffle=True, process_index=jax.process_index(),
                                         process_count=jax.process_count()),
                        ("tokens", "attention_mask", "valid"))
    step_kw = {}
    if rc.contrastive_coef:
        step_kw["contrastive"] = dict(contrastive_coef=float(rc.contrastive_coef),
                                      contrastive_temperature=float(rc.contrastive_temperature),
                                      contrastive_dropout=float(rc.contrastive_dropout))
    if rc.meta_rm:
        step_kw["meta"] = dict(lr=float(rc.meta_lr), first_order=bool(rc.meta_first_order))
    return JointIterator(train_iter, extras, pair_labels), step_kw, info


def build(config, stage_dir: str) -> common.Stage:
    """The reward-model stage: model (score head), ranking data, AdamW state, the step (with
    the MOSS options of `config.rm` when any is on)."""
    mesh = common.mesh_from_config(config)
    init_dir = common.resolve_init_dir(config.init_from)
    tok_spec = common.tokenizer_spec(config, init_dir)
    tokenizer = load_tokenizer(tok_spec)
    model = common.build_model(config, "score", mesh, init_dir=init_dir, seed=int(config.seed))
    common.check_tokenizer(tokenizer, model.cfg, {"init_from": init_dir} if init_dir else {})
    train_ds, eval_ds = common.prepare_data(config, tokenizer, stage_dir)
    tc, rc = common.train_options(config), parse(RMOptions, config.rm, "rm")
    train_iter, eval_batches = common.data_iterators(config, train_ds, eval_ds,
                                                     batch_size=int(tc.batch_size))
    loss_kw = dict(tie_mode=rc.tie_mode, margin=float(rc.margin),
                   label_smoothing=float(rc.label_smoothing),
                   center_coef=float(rc.center_loss_coef))

    tr = common.trainable(config, model, mesh, seed=int(config.seed))
    del model
    common.log_main(f"[rm] {tr.describe()}")
    graphdef = tr.graphdef
    optimizer, schedule = common.make_optimizer(tc)
    state, state_sh = common.init_train_state(tr.params, optimizer, tr.shardings, mesh,
                                              int(config.seed))
    train_iter, step_kw, moss = moss_options(config, rc, train_ds, tokenizer, mesh, stage_dir,
                                             train_iter)
    step = common.compile_step(
        functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                          schedule=schedule, grad_accum=int(tc.grad_accum),
                          on_nonfinite=tc.on_nonfinite, loss_kw=loss_kw, **step_kw), state_sh,
        base=tr.base, base_sh=tr.base_sh)

    def finish(result):
        params = tr.full(result.state["params"])
        bias_shift, n_centre = 0.0, 0
        if rc.center_on_sft:
            bias_shift, n_centre = centring_mean(config, params, graphdef, tokenizer, train_ds,
                                                 mesh)
            params = dict(params, score_b=params["score_b"] - bias_shift)
        model = nnx.merge(graphdef, params)
        if rc.export_hf:
            common.export_stage_model(model, os.path.join(stage_dir, "hf"),
                                      tokenizer=tokenizer, tokenizer_spec_=tok_spec,
                                      stage="rm", extra={"reward_centring_shift": bias_shift},
                                      **common.lora_export_kw(tr, stage_dir, init_dir))
        summary = {"stage": "rm", "steps": int(tc.steps), **common.loop_summary(result),
                   "centring_shift": bias_shift, "centring_examples": n_centre,
                   **tr.param_counts(result.state["params"]),
                   "data_rejected": train_ds.report.n_rejected,
                   **({"moss": moss} if moss is not None else {})}
        if jax.process_index() == 0:
            write_summary(stage_dir, summary)
            plot_curves(stage_dir, [["loss"], ["accuracy"], ["mean_margin"]],
                        title="Reward model")
        return summary, model

    evaluate = (make_eval_fn(graphdef, eval_batches, mesh, loss_kw, tr.full)
                if eval_ds is not None else None)
    return common.Stage(name="rm", state=state, state_sh=state_sh, step=step,
                        batches=train_iter, total_steps=int(tc.steps), mesh=mesh,
                        evaluate=evaluate, finish=finish)


def run(config, stage_dir: str):
    """Trains (or resumes) the reward model in `stage_dir`; exports it to `stage_dir/hf`."""
    return common.run_stage(build, config, stage_dir)
