"""The built-in end-to-end run over several seeds, plus an over-optimisation run.

  python experiments/pipeline/run.py --out /tmp/pipeline_exp [--seeds 0,1,2]
      [--overopt_iterations 400]

For each seed: `python -m jaxrlhf.train --config configs/tiny_pipeline.py:seed=S` (SFT -> RM ->
PPO), timing the whole command. Then, from seed 0's SFT and RM, PPO with the KL penalty off
and a larger learning rate for many iterations, evaluated on held-out prompts every 25
iterations: the proxy (RM) reward keeps rising while the gold reward peaks and falls.
Writes results.json and prints a markdown table (mean ± std over seeds).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(args, log):
    env = dict(os.environ, JAXRLHF_NO_PROGRESS="1")
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "jaxrlhf.train"] + args, cwd=REPO, env=env,
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def read_rows(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--overopt_iterations", type=int, default=400)
    ap.add_argument("--overopt_lr", type=float, default=2e-4)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = {"seeds": {}}
    for seed in [int(s) for s in a.seeds.split(",")]:
        wd = os.path.join(a.out, f"seed{seed}")
        wall = sh(["--config", f"configs/tiny_pipeline.py:seed={seed}", "--workdir", wd],
                  os.path.join(a.out, f"seed{seed}.log"))
        s = json.load(open(os.path.join(wd, "summary.json")))
        results["seeds"][seed] = {
            "wall_time_s": wall,
            "sft_eval_loss": s["sft"]["eval_loss"],
            "rm_eval_accuracy": s["rm"]["eval_accuracy"],
            "gold_sft_policy": s["ppo"]["eval_initial_gold_reward"],
            "gold_ppo_policy": s["ppo"]["eval_final_gold_reward"],
            "rm_score_sft_policy": s["ppo"]["eval_initial_rm_score"],
            "rm_score_ppo_policy": s["ppo"]["eval_final_rm_score"],
            "kl_ppo_policy": s["ppo"]["eval_final_kl"],
        }
        print(json.dumps({seed: results["seeds"][seed]}), flush=True)

    keys = list(next(iter(results["seeds"].values())))
    table = {k: (float(np.mean([r[k] for r in results["seeds"].values()])),
                 float(np.std([r[k] for r in results["seeds"].values()], ddof=1))
                 if len(results["seeds"]) > 1 else 0.0) for k in keys}
    gains = [r["gold_ppo_policy"] - r["gold_sft_policy"] for r in results["seeds"].values()]
    table["gold_gain"] = (float(np.mean(gains)),
                          float(np.std(gains, ddof=1)) if len(gains) > 1 else 0.0)
    results["mean_std"] = table

    if a.overopt_iterations:
        base = os.path.join(a.out, f"seed{a.seeds.split(',')[0]}")
        wd = os.path.join(a.out, "overopt_kl0")
        sh(["--config", f"configs/ppo.py:sft={base}/sft,rm={base}/rm,kl=0,"
                        f"iterations={a.overopt_iterations}", "--workdir", wd,
            f"--config.ppo.actor_lr={a.overopt_lr}", "--config.train.eval_every=25"],
           os.path.join(a.out, "overopt_kl0.log"))
        rows = [r for r in read_rows(os.path.join(wd, "metrics.jsonl")) if r["split"] == "eval"]
        results["overopt_kl0"] = [{k: r[k] for k in ("step", "rm_score", "gold_reward", "kl",
                                                     "response_length", "eos_rate")}
                                  for r in rows]
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)

    print("\n| metric | mean ± std over seeds |\n| --- | --- |")
    for k, (m, s) in table.items():
        print(f"| {k} | {m:.3f} ± {s:.3f} |")
    if "overopt_kl0" in results:
        print("\n| iteration | RM score | gold reward | KL | length | EOS rate |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for r in results["overopt_kl0"]:
            print(f"| {r['step']} | {r['rm_score']:.3f} | {r['gold_reward']:.3f} | "
                  f"{r['kl']:.2f} | {r['response_length']:.2f} | {r['eos_rate']:.2f} |")


if __name__ == "__main__":
    main()
