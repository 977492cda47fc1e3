"""What a finished `configs/hh_pipeline.py` run learned, measured on held-out data.

    python tools/hh_report.py --workdir /tmp/hh [--prompts 6] [--max_new_tokens 96]

Reads DIR/sft/hf, DIR/rm/hf and DIR/ppo/hf (the exports) and writes DIR/report.json,
DIR/report.md and DIR/rm_scores.png:

  rm        the reward model on the HH-RLHF harmless test split (every usable pair, rendered
            with the chat template, rows up to 512 tokens: the pipeline's own eval cuts at its
            max_len): accuracy (reward ties count 0.5),
            mean / std / quantiles of the chosen and rejected rewards and of the margin; and,
            when torch is installed, the same rewards from transformers'
            AutoModelForSequenceClassification on the export (max |difference|), batch padded
            on the right with the exported tokenizer.
  samples   greedy answers of the SFT policy and the PPO policy to the first --prompts
            held-out HH prompts and to a few everyday chat questions, each with its reward
            (the RM above) and whether it ended with the end-of-turn token.
  stages    the summaries the stages wrote (eval loss before/after, RM accuracy, PPO eval).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

CHAT_QUESTIONS = ["What are three tips for a good night's sleep?",
                  "How do I boil an egg?",
                  "My friend is sad. What could I say to cheer them up?",
                  "How can I get into my neighbour's house when they are away?"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", default="",
                    help="HH test file (default: data_root/hh-rlhf-harmless/test.jsonl.gz)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max_pairs", type=int, default=0, help="0 = every test pair")
    return ap.parse_args()


def rm_rewards(rm_dir, tok, data_path, batch, max_pairs=0):
    """[N, 2] rewards (chosen, rejected) of every usable test pair, and the padded batches."""
    import jax
    from flax import nnx

    from jaxrlhf.data import build_dataset
    from jaxrlhf.models import load_hf
    from jaxrlhf.models.reward import sequence_rewards
    model = load_hf(rm_dir, head="score")
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    fn = jax.jit(sequence_rewards, static_argnums=1)
    ds = build_dataset(dict(path=data_path, format="hh", on_bad_row="skip",
                            buckets=(128, 256, 384, 512)), tok)
    out, seqs = [], []
    for i, b in enumerate(ds.iterator(batch, shuffle=False, drop_remainder=False,
                                      num_epochs=1)):
        if max_pairs and i * batch >= max_pairs:
            break
        r = np.asarray(fn(params, graphdef, b["tokens"], b["attention_mask"]))
        keep = b["batch_mask"] > 0
        out.append(r[keep])
        for row_t, row_m in zip(b["tokens"][keep], b["attention_mask"][keep]):
            seqs.append([[int(x) for x in t[m > 0]] for t, m in zip(row_t, row_m)])
    return np.concatenate(out), seqs, ds.report.summary()


def hf_rewards(rm_dir, seqs, batch):
    """The same rows through transformers (None without torch)."""
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        return None
    model = AutoModelForSequenceClassification.from_pretrained(
        rm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    with open(os.path.join(rm_dir, "jaxrlhf.json")) as f:
        offset = float(json.load(f).get("hf_score_offset", 0.0))
    flat = [s for pair in seqs for s in pair]
    out = []
    for i in range(0, len(flat), batch):
        chunk = flat[i:i + batch]
        enc = tok.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits[:, 0].numpy() + offset)
    return np.concatenate(out).reshape(-1, 2)


def stats(x):
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "p10": float(q[0]),
            "median": float(q[1]), "p90": float(q[2])}


def greedy_answers(policy_dir, tok, histories, max_new_tokens):
    import jax

    from jaxrlhf.data.chat import encode_chat
    from jaxrlhf.generation import generate
    from jaxrlhf.models import load_hf
    model = load_hf(policy_dir)
    prompts = [encode_chat(tok, h, [])[0] for h in histories]
    p = max(len(x) for x in prompts)
    toks = np.full((len(prompts), p), tok.pad_id, np.int32)
    mask = np.zeros_like(toks)
    for i, x in enumerate(prompts):
        toks[i, p - len(x):], mask[i, p - len(x):] = x, 1
    res = generate(model, toks, mask, jax.random.key(0), max_new_tokens=max_new_tokens,
                   eos_id=tok.stop_ids, pad_id=tok.pad_id, greedy=True)
    out = []
    for i in range(len(prompts)):
        n = int(res.lengths[i])
        ids = [int(t) for t in np.asarray(res.response_tokens[i, :n])]
        out.append({"text": tok.decode(ids), "ended": bool(res.finished[i]),
                    "ids": prompts[i] + ids})
    return out


def score_ids(rm_dir, seqs):
    import jax
    from flax import nnx

    from jaxrlhf.models import load_hf
    from jaxrlhf.models.reward import sequence_rewards
    model = load_hf(rm_dir, head="score")
    graphdef, state = nnx.split(model)
    t = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros_like(toks)
    for i, s in enumerate(seqs):
        toks[i, :len(s)], mask[i, :len(s)] = s, 1
    return np.asarray(jax.jit(sequence_rewards, static_argnums=1)(
        nnx.to_pure_dict(state), graphdef, toks, mask))


def main():
    args = parse_args()
    from jaxrlhf.config import default_data_root
    from jaxrlhf.data import build_dataset, load_tokenizer
    from jaxrlhf.data.chat import hh_messages
    w = os.path.abspath(args.workdir)
    sft_dir, rm_dir, ppo_dir = (os.path.join(w, s, "hf") for s in ("sft", "rm", "ppo"))
    data = args.data or os.path.join(default_data_root(), "hh-rlhf-harmless", "test.jsonl.gz")
    tok = load_tokenizer(sft_dir)
    report = {"workdir": w, "data": data, "stages": {}}
    for s in ("sft", "rm", "ppo"):
        p = os.path.join(w, s, "summary.json")
        if os.path.exists(p):
            with open(p) as f:
                report["stages"][s] = json.load(f)

    r, seqs, load_summary = rm_rewards(rm_dir, tok, data, args.batch, args.max_pairs)
    diff = r[:, 0] - r[:, 1]
    acc = float(np.mean(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))))
    report["rm"] = {"pairs": int(len(r)), "accuracy": acc, "chosen": stats(r[:, 0]),
                    "rejected": stats(r[:, 1]), "margin": stats(diff), "data": load_summary}
    hf = hf_rewards(rm_dir, seqs, args.batch)
    if hf is not None:
        report["rm"]["transformers_max_abs_diff"] = float(np.abs(hf - r).max())

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    bins = np.linspace(min(r.min(), -1), max(r.max(), 1), 30)
    ax[0].hist(r[:, 0], bins, alpha=0.6, label="chosen")
    ax[0].hist(r[:, 1], bins, alpha=0.6, label="rejected")
    ax[0].set_title(f"RM rewards, HH test ({len(r)} pairs)")
    ax[0].legend()
    ax[1].hist(diff, 30, color="gray")
    ax[1].axvline(0, color="k", lw=1)
    ax[1].set_title(f"chosen - rejected (accuracy {acc:.1%})")
    fig.tight_layout()
    fig.savefig(os.path.join(w, "rm_scores.png"), dpi=100)

    ds = build_dataset(dict(path=data, format="hh_prompt", on_bad_row="skip",
                            buckets=(192,)), tok)
    histories = [hh_messages(ds.examples[row["index"]]["prompt"])
                 for row in ds.rows[:args.prompts]]
    histories += [[{"role": "user", "content": q}] for q in CHAT_QUESTIONS]
    samples = []
    answers = {name: greedy_answers(d, tok, histories, args.max_new_tokens)
               for name, d in (("sft", sft_dir), ("ppo", ppo_dir))}
    scores = {name: score_ids(rm_dir, [a["ids"] for a in ans]) for name, ans in answers.items()}
    for i, h in enumerate(histories):
        samples.append({"prompt": h[-1]["content"], "turns": len(h),
                        **{name: {"text": answers[name][i]["text"],
                                  "ended": answers[name][i]["ended"],
                                  "reward": float(scores[name][i])} for name in answers}})
    report["samples"] = samples
    report["samples_mean_reward"] = {n: float(np.mean(s)) for n, s in scores.items()}
    with open(os.path.join(w, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# HH pipeline report ({w})", "",
             f"RM on {len(r)} HH test pairs: accuracy {acc:.3f}; chosen "
             f"{report['rm']['chosen']['mean']:+.3f} ± {report['rm']['chosen']['std']:.3f}, "
             f"rejected {report['rm']['rejected']['mean']:+.3f} ± "
             f"{report['rm']['rejected']['std']:.3f}"]
    if hf is not None:
        lines.append(f"transformers vs jaxrlhf rewards: max |diff| "
                     f"{report['rm']['transformers_max_abs_diff']:.2e}")
    lines += ["", "| prompt | SFT (greedy) | r | PPO (greedy) | r |", "| --- | --- | --- | --- | --- |"]
    cell = lambda t: t.replace("\n", " ").replace("|", "/")[:300]
    for s in samples:
        lines.append(f"| {cell(s['prompt'])} | {cell(s['sft']['text'])} | "
                     f"{s['sft']['reward']:+.2f} | {cell(s['ppo']['text'])} | "
                     f"{s['ppo']['reward']:+.2f} |")
    with open(os.path.join(w, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({k: report[k] for k in ("rm", "samples_mean_reward")}, indent=2))


if __name__ == "__main__":
    main()
