"""Direct preference optimisation (DPO family) on pairs, HH conversations and K-wise rankings.

The policy starts from `init_from` (an SFT stage dir or any HF dir); the reference is
`dpo.ref_init` (default the same model), frozen. Per response y_i of a prompt (one forward
pass each; a prompt's K responses make all its pairs):

  logπ(y_i|x)  Σ of the policy's log-probs over the response tokens (its EOS included)
  s_i          logπ(y_i|x) − logπ_ref(y_i|x)        (dpo.loss = simpo: logπ(y_i|x) / |y_i|)

and the loss is `objectives.preference_loss` over all ranked pairs (dpo.ranking = "pairs":
sigmoid / cDPO, robust, IPO, SimPO) or `objectives.plackett_luce_loss` (K-wise DPO).

Reference log-probs (dpo.ref_logps):
  cached  computed before the first step, once per data row the run visits (its train.steps
          batches replayed from the same iterator, and the held-out batches), then the
          reference is dropped; kept in stage_dir/ref_logps_<split>.npz with a fingerprint of
          the data rows and the reference: a resumed or re-run stage reads them back (a longer
          run computes only the rows it adds), every epoch reuses them
  step    the frozen reference runs in every step (no file; one more forward per step)

MOSS: dpo.strength_file (an rm_ensemble stage's strength.jsonl on the same data) with
dpo.flip_fraction / soft_labels / adaptive_margin gives each pair its (ε, m) exactly as for the
reward model (`jaxrlhf.trainers.reward.strength_pair_labels`).

Metrics (train and held-out): loss, accuracy (implicit-reward accuracy: β s_w > β s_l over
ranked pairs), reward_margin (mean β (s_w − s_l)), chosen_/rejected_logps (policy log-prob of
the best / worst ranked response), chosen_/rejected_logratio (their s: the drift from the
reference), num_pairs. With gradient accumulation each micro-batch counts by its prompts.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf import paths
from jaxrlhf import objectives as obj
from jaxrlhf import sharding as shd
from jaxrlhf.data import JointIterator, load_tokenizer
from jaxrlhf.metrics import plot_curves, write_summary
from jaxrlhf.options import DPOOptions, parse
from jaxrlhf.trainers import common
from jaxrlhf.trainers.reward import strength_pair_labels
from jaxrlhf.trainers.rm_steps import num_prompts_with_pairs, valid_responses

ECHO_KEYS = ("loss", "accuracy", "reward_margin", "chosen_logratio", "rejected_logratio")
REF_FILE = "ref_logps_{split}.npz"


def response_logps(params, graphdef, tokens, mask, prompt_len):
    """(Σ log π over the response tokens [...], number of response tokens [...]) of right-padded
    prompt + response rows [..., T] (any leading shape); prompt_len [...] prompt tokens each."""
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    flat, m = tokens.reshape(-1, t), mask.reshape(-1, t)
    model = nnx.merge(graphdef, params)
    h = model.hidden(flat, m)
    lp = model.target_logprobs(h[:, :-1], flat[:, 1:])                 # [N, T-1]
    pos = jnp.arange(1, t)[None]
    resp = (pos >= prompt_len.reshape(-1, 1)) & (m[:, 1:] > 0)
    total = jnp.sum(jnp.where(resp, lp, 0.0), axis=-1)
    return total.reshape(lead), jnp.sum(resp, axis=-1).astype(jnp.float32).reshape(lead)


def loss_kw_of(do: DPOOptions) -> dict:
    return dict(loss=do.loss, ranking=do.ranking, beta=float(do.beta),
                label_smoothing=float(do.label_smoothing), margin=float(do.margin),
                simpo_gamma=float(do.simpo_gamma), tie_mode=do.tie_mode)


def dpo_loss(params, graphdef, batch, *, ref=None, loss, ranking, beta, label_smoothing,
             margin, simpo_gamma, tie_mode):
    """(loss, metrics) of one (micro-)batch. The reference log-probs come from
    batch["ref_logps"] or, with `ref` = (graphdef, params), from a forward pass of it."""
    logp, n_tok = response_logps(params, graphdef, batch["tokens"], batch["attention_mask"],
                                 batch["prompt_len"])
    valid = valid_responses(batch)
    if loss == "simpo":
        s = logp / jnp.maximum(n_tok, 1.0)
    else:
        if ref is not None:
            ref_logp, _ = response_logps(ref[1], ref[0], batch["tokens"],
                                         batch["attention_mask"], batch["prompt_len"])
            ref_logp = jax.lax.stop_gradient(ref_logp)
        else:
            ref_logp = batch["ref_logps"]
        s = logp - ref_logp
    s = jnp.where(valid, s, 0.0)
    if ranking == "plackett_luce":
        out, m = obj.plackett_luce_loss(s, batch["ranks"], valid, beta=beta, tie_mode=tie_mode)
    else:
        if "pair_margin" in batch:
            margin, label_smoothing = batch["pair_margin"], batch["pair_smoothing"]
        out, m = obj.preference_loss(s, batch["ranks"], valid, loss=loss, beta=beta,
                                     label_smoothing=label_smoothing, margin=margin,
                                     simpo_gamma=simpo_gamma, tie_mode=tie_mode)
    ends = {}
    for name, x in (("logps", logp), ("logratio", s)):
        best, worst, _ = obj.ranking_ends(jax.lax.stop_gradient(x), batch["ranks"], valid)
        ends[f"chosen_{name}"], ends[f"rejected_{name}"] = best, worst
    return out, dict(m, **ends)


METRIC_KEYS = ("accuracy", "reward_margin", "chosen_logps", "rejected_logps",
               "chosen_logratio", "rejected_logratio")


def train_step(state, batch, ref_params=None, *, graphdef, ref_graphdef=None, optimizer,
               schedule, grad_accum: int, on_nonfinite: str, loss_kw, base=None):
    """step(state, batch[, ref_params]) -> (state, metrics): one AdamW step on the DPO loss;
    every micro-batch's loss and metrics count by its prompts over the whole batch's. With
    `base` (frozen weights under LoRA) only the adapters in state["params"] are trained."""
    ref = (ref_graphdef, ref_params) if ref_params is not None else None
    total = jnp.maximum(num_prompts_with_pairs(batch, loss_kw["tie_mode"]), 1.0)

    def contribution(params, mb):
        loss, m = dpo_loss(params, graphdef, mb, ref=ref, **loss_kw)
        w = m["num_prompts"] / total
        aux = {k: m[k] * w for k in METRIC_KEYS}
        aux["num_pairs"] = m["num_pairs"]
        return loss * w, aux

    loss, aux, grads = common.accumulate(contribution, state["params"], batch, grad_accum,
                                         base=base)
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, on_nonfinite)
    metrics.update(loss=loss, **aux)
    return state, metrics


def make_eval_fn(graphdef, eval_batches, mesh, loss_kw, ref=None, transform=None,
                 full=lambda p: p):
    """Held-out metrics (each batch weighted by its prompts with pairs)."""
    @jax.jit
    def sums(params, ref_params, batch):
        r = (ref[0], ref_params) if ref is not None else None
        loss, m = dpo_loss(params, graphdef, batch, ref=r, **loss_kw)
        n = m["num_prompts"]
        return {"loss": loss * n, "num_prompts": n, "num_pairs": m["num_pairs"],
                **{k: m[k] * n for k in METRIC_KEYS}}

    def evaluate(state):
        acc = {}
        for b in eval_batches():
            if transform is not None:
                b = transform(b)
            out = jax.device_get(sums(full(state["params"]), ref[1] if ref is not None else None,
                                      common.to_global(b, mesh)))
            for k, v in out.items():
                acc[k] = acc.get(k, 0.0) + float(v)
        n = acc.get("num_prompts", 0.0)
        if not n:
            return {}
        return {k: (v if k in ("num_prompts", "num_pairs") else v / n) for k, v in acc.items()}

    return evaluate


# ------------------------------------------------------------------------------------------
# The reference log-prob cache.

def _fingerprint(ds, ref_dir: str, extra: str) -> str:
    h = hashlib.sha256()
    h.update(f"{ref_dir}|{extra}|{len(ds.rows)}".encode())
    for row in ds.rows:
        h.update(np.int64(row["index"]).tobytes())
        h.update(np.int64(row["prompt_len"]).tobytes())
        for seq in row["tokens"]:
            h.update(np.asarray(seq, np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


class RefCache:
    """Reference log-probs [K] per data row (row `index`), computed once for the rows a run
    visits and kept in a .npz file; `add(batch)` puts a batch's rows under "ref_logps"."""

    def __init__(self, logps: dict, path: str):
        self.logps, self.path = logps, path

    @classmethod
    def build(cls, path: str, fingerprint: str, ref_fn, batches, mesh, log):
        """Reads `path` when its fingerprint matches, then computes the rows of `batches` (host
        batches, in order) it lacks with ref_fn(tokens, attention_mask, prompt_len) and
        writes the file again if anything was added."""
        logps = {}
        if paths.exists(path):
            with paths.open(path, "rb") as fh, np.load(io.BytesIO(fh.read())) as f:
                if str(f["fingerprint"]) == fingerprint:
                    logps = dict(zip(f["index"].tolist(), f["logps"]))
                else:
                    log(f"[dpo] {path} is for other data or another reference; recomputing")
        added, t0 = 0, time.time()
        for n, b in enumerate(batches):
            g = common.to_global({key: b[key] for key in ("tokens", "attention_mask",
                                                          "prompt_len", "index", "valid")},
                                 mesh)
            idx = shd.host_array(g["index"])
            if all(int(i) in logps for i in idx):
                continue
            lp = shd.host_array(ref_fn(g["tokens"], g["attention_mask"], g["prompt_len"])[0])
            valid = shd.host_array(g["valid"]) > 0
            for i, row, v in zip(idx, lp, valid):
                if int(i) not in logps:
                    logps[int(i)] = np.where(v, row, np.nan).astype(np.float32)
                    added += 1
            if time.time() - t0 > 30 and (n + 1) % 10 == 0:
                log(f"[dpo] reference log-probs: {added} rows computed so far "
                    f"({time.time() - t0:.0f} s)")
        if added and jax.process_index() == 0:
            keys = sorted(logps)
            buf = io.BytesIO()
            np.savez(buf, index=np.asarray(keys, np.int64),
                     logps=np.stack([logps[i] for i in keys]),
                     fingerprint=np.asarray(fingerprint))
            paths.write_bytes(path, buf.getvalue())
        log(f"[dpo] reference log-probs: {added} rows computed, {len(logps) - added} read "
            f"back ({path})")
        return cls(logps, path)

    def add(self, batch):
        idx = np.asarray(batch["index"]).astype(np.int64)
        missing = [int(i) for i in idx if int(i) not in self.logps]
        if missing:
            raise ValueError(f"{self.path} has no reference log-prob for data row "
                             f"{missing[0]}; delete the file to recompute it")
        ref = np.stack([self.logps[int(i)] for i in idx])
        bad = np.isnan(ref) & (np.asarray(batch["valid"]) > 0)
        if bad.any():
            raise ValueError(f"{self.path}: data row {idx[np.nonzero(bad)[0][0]]} has a "
                             "response the cache holds no log-prob for; delete the file")
        batch["ref_logps"] = np.nan_to_num(ref)
        return batch


def _compose(*fns):
    fns = [f for f in fns if f is not None]
    if not fns:
        return None

    def apply(batch):
        for f in fns:
            batch = f(batch)
        return batch
    return apply


# ------------------------------------------------------------------------------------------
# The stage.

def build(config, stage_dir: str) -> common.Stage:
    """The DPO stage: policy (LM head) from init_from, frozen reference (cached log-probs or
    in the step), ranking data, AdamW state, the step."""
    mesh = common.mesh_from_config(config)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a: None)
    do = parse(DPOOptions, config.dpo, "dpo")
    init_dir = common.resolve_init_dir(config.init_from)
    ref_dir = common.resolve_init_dir(do.ref_init) if do.ref_init else init_dir
    tok_spec = common.tokenizer_spec(config, init_dir)
    tokenizer = load_tokenizer(tok_spec)
    model = common.build_model(config, "lm", mesh, init_dir=init_dir, seed=int(config.seed))
    dirs = {k: v for k, v in (("init_from", init_dir), ("dpo.ref_init", ref_dir)) if v}
    common.check_tokenizer(tokenizer, model.cfg, dirs)
    train_ds, eval_ds = common.prepare_data(config, tokenizer, stage_dir)
    tc = common.train_options(config)
    train_iter, eval_batches = common.data_iterators(config, train_ds, eval_ds,
                                                     batch_size=int(tc.batch_size))
    tr = common.trainable(config, model, mesh, seed=int(config.seed))
    log(f"[dpo] {tr.describe()}")
    graphdef = tr.graphdef
    optimizer, schedule = common.make_optimizer(tc)
    state, state_sh = common.init_train_state(tr.params, optimizer, tr.shardings, mesh,
                                              int(config.seed))
    loss_kw = loss_kw_of(do)

    # The frozen reference: the starting policy itself (a copy: the state is donated; with
    # adapters the frozen base, no copy: `Trainable.reference`), or dpo.ref_init.
    # Without a reference (SimPO) nothing is loaded.
    ref = None
    if not do.reference_free:
        if ref_dir and ref_dir != init_dir:
            ref_model = common.build_model(config, "lm", mesh, init_dir=ref_dir)
            ref = (nnx.graphdef(ref_model), common.params_of(ref_model))
            del ref_model
        elif tr.is_lora:
            ref = tr.reference()
        else:
            ref = (graphdef, jax.tree.map(jnp.copy, tr.params))
    del model

    pair_labels, moss = strength_pair_labels(do, train_ds)
    info = {"reference": ref_dir or "initial policy", "ref_logps": do.ref_logps}
    eval_transform = None
    if ref is not None and do.ref_logps == "cached":
        # Only the rows this run visits (its train.steps batches, the held-out batches), each
        # once: the same iterators, replayed.
        ref_fn = jax.jit(functools.partial(response_logps, ref[1], ref[0]))
        plan_iter, plan_eval = common.data_iterators(config, train_ds, eval_ds,
                                                     batch_size=int(tc.batch_size))
        plans = {"train": (train_ds, (next(plan_iter) for _ in range(int(tc.steps))))}
        if eval_ds is not None:
            plans["eval"] = (eval_ds, plan_eval())
        caches = {}
        for split, (ds, batches) in plans.items():
            fp = _fingerprint(ds, ref_dir or f"init seed {config.seed}", split)
            caches[split] = RefCache.build(os.path.join(stage_dir, REF_FILE.format(split=split)),
                                           fp, ref_fn, batches, mesh, log)
        ref = None   # the step reads batch["ref_logps"]; the reference weights are freed
        train_iter = JointIterator(train_iter, {}, _compose(caches["train"].add, pair_labels))
        if "eval" in caches:
            eval_transform = caches["eval"].add
    elif pair_labels is not None:
        train_iter = JointIterator(train_iter, {}, pair_labels)

    fn = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                           schedule=schedule, grad_accum=int(tc.grad_accum),
                           on_nonfinite=tc.on_nonfinite, loss_kw=loss_kw)
    if ref is None:
        step = common.compile_step(fn, state_sh, base=tr.base, base_sh=tr.base_sh)
    else:   # the frozen arguments: the reference's params and the policy's frozen base
        ref_graphdef, ref_params = ref
        frozen = {"ref": ref_params, "base": tr.base}
        step = common.compile_step(
            lambda s, b, base: fn(s, b, base["ref"], ref_graphdef=ref_graphdef,
                                  base=base["base"]),
            state_sh, base=frozen, base_sh=jax.tree.map(lambda x: x.sharding, frozen))

    def finish(result):
        policy = tr.merged_model(result.state["params"])
        if do.export_hf:
            common.export_stage_model(policy, os.path.join(stage_dir, "hf"),
                                      tokenizer=tokenizer, tokenizer_spec_=tok_spec,
                                      stage="dpo", extra={"dpo": loss_kw},
                                      **common.lora_export_kw(tr, stage_dir, init_dir))
        summary = {"stage": "dpo", "steps": int(tc.steps), **common.loop_summary(result),
                   **loss_kw, **info,
                   **tr.param_counts(result.state["params"]),
                   "data_rejected": train_ds.report.n_rejected,
                   **({"moss": moss} if moss else {})}
        if is_main:
            write_summary(stage_dir, summary)
            plot_curves(stage_dir, [["loss"], ["accuracy"], ["reward_margin"],
                                    ["chosen_logratio", "rejected_logratio"]],
                        title=f"DPO ({do.loss}, {do.ranking})")
        return summary, policy

    evaluate = (make_eval_fn(graphdef, eval_batches, mesh, loss_kw, ref=ref,
                             transform=eval_transform, full=tr.full)
                if eval_ds is not None else None)
    return common.Stage(name="dpo", state=state, state_sh=state_sh, step=step,
                        batches=train_iter, total_steps=int(tc.steps), mesh=mesh,
                        evaluate=evaluate, finish=finish, echo_keys=ECHO_KEYS)


def run(config, stage_dir: str):
    """Trains (or resumes) DPO in `stage_dir`; exports the policy to `stage_dir/hf`."""
    return common.run_stage(build, config, stage_dir)
