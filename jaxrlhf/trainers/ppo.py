"""PPO-ptx with four models: actor (trained, from SFT), reference (frozen SFT),
reward model (frozen), critic (trained, from the reward model; or a value head on the actor's
trunk with `ppo.critic="shared"`).

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

Token layout of a rollout: tokens [B, L = P + N] = left-padded prompt + response; the hidden
state at position P - 1 + t predicts response token t, so response log-probs and values are
read from positions P-1 .. L-2.
"""
from __future__ import annotations

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

from jaxrlhf import objectives as obj
from jaxrlhf import rollout as ro
from jaxrlhf.data import JointIterator, build_dataset, load_tokenizer
from jaxrlhf.generation import sampling_logprobs
from jaxrlhf.metrics import plot_curves, read_metrics, write_summary
from jaxrlhf.trainers import common

CRITIC_MODES = ("separate", "shared")
# Metrics printed on the console (all of them go to metrics.jsonl / TensorBoard).
ECHO_KEYS = ("rm_score", "gold_reward", "kl", "kl_coef", "entropy", "response_length",
             "eos_rate", "clipfrac", "approx_kl", "value_loss", "explained_variance", "ptx_loss")


# ------------------------------------------------------------------------------------------
# Pure functions (jitted once at set-up).

def policy_forward(params, tokens, mask, n_resp: int, *, graphdefs, critic: str):
    """Actor logits [B, N, V] at the response positions and values [B, N]."""
    actor = nnx.merge(graphdefs["actor"], params["actor"])
    resp_rows = ro.response_rows(tokens, n_resp)
    h_resp = actor.hidden(tokens, mask, select=resp_rows)
    logits = actor.apply_head(h_resp)
    if critic == "shared":
        w, b = params["critic"]["w"], params["critic"]["b"]
        values = (h_resp @ w.astype(h_resp.dtype)).astype(jnp.float32) + b
    else:
        model = nnx.merge(graphdefs["critic"], params["critic"])
        values = model.apply_head(model.hidden(tokens, mask, select=resp_rows))
    return logits, values


def _sampling_kw(opts):
    return opts["sampling"].logprob_kw()


def policy_outputs(params, tokens, mask, resp, *, graphdefs, opts):
    """(log π(response) [B, N], entropy [B, N], values [B, N]) at the response positions, under
    the sampling distribution (`sampling_logprobs`)."""
    logits, values = policy_forward(params, tokens, mask, resp.shape[1], graphdefs=graphdefs,
                                    critic=opts["critic"])
    logp = sampling_logprobs(logits, resp, **_sampling_kw(opts))
    return logp, obj.entropy(logits, opts["temperature"]), values


def frozen_scores(frozen, rollout, *, graphdefs, opts):
    """Reference log-probs of the response [B, N] and the reward score [B] (the reward
    model's, or rollout["score"] when a host-side reward filled it in)."""
    ref_logp = ro.response_logprobs(graphdefs["ref"], frozen["ref"], rollout, opts["sampling"])
    if "score" in rollout:
        return ref_logp, rollout["score"]
    return ref_logp, opts["reward"](frozen["reward"], rollout["tokens"], rollout["mask"])


def shape_experience(state, rollout, outputs, ref_logp, raw_score, *, opts):
    """Score shaping + KL-penalised rewards + GAE + whitening, from the policy's outputs
    (π_old, entropy, values) and the frozen models' scores: (experience, metrics, stats)."""
    old_logp, ent, values = outputs
    resp, resp_mask = rollout["response_tokens"], rollout["response_mask"]
    valid = resp_mask > 0
    finished = rollout["finished"]
    score = raw_score - opts["missing_eos_penalty"] * (1.0 - finished.astype(jnp.float32))
    stats = obj.running_moments_update(state["reward_stats"], score)
    if opts["reward_norm"] == "running":
        score = obj.normalize_with_moments(score, stats)
    rewards, km = obj.kl_penalized_rewards(
        score, old_logp, ref_logp, valid, kl_coef=state["kl_ctl"].kl_coef,
        kind=opts["kl_estimator"], score_clip=opts["reward_clip"] or None)
    adv, returns = obj.gae(rewards, values, valid, gamma=opts["gamma"], lam=opts["lam"])
    if opts["whiten_advantages"]:
        adv = obj.masked_whiten(adv, valid)
    exp = {"tokens": rollout["tokens"], "mask": rollout["mask"], "response_tokens": resp,
           "response_mask": resp_mask, "old_logp": jnp.where(valid, old_logp, 0.0),
           "old_values": jnp.where(valid, values, 0.0), "advantages": adv, "returns": returns}
    lengths = jnp.sum(resp_mask, axis=-1).astype(jnp.float32)
    metrics = {
        "rm_score": jnp.mean(raw_score),
        "score": km["score"],
        "kl": km["kl"],
        "kl_per_token": km["kl_per_token"],
        "non_score_reward": km["non_score_reward"],
        "total_reward": km["total_reward"],
        "entropy": obj.masked_mean(ent, valid),
        "response_length": jnp.mean(lengths),
        "eos_rate": jnp.mean(finished.astype(jnp.float32)),
        "kl_coef": state["kl_ctl"].kl_coef,
        "value_mean": obj.masked_mean(values, valid),
        "return_mean": obj.masked_mean(returns, valid),
    }
    return exp, metrics, stats


def make_experience(state, frozen, rollout, *, graphdefs, opts):
    """The scoring pass + reward shaping + GAE: returns (experience, metrics, reward_stats)."""
    outputs = policy_outputs(state["params"], rollout["tokens"], rollout["mask"],
                             rollout["response_tokens"], graphdefs=graphdefs, opts=opts)
    ref_logp, raw_score = frozen_scores(frozen, rollout, graphdefs=graphdefs, opts=opts)
    return shape_experience(state, rollout, outputs, ref_logp, raw_score, opts=opts)


def ppo_losses(outputs, mb, denoms, opts):
    """PPO clipped policy loss + vf_coef · value loss − entropy_coef · entropy of one
    (micro)batch of experience, from the policy's outputs on it: (total, diagnostics)."""
    logp, ent, values = outputs
    agg = opts["loss_agg"]
    valid = mb["response_mask"] > 0
    pg, pm = obj.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], valid,
                                 clip_eps=opts["clip_eps"],
                                 dual_clip=opts["dual_clip"] or None, agg=agg, **denoms)
    vl, vm = obj.value_loss(values, mb["old_values"], mb["returns"], valid,
                            clip_eps=opts["vf_clip_eps"], agg=agg, **denoms)
    ent_term = obj.aggregate(ent, valid, agg, **denoms)
    total = pg + opts["vf_coef"] * vl - opts["entropy_coef"] * ent_term
    aux = {"policy_loss": pg, "value_loss": vl, "entropy_bonus_term": ent_term,
           "approx_kl": pm["approx_kl"], "clipfrac": pm["clipfrac"],
           "ratio_mean": pm["ratio_mean"], "ratio_max": pm["ratio_max"],
           "vf_clipfrac": vm.get("clipfrac", vm.get("vf_clipfrac", 0.0)),
           "explained_variance": vm.get("explained_variance", 0.0)}
    return total, aux


def ptx_term(actor_params, mb, *, graphdefs, opts, denoms):
    """The pretraining LM loss of the ptx batch in `mb` (keys ptx_tokens, ...)."""
    actor = nnx.merge(graphdefs["actor"], actor_params)
    logits = actor(mb["ptx_tokens"], mb["ptx_attention_mask"])
    return obj.ptx_loss(logits, mb["ptx_tokens"], mb["ptx_loss_mask"], agg=opts["loss_agg"],
                        **denoms)[0]


def _ptx_denoms(batch):
    return obj.aggregation_denominators(batch["ptx_loss_mask"][:, 1:] > 0)


def update_step(state, batch, *, graphdefs, optimizer, schedule, opts, grad_accum: int):
    """One PPO(-ptx) update on a minibatch of experience (and a ptx batch): (state, metrics)."""
    denoms = obj.aggregation_denominators(batch["response_mask"] > 0)
    use_ptx = opts["ptx_coef"] > 0
    if use_ptx:
        ptx_denoms = _ptx_denoms(batch)

    def contribution(params, mb):
        outputs = policy_outputs(params, mb["tokens"], mb["mask"], mb["response_tokens"],
                                 graphdefs=graphdefs, opts=opts)
        total, aux = ppo_losses(outputs, mb, denoms, opts)
        if use_ptx:
            pl = ptx_term(params["actor"], mb, graphdefs=graphdefs, opts=opts,
                          denoms=ptx_denoms)
            total = total + opts["ptx_coef"] * pl
            aux["ptx_loss"] = pl
        return total, aux

    loss, aux, grads = common.accumulate(contribution, state["params"], batch, grad_accum)
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, opts["on_nonfinite"],
                                         counter="updates")  # "step" counts iterations
    if grad_accum > 1:  # per-micro-batch means of the diagnostics -> their average
        for k in ("approx_kl", "clipfrac", "ratio_mean", "vf_clipfrac", "explained_variance"):
            aux[k] = aux[k] / grad_accum
        aux["ratio_max"] = aux["ratio_max"] / grad_accum
    metrics.update(loss=loss, **aux)
    return state, metrics


def fused_first_update(state, frozen, rollout, ptx_batch, *, graphdefs, optimizer, schedule,
                       opts):
    """`make_experience` and the first `update_step` as one program, for one minibatch per
    epoch (minibatch_size == rollout_batch) and no gradient accumulation.

    The first update is taken at the parameters that scored the rollout, on the whole batch,
    so the scoring pass's actor and critic forwards ARE the update's forwards: they run once,
    under `jax.vjp`; π_old and the old values are their outputs, the rewards / GAE /
    whitening are computed from them (no gradient flows there), and the PPO loss's gradient
    with respect to (log π, entropy, values) is pulled back through the same forward. Same
    loss and gradient as `make_experience` followed by `update_step`, with two fewer model
    forwards per iteration; the ratio of this update is exactly 1 (π_θ and π_old are one
    array). Only the row order differs from the unfused path (which permutes the minibatch),
    so results agree to float rounding. Returns (state, experience, experience metrics,
    update metrics); the state carries the new reward statistics.
    """
    fwd = lambda p: policy_outputs(p, rollout["tokens"], rollout["mask"],
                                   rollout["response_tokens"], graphdefs=graphdefs, opts=opts)
    outputs, pullback = jax.vjp(fwd, state["params"])
    ref_logp, raw_score = frozen_scores(frozen, rollout, graphdefs=graphdefs, opts=opts)
    exp, m_exp, stats = shape_experience(state, rollout, outputs, ref_logp, raw_score,
                                         opts=opts)
    denoms = obj.aggregation_denominators(exp["response_mask"] > 0)
    (loss, aux), cotangents = jax.value_and_grad(
        lambda o: ppo_losses(o, exp, denoms, opts), has_aux=True)(outputs)
    (grads,) = pullback(cotangents)
    if ptx_batch is not None:
        pl, g_ptx = jax.value_and_grad(
            lambda a: ptx_term(a, ptx_batch, graphdefs=graphdefs, opts=opts,
                               denoms=_ptx_denoms(ptx_batch)))(state["params"]["actor"])
        grads = dict(grads, actor=jax.tree.map(lambda g, h: g + opts["ptx_coef"] * h,
                                               grads["actor"], g_ptx))
        loss = loss + opts["ptx_coef"] * pl
        aux["ptx_loss"] = pl
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, opts["on_nonfinite"],
                                         counter="updates")
    metrics.update(loss=loss, **aux)
    return dict(state, reward_stats=stats), exp, m_exp, metrics


def eval_scores(actor_params, frozen, rollout, *, graphdefs, opts):
    """Reward score and KL(actor || reference) (k1 summed over the response) of rollouts."""
    valid = rollout["response_mask"] > 0
    logp = lambda name, params: ro.response_logprobs(graphdefs[name], params, rollout,
                                                     opts["sampling"])
    kl = jnp.sum(jnp.where(valid, logp("actor", actor_params) - logp("ref", frozen["ref"]),
                           0.0), axis=-1)
    return opts["reward"](frozen["reward"], rollout["tokens"], rollout["mask"]), kl


# ------------------------------------------------------------------------------------------
# Host-side parts: texts, gold reward, held-out evaluation.

class _Texts:
    """Prompt texts and decoded responses of rollouts; the gold reward on the built-in task."""

    def __init__(self, config, prompt_ds, tokenizer):
        self.task = None
        if config.data.path == "synthetic" and config.ppo.gold_reward:
            from jaxrlhf.data import SyntheticTask
            self.task = SyntheticTask.from_config(config.data.synthetic)
        self.ds, self.tok = prompt_ds, tokenizer

    def __call__(self, index, response_tokens, response_mask, ds=None):
        """Prompt texts (rows `index` of `ds`, default the training prompts) and responses."""
        ds = ds or self.ds
        prompts = [ds.examples[int(i)]["prompt"] for i in index]
        return prompts, ro.decode_responses(self.tok, response_tokens, response_mask)

    def gold(self, prompts, responses, finished) -> np.ndarray:
        return np.asarray(self.task.gold_reward_batch(prompts, responses,
                                                      [bool(f) for f in finished]))


class _PolicyEval:
    """Held-out evaluation of a policy: sample once per prompt (fixed rng) and report the mean
    gold reward (built-in task), RM score, KL to the reference, length and EOS rate over the
    first ppo.eval_prompts held-out prompts (rounded up to whole rollout batches)."""

    def __init__(self, config, tokenizer, graphdefs, opts, mesh, texts: _Texts):
        pc = config.ppo
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

    @property
    def active(self) -> bool:
        return self.ds is not None and int(self.pc.eval_prompts) > 0

    def __call__(self, actor_params, frozen) -> Dict[str, float]:
        tot: Dict[str, float] = {}
        n = 0
        it = self.ds.iterator(int(self.pc.rollout_batch), shuffle=False, drop_remainder=False,
                              num_epochs=1, process_index=jax.process_index(),
                              process_count=jax.process_count())
        max_batches = -(-int(self.pc.eval_prompts) // int(self.pc.rollout_batch))
        for i, b in enumerate(it):
            if i >= max_batches:
                break
            keep = b.pop("batch_mask") > 0
            index = b.pop("index")
            g = common.to_global(b, self.mesh)
            r = ro.sample((self.actor_gd, actor_params), g["prompt_tokens"], g["prompt_mask"],
                          jax.random.fold_in(jax.random.PRNGKey(1234), i), self.sampling,
                          eos_id=self.tok.stop_ids, pad_id=self.tok.pad_id, mesh=self.mesh)
            score, kl = (ro.host_array(x) for x in self.scores(actor_params, frozen, r))
            resp, rmask, fin = (ro.host_array(r[k]) for k in ("response_tokens",
                                                              "response_mask", "finished"))
            keep = ro.host_array(jnp.asarray(keep)) if jax.process_count() > 1 else keep
            vals = {"rm_score": score, "kl": kl, "response_length": rmask.sum(-1),
                    "eos_rate": fin.astype(np.float32)}
            if self.texts.task is not None:
                vals["gold_reward"] = self.texts.gold(*self.texts(index, resp, rmask,
                                                                  ds=self.ds), fin)
            for k, v in vals.items():
                tot[k] = tot.get(k, 0.0) + float(np.asarray(v, np.float64)[keep].sum())
            n += int(keep.sum())
        return {k: v / max(n, 1) for k, v in tot.items()} | {"prompts": float(n)}


# ------------------------------------------------------------------------------------------
# Set-up helpers.

def _load_frozen(init_dir, head, mesh, model_block):
    from jaxrlhf.models import load_hf
    model = common.with_run_options(load_hf(init_dir, head=head, mesh=mesh), model_block)
    return nnx.graphdef(model), common.params_of(model), model


def _optimizer(config, total_updates: int, params):
    pc = config.ppo
    tc = config.train.copy_and_resolve_references()
    tc.warmup_steps = int(pc.warmup_iterations)
    tc.steps = total_updates
    opt_a, sched = common.make_optimizer(tc, lr=float(pc.actor_lr), steps=total_updates)
    opt_c, _ = common.make_optimizer(tc, lr=float(pc.critic_lr), steps=total_updates)
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    return optax.multi_transform({"actor": opt_a, "critic": opt_c}, labels), sched


def _opts(config) -> Dict[str, Any]:
    pc = config.ppo
    if pc.critic not in CRITIC_MODES:
        raise ValueError(f"ppo.critic must be one of {CRITIC_MODES}, got {pc.critic!r}.")
    if pc.reward_norm not in ("none", "running"):
        raise ValueError(f"ppo.reward_norm must be 'none' or 'running', got {pc.reward_norm!r}.")
    if pc.rollout_batch % pc.minibatch_size:
        raise ValueError(f"ppo.rollout_batch ({pc.rollout_batch}) must be a multiple of "
                         f"ppo.minibatch_size ({pc.minibatch_size}).")
    obj.registry.get("kl", pc.kl_estimator)
    obj.registry.get("loss_agg", pc.loss_agg)
    keys = ("critic", "temperature", "kl_estimator", "gamma", "lam", "clip_eps", "dual_clip",
            "vf_clip_eps", "vf_coef", "entropy_coef", "ptx_coef", "loss_agg",
            "whiten_advantages", "reward_clip", "reward_norm", "missing_eos_penalty")
    opts = {k: pc[k] for k in keys}
    opts["on_nonfinite"] = config.train.on_nonfinite
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
    pc = config.ppo
    opts = _opts(config)
    mesh = common.mesh_from_config(config)
    ensemble = bool(pc.reward_ensemble)
    if not pc.actor_init or not (pc.reward_init or ensemble):
        raise ValueError("PPO needs ppo.actor_init (an SFT stage dir or HF dir) and "
                         "ppo.reward_init (a reward-model stage dir or HF dir).")
    actor_dir = common.resolve_init_dir(pc.actor_init)
    if ensemble:  # member 0 stands in for reward_init (critic, checks)
        from jaxrlhf.models.reward import load_ensemble, member_dirs
        reward_dir = common.resolve_init_dir(pc.reward_init or member_dirs(pc.reward_ensemble)[0])
    else:
        reward_dir = common.resolve_init_dir(pc.reward_init)
    critic_dir = common.resolve_init_dir(pc.critic_init or reward_dir)
    tok_spec = common.tokenizer_spec(config, actor_dir)
    tokenizer = load_tokenizer(tok_spec)

    ref_dir = common.resolve_init_dir(pc.ref_init or pc.actor_init)
    ref_gd, ref_params, actor_model = _load_frozen(ref_dir, "lm", mesh, config.model)
    if ensemble:  # stacked members [M, ...]: score = mean − uncertainty_coef · std
        rm_gd, rm_params, rm_model = load_ensemble(pc.reward_ensemble, mesh)
        opts["reward"] = ro.ModelReward(rm_gd, ensemble_coef=float(pc.uncertainty_coef))
    else:
        rm_gd, rm_params, rm_model = _load_frozen(reward_dir, "score", mesh, config.model)
        opts["reward"] = ro.ModelReward(rm_gd)
    common.check_tokenizer(tokenizer, actor_model.cfg,
                           {"actor_init": actor_dir, "reward_init": reward_dir,
                            "critic_init": critic_dir, "ref_init": ref_dir})
    if rm_model.cfg.vocab_size != actor_model.cfg.vocab_size:
        raise ValueError(f"Actor vocab {actor_model.cfg.vocab_size} != reward model vocab "
                         f"{rm_model.cfg.vocab_size}: they must share one tokenizer.")

    # Trainable params: actor (a separate buffer from the frozen reference, which is never
    # donated) and critic (a separate model from critic_init, or a value head on the trunk).
    if ref_dir == actor_dir:
        actor_params = jax.tree.map(jnp.copy, ref_params)
    else:
        _, actor_params, _ = _load_frozen(actor_dir, "lm", mesh, config.model)
    graphdefs = {"actor": ref_gd, "ref": ref_gd}
    params_sh = {"actor": common.param_shardings(actor_model, mesh)}
    rep = NamedSharding(mesh, P())
    if pc.critic == "shared":
        d = actor_model.cfg.d_model
        critic_params = {"w": jax.device_put(jnp.zeros((d,), jnp.float32), rep),
                         "b": jax.device_put(jnp.zeros((), jnp.float32), rep)}
        params_sh["critic"] = {"w": rep, "b": rep}
    else:
        cgd, critic_params, critic_model = _load_frozen(critic_dir, "score", mesh, config.model)
        critic_params = jax.tree.map(jnp.copy, critic_params)
        graphdefs["critic"] = cgd
        params_sh["critic"] = common.param_shardings(critic_model, mesh)
    params = {"actor": actor_params, "critic": critic_params}
    frozen = {"ref": ref_params, "reward": rm_params}

    n_mb = pc.rollout_batch // pc.minibatch_size
    n_updates = int(pc.ppo_epochs) * n_mb
    optimizer, schedule = _optimizer(config, int(pc.iterations) * n_updates, params)
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
    texts = _Texts(config, prompt_ds, tokenizer)
    policy_eval = _PolicyEval(config, tokenizer, graphdefs, opts, mesh, texts)

    experience_fn = jax.jit(functools.partial(make_experience, graphdefs=graphdefs, opts=opts))
    update_fn = jax.jit(
        functools.partial(update_step, graphdefs=graphdefs, optimizer=optimizer,
                          schedule=schedule, opts=opts, grad_accum=int(pc.grad_accum)),
        in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=(0,))
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

    def iteration(state, batch):
        it = int(jax.device_get(state["step"]))
        it_rng = jax.random.fold_in(state["rng"], it)
        index = batch.pop("index")
        ptx = {k[4:]: batch.pop(k) for k in list(batch) if k.startswith("ptx_")}
        g = common.to_global(batch, mesh)
        tg = time.time()
        # (graphdef, params) rather than a merged module: generate would split it again.
        rollout = ro.sample((graphdefs["actor"], state["params"]["actor"]),
                            g["prompt_tokens"], g["prompt_mask"], jax.random.fold_in(it_rng, 0),
                            opts["sampling"], eos_id=tokenizer.stop_ids,
                            pad_id=tokenizer.pad_id, mesh=mesh)
        jax.block_until_ready(rollout["tokens"])
        clock["generation"] += time.time() - tg
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
                                                     int(pc.rollout_batch)))
            for j in range(n_mb):
                idx = perm[j * pc.minibatch_size:(j + 1) * pc.minibatch_size]
                mb = {key: v[idx] for key, v in exp.items()}
                mb.update(ptx_mbs[len(updates)] or {})
                state, um = update_fn(state, mb)
                updates.append(um)
        new_kl = kl_update(state["kl_ctl"], m_exp["kl"], jnp.float32(pc.rollout_batch))
        state = dict(state, step=state["step"] + 1, kl_ctl=new_kl)
        share = clock["generation"] / max(time.time() - clock["start"], 1e-9)
        return state, {"experience": m_exp, "updates": updates, "index": index,
                       "rollout": {k: rollout[k] for k in ("response_tokens", "response_mask",
                                                           "finished")},
                       "generation_time_share": share}

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
        resp, rmask, fin = (ro.host_array(out["rollout"][k])
                            for k in ("response_tokens", "response_mask", "finished"))
        if texts.task is not None:
            m["gold_reward"] = float(np.mean(texts.gold(*texts(out["index"], resp, rmask),
                                                        fin)))
        m["generation_time_share"] = out["generation_time_share"]
        if pi == 0 and pc.sample_every and step_no % pc.sample_every == 0:
            prompts_txt, resp_txt = texts(out["index"][:4], resp[:4], rmask[:4])
            with open(samples_path, "a") as f:
                for p_, r_, e_ in zip(prompts_txt, resp_txt, fin[:4]):
                    f.write(json.dumps({"iteration": step_no, "prompt": p_, "response": r_,
                                        "ended": bool(e_)}) + "\n")
            logger.print(f"[ppo] sample @ {step_no}: {prompts_txt[0]!r} -> {resp_txt[0]!r}")
        return m

    def finish(result):
        actor = nnx.merge(graphdefs["actor"], result.state["params"]["actor"])
        common.export_stage_model(actor, os.path.join(stage_dir, "hf"), tokenizer=tokenizer,
                                  tokenizer_spec_=tok_spec, stage="ppo")
        rows = (read_metrics(stage_dir)
                if os.path.exists(os.path.join(stage_dir, "metrics.jsonl")) else [])
        first = rows[0] if rows else {}
        summary = {"stage": "ppo", "iterations": int(pc.iterations),
                   "wall_time_s": result.wall_time,
                   **{f"final_{k}": v for k, v in result.last_metrics.items()},
                   **{f"eval_initial_{k}": v for k, v in result.start_eval_metrics.items()},
                   **{f"eval_final_{k}": v for k, v in result.eval_metrics.items()},
                   **{f"first_{k}": first.get(k) for k in ("rm_score", "gold_reward", "kl")
                      if k in first}}
        if pi == 0:
            write_summary(stage_dir, summary)
            plot_curves(stage_dir, [["rm_score"], ["gold_reward"], ["kl"], ["entropy"]],
                        filename="curves.png", title="PPO")
        return summary, actor

    evaluate = ((lambda s: policy_eval(s["params"]["actor"], frozen))
                if policy_eval.active else None)
    return common.Stage(name="ppo", state=state, state_sh=state_sh, step=iteration,
                        batches=batches, total_steps=int(pc.iterations), mesh=mesh,
                        evaluate=evaluate, finish=finish, put=lambda b: b,
                        read_metrics=read_iteration_metrics, echo_keys=ECHO_KEYS,
                        start_eval_file="eval_initial_policy.json")


def run(config, stage_dir: str):
    """Trains (or resumes) PPO-ptx in `stage_dir`; exports the actor to `stage_dir/hf`."""
    return common.run_stage(build, config, stage_dir)
