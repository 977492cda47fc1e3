"""DPO family against the RM -> PPO pipeline on the built-in sorting task, at equal preference
data; K-wise against pairwise DPO; strength-aware against plain DPO under label noise.

  python experiments/dpo/run.py --out /tmp/dpo_exp [--seeds 0,1,2] [--steps 400]

For each seed:
  1. the built-in pipeline (`configs/tiny_pipeline.py:seed=S`): SFT, an RM on K = 4 rankings of
     4096 prompts (400 steps x 16 prompts), PPO (60 iterations) -- the RLHF reference;
  2. from that SFT model, on the SAME rankings (same data config and seed, the same 400 steps x
     16 prompts): DPO (sigmoid, all 6 pairs of each ranking), IPO (all pairs), K-wise DPO
     (Plackett-Luce over the 4-way ranking); and pairwise DPO on K = 2 rankings of the same
     4096 prompts (one pair per prompt, a quarter of the comparisons);
  3. label noise: pairs of 2048 prompts labelled with data.synthetic.label_noise = 0.25 (a
     quarter of the labels come from a careless labeller that answers at random); an
     rm_ensemble of 4 reward models on them gives every pair its preference strength; then
     plain DPO, robust DPO (eps = 0.125, the expected flip rate), and strength-aware DPO
     (MOSS: flip the 20% lowest-strength pairs; soft labels sigma(mu)).
Every policy is evaluated by the PPO stage's held-out evaluation (0 iterations: 256 test
prompts, one sample each at temperature 1): gold reward and KL(policy || SFT) summed over the
response; DPO stages also report held-out implicit-reward accuracy on the test rankings.

Writes results.json and results.png, and prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLEAN = {   # name -> configs/dpo.py variant
    "dpo": "loss=sigmoid,ranking=pairs,k=4",
    "ipo": "loss=ipo,ranking=pairs,k=4",
    "kwise_dpo": "loss=sigmoid,ranking=plackett_luce,k=4",
    "pairwise_dpo_k2": "loss=sigmoid,ranking=pairs,k=2",
}
NOISY = {   # name -> (configs/dpo.py variant, needs the strength file)
    "noisy_dpo": ("k=2,noise=0.25", False),
    "noisy_robust_dpo": ("k=2,noise=0.25,loss=robust,eps=0.125", False),
    "noisy_dpo_flip": ("k=2,noise=0.25,flip=0.2", True),
    "noisy_dpo_soft": ("k=2,noise=0.25,soft=1", True),
}
NOISY_PROMPTS = 2048


def train(args, workdir, log):
    """python -m jaxrlhf.train with `args` (unless workdir already has a summary.json)."""
    if os.path.exists(os.path.join(workdir, "summary.json")):
        return None
    env = dict(os.environ, JAXRLHF_NO_PROGRESS="1")
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "jaxrlhf.train", *args, "--workdir", workdir],
                       cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def summary(d):
    with open(os.path.join(d, "summary.json")) as f:
        return json.load(f)


def evaluate(policy_dir, sft_dir, out, seed):
    """Held-out gold reward and KL to the SFT model: the PPO stage's evaluation, 0 iterations."""
    train(["--config", f"configs/ppo.py:sft={policy_dir},iterations=0", f"--config.seed={seed}",
           f"--config.ppo.ref_init={sft_dir}",
           "--config.ppo.reward_fns=jaxrlhf.rewards:sorting_gold", "--config.ppo.critic=none",
           "--config.ppo.advantage_estimator=grpo", "--config.ppo.samples_per_prompt=4",
           f"--config.data.synthetic.seed={seed}"], out, out + ".log")
    s = summary(out)
    return {"gold": s["eval_final_gold_reward"], "kl": s["eval_final_kl"],
            "length": s["eval_final_response_length"]}


def run_seed(root, seed, steps):
    os.makedirs(root, exist_ok=True)
    res = {}
    wall = train(["--config", f"configs/tiny_pipeline.py:seed={seed}"], root,
                 os.path.join(root, "pipeline.log"))
    sft_dir = os.path.join(root, "sft")
    ppo = summary(os.path.join(root, "ppo"))
    res["sft"] = {"gold": ppo["eval_initial_gold_reward"], "kl": ppo["eval_initial_kl"]}
    res["rm_ppo"] = {"gold": ppo["eval_final_gold_reward"], "kl": ppo["eval_final_kl"],
                     "rm_accuracy": summary(os.path.join(root, "rm"))["eval_accuracy"],
                     "pipeline_wall_s": wall}
    common = [f"--config.data.synthetic.seed={seed}"]
    for name, variant in CLEAN.items():
        d = os.path.join(root, name)
        w = train(["--config", f"configs/dpo.py:sft={sft_dir},seed={seed},steps={steps},"
                               f"{variant}", *common], d, d + ".log")
        s = summary(d)
        res[name] = dict(evaluate(d, sft_dir, d + "_eval", seed),
                         implicit_accuracy=s["eval_accuracy"], wall_s=w or s["wall_time_s"])
    ens = os.path.join(root, "ensemble")
    noisy_data = ["--config.data.synthetic.label_noise=0.25",
                  f"--config.data.synthetic.num_examples={NOISY_PROMPTS}",
                  f"--config.data.synthetic.seed={seed}"]
    train(["--config", "configs/rm_ensemble.py:k=2,m=4", f"--config.seed={seed}",
           *noisy_data], ens, ens + ".log")
    strength = os.path.join(ens, "strength.jsonl")
    for name, (variant, needs) in NOISY.items():
        d = os.path.join(root, name)
        arg = f"configs/dpo.py:sft={sft_dir},seed={seed},steps={steps},{variant}"
        if needs:
            arg += f",strength={strength}"
        train(["--config", arg, *noisy_data], d, d + ".log")
        s = summary(d)
        res[name] = dict(evaluate(d, sft_dir, d + "_eval", seed),
                         implicit_accuracy=s["eval_accuracy"], wall_s=s["wall_time_s"])
    return res


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [m for m in ["sft", "rm_ppo", *CLEAN, *NOISY] if m in results]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, group, title in ((axes[0], ["sft", "rm_ppo", *CLEAN], "equal preference data"),
                             (axes[2], ["sft", *NOISY], "25% careless labels")):
        g = [m for m in group if m in results]
        mean = [np.mean([r["gold"] for r in results[m]]) for m in g]
        std = [np.std([r["gold"] for r in results[m]]) for m in g]
        ax.bar(range(len(g)), mean, yerr=std, capsize=4)
        ax.set_xticks(range(len(g)), g, rotation=30, ha="right")
        ax.set(ylabel="held-out gold reward", title=title)
    for m in methods:
        axes[1].scatter([r["kl"] for r in results[m]], [r["gold"] for r in results[m]],
                        label=m, s=25)
    axes[1].set(xlabel="KL(policy || SFT), nats per response", ylabel="held-out gold reward",
                title="reward vs divergence (one point per seed)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args()
    results = {}
    t0 = time.time()
    for seed in (int(s) for s in a.seeds.split(",")):
        for name, r in run_seed(os.path.join(a.out, f"seed{seed}"), seed, a.steps).items():
            results.setdefault(name, []).append(r)
        print(f"seed {seed} done, {time.time() - t0:.0f} s", flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "results.json"), "w") as f:
        json.dump({"seeds": a.seeds, "steps": a.steps, "results": results,
                   "total_wall_s": time.time() - t0}, f, indent=1)
    plot(results, os.path.join(here, "results.png"))
    print("| method | held-out gold | KL to SFT | implicit-reward acc. |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        cell = lambda k: (f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
                          if k in rs[0] else "–")
        print(f"| {name} | {cell('gold')} | {cell('kl')} | {cell('implicit_accuracy')} |")


if __name__ == "__main__":
    main()
