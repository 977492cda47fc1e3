"""PPO-ptx's jitted functions, pure in their arguments (the stage is `jaxrlhf.trainers.ppo`):
the scoring pass (policy log-probs, entropy, values; reference log-probs; reward score),
reward shaping + KL penalty + advantages, the PPO(-ptx) update, the fused scoring pass + first
update, and the held-out scores.

Static options (`opts`, bound with functools.partial): the loss options of `ppo.*`,
"sampling" (`jaxrlhf.rollout.Sampling`), "reward" (a reward model source, e.g.
`jaxrlhf.rollout.ModelReward`, or None), "advantages" (a registry "advantage" function for a
critic, or an "outcome_advantage" one for the critic-free estimators, with "critic": "none")
and "on_nonfinite". `graphdefs`: {"actor", "ref"} and, for a separate critic, "critic".

The score of a response is reward_model_coef × the reward model's score + the rollout's
"host_score" (the Python reward functions' weighted sum, computed on the host before the
scoring pass; zeros without reward functions).

Token layout of a rollout: tokens [B, L = P + N] = left-padded prompt + response; the hidden
state at position P - 1 + t predicts response token t, so response log-probs and values are
read from positions P-1 .. L-2 (`jaxrlhf.rollout.response_rows`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf import objectives as obj
from jaxrlhf import rollout as ro
from jaxrlhf.generation import sampling_logprobs
from jaxrlhf.models import lora
from jaxrlhf.trainers import common


def policy_outputs(params, tokens, mask, resp, *, graphdefs, opts, group: int = 1):
    """(log π(response) [B, N] under the sampling distribution, entropy [B, N]) of the actor
    at the response positions -- its LM head chunked over positions for large vocabularies
    (`Transformer.head_reduce`) -- and values [B, N]. `group`: rows come in prompt groups of
    that many (a rollout in sample order), whose prompt is run once (`Transformer.hidden`)."""
    actor = nnx.merge(graphdefs["actor"], params["actor"])
    resp_rows = ro.response_rows(tokens, resp.shape[1])
    h_resp = actor.hidden(tokens, mask, select=resp_rows, group=group)
    # Without an entropy bonus the entropy is a metric: no gradient path through it.
    ent_in = (lambda z: z) if opts["entropy_coef"] else jax.lax.stop_gradient
    logp, ent = actor.head_reduce(
        h_resp, lambda z, y: (sampling_logprobs(z, y, **_sampling_kw(opts)),
                              obj.entropy(ent_in(z), opts["temperature"])), resp)
    critic = opts["critic"]
    if critic == "none":
        values = jnp.zeros(h_resp.shape[:2], jnp.float32)
    elif critic == "shared":
        w, b = params["critic"]["w"], params["critic"]["b"]
        values = (h_resp @ w.astype(h_resp.dtype)).astype(jnp.float32) + b
    else:
        model = nnx.merge(graphdefs["critic"], params["critic"])
        values = model.apply_head(model.hidden(tokens, mask, select=resp_rows, group=group))
    return logp, ent, values


def _sampling_kw(opts):
    return opts["sampling"].logprob_kw()


def total_score(frozen, rollout, opts):
    """reward_model_coef × the reward model's score (if any) + the host-side score [B]."""
    score = rollout["host_score"].astype(jnp.float32)
    if opts["reward"] is not None:
        model = opts["reward"](frozen["reward"], rollout["tokens"], rollout["mask"])
        score = opts["reward_model_coef"] * model + score
    return score


def shared_prompt_group(opts) -> int:
    """The prompt-group size the scoring forwards of a whole rollout (rows in sample order)
    may share their prompt over: samples_per_prompt when `share_prompt_forward` is on, else
    1. Minibatches of permuted rows never share."""
    return int(opts["samples_per_prompt"]) if opts.get("share_prompt_forward") else 1


def frozen_scores(frozen, rollout, *, graphdefs, opts, group: int = 1):
    """Reference log-probs of the response [B, N] and the score [B] (`total_score`);
    `group` as in `policy_outputs`."""
    ref_logp = ro.response_logprobs(graphdefs["ref"], frozen["ref"], rollout, opts["sampling"],
                                    group=group)
    return ref_logp, total_score(frozen, rollout, opts)


def shaped_score(raw_score, rollout, opts):
    """The score after the missing-EOS penalty and the overlong penalty (DAPO)."""
    finished = rollout["finished"]
    score = raw_score - opts["missing_eos_penalty"] * (1.0 - finished.astype(jnp.float32))
    if opts["overlong_buffer"] > 0:
        lengths = jnp.sum(rollout["response_mask"], axis=-1)
        score = score + obj.overlong_penalty(lengths, opts["sampling"].max_new_tokens,
                                             opts["overlong_buffer"], opts["overlong_penalty"])
    return score


def shape_experience(state, rollout, outputs, ref_logp, raw_score, *, opts):
    """Score shaping + KL-penalised rewards + GAE + whitening, from the policy's outputs
    (π_old, entropy, values) and the frozen models' scores: (experience, metrics, stats)."""
    old_logp, ent, values = outputs
    resp, resp_mask = rollout["response_tokens"], rollout["response_mask"]
    valid = resp_mask > 0
    finished = rollout["finished"]
    score = shaped_score(raw_score, rollout, opts)
    stats = obj.running_moments_update(state["reward_stats"], score)
    if opts["reward_norm"] == "running":
        score = obj.normalize_with_moments(score, stats)
    kl_coef = state["kl_ctl"].kl_coef
    rewards, km = obj.kl_penalized_rewards(
        score, old_logp, ref_logp, valid, kl_coef=kl_coef,
        kind=opts["kl_estimator"], score_clip=opts["reward_clip"] or None)
    extra = {}
    if opts["critic"] == "none":   # critic-free: advantages from the sequence scores
        if opts["reward_clip"]:
            score = jnp.clip(score, -opts["reward_clip"], opts["reward_clip"])
        kl_tok = jnp.where(valid, obj.kl_estimate(jnp.where(valid, old_logp, 0.0),
                                                  jnp.where(valid, ref_logp, 0.0),
                                                  opts["kl_estimator"]), 0.0)
        k = opts["samples_per_prompt"]
        adv = opts["advantages"](score, kl_tok, valid, group_size=k, kl_coef=kl_coef,
                                 eps=opts["advantage_eps"])
        returns = jnp.zeros_like(adv)
        if k > 1:
            uniform = obj.uniform_groups(score, k)
            extra["uniform_groups"] = jnp.mean(uniform.astype(jnp.float32))
            if opts["filter_uniform_groups"]:   # DAPO dynamic sampling, as a loss mask
                resp_mask = jnp.where(uniform[:, None], 0, resp_mask)
    else:
        adv, returns = opts["advantages"](rewards, values, valid, gamma=opts["gamma"],
                                          lam=opts["lam"])
        if opts["whiten_advantages"]:
            adv = obj.masked_whiten(adv, valid)
    exp = {"tokens": rollout["tokens"], "mask": rollout["mask"], "response_tokens": resp,
           "response_mask": resp_mask, "old_logp": jnp.where(valid, old_logp, 0.0),
           "old_values": jnp.where(valid, values, 0.0), "advantages": adv, "returns": returns}
    if opts["kl_loss_coef"] > 0:
        exp["ref_logp"] = jnp.where(valid, ref_logp, 0.0)
    lengths = jnp.sum(rollout["response_mask"], axis=-1).astype(jnp.float32)
    metrics = {
        opts.get("score_name", "rm_score"): jnp.mean(raw_score),
        "score": km["score"],
        "kl": km["kl"],
        "kl_per_token": km["kl_per_token"],
        "non_score_reward": km["non_score_reward"],
        "total_reward": km["total_reward"],
        "entropy": obj.masked_mean(ent, valid),
        "response_length": jnp.mean(lengths),
        "eos_rate": jnp.mean(finished.astype(jnp.float32)),
        "kl_coef": kl_coef,
        "advantage_mean": obj.masked_mean(adv, valid),
        **extra,
    }
    if opts["critic"] != "none":
        metrics.update(value_mean=obj.masked_mean(values, valid),
                       return_mean=obj.masked_mean(returns, valid))
    return exp, metrics, stats


def make_experience(state, frozen, rollout, *, graphdefs, opts):
    """The scoring pass + reward shaping + GAE: returns (experience, metrics, reward_stats)."""
    outputs = policy_outputs(lora.join(frozen.get("base"), state["params"]), rollout["tokens"],
                             rollout["mask"], rollout["response_tokens"], graphdefs=graphdefs,
                             opts=opts)
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
                                 clip_eps_high=opts["clip_eps_high"] or None,
                                 dual_clip=opts["dual_clip"] or None, agg=agg, **denoms)
    ent_term = obj.aggregate(ent, valid, agg, **denoms)
    total = pg - opts["entropy_coef"] * ent_term if opts["entropy_coef"] else pg
    aux = {"policy_loss": pg, "entropy_bonus_term": ent_term,
           "approx_kl": pm["approx_kl"], "clipfrac": pm["clipfrac"],
           "ratio_mean": pm["ratio_mean"], "ratio_max": pm["ratio_max"]}
    if opts["critic"] != "none":
        vl, vm = obj.value_loss(values, mb["old_values"], mb["returns"], valid,
                                clip_eps=opts["vf_clip_eps"], agg=agg, **denoms)
        total = total + opts["vf_coef"] * vl
        aux.update(value_loss=vl, vf_clipfrac=vm.get("clipfrac", vm.get("vf_clipfrac", 0.0)),
                   explained_variance=vm.get("explained_variance", 0.0))
    if opts["kl_loss_coef"] > 0:   # KL(π_θ ‖ π_ref) in the loss (GRPO), with its gradient
        kl_tok = obj.kl_estimate(logp, mb["ref_logp"], opts["kl_loss_estimator"])
        kl_term = obj.aggregate(kl_tok, valid, agg, **denoms)
        total = total + opts["kl_loss_coef"] * kl_term
        aux["kl_loss"] = kl_term
    return total, aux


def ptx_term(actor_params, mb, *, graphdefs, opts, denoms):
    """The pretraining LM loss of the ptx batch in `mb` (keys ptx_tokens, ...)."""
    actor = nnx.merge(graphdefs["actor"], actor_params)
    logits = actor(mb["ptx_tokens"], mb["ptx_attention_mask"])
    return obj.ptx_loss(logits, mb["ptx_tokens"], mb["ptx_loss_mask"], agg=opts["loss_agg"],
                        **denoms)[0]


def _ptx_denoms(batch):
    return obj.aggregation_denominators(batch["ptx_loss_mask"][:, 1:] > 0)


def update_step(state, batch, base=None, *, graphdefs, optimizer, schedule, opts,
                grad_accum: int):
    """One PPO(-ptx) update on a minibatch of experience (and a ptx batch): (state, metrics).
    `base`: the frozen weights of the actor / critic under LoRA ({"actor", "critic"} or
    None)."""
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

    loss, aux, grads = common.accumulate(contribution, state["params"], batch, grad_accum,
                                         base=base)
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss,
                                         opts["on_nonfinite"],
                                         counter="updates")  # "step" counts iterations
    if grad_accum > 1:  # per-micro-batch means of the diagnostics -> their average
        for k in ("approx_kl", "clipfrac", "ratio_mean", "vf_clipfrac", "explained_variance"):
            if k in aux:
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
    base = frozen.get("base")
    # π_old and π_θ are one array here, so the actor and the reference may run each
    # prompt once for its K samples (`shared_prompt_group`) without breaking ratio == 1.
    group = shared_prompt_group(opts)
    fwd = lambda p: policy_outputs(lora.join(base, p), rollout["tokens"], rollout["mask"],
                                   rollout["response_tokens"], graphdefs=graphdefs, opts=opts,
                                   group=group)
    outputs, pullback = jax.vjp(fwd, state["params"])
    ref_logp, raw_score = frozen_scores(frozen, rollout, graphdefs=graphdefs, opts=opts,
                                        group=group)
    exp, m_exp, stats = shape_experience(state, rollout, outputs, ref_logp, raw_score,
                                         opts=opts)
    denoms = obj.aggregation_denominators(exp["response_mask"] > 0)
    (loss, aux), cotangents = jax.value_and_grad(
        lambda o: ppo_losses(o, exp, denoms, opts), has_aux=True)(outputs)
    (grads,) = pullback(cotangents)
    if ptx_batch is not None:
        actor_base = base["actor"] if base is not None else None
        pl, g_ptx = jax.value_and_grad(
            lambda a: ptx_term(lora.join(actor_base, a), ptx_batch, graphdefs=graphdefs,
                               opts=opts, denoms=_ptx_denoms(ptx_batch)))(
                                   state["params"]["actor"])
        grads = dict(grads, actor=jax.tree.map(lambda g, h: g + opts["ptx_coef"] * h,
                                               grads["actor"], g_ptx))
        loss = loss + opts["ptx_coef"] * pl
        aux["ptx_loss"] = pl
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss,
                                         opts["on_nonfinite"], counter="updates")
    metrics.update(loss=loss, **aux)
    return dict(state, reward_stats=stats), exp, m_exp, metrics


def eval_scores(actor_params, frozen, rollout, *, graphdefs, opts):
    """Score (`total_score`) and KL(actor || reference) (k1 summed over the response) of
    rollouts."""
    valid = rollout["response_mask"] > 0
    logp = lambda name, params: ro.response_logprobs(graphdefs[name], params, rollout,
                                                     opts["sampling"])
    kl = jnp.sum(jnp.where(valid, logp("actor", actor_params) - logp("ref", frozen["ref"]),
                           0.0), axis=-1)
    return total_score(frozen, rollout, opts), kl
