"""MOSS reward-model training options ("Secrets of RLHF II") on top of the plain
K-wise ranking loss of `jaxrlhf.trainers.reward`. Every option lives in `config.rm`; with all
of them off `setup` returns None and the RM stage runs its unchanged default path.

Preference-strength options (need `rm.strength_file`, the strength.jsonl written by the
`rm_ensemble` stage or `tools/preference_strength.py`: one row per ranked pair
(index, chosen, rejected) with the ensemble mean μ and std σ of d_m = r_m(chosen) − r_m(rejected),
keyed by the data row `index`). Each pair's loss is the generalised Bradley–Terry term of
`jaxrlhf.objectives.kwise_ranking_loss`,

    ℓ = −[(1 − ε) log σ(Δ) + ε log σ(−Δ)],   Δ = r_chosen − r_rejected − m,

and the options only choose the pair's (ε, m) (host-side NumPy, `pair_labels`; they reach the
step as batch["pair_smoothing"], batch["pair_margin"] [B, K, K]):

  soft_labels      ε(μ) = 1 − σ(μ / soft_label_temperature): the target P(chosen ≻ rejected)
                   is the ensemble's own Bradley–Terry probability (it replaces rm.label_smoothing)
  adaptive_margin  α > 0: m(μ) = rm.margin + clip(α·μ, −adaptive_margin_max, +adaptive_margin_max)
                   (MOSS: −log σ(r_c − r_r − m̂(x, y)) with m̂ from μ)
  flip_fraction    f: the labels of the ⌊f·N + ½⌋ pairs with the lowest μ in the strength file
                   (ties by file order) are reversed. A flipped pair is trained as
                   "rejected ≻ chosen" with the (ε, m) its swapped pair (strength −μ) would get;
                   in the un-swapped frame that is (ε, m) ← (1 − ε(−μ), −m(−μ)), which is exactly
                   the loss of the pair with its ranks swapped. (Since ε(μ) and m(μ) − rm.margin
                   are odd-symmetric in μ, flipping changes nothing for soft labels and for the
                   adaptive part of the margin: they already follow the ensemble, not the label.)

Contrastive term (rm.contrastive_coef > 0; SimCSE on preference differences, MOSS §contrastive):
the representation of a response is the reward model's final hidden state at its last real token
(what the score head reads); each ranked pair is d = h(chosen) − h(rejected). The model has no
dropout, so the two SimCSE views are made by feature dropout (rate rm.contrastive_dropout, an
independent mask per view and per row, keys from fold_in(state.rng, step)) on those hidden
states; `jaxrlhf.objectives.contrastive_loss` (InfoNCE, temperature
rm.contrastive_temperature, the other pairs of the micro-batch as negatives) is added as
coef · L_con. With rm.contrastive_dropout = 0 the views coincide and the term is pure
uniformity (spreads the pairs' differences apart). The ranking loss uses the dropout-free
rewards. With grad accumulation the term is the mean over micro-batches (negatives come from
the same micro-batch).

MetaRM (rm.meta_rm; MOSS §MetaRM / Dou et al. 2024). A meta set of new-distribution responses:
rows {prompt, responses: [y_1..y_k]} (k >= 2, no labels) from rm.meta_data (a JSON/JSONL file),
or sampled from the actor rm.meta_actor (an SFT/PPO stage dir or HF dir) with
`jaxrlhf.generation.generate` on the training prompts (written to stage_dir/meta_samples.jsonl).
Per step, with a preference batch X_t and a meta batch X_s:

    J_θ(X_s)   = mean over pairs (y_i, y_j), i < j, of the same prompt of σ(|r_θ(x,y_i) − r_θ(x,y_j)|)
    θ'         = θ + η ∇_θ J_θ(X_s)                       (one ASCENT step; η = rm.meta_lr)
    L_θ'(X_t)  = the usual ranking loss at θ'
    θ_{t+1}    = optimizer update of θ with ∇_θ L_θ'(X_t)  (through θ' = θ + η∇J(θ):
                 (I + η ∇²J) ∇L(θ'), second order; rm.meta_first_order drops the ∇²J term)

The optimizer state, schedule and clipping act on θ (the original parameters), as in the paper.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.objectives import contrastive_loss, kwise_ranking_loss
from jaxrlhf.trainers import common
from jaxrlhf.trainers import reward as rm_stage

META = "meta_"   # prefix of the meta-batch keys inside a training batch
STRENGTH_OPTIONS = ("flip_fraction", "soft_labels", "adaptive_margin")


# ------------------------------------------------------------------------------------------
# Preference strength -> per-pair (ε, m).

def read_strength(path: str) -> list[dict]:
    """Rows of a strength.jsonl: {index, chosen, rejected, mu, sigma, ...}."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append({"index": int(r["index"]), "chosen": int(r["chosen"]),
                             "rejected": int(r["rejected"]), "mu": float(r["mu"]),
                             "sigma": float(r.get("sigma", 0.0))})
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a strength row ({e}); expected "
                                 "{index, chosen, rejected, mu, sigma}") from e
    if not rows:
        raise ValueError(f"{path} has no strength rows")
    return rows


@dataclasses.dataclass
class StrengthTable:
    """μ and the flip decision of every pair, as dense [N, K, K] arrays indexed by
    (row index, chosen slot, rejected slot); NaN μ = no strength for that pair."""

    mu: np.ndarray
    flip: np.ndarray
    path: str = ""

    @classmethod
    def from_rows(cls, rows, k: int, flip_fraction: float = 0.0, path: str = ""):
        n = max(r["index"] for r in rows) + 1
        mu = np.full((n, k, k), np.nan)
        flip = np.zeros((n, k, k), bool)
        for r in rows:
            if not (0 <= r["chosen"] < k and 0 <= r["rejected"] < k):
                raise ValueError(f"{path}: pair ({r['chosen']}, {r['rejected']}) of row "
                                 f"{r['index']} does not fit K = {k} responses")
            mu[r["index"], r["chosen"], r["rejected"]] = r["mu"]
        if not 0.0 <= flip_fraction <= 1.0:
            raise ValueError(f"rm.flip_fraction must be in [0, 1], got {flip_fraction}")
        n_flip = int(math.floor(flip_fraction * len(rows) + 0.5))
        if n_flip:
            mus = np.asarray([r["mu"] for r in rows])
            for i in np.argsort(mus, kind="stable")[:n_flip]:
                r = rows[int(i)]
                flip[r["index"], r["chosen"], r["rejected"]] = True
        return cls(mu, flip, path)

    def lookup(self, batch: Mapping[str, np.ndarray]):
        """(μ, flip) [B, K, K] of a ranking batch; raises if a ranked pair has no strength."""
        idx = np.asarray(batch["index"]).astype(np.int64)
        ranks, valid = np.asarray(batch["ranks"]), np.asarray(batch["valid"]) > 0
        ranked = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
        inside = idx < self.mu.shape[0]
        mu = np.where(inside[:, None, None], self.mu[np.minimum(idx, self.mu.shape[0] - 1)],
                      np.nan)
        flip = self.flip[np.minimum(idx, self.mu.shape[0] - 1)] & inside[:, None, None]
        missing = ranked & np.isnan(mu)
        if missing.any():
            b, i, j = (int(x[0]) for x in np.nonzero(missing))
            raise ValueError(
                f"{self.path or 'strength table'} has no strength for data row {int(idx[b])} "
                f"pair (chosen {i}, rejected {j}). The strength file must come from the same "
                "data config (an rm_ensemble stage on this data, or tools/preference_strength.py).")
        return np.nan_to_num(mu), flip


def pair_labels(mu, flip, *, label_smoothing: float = 0.0, margin: float = 0.0,
                soft_labels: bool = False, soft_label_temperature: float = 1.0,
                adaptive_margin: float = 0.0, adaptive_margin_max: float = 5.0):
    """Per-pair (ε, m) from the strength mean μ (see the module docstring); NumPy float32."""
    mu = np.asarray(mu, np.float64)

    def eps_of(x):
        if soft_labels:
            return 1.0 - 1.0 / (1.0 + np.exp(-x / soft_label_temperature))
        return np.full_like(x, label_smoothing)

    def margin_of(x):
        m = np.full_like(x, margin)
        if adaptive_margin:
            m = m + np.clip(adaptive_margin * x, -adaptive_margin_max, adaptive_margin_max)
        return m

    eps = np.where(flip, 1.0 - eps_of(-mu), eps_of(mu))
    m = np.where(flip, -margin_of(-mu), margin_of(mu))
    return eps.astype(np.float32), m.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Pure step functions.

def last_hidden_and_rewards(params, graphdef, tokens, mask):
    """Final hidden state at the last real token [..., D] and the reward [...] of [..., T]
    sequences (the score head applied to that hidden state)."""
    lead, t = tokens.shape[:-1], tokens.shape[-1]
    model = nnx.merge(graphdef, params)
    flat_mask = mask.reshape(-1, t)
    h_last = model.last_hidden(tokens.reshape(-1, t), flat_mask)
    r = model.apply_head(h_last[:, None, :])[:, 0]
    return h_last.reshape(lead + h_last.shape[-1:]), r.reshape(lead)


def _ranked(batch):
    valid = rm_stage._valid(batch)
    ranks = batch["ranks"]
    return valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])


def pair_contrastive_loss(h_BxKxD, batch, keys_Bx2, *, temperature: float, dropout: float):
    """InfoNCE over the ranked pairs' difference representations h_i − h_j (module docstring);
    two feature-dropout views drawn from one key per row."""
    b, k, d = h_BxKxD.shape
    if dropout > 0.0:
        keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - dropout, (2, k, d)))(
            keys_Bx2)                                                    # [B, 2, K, D]
        hv = jnp.where(keep, h_BxKxD[:, None] / (1.0 - dropout), 0.0)
        v1, v2 = hv[:, 0], hv[:, 1]
    else:
        v1 = v2 = h_BxKxD
    full = (b, k, k, d)
    chosen = lambda v: jnp.broadcast_to(v[:, :, None, :], full).reshape(-1, d)
    rejected = lambda v: jnp.broadcast_to(v[:, None, :, :], full).reshape(-1, d)
    return contrastive_loss(chosen(v1), rejected(v1), temperature=temperature,
                            z_chosen_view2_BxD=chosen(v2), z_rejected_view2_BxD=rejected(v2),
                            mask_B=_ranked(batch).reshape(-1))


def difference_loss(params, graphdef, meta_batch):
    """MetaRM's J_θ: mean over the pairs i < j of valid responses of each meta row of
    σ(|r_i − r_j|) (the responses carry no labels)."""
    r = rm_stage.sequence_rewards(params, graphdef, meta_batch["tokens"],
                                  meta_batch["attention_mask"])
    valid = meta_batch["valid"] > 0
    k = r.shape[-1]
    upper = jnp.triu(jnp.ones((k, k), jnp.bool_), 1)[None]
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    s = jax.nn.sigmoid(jnp.abs(r[:, :, None] - r[:, None, :]))
    n = jnp.sum(pairs.astype(jnp.float32))
    return jnp.sum(jnp.where(pairs, s, 0.0)) / jnp.maximum(n, 1.0)


def toolkit_ranking_loss(params, graphdef, batch, *, tie_mode: str, margin: float,
                         label_smoothing: float, contrastive_coef: float = 0.0,
                         contrastive_temperature: float = 0.05,
                         contrastive_dropout: float = 0.0, center_coef: float = 0.0):
    """(ranking loss, metrics, contrastive loss) of one (micro-)batch; per-pair ε / m from the
    batch when present (as in `reward.ranking_loss`)."""
    h, rewards = last_hidden_and_rewards(rm_stage.frozen_bias(params), graphdef,
                                         batch["tokens"], batch["attention_mask"])
    if "pair_margin" in batch:
        margin, label_smoothing = batch["pair_margin"], batch["pair_smoothing"]
    elif not margin:
        margin = None
    loss, m = kwise_ranking_loss(rewards, batch["ranks"], rm_stage._valid(batch),
                                 tie_mode=tie_mode, margin=margin,
                                 label_smoothing=label_smoothing, center_coef=center_coef)
    con = jnp.zeros((), jnp.float32)
    if contrastive_coef:
        con, _ = pair_contrastive_loss(h, batch, batch["row_key"],
                                       temperature=contrastive_temperature,
                                       dropout=contrastive_dropout)
    return loss, m, con


def train_step(state, batch, *, graphdef, optimizer, schedule, grad_accum: int,
               on_nonfinite: str, loss_kw, contrastive: Optional[Mapping[str, float]] = None,
               meta: Optional[Mapping[str, Any]] = None):
    """step(state, batch) -> (state, metrics): the ranking loss (+ contrastive term), or the
    MetaRM update when `meta` is given ({"lr": η, "first_order": bool})."""
    contrastive = dict(contrastive or {})
    coef = float(contrastive.get("contrastive_coef", 0.0))
    main = {k: v for k, v in batch.items() if not k.startswith(META)}
    n_rows = main["tokens"].shape[0]
    rng = jax.random.fold_in(state["rng"], state["step"])
    if coef:
        main["row_key"] = jax.random.split(rng, n_rows)
    total = jnp.maximum(rm_stage.num_prompts_with_pairs(main, loss_kw["tie_mode"]), 1.0)

    def contribution(params, mb):
        loss, m, con = toolkit_ranking_loss(params, graphdef, mb, **loss_kw, **contrastive)
        w = m["num_prompts"] / total
        aux = {"accuracy": m["accuracy"] * w, "mean_margin": m["mean_margin"] * w,
               "num_pairs": m["num_pairs"], "ranking_loss": loss * w}
        out = loss * w
        if coef:
            out = out + coef * con / grad_accum
            aux["contrastive_loss"] = jax.lax.stop_gradient(con) / grad_accum
        return out, aux

    params = state["params"]
    if meta is None:
        loss, aux, grads = common.accumulate(contribution, params, main, grad_accum)
    else:
        meta_batch = {k[len(META):]: v for k, v in batch.items() if k.startswith(META)}

        def adapt(p):
            j, g = jax.value_and_grad(difference_loss)(p, graphdef, meta_batch)
            if meta["first_order"]:
                g = jax.lax.stop_gradient(g)
            return jax.tree.map(lambda a, b: a + meta["lr"] * b.astype(a.dtype), p, g), j

        adapted, pullback, j = jax.vjp(adapt, params, has_aux=True)
        loss, aux, g_adapted = common.accumulate(contribution, adapted, main, grad_accum)
        (grads,) = pullback(g_adapted)
        aux["meta_difference_loss"] = j
    state, metrics = common.apply_update(state, grads, optimizer, schedule, loss, on_nonfinite)
    metrics.update(loss=loss, **aux)
    return state, metrics


# ------------------------------------------------------------------------------------------
# Meta set (MetaRM): a file of policy samples, or samples drawn from an actor.

def read_meta_file(path: str) -> list[dict]:
    """Rows {prompt, responses: [str, ...]} (k >= 2, no labels) of a JSON / JSONL file."""
    from jaxrlhf.data.formats import read_rows
    out = []
    for row in read_rows(path):
        where = f"{row.file}:{row.line}"
        if row.error is not None:
            raise ValueError(f"{where}: {row.error[0]}: {row.error[1]}")
        v = row.value
        ok = (isinstance(v, dict) and isinstance(v.get("prompt"), str)
              and isinstance(v.get("responses"), list) and len(v["responses"]) >= 2
              and all(isinstance(r, str) for r in v["responses"]))
        if not ok:
            raise ValueError(f"{where}: a meta row must be {{prompt: str, responses: [str, "
                             "str, ...]}} with >= 2 responses")
        out.append({"prompt": v["prompt"], "responses": list(v["responses"])})
    if not out:
        raise ValueError(f"{path}: no meta rows")
    return out


def sample_meta_examples(config, train_ds, tokenizer, mesh) -> list[dict]:
    """rm.meta_num_prompts prompts (the built-in task's prompt stream, else the training rows'
    prompts) with rm.meta_k responses each sampled from rm.meta_actor."""
    from jaxrlhf.data import PreparedDataset, SyntheticTask, tokenize_examples
    from jaxrlhf.data.formats import make_report
    from jaxrlhf.generation import generate
    from jaxrlhf.models import load_hf
    rc = config.rm
    actor_dir = common.resolve_init_dir(rc.meta_actor)
    actor = load_hf(actor_dir, head="lm", mesh=mesh)
    n = int(rc.meta_num_prompts)
    if config.data.path == "synthetic":
        task = SyntheticTask.from_config(config.data.synthetic)
        prompts = [e["prompt"] for e in task.prompt_examples(n, split="train")]
    else:
        seen, prompts = set(), []
        for ex in train_ds.examples:
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                prompts.append(ex["prompt"])
            if len(prompts) == n:
                break
    examples = [{"prompt": p} for p in prompts]
    opts = dict(train_ds.options.__dict__)
    opts.pop("prompt_buckets")
    opts["format"] = "prompt"
    rows = tokenize_examples(examples, tokenizer, opts,
                             report=make_report(train_ds.options, "meta prompts", None))
    ds = PreparedDataset(examples, rows, make_report(train_ds.options, "meta", None),
                         dataclasses.replace(train_ds.options, format="prompt"), tokenizer)
    bs = int(config.train.batch_size)
    responses: Dict[int, list] = {}
    for i, b in enumerate(ds.iterator(bs, shuffle=False, drop_remainder=False, num_epochs=1)):
        keep = b["batch_mask"] > 0
        for j in range(int(rc.meta_k)):
            res = generate(actor, jnp.asarray(b["prompt_tokens"]),
                           jnp.asarray(b["prompt_mask"]),
                           jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 4242),
                                              i * 1000 + j),
                           max_new_tokens=int(rc.meta_max_new_tokens),
                           temperature=float(rc.meta_temperature), eos_id=tokenizer.stop_ids,
                           pad_id=tokenizer.pad_id, mesh=mesh)
            toks, mask = np.asarray(res.response_tokens), np.asarray(res.response_mask)
            for r in range(len(keep)):
                if keep[r]:
                    text = tokenizer.decode([int(t) for t, m in zip(toks[r], mask[r])
                                             if m and int(t) != tokenizer.eos_id])
                    responses.setdefault(int(b["index"][r]), []).append(text)
    return [{"prompt": prompts[i], "responses": responses[i]} for i in sorted(responses)]


def meta_dataset(examples, train_ds, tokenizer):
    """A ranking-format PreparedDataset of meta rows (ranks all 0: they are never used)."""
    from jaxrlhf.data import PreparedDataset, tokenize_examples
    from jaxrlhf.data.formats import make_report
    k = max(len(e["responses"]) for e in examples)
    rows_in = [{"prompt": e["prompt"], "responses": e["responses"],
                "ranks": [0] * len(e["responses"])} for e in examples]
    o = dataclasses.replace(train_ds.options, format="ranking", max_k=k)
    opts = dict(o.__dict__)
    opts.pop("prompt_buckets")
    report = make_report(o, "meta set", None)
    rows = tokenize_examples(rows_in, tokenizer, opts, report=report)
    return PreparedDataset(rows_in, rows, report, o, tokenizer)


# ------------------------------------------------------------------------------------------
# The iterator wrapper and the stage hook.

class ToolkitIterator:
    """The training iterator plus per-pair (ε, m) and a meta batch per step; `state()` /
    `restore()` cover both iterators, so a resumed run sees the same batches."""

    def __init__(self, base, *, table: Optional[StrengthTable] = None,
                 label_kw: Optional[dict] = None, meta_iter=None):
        self.base, self.table, self.label_kw, self.meta_iter = base, table, label_kw, meta_iter

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.base)
        if self.table is not None:
            mu, flip = self.table.lookup(b)
            b["pair_smoothing"], b["pair_margin"] = pair_labels(mu, flip, **self.label_kw)
        if self.meta_iter is not None:
            m = next(self.meta_iter)
            for k in ("tokens", "attention_mask", "valid"):
                b[META + k] = m[k]
        return b

    def state(self) -> dict:
        s = dict(self.base.state())
        if self.meta_iter is not None:
            s["meta"] = self.meta_iter.state()
        return s

    def restore(self, state) -> None:
        state = dict(state)
        meta = state.pop("meta", None)
        self.base.restore(state)
        if self.meta_iter is not None and meta is not None:
            self.meta_iter.restore(meta)


@dataclasses.dataclass
class Toolkit:
    """What `reward.run` needs when a MOSS option is on: the wrapped iterator and the step."""

    wrap_iterator: Any
    step_fn: Any             # a `train_step`-compatible function (reward.train_step or ours)
    step_kw: dict
    info: dict


def active(rc) -> bool:
    return bool(rc.get("strength_file") or rc.get("flip_fraction") or rc.get("soft_labels")
                or rc.get("adaptive_margin") or rc.get("contrastive_coef")
                or rc.get("meta_rm"))


def setup(config, train_ds, tokenizer, mesh, stage_dir: str) -> Optional[Toolkit]:
    """None when every option is off; else the iterator wrapper and the train step."""
    rc = config.rm
    if not active(rc):
        return None
    info: dict = {}
    table, label_kw = None, None
    wants_strength = any(bool(rc.get(k)) for k in STRENGTH_OPTIONS)
    if wants_strength and not rc.strength_file:
        raise ValueError("rm.flip_fraction / rm.soft_labels / rm.adaptive_margin need "
                         "rm.strength_file (strength.jsonl of an rm_ensemble stage).")
    if rc.strength_file:
        rows = read_strength(rc.strength_file)
        table = StrengthTable.from_rows(rows, train_ds.num_responses,
                                        float(rc.flip_fraction), rc.strength_file)
        label_kw = dict(label_smoothing=float(rc.label_smoothing), margin=float(rc.margin),
                        soft_labels=bool(rc.soft_labels),
                        soft_label_temperature=float(rc.soft_label_temperature),
                        adaptive_margin=float(rc.adaptive_margin),
                        adaptive_margin_max=float(rc.adaptive_margin_max))
        info.update(strength_pairs=len(rows), flipped_pairs=int(table.flip.sum()))
    meta_ds = None
    if rc.meta_rm:
        if rc.meta_data:
            examples = read_meta_file(rc.meta_data)
        elif rc.meta_actor:
            examples = sample_meta_examples(config, train_ds, tokenizer, mesh)
            if jax.process_index() == 0:
                with open(os.path.join(stage_dir, "meta_samples.jsonl"), "w") as f:
                    for e in examples:
                        f.write(json.dumps(e) + "\n")
        else:
            raise ValueError("rm.meta_rm needs rm.meta_data (a file of {prompt, responses}) "
                             "or rm.meta_actor (a stage dir to sample responses from).")
        meta_ds = meta_dataset(examples, train_ds, tokenizer)
        info.update(meta_rows=len(meta_ds.rows))

    def wrap(base):
        meta_iter = None
        if meta_ds is not None:
            meta_iter = meta_ds.iterator(int(rc.meta_batch_size), seed=int(config.seed) + 17,
                                         shuffle=True, process_index=jax.process_index(),
                                         process_count=jax.process_count())
        return ToolkitIterator(base, table=table, label_kw=label_kw, meta_iter=meta_iter)

    contrastive = None
    if rc.contrastive_coef:
        contrastive = dict(contrastive_coef=float(rc.contrastive_coef),
                           contrastive_temperature=float(rc.contrastive_temperature),
                           contrastive_dropout=float(rc.contrastive_dropout))
    meta = (dict(lr=float(rc.meta_lr), first_order=bool(rc.meta_first_order))
            if rc.meta_rm else None)
    if contrastive is None and meta is None:
        # Per-pair (ε, m) only: the plain step reads them from the batch.
        return Toolkit(wrap, rm_stage.train_step, {}, info)
    return Toolkit(wrap, train_step, dict(contrastive=contrastive, meta=meta), info)
