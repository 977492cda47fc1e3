"""MOSS reward-model techniques against a plain Bradley–Terry RM.

  python experiments/moss_rm/run.py --task synthetic --workdir /tmp/moss_rm   # built-in task
  python experiments/moss_rm/run.py --task hh --workdir /tmp/moss_rm_hh       # HH harmless

For each task: (1) an SFT actor (its samples are MetaRM's meta set and, on the built-in task,
an out-of-distribution test set); (2) an `rm_ensemble` of M reward models on the noisy
training pairs (seeds 1000.., --ensemble_steps steps each) -> strength.jsonl; (3) for every seed, one RM per method — baseline, flip
(lowest-μ 20% of pairs), soft labels (p = σ(μ)), adaptive margin (m = clip(μ, ±5)),
contrastive (+0.1 · SimCSE InfoNCE on pair differences, feature dropout 0.1), MetaRM (η = 0.05,
second order) — all with the same model, steps, data and seed; (4) accuracy of each RM:

  synthetic  label_noise = 0.25 (the labeller answers at random 25% of the time, on top of the
             Bradley–Terry noise of temperature 0.25). `clean_acc`: pairs of the test split,
             ordered by the hidden GOLD reward (gold ties left out). `policy_acc`: pairs of two
             SFT-policy samples on test prompts, gold-ordered (the distribution shift MetaRM
             is about).
  hh         the shared HH-RLHF harmless split (1800 train / 200 test pairs); `test_acc` is
             agreement with the human test labels (not clean: no gold exists).

Writes <workdir>/results.json and prints a markdown table (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.data import PreparedDataset, SyntheticTask, tokenize_examples
from jaxrlhf.data.formats import make_report
from jaxrlhf.data.preference_strength import read_strength
from jaxrlhf.models.reward import load_ensemble, member, sequence_rewards
from jaxrlhf.options import RMOptions, parse
from jaxrlhf.trainers import common, reward, runner

# The repository root, for its configs/ directory.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = {
    "baseline": {},
    "flip": {"flip_fraction": 0.2},
    "soft_labels": {"soft_labels": True},
    "adaptive_margin": {"adaptive_margin": 1.0},
    "contrastive": {"contrastive_coef": 0.1},
    "meta_rm": {"meta_rm": True, "meta_lr": 0.05},
    # Sensitivity of MetaRM to its inner step size (run with --methods on the built-in task).
    "meta_rm_eta0.01": {"meta_rm": True, "meta_lr": 0.01},
    "meta_rm_eta0.2": {"meta_rm": True, "meta_lr": 0.2},
}
DEFAULT_METHODS = "baseline,flip,soft_labels,adaptive_margin,contrastive,meta_rm"
STRENGTH = ("flip", "soft_labels", "adaptive_margin")


def _load(name):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_moss_cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quiet(c, steps):
    c.train.steps = steps
    c.train.log_every = max(steps // 4, 1)
    c.train.eval_every = 0
    c.train.eval_batches = 4
    c.train.save_every = 10 ** 6
    return c


def rm_config(task, args, seed):
    if task == "synthetic":
        c = _load("rm").get_config(f"steps={args.steps}")
        c.data.format = "preference"
        c.data.buckets = (32,)
        c.data.synthetic.label_noise = args.label_noise
        c.data.synthetic.num_examples = args.train_pairs
        c.data.synthetic.seed = 0          # one data set; the seed varies init and order
        c.eval_data.format = "preference"
    else:
        c = _load("rm").get_config(f"data=hh,steps={args.steps}")
        for block in ("data", "eval_data"):
            c[block].max_len = args.hh_max_len
            c[block].buckets = (args.hh_max_len // 2, args.hh_max_len)
    c.model.preset = "tiny"
    c.model.d_model, c.model.n_layers = args.d_model, args.n_layers
    c.model.n_heads, c.model.n_kv_heads, c.model.mlp_dim = 4, 2, 3 * args.d_model
    c.train.batch_size = args.batch
    c.seed = seed
    c.rm.center_on_sft = False
    c.rm.export_hf = False
    return _quiet(c, args.steps)


def sft_config(task, args):
    if task == "synthetic":
        c = _load("sft").get_config(f"steps={args.sft_steps}")
        c.data.synthetic.num_examples = 4096
    else:
        c = _load("sft").get_config(f"data=hh,steps={args.sft_steps}")
        for block in ("data", "eval_data"):
            c[block].max_len = args.hh_max_len
            c[block].buckets = (args.hh_max_len // 2, args.hh_max_len)
        c.train.batch_size = 16
    c.model.preset = "tiny"
    c.model.d_model, c.model.n_layers = args.d_model, args.n_layers
    c.model.n_heads, c.model.n_kv_heads, c.model.mlp_dim = 4, 2, 3 * args.d_model
    return _quiet(c, args.sft_steps)


# ------------------------------------------------------------------------------------------
# Scoring pairs with a trained RM.

def pair_rewards(model, tokenizer, opts, pairs):
    """Rewards [N, 2] of (prompt, a, b) triples (rows the tokeniser drops are NaN)."""
    examples = [{"prompt": p, "responses": [a, b], "ranks": [0, 1]} for p, a, b in pairs]
    o = dataclasses.replace(opts, format="ranking", max_k=2, on_bad_row="skip")
    d = dict(o.__dict__)
    d.pop("prompt_buckets")
    report = make_report(o, "eval pairs", None)
    rows = tokenize_examples(examples, tokenizer, d, report=report)
    ds = PreparedDataset(examples, rows, report, o, tokenizer)
    graphdef, params = nnx.graphdef(model), common.params_of(model)
    fn = jax.jit(lambda p, t, m: sequence_rewards(p, graphdef, t, m))
    out = np.full((len(pairs), 2), np.nan)
    for b in ds.iterator(64, shuffle=False, drop_remainder=False, num_epochs=1):
        r = np.asarray(fn(params, jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"])))
        keep = b["batch_mask"] > 0
        out[b["index"][keep]] = r[keep]
    return out


def accuracy(rewards, first_better):
    ok = ~np.isnan(rewards).any(axis=1)
    d = rewards[ok, 0] - rewards[ok, 1]
    win = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
    return float(np.mean(np.where(first_better[ok], win, 1.0 - win)))


def sample_pairs(actor, tokenizer, prompts, max_new_tokens, seed):
    """Two samples per prompt from `actor` (temperature 1)."""
    from jaxrlhf.generation import generate
    from jaxrlhf.data import tokenize_examples as tok_ex
    from jaxrlhf.data import resolve_options
    opts = resolve_options(dict(format="prompt", buckets=(32, 64, 128, 256)))
    d = dict(opts.__dict__)
    d.pop("prompt_buckets")
    rows = tok_ex([{"prompt": p} for p in prompts], tokenizer, d)
    ds = PreparedDataset([{"prompt": p} for p in prompts], rows,
                         make_report(opts, "prompts", None), opts, tokenizer)
    out = {}
    for i, b in enumerate(ds.iterator(64, shuffle=False, drop_remainder=False, num_epochs=1)):
        texts = []
        for j in range(2):
            res = generate(actor, jnp.asarray(b["prompt_tokens"]), jnp.asarray(b["prompt_mask"]),
                           jax.random.fold_in(jax.random.PRNGKey(seed), 2 * i + j),
                           max_new_tokens=max_new_tokens, eos_id=tokenizer.stop_ids,
                           pad_id=tokenizer.pad_id)
            toks, mask = np.asarray(res.response_tokens), np.asarray(res.response_mask)
            fin = np.asarray(res.finished)
            texts.append([(tokenizer.decode([int(t) for t, m in zip(toks[r], mask[r])
                                             if m and int(t) != tokenizer.eos_id]), bool(fin[r]))
                          for r in range(len(toks))])
        for r in range(len(b["index"])):
            if b["batch_mask"][r]:
                out[int(b["index"][r])] = (texts[0][r], texts[1][r])
    return [(prompts[i],) + out[i] for i in sorted(out)]


# ------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("synthetic", "hh"), default="synthetic")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--ensemble_steps", type=int, default=400,
                    help="steps of each ensemble member (default: as many as the compared RMs)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--d_model", type=int, default=64)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--label_noise", type=float, default=0.25)
    ap.add_argument("--train_pairs", type=int, default=2048)
    ap.add_argument("--test_pairs", type=int, default=1000)
    ap.add_argument("--hh_max_len", type=int, default=256)
    ap.add_argument("--meta_prompts", type=int, default=256)
    args = ap.parse_args()
    t_start = time.time()
    task, wd = args.task, os.path.abspath(args.workdir)
    os.makedirs(wd, exist_ok=True)
    res_path = os.path.join(wd, "results.json")
    results = json.load(open(res_path)) if os.path.exists(res_path) else {"runs": {}}
    results["args"] = vars(args)

    def save():
        with open(res_path, "w") as f:
            json.dump(results, f, indent=2)

    # (1) SFT actor.
    sft_dir = os.path.join(wd, "sft")
    t0 = time.time()
    _, actor = runner.run(sft_config(task, args), sft_dir)
    results["sft_wall_s"] = time.time() - t0
    base_cfg = rm_config(task, args, seed=0)
    tokenizer = __import__("jaxrlhf.data", fromlist=["load_tokenizer"]).load_tokenizer("byte")
    train_ds, _ = common.prepare_data(base_cfg, tokenizer, os.path.join(wd, "data"))

    # Test sets.
    if task == "synthetic":
        task_ = SyntheticTask.from_config(base_cfg.data.synthetic)
        test = task_.preference_examples(args.test_pairs, split="test")
        clean = [(e["prompt"], e["chosen"], e["rejected"]) for e in test]
        g = np.asarray([[task_.gold_reward(p, a), task_.gold_reward(p, b)] for p, a, b in clean])
        keep = g[:, 0] != g[:, 1]
        clean = [c for c, k in zip(clean, keep) if k]
        clean_first = (g[keep, 0] > g[keep, 1])
        prompts = [e["prompt"] for e in task_.prompt_examples(args.test_pairs, split="test")]
        pol = sample_pairs(actor, tokenizer, prompts, 16, seed=77)
        gp = np.asarray([[task_.gold_reward(p, a, ea), task_.gold_reward(p, b, eb)]
                         for p, (a, ea), (b, eb) in pol])
        keep = gp[:, 0] != gp[:, 1]
        policy = [(p, a, b) for (p, (a, _), (b, _)), k in zip(pol, keep) if k]
        policy_first = gp[keep, 0] > gp[keep, 1]
        # How noisy are the training labels? (gold order of each training pair)
        tg = np.asarray([[task_.gold_reward(e["prompt"], e["responses"][0]),
                          task_.gold_reward(e["prompt"], e["responses"][1])]
                         for e in train_ds.examples])
        label_wrong = tg[:, 0] < tg[:, 1]
        results["data"] = {"train_pairs": len(train_ds.examples),
                           "train_label_wrong_frac": float(label_wrong.mean()),
                           "train_gold_tie_frac": float((tg[:, 0] == tg[:, 1]).mean()),
                           "clean_test_pairs": len(clean), "policy_test_pairs": len(policy)}
    else:
        from jaxrlhf.data import build_dataset
        test_ds = build_dataset(base_cfg.eval_data, tokenizer)
        clean = [(e["prompt"], e["responses"][0], e["responses"][1]) for e in test_ds.examples]
        clean_first = np.ones(len(clean), bool)
        policy, label_wrong = None, None
        results["data"] = {"train_pairs": len(train_ds.examples), "test_pairs": len(clean)}

    # (2) Ensemble -> strength.
    ens_dir = os.path.join(wd, "ensemble")
    ens_cfg = _quiet(rm_config(task, args, seed=1000), args.ensemble_steps)
    ens_cfg.stage = "rm_ensemble"
    ens_cfg.rm.ensemble_size = args.members
    ens_cfg.rm.export_hf = True
    t0 = time.time()
    ens_summary, _ = runner.run(ens_cfg, ens_dir)
    results["ensemble"] = {"wall_s": time.time() - t0, "members": args.members,
                           **{k: ens_summary[k] for k in ens_summary
                              if k.startswith(("strength_", "eval_acc", "eval_ens"))}}
    if "ensemble_mean" not in results:
        # Reference: the ensemble's own mean reward (what the strength methods distil from).
        graphdef, stacked, _ = load_ensemble(ens_dir)
        members = [nnx.merge(graphdef, member(stacked, m))
                   for m in range(args.members)]
        sets = [("clean_acc", clean, clean_first)]
        if policy is not None:
            sets.append(("policy_acc", policy, policy_first))
        results["ensemble_mean"] = {
            name: accuracy(np.mean([pair_rewards(mm, tokenizer, train_ds.options, pairs)
                                    for mm in members], axis=0), first)
            for name, pairs, first in sets}
    strength = read_strength(os.path.join(ens_dir, "strength.jsonl"))
    if label_wrong is not None:
        mu = np.full(len(train_ds.examples), np.nan)
        for r in strength:
            mu[r["index"]] = r["mu"]
        ok = ~np.isnan(mu)
        q20 = np.quantile(mu[ok], 0.2)
        low = ok & (mu <= q20)
        # AUC of -μ as a detector of wrong labels.
        s = -mu[ok]
        y = label_wrong[ok]
        rk = np.empty(len(s))
        rk[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
        auc = (rk[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
        results["strength_analysis"] = {
            "wrong_frac_overall": float(y.mean()),
            "wrong_frac_bottom20_mu": float(label_wrong[low].mean()),
            "wrong_frac_mu_negative": float(label_wrong[ok & (mu < 0)].mean()),
            "frac_mu_negative": float((mu[ok] < 0).mean()),
            "auc_minus_mu_detects_wrong": float(auc)}
    save()

    # Meta set: samples of the SFT actor on training prompts (shared by all seeds).
    meta_file = os.path.join(wd, "meta_samples.jsonl")
    if not os.path.exists(meta_file):
        mc = rm_config(task, args, seed=0)
        mc.rm.meta_actor, mc.rm.meta_num_prompts = sft_dir, args.meta_prompts
        mc.rm.meta_max_new_tokens = 16 if task == "synthetic" else 64
        mesh = common.mesh_from_config(mc)
        ex = reward.sample_meta_examples(mc, parse(RMOptions, mc.rm, "rm"), train_ds,
                                         tokenizer, mesh)
        with open(meta_file, "w") as f:
            for e in ex:
                f.write(json.dumps(e) + "\n")

    # (3) + (4) every method x seed.
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.methods.split(","):
            key = f"{name}/seed{seed}"
            if key in results["runs"]:
                continue
            c = rm_config(task, args, seed)
            for k, v in METHODS[name].items():
                c.rm[k] = v
            if name in STRENGTH:
                c.rm.strength_file = os.path.join(ens_dir, "strength.jsonl")
            if name.startswith("meta_rm"):
                c.rm.meta_data = meta_file
            t0 = time.time()
            summary, model = runner.run(c, os.path.join(wd, name, f"seed{seed}"))
            run = {"wall_s": time.time() - t0, "train_loss": summary.get("train_loss"),
                   "train_accuracy_noisy": summary.get("train_accuracy"),
                   "eval_accuracy_given_labels": summary.get("eval_accuracy")}
            run["clean_acc"] = accuracy(pair_rewards(model, tokenizer, train_ds.options, clean),
                                        clean_first)
            if policy is not None:
                run["policy_acc"] = accuracy(pair_rewards(model, tokenizer, train_ds.options,
                                                          policy), policy_first)
            results["runs"][key] = run
            print(f"[moss_rm] {key}: {run}", flush=True)
            save()

    results.setdefault("wall_s_invocations", []).append(time.time() - t_start)
    save()
    print(table(results))


def table(results) -> str:
    runs = results["runs"]
    cols = ["clean_acc"] + (["policy_acc"] if any("policy_acc" in r for r in runs.values())
                            else [])
    lines = ["| method | " + " | ".join(cols) + " | seeds |", "|---" * (len(cols) + 2) + "|"]
    for name in METHODS:
        rs = [r for k, r in runs.items() if k.split("/")[0] == name]
        if not rs:
            continue
        cells = []
        for c in cols:
            v = np.asarray([r[c] for r in rs]) * 100
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(rs)} |")
    if "ensemble_mean" in results:
        e = results["ensemble_mean"]
        lines.append("| (ensemble mean reward, reference) | "
                     + " | ".join(f"{100 * e[c]:.1f}" if c in e else "-" for c in cols) + " | 1 |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
