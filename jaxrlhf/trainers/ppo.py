"""On-policy RL from an SFT policy: PPO-ptx with four models -- actor (trained, from SFT),
reference (frozen SFT), reward model (frozen), critic (trained, from the reward model; or a
value head on the actor's trunk with `ppo.critic="shared"`) -- and the critic-free family
(GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++: `ppo.advantage_estimator`, no critic), which
differs from PPO only in how advantages are estimated and the loss is aggregated.

Rewards: a reward model (`ppo.reward_init` / `reward_ensemble`), Python functions of the
decoded texts (`ppo.reward_fns`, `jaxrlhf.rewards`), or both (weighted sum). With
`ppo.samples_per_prompt = K`, each prompt is sampled K times (rows prompt-major, one shared
prefill per prompt), as the group estimators need.

One iteration:
  prompts (left-padded) -> `generate` (actor) -> one jitted scoring pass: π_old and π_ref
  log-probs (the sampling distribution of `jaxrlhf.generation.sampling_logprobs`, so the first
  minibatch has ratio 1), values, reward score -> score shaping (missing-EOS penalty, running
  normalisation, clipping) -> per-token KL-penalised rewards -> GAE -> advantage whitening ->
  ppo_epochs x minibatches of jitted actor + critic updates (+ the ptx LM loss on a pretraining
  batch, weighted ppo.ptx_coef) -> KL controller update -> metrics.
With one minibatch per epoch and no gradient accumulation (`ppo.fused_first_update`, on by
default) the scoring pass and epoch 0's update are one program sharing the actor and critic
forwards (`fused_first_update`).

Train state (checkpointed, donated to the update step): {"step" (iterations done),
"updates" (optimizer updates done), "params": {"actor", "critic"}, "opt_state", "rng",
"kl_ctl", "reward_stats"}. The frozen
reference and reward parameters are separate arguments and never donated. The prompt and ptx
iterator positions are stored in the checkpoint's metadata: a resumed run equals the
uninterrupted one.

The jitted functions are in `jaxrlhf.trainers.ppo_steps`; rollouts and reward sources in
`jaxrlhf.rollout`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrlhf import paths
from jaxrlhf import objectives as obj
from jaxrlhf import rewards as rw
from jaxrlhf import rollout as ro
from jaxrlhf import sharding as shd
from jaxrlhf.data import JointIterator, build_dataset, load_tokenizer
from jaxrlhf.data.batching import prompt_text
from jaxrlhf.metrics import plot_curves, read_metrics, write_summary
from jaxrlhf.options import PPOOptions, parse
from jaxrlhf.trainers import common
from jaxrlhf.trainers.ppo_steps import (eval_scores, fused_first_update, make_experience,
                                       update_step)

# Metrics printed on the console (all of them go to metrics.jsonl / TensorBoard).
ECHO_KEYS = ("rm_score", "reward", "gold_reward", "kl", "kl_coef", "entropy",
             "response_length", "eos_rate", "clipfrac", "approx_kl", "value_loss",
             "explained_variance", "kl_loss", "ptx_loss", "uniform_groups",
             "reward_fn_failures")


# ------------------------------------------------------------------------------------------
# Host-side parts: texts, gold reward, held-out evaluation.

class _Texts:
    """Prompt texts, decoded responses and metadata of rollouts; the gold reward on the
    built-in sorting task; the Python reward functions."""

    def __init__(self, config, pc: PPOOptions, prompt_ds, tokenizer):
        self.task = None
        if (config.data.path == "synthetic" and pc.gold_reward
                and config.data.synthetic.get("task", "sort") == "sort"):
            from jaxrlhf.data import SyntheticTask
            self.task = SyntheticTask.from_config(config.data.synthetic)
        self.ds, self.tok = prompt_ds, tokenizer
        self.raw_chat = config.data.get("chat_template", "auto") == "raw"
        self.fns = (rw.RewardFunctions.from_spec(pc.reward_fns, pc.reward_fn_errors,
                                                 pc.reward_fn_penalty)
                    if pc.reward_fns else None)

    def __call__(self, index, response_tokens, response_mask, ds=None):
        """Prompt texts (rows `index` of `ds`, default the training prompts) and responses."""
        ds = ds or self.ds
        prompts = [prompt_text(ds.examples[int(i)], self.tok, raw=self.raw_chat)
                   for i in index]
        return prompts, ro.decode_responses(self.tok, response_tokens, response_mask)

    def gold(self, prompts, responses, finished) -> np.ndarray:
        return np.asarray(self.task.gold_reward_batch(prompts, responses,
                                                      [bool(f) for f in finished]))

    def function_scores(self, index, rollout, ds=None):
        """(scores float32 [rows], info) of the reward functions on a rollout whose row r
        answers prompt index[r]."""
        ds = ds or self.ds
        resp, rmask, fin = (shd.host_array(rollout[k]) for k in ("response_tokens",
                                                                  "response_mask", "finished"))
        prompts, texts = self(index, resp, rmask, ds)
        meta = [dict(ds.examples[int(i)].get("meta") or {}, finished=bool(f),
                     length=int(m.sum())) for i, f, m in zip(index, fin, rmask)]
        return self.fns(prompts, texts, meta)


class _PolicyEval:
    """Held-out evaluation of a policy: sample once per prompt (fixed rng) and report the mean
    gold reward (built-in task), RM score, KL to the reference, length and EOS rate over the
    first ppo.eval_prompts held-out prompts (rounded up to whole batches of ppo.eval_batch)."""

    def __init__(self, config, pc: PPOOptions, tokenizer, graphdefs, opts, mesh, texts: _Texts):
        self.ds = None
        if config.data.path == "synthetic":
            ev = config.data.copy_and_resolve_references()
            ev.split = "test"
            ev.synthetic.num_examples = int(pc.eval_prompts)
            self.ds = build_dataset(ev, tokenizer)
        elif config.eval_data.path:
            self.ds = build_dataset(common.heldout_block(config), tokenizer)
        self.pc, self.tok, self.mesh, self.texts = pc, tokenizer, mesh, texts
        self.scores = jax.jit(functools.partial(eval_scores, graphdefs=graphdefs, opts=opts))
        self.actor_gd, self.sampling = graphdefs["actor"], opts["sampling"]
        self.score_name = opts["score_name"]

    @property
    def active(self) -> bool:
        return self.ds is not None and int(self.pc.eval_prompts) > 0

    def __call__(self, actor_params, frozen) -> Dict[str, float]:
        tot: Dict[str, float] = {}
        n = 0
        # A fixed batch (not the rollout batch): the sampler's draws depend on the batch size.
        bs = max(1, min(int(self.pc.eval_batch), int(self.pc.eval_prompts)))
        it = self.ds.iterator(bs, shuffle=False, drop_remainder=False,
                              num_epochs=1, process_index=jax.process_index(),
                              process_count=jax.process_count())
        max_batches = -(-int(self.pc.eval_prompts) // bs)
        for i, b in enumerate(it):
            if i >= max_batches:
                break
            keep = b.pop("batch_mask") > 0
            index = b.pop("index")
            g = common.to_global(b, self.mesh)
            r = ro.sample((self.actor_gd, actor_params), g["prompt_tokens"], g["prompt_mask"],
                          jax.random.fold_in(jax.random.PRNGKey(1234), i), self.sampling,
                          eos_id=self.tok.stop_ids, pad_id=self.tok.pad_id, mesh=self.mesh,
                          greedy=bool(self.pc.eval_greedy))
            keep = shd.host_array(jnp.asarray(keep)) if jax.process_count() > 1 else keep
            vals = {}
            host = np.zeros(r["finished"].shape, np.float32)
            if self.texts.fns is not None:
                host, info = self.texts.function_scores(index, r, ds=self.ds)
                for k, v in info.pop("per_row").items():
                    vals[k] = v
            r = dict(r, host_score=host_scores(host, self.mesh))
            score, kl = (shd.host_array(x) for x in self.scores(actor_params, frozen, r))
            resp, rmask, fin = (shd.host_array(r[k]) for k in ("response_tokens",
                                                              "response_mask", "finished"))
            # Greedy responses are not samples of the policy: their summed log-ratio is not a
            # KL estimate, so it gets its own name.
            kl_name = "greedy_log_ratio" if self.pc.eval_greedy else "kl"
            vals.update({self.score_name: score, kl_name: kl, "response_length": rmask.sum(-1),
                         "eos_rate": fin.astype(np.float32)})
            if self.texts.task is not None:
                vals["gold_reward"] = self.texts.gold(*self.texts(index, resp, rmask,
                                                                  ds=self.ds), fin)
            for k, v in vals.items():
                tot[k] = tot.get(k, 0.0) + float(np.asarray(v, np.float64)[keep].sum())
            n += int(keep.sum())
        return {k: v / max(n, 1) for k, v in tot.items()} | {"prompts": float(n)}


def host_scores(scores, mesh):
    """A host array of scores for every rollout row -> a global array sharded like the rows
    (every process holds all rows' scores)."""
    arr = np.asarray(scores, np.float32)
    return jax.make_array_from_callback(arr.shape, shd.batch_sharding(mesh),
                                        lambda idx: arr[idx])


# ------------------------------------------------------------------------------------------
# Set-up helpers.

def _load_frozen(init_dir, head, mesh, model_block):
    from jaxrlhf.models import load_hf
    model = common.with_run_options(load_hf(init_dir, head=head, mesh=mesh), model_block)
    return nnx.graphdef(model), common.params_of(model), model


def _optimizer(config, pc: PPOOptions, total_updates: int, params):
    tc = dataclasses.replace(common.train_options(config), warmup_steps=pc.warmup_iterations,
                             steps=total_updates)
    opt_a, sched = common.make_optimizer(tc, lr=float(pc.actor_lr), steps=total_updates)
    transforms = {"actor": opt_a}
    if "critic" in params:
        transforms["critic"], _ = common.make_optimizer(tc, lr=float(pc.critic_lr),
                                                        steps=total_updates)
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    return optax.multi_transform(transforms, labels), sched


def _opts(config, pc: PPOOptions) -> Dict[str, Any]:
    """What the jitted PPO functions read (static): the loss options and the sampling
    distribution; the reward source is added by `build`."""
    keys = ("temperature", "kl_estimator", "gamma", "lam", "clip_eps", "clip_eps_high",
            "dual_clip", "vf_clip_eps", "vf_coef", "entropy_coef", "ptx_coef", "loss_agg",
            "whiten_advantages", "reward_clip", "reward_norm", "missing_eos_penalty",
            "kl_loss_coef", "kl_loss_estimator", "samples_per_prompt", "advantage_eps",
            "filter_uniform_groups", "overlong_buffer", "overlong_penalty",
            "share_prompt_forward")
    opts = {k: getattr(pc, k) for k in keys}
    opts["critic"] = pc.critic_kind
    opts["advantages"] = obj.registry.get(
        "outcome_advantage" if pc.critic_free else "advantage", pc.advantage_estimator)
    opts["reward_model_coef"] = float(pc.reward_model_coef) if pc.reward_fns else 1.0
    # The mean raw score's metric name: the reward model's, or the total with reward functions.
    opts["score_name"] = "reward" if pc.reward_fns else "rm_score"
    opts["on_nonfinite"] = common.train_options(config).on_nonfinite
    opts["sampling"] = ro.Sampling(max_new_tokens=int(pc.max_new_tokens),
                                   temperature=float(pc.temperature), top_k=int(pc.top_k),
                                   top_p=float(pc.top_p))
    return opts


def _split_rows(batch, n: int) -> List[Any]:
    """n consecutive equal row blocks of every array in `batch` (None -> [None] * n)."""
    if batch is None:
        return [None] * n
    size = next(iter(batch.values())).shape[0] // n
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n)]


# ------------------------------------------------------------------------------------------
# The stage.

def build(config, stage_dir: str) -> common.Stage:
    """PPO-ptx as a stage of the shared loop: one step is one iteration (rollout ->
    experience -> ppo_epochs x minibatch updates -> KL controller)."""
    pc = parse(PPOOptions, config.ppo, "ppo")
    opts = _opts(config, pc)
    mesh = common.mesh_from_config(config)
    ensemble = bool(pc.reward_ensemble)
    has_rm = bool(pc.reward_init or ensemble)
    if not pc.actor_init or not (has_rm or pc.reward_fns):
        raise ValueError("ppo.actor_init (an SFT stage dir or HF dir) and a reward are needed: "
                         "ppo.reward_init (a reward-model stage dir or HF dir), "
                         "ppo.reward_ensemble, or ppo.reward_fns (Python reward functions).")
    critic = pc.critic_kind
    actor_dir = common.resolve_init_dir(pc.actor_init)
    reward_dir = ""
    if ensemble:  # member 0 stands in for reward_init (critic, checks)
        from jaxrlhf.models.reward import load_ensemble, member_dirs
        reward_dir = common.resolve_init_dir(pc.reward_init or member_dirs(pc.reward_ensemble)[0])
    elif has_rm:
        reward_dir = common.resolve_init_dir(pc.reward_init)
    critic_dir = ""
    if critic == "separate":
        if not (pc.critic_init or reward_dir):
            raise ValueError("ppo.critic_init is needed for critic='separate' without a reward "
                             "model (or use critic='shared', or a critic-free "
                             "advantage_estimator)")
        critic_dir = common.resolve_init_dir(pc.critic_init or reward_dir)
    tok_spec = common.tokenizer_spec(config, actor_dir)
    tokenizer = load_tokenizer(tok_spec)

    ref_dir = common.resolve_init_dir(pc.ref_init or pc.actor_init)
    ref_gd, ref_params, actor_model = _load_frozen(ref_dir, "lm", mesh, config.model)
    rm_params, opts["reward"] = None, None
    if ensemble:  # stacked members [M, ...]: score = mean − uncertainty_coef · std
        rm_gd, rm_params, rm_model = load_ensemble(pc.reward_ensemble, mesh)
        opts["reward"] = ro.ModelReward(rm_gd, ensemble_coef=float(pc.uncertainty_coef))
    elif has_rm:
        rm_gd, rm_params, rm_model = _load_frozen(reward_dir, "score", mesh, config.model)
        opts["reward"] = ro.ModelReward(rm_gd)
    dirs = {"actor_init": actor_dir, "reward_init": reward_dir, "critic_init": critic_dir,
            "ref_init": ref_dir}
    common.check_tokenizer(tokenizer, actor_model.cfg, {k: v for k, v in dirs.items() if v})
    if has_rm and rm_model.cfg.vocab_size != actor_model.cfg.vocab_size:
        raise ValueError(f"Actor vocab {actor_model.cfg.vocab_size} != reward model vocab "
                         f"{rm_model.cfg.vocab_size}: they must share one tokenizer.")

    # Trainable params: actor (a separate buffer from the frozen reference, which is never
    # donated) and critic (a separate model from critic_init, or a value head on the trunk).
    # With adapters (config.lora) only the adapters (and the critic's score head) are trained:
    # the reference is the actor's frozen base under the graph without adapters (one copy of
    # the weights), and a critic from the reward model shares the reward model's trunk.
    lo = common.lora_options(config)
    if ref_dir != actor_dir:
        actor_model = _load_frozen(actor_dir, "lm", mesh, config.model)[2]
    actor_tr = common.trainable(config, actor_model, mesh, seed=int(config.seed), options=lo)
    base = None
    if actor_tr.is_lora:
        actor_params = actor_tr.params
        base = {"actor": actor_tr.base}
        if ref_dir == actor_dir:
            ref_gd, ref_params = actor_tr.reference()
        common.log_main(f"[ppo] actor: {actor_tr.describe()}")
    elif ref_dir == actor_dir:
        actor_params = jax.tree.map(jnp.copy, ref_params)
    else:
        actor_params = actor_tr.params
    graphdefs = {"actor": actor_tr.graphdef, "ref": ref_gd}
    params_sh = {"actor": actor_tr.shardings}
    rep = NamedSharding(mesh, P())
    params = {"actor": actor_params}
    if critic == "shared":
        d = actor_model.cfg.d_model
        critic_params = {"w": jax.device_put(jnp.zeros((d,), jnp.float32), rep),
                         "b": jax.device_put(jnp.zeros((), jnp.float32), rep)}
        params_sh["critic"] = {"w": rep, "b": rep}
    elif critic == "separate":
        if lo.enabled and critic_dir == reward_dir and not ensemble:
            critic_model = rm_model   # adapters on the reward model's own (frozen) trunk
        else:
            critic_model = _load_frozen(critic_dir, "score", mesh, config.model)[2]
        # lora.adapter is the actor's; the critic gets fresh adapters of the same rank
        critic_lo = dataclasses.replace(lo, adapter="",
                                        rank=lo.rank or actor_tr.model.cfg.lora_rank)
        critic_tr = common.trainable(config, critic_model, mesh, seed=int(config.seed) + 1,
                                     options=critic_lo)
        # A copy: the state is donated and the score head may be the reward model's arrays.
        critic_params = jax.tree.map(jnp.copy, critic_tr.params)
        graphdefs["critic"] = critic_tr.graphdef
        params_sh["critic"] = critic_tr.shardings
        if critic_tr.is_lora:
            base["critic"] = critic_tr.base
            common.log_main(f"[ppo] critic: {critic_tr.describe()}")
    if critic != "none":
        params["critic"] = critic_params
    frozen = {"ref": ref_params, "reward": rm_params, "base": base}
    actor_full = lambda p: actor_tr.full(p["actor"])   # the actor's full params from state's

    rows = pc.rows   # rollout rows per iteration: prompts x samples_per_prompt
    n_mb = rows // pc.minibatch_size
    n_updates = int(pc.ppo_epochs) * n_mb
    optimizer, schedule = _optimizer(config, pc, int(pc.iterations) * n_updates, params)
    state, state_sh = common.init_train_state(params, optimizer, params_sh, mesh,
                                              int(config.seed))
    kl_ctl = obj.kl_controller_init(pc.kl_controller, kl_coef=float(pc.kl_coef),
                                    target=float(pc.kl_target), horizon=float(pc.kl_horizon))
    state["kl_ctl"] = jax.device_put(kl_ctl, rep)
    state["reward_stats"] = jax.device_put(obj.running_moments_init(), rep)
    state["updates"] = jax.device_put(jnp.zeros((), jnp.int32), rep)
    state_sh["updates"] = rep
    state_sh["kl_ctl"] = jax.tree.map(lambda _: rep, kl_ctl)
    state_sh["reward_stats"] = jax.tree.map(lambda _: rep, state["reward_stats"])

    # Data: prompts, and per iteration one ptx batch per update.
    workdir = stage_dir if jax.process_index() == 0 else None
    prompt_ds = build_dataset(config.data, tokenizer, workdir=workdir)
    pi, pcount = jax.process_index(), jax.process_count()
    extras = {}
    if pc.ptx_coef > 0:
        ptx_ds = build_dataset(config.ptx_data, tokenizer, workdir=workdir)
        extras["ptx"] = (ptx_ds.iterator(int(pc.ptx_batch_size) * n_updates,
                                         seed=int(config.seed) + 1, process_index=pi,
                                         process_count=pcount),
                         ("tokens", "attention_mask", "loss_mask"))
    batches = JointIterator(prompt_ds.iterator(int(pc.rollout_batch), seed=int(config.seed),
                                               process_index=pi, process_count=pcount), extras)
    texts = _Texts(config, pc, prompt_ds, tokenizer)
    policy_eval = _PolicyEval(config, pc, tokenizer, graphdefs, opts, mesh, texts)

    experience_fn = jax.jit(functools.partial(make_experience, graphdefs=graphdefs, opts=opts))
    update_fn = jax.jit(
        functools.partial(update_step, graphdefs=graphdefs, optimizer=optimizer,
                          schedule=schedule, opts=opts, grad_accum=int(pc.grad_accum)),
        in_shardings=(state_sh, None, None), out_shardings=(state_sh, None),
        donate_argnums=(0,))
    kl_update = jax.jit(obj.kl_controller_update)
    fused_fn = None
    if bool(pc.fused_first_update) and n_mb == 1 and int(pc.grad_accum) == 1:
        # One minibatch: the scoring pass and the first update share their forwards.
        fused_fn = jax.jit(
            functools.partial(fused_first_update, graphdefs=graphdefs, optimizer=optimizer,
                              schedule=schedule, opts=opts),
            in_shardings=(state_sh, None, None, None),
            out_shardings=(state_sh, None, None, None), donate_argnums=(0,))
    clock = {"start": time.time(), "generation": 0.0}
    k_samples = int(pc.samples_per_prompt)
    score_name = opts["score_name"]
    fn_keys = [f"reward/{name.rpartition(':')[2]}" for name, _, _ in
               (rw.parse_reward_fns(pc.reward_fns, load=False) if pc.reward_fns else [])]
    errors_path = os.path.join(stage_dir, "reward_fn_errors.jsonl")

    def iteration(state, batch):
        it = int(jax.device_get(state["step"]))
        it_rng = jax.random.fold_in(state["rng"], it)
        index = batch.pop("index")
        ptx = {k[4:]: batch.pop(k) for k in list(batch) if k.startswith("ptx_")}
        g = common.to_global(batch, mesh)
        # The data row of every rollout row (all processes' prompts, K rows each).
        row_index = np.repeat(shd.host_array(common.to_global({"i": index}, mesh)["i"]),
                              k_samples)
        tg = time.time()
        # (graphdef, params) rather than a merged module: generate would split it again.
        rollout = ro.sample((graphdefs["actor"], actor_full(state["params"])),
                            g["prompt_tokens"], g["prompt_mask"], jax.random.fold_in(it_rng, 0),
                            opts["sampling"], eos_id=tokenizer.stop_ids,
                            pad_id=tokenizer.pad_id, k=k_samples, mesh=mesh)
        jax.block_until_ready(rollout["tokens"])
        clock["generation"] += time.time() - tg
        fn_info = {}
        host = np.zeros((rows,), np.float32)
        if texts.fns is not None:
            host, fn_info = texts.function_scores(row_index, rollout)
            fn_info.pop("per_row")
            records = fn_info.pop("failure_records")
            if records and pi == 0:
                paths.append_lines(errors_path, [json.dumps(dict(rec, iteration=it + 1)) + "\n"
                                                 for rec in records])
        rollout = dict(rollout, host_score=host_scores(host, mesh))
        ptx_mbs = _split_rows({f"ptx_{k}": v for k, v in common.to_global(ptx, mesh).items()}
                              if ptx else None, n_updates)
        updates = []
        if fused_fn is not None:  # scoring pass + epoch 0's single update in one program
            state, exp, m_exp, um = fused_fn(state, frozen, rollout, ptx_mbs[0])
            updates.append(um)
        else:
            exp, m_exp, stats = experience_fn(state, frozen, rollout)
            state = dict(state, reward_stats=stats)
        for epoch in range(len(updates), int(pc.ppo_epochs)):  # fused: epoch 0 is done
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(it_rng, 1 + epoch),
                                                     rows))
            for j in range(n_mb):
                idx = perm[j * pc.minibatch_size:(j + 1) * pc.minibatch_size]
                mb = {key: v[idx] for key, v in exp.items()}
                mb.update(ptx_mbs[len(updates)] or {})
                state, um = update_fn(state, mb, base)
                updates.append(um)
        new_kl = kl_update(state["kl_ctl"], m_exp["kl"], jnp.float32(rows))
        state = dict(state, step=state["step"] + 1, kl_ctl=new_kl)
        share = clock["generation"] / max(time.time() - clock["start"], 1e-9)
        return state, {"experience": m_exp, "updates": updates, "index": row_index,
                       "rollout": {k: rollout[k] for k in ("response_tokens", "response_mask",
                                                           "finished")},
                       "reward_fns": fn_info, "generation_time_share": share,
                       "elapsed_s": time.time() - clock["start"]}

    samples_path = os.path.join(stage_dir, "samples.jsonl")

    def read_iteration_metrics(step_no, out, logger):
        m = {key: float(v) for key, v in jax.device_get(out["experience"]).items()}
        ups = jax.device_get(out["updates"])
        for key in ups[0]:
            vals = [float(u[key]) for u in ups]
            m[key] = float(np.max(vals) if key == "ratio_max" else np.mean(vals))
        m["finite"] = float(np.min([float(u["finite"]) for u in ups]))
        for key in ("ratio_mean", "approx_kl", "clipfrac"):
            m[f"first_{key}"] = float(ups[0][key])
        resp, rmask, fin = (shd.host_array(out["rollout"][k])
                            for k in ("response_tokens", "response_mask", "finished"))
        if texts.task is not None:
            m["gold_reward"] = float(np.mean(texts.gold(*texts(out["index"], resp, rmask),
                                                        fin)))
        m.update(out["reward_fns"])
        m["generation_time_share"] = out["generation_time_share"]
        m["elapsed_s"] = out["elapsed_s"]   # wall time of this process in the stage
        if pi == 0 and pc.sample_every and step_no % pc.sample_every == 0:
            prompts_txt, resp_txt = texts(out["index"][:4], resp[:4], rmask[:4])
            paths.append_lines(samples_path, [
                json.dumps({"iteration": step_no, "prompt": p_, "response": r_,
                            "ended": bool(e_)}) + "\n"
                for p_, r_, e_ in zip(prompts_txt, resp_txt, fin[:4])])
            logger.print(f"[ppo] sample @ {step_no}: {prompts_txt[0]!r} -> {resp_txt[0]!r}")
        return m

    def finish(result):
        actor = nnx.merge(graphdefs["actor"], actor_full(result.state["params"]))
        common.export_stage_model(actor, os.path.join(stage_dir, "hf"), tokenizer=tokenizer,
                                  tokenizer_spec_=tok_spec, stage="ppo",
                                  **common.lora_export_kw(actor_tr, stage_dir, actor_dir))
        rows = (read_metrics(stage_dir)
                if paths.exists(os.path.join(stage_dir, "metrics.jsonl")) else [])
        first = rows[0] if rows else {}
        summary = {"stage": "ppo", "iterations": int(pc.iterations),
                   "wall_time_s": result.wall_time,
                   **{f"final_{k}": v for k, v in result.last_metrics.items()},
                   **{f"eval_initial_{k}": v for k, v in result.start_eval_metrics.items()},
                   **{f"eval_final_{k}": v for k, v in result.eval_metrics.items()},
                   **{f"first_{k}": first.get(k) for k in (score_name, "gold_reward", "kl")
                      if k in first}}
        if pi == 0:
            write_summary(stage_dir, summary)
            plot_curves(stage_dir, [[score_name], ["gold_reward"] + fn_keys, ["kl"],
                                    ["entropy", "response_length"]],
                        filename="curves.png",
                        title=pc.advantage_estimator.upper() if pc.critic_free else "PPO")
        return summary, actor

    evaluate = ((lambda s: policy_eval(actor_full(s["params"]), frozen))
                if policy_eval.active else None)
    return common.Stage(name="ppo", state=state, state_sh=state_sh, step=iteration,
                        batches=batches, total_steps=int(pc.iterations), mesh=mesh,
                        evaluate=evaluate, finish=finish, put=lambda b: b,
                        read_metrics=read_iteration_metrics,
                        echo_keys=ECHO_KEYS[:2] + tuple(fn_keys) + ECHO_KEYS[2:],
                        start_eval_file="eval_initial_policy.json")


def run(config, stage_dir: str):
    """Trains (or resumes) PPO-ptx in `stage_dir`; exports the actor to `stage_dir/hf`."""
    return common.run_stage(build, config, stage_dir)
