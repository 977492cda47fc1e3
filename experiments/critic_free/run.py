"""PPO against the critic-free family on the built-in sorting task, at one rollout budget.

  python experiments/critic_free/run.py --out /tmp/critic_free [--seeds 0,1,2]
      [--algos ppo,grpo,dr_grpo,dapo,rloo,reinforce_pp] [--iterations 60]

For each seed: one SFT stage (`configs/sft.py`, the tiny model on noisy demonstrations), then
from it one RL stage per algorithm (`configs/grpo.py:sft=DIR,algo=A`). Every algorithm gets the
same reward (the task's gold reward as a Python function: no reward model, so no proxy to
over-optimise) and the same budget: 64 sampled responses per iteration (16 prompts x 4 samples;
PPO: 64 prompts x 1 sample, GAE with a value head on the actor's trunk), two epochs of two
minibatches, the same learning rate. Measured: training gold reward against samples and
against wall time, KL(policy || SFT) (k1, summed over the response), and on 256 held-out
prompts before and after: gold reward, exact-sort accuracy, KL.

Writes results.json, curves.png (mean over seeds, shaded ± std) and prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLES_PER_ITERATION = 64


def train(config_arg, workdir, log, extra=()):
    env = dict(os.environ, JAXRLHF_NO_PROGRESS="1")
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "jaxrlhf.train", "--config", config_arg,
                        "--workdir", workdir, *extra], cwd=REPO, env=env, stdout=f,
                       stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def read_rows(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def rl_arg(algo, sft_dir, seed, iterations):
    arg = f"configs/grpo.py:sft={sft_dir},algo={algo},seed={seed},iterations={iterations}"
    if algo == "ppo":   # one sample per prompt, the same 64 responses per iteration
        arg += ",k=1,prompts=64"
    return arg


def summarise(runs):
    """{algo: {metric: (mean, std)}} over seeds."""
    out = {}
    for algo, per_seed in runs.items():
        keys = per_seed[0].keys()
        out[algo] = {k: (float(np.mean([r[k] for r in per_seed])),
                         float(np.std([r[k] for r in per_seed]))) for k in keys}
    return out


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for algo, per_seed in curves.items():
        n = min(len(c["gold"]) for c in per_seed)
        gold = np.array([c["gold"][:n] for c in per_seed])
        kl = np.array([c["kl"][:n] for c in per_seed])
        wall = np.array([c["elapsed_s"][:n] for c in per_seed]).mean(0)
        samples = np.arange(1, n + 1) * SAMPLES_PER_ITERATION
        for ax, x, y in ((axes[0], samples, gold), (axes[1], wall, gold),
                         (axes[2], samples, kl)):
            m, s = y.mean(0), y.std(0)
            ax.plot(x, m, label=algo)
            ax.fill_between(x, m - s, m + s, alpha=0.15)
    axes[0].set(xlabel="sampled responses", ylabel="gold reward (train rollouts)")
    axes[1].set(xlabel="wall time in the RL stage (s, from its start: compile and the first "
                       "evaluation included)", ylabel="gold reward (train rollouts)")
    axes[2].set(xlabel="sampled responses", ylabel="KL(policy || SFT), nats per response")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Built-in sorting task, gold reward as the reward; mean ± std over "
                 f"{len(next(iter(curves.values())))} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algos", default="ppo,grpo,dr_grpo,dapo,rloo,reinforce_pp")
    ap.add_argument("--iterations", type=int, default=60)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    algos = args.algos.split(",")
    os.makedirs(args.out, exist_ok=True)
    finals, curves = {a: [] for a in algos}, {a: [] for a in algos}
    for seed in seeds:
        sft_dir = os.path.join(args.out, f"sft_{seed}")
        if not os.path.exists(os.path.join(sft_dir, "summary.json")):
            t = train("configs/sft.py", sft_dir, sft_dir + ".log",
                      [f"--config.seed={seed}", f"--config.data.synthetic.seed={seed}"])
            print(f"[critic_free] seed {seed}: SFT {t:.0f} s", flush=True)
        for algo in algos:
            d = os.path.join(args.out, f"{algo}_{seed}")
            if not os.path.exists(os.path.join(d, "summary.json")):
                t = train(rl_arg(algo, sft_dir, seed, args.iterations), d, d + ".log")
                print(f"[critic_free] seed {seed} {algo}: {t:.0f} s", flush=True)
            with open(os.path.join(d, "summary.json")) as f:
                s = json.load(f)
            rows = [r for r in read_rows(os.path.join(d, "metrics.jsonl"))
                    if r["split"] == "train"]
            curves[algo].append({"gold": [r["reward/sorting_gold"] for r in rows],
                                 "kl": [r["kl"] for r in rows],
                                 "elapsed_s": [r["elapsed_s"] for r in rows]})
            finals[algo].append({
                "eval_gold_before": s["eval_initial_reward/sorting_gold"],
                "eval_gold_after": s["eval_final_reward/sorting_gold"],
                "eval_accuracy_before": s["eval_initial_reward/sorting_exact"],
                "eval_accuracy_after": s["eval_final_reward/sorting_exact"],
                "eval_kl_after": s["eval_final_kl"],
                "rl_wall_time_s": s["wall_time_s"],
            })
    table = summarise(finals)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "iterations": args.iterations,
                   "samples_per_iteration": SAMPLES_PER_ITERATION, "per_seed": finals,
                   "mean_std": table}, f, indent=2)
    plot(curves, os.path.join(args.out, "curves.png"))
    cols = ("eval_gold_before", "eval_gold_after", "eval_accuracy_before",
            "eval_accuracy_after", "eval_kl_after", "rl_wall_time_s")
    print("| algorithm | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for algo in algos:
        cells = [f"{table[algo][c][0]:.3f} ± {table[algo][c][1]:.3f}" for c in cols]
        print(f"| {algo} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
