"""LoRA against full fine-tuning on a real model: SFT of SmolLM2-135M-Instruct on the chosen
responses of HH-RLHF harmless, same data, steps and batches, each run in its own process.

  python tools/get_smollm2.py /tmp/smollm2
  python experiments/lora/run.py --hf /tmp/smollm2 --out /tmp/lora_exp [--steps 40]

Runs `configs/sft.py:data=hh,init_from=HF,steps=N` twice: full fine-tuning at the pretrained
recipe's lr (1e-5), and adapters of rank 16 (alpha 32) on every projection at lr 2e-4 (LoRA
needs a larger step: its update is the product of two small matrices). Held-out loss on the
first 64 HH test transcripts before and after; peak RSS of each process (VmHWM, read from
/usr/bin/time -v); wall time. Writes results.json and results.png (train and held-out loss of
both runs) into --out and prints a markdown table.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = {
    "full": ["--config.train.lr=1e-5"],
    "lora_r16": ["--config.train.lr=2e-4", "--config.lora.rank=16", "--config.lora.alpha=32"],
}


def train(name, hf, steps, out):
    """One SFT run under /usr/bin/time -v: (wall seconds, peak RSS GiB)."""
    workdir = os.path.join(out, name)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "jaxrlhf.train", "--config",
           f"configs/sft.py:data=hh,init_from={hf},steps={steps}", "--workdir", workdir,
           *RUNS[name]]
    env = dict(os.environ, JAXRLHF_NO_PROGRESS="1")
    t0 = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - t0
    with open(os.path.join(out, f"{name}.log")) as f:
        kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read()).group(1))
    return wall, kb / 2 ** 20, " ".join(cmd[2:])


def curves(workdir):
    rows = [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [(r["step"], r["loss"]) for r in rows if r.get("split", "train") == "train"]
    evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval"]
    return train, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="the SmolLM2 (or any chat model) HF dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"steps": args.steps, "batch": 8, "model": os.path.abspath(args.hf),
               "load_average_start": list(os.getloadavg()), "runs": {}}
    for name in RUNS:
        wall, rss, cmd = train(name, os.path.abspath(args.hf), args.steps, args.out)
        with open(os.path.join(args.out, name, "summary.json")) as f:
            s = json.load(f)
        results["runs"][name] = {
            "command": cmd, "wall_s": round(wall, 1), "peak_rss_gb": round(rss, 2),
            "eval_loss_start": s["eval_start_loss"], "eval_loss_end": s["eval_loss"],
            "train_loss_last": s["train_loss"], "trainable_params": s["trainable_params"],
            "num_params": s["num_params"]}
    results["load_average_end"] = list(os.getloadavg())
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in RUNS:
        tr, ev = curves(os.path.join(args.out, name))
        ax[0].plot(*zip(*tr), label=name)
        ax[1].plot(*zip(*ev), "o-", label=name)
    for a, t in zip(ax, ("train loss", "held-out loss (64 HH test rows)")):
        a.set_xlabel("step")
        a.set_title(t)
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "results.png"), dpi=110)
    print("| run | trainable params | held-out loss start -> end | peak RSS | wall |")
    print("|---|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {int(r['trainable_params']):,} | {r['eval_loss_start']:.4f} -> "
              f"{r['eval_loss_end']:.4f} | {r['peak_rss_gb']:.2f} GB | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
