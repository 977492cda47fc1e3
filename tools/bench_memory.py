"""Peak host memory (RSS) and step time of the SFT and reward-model train steps: jaxrlhf against
PyTorch (HF transformers + torch.optim.AdamW) at the same shapes, each side in a fresh process.

    python tools/bench_memory.py --hf /tmp/smollm2                  # a real model (SmolLM2-135M)
    python tools/bench_memory.py --hf /tmp/smollm2 --stages          # + the full CLI stages
    python tools/bench_memory.py --preset small --batch 16 --seq 128 # a random preset model
    python tools/bench_memory.py --hf DIR --malloc reuse             # jaxrlhf with the opt-in
                                                                     # glibc tuning

Each measurement is a child process (`--worker MODE`) so that its peak RSS (`ru_maxrss`) is its
own: it loads the model, builds the optimizer, compiles (jaxrlhf) and runs `--warmup` + `--steps`
train steps on a batch of `--batch` random rows of `--seq` real tokens (no padding):

  jax_sft    `trainers.sft.train_step` jitted by `common.compile_step` (state donated), as the
             SFT stage runs it             vs  torch_sft  `AutoModelForCausalLM(labels=...)`
  jax_rm     `trainers.rm_steps.train_step` on batch/2 pairs (K = 2)
                                           vs  torch_rm   `AutoModelForSequenceClassification`
                                                          with −log σ(r_c − r_r)
  With --stages also the whole CLI stage (`python -m jaxrlhf.train` on HH-RLHF with the
  model's chat template, `--stage_steps` steps + eval at step 0 and at the end + HF export):
  stage_sft, stage_rm; their peak is that of the whole stage process.

Both sides are fp32, pinned to the first `--threads` cores. The ratio is jaxrlhf / PyTorch
(lower is better for memory; > 1 means slower for time). Prints one JSON object; `--out` also
writes it (default experiments/benchmarks/bench_memory_<name>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", default="", help="local HF causal-LM directory")
    src.add_argument("--preset", default="", help="jaxrlhf preset with random weights")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (RM: batch/2 pairs)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    add_jax_run_args(ap)
    ap.add_argument("--remat", default="", help="jaxrlhf remat policy (default: the model's)")
    ap.add_argument("--stages", action="store_true", help="also measure the CLI stages")
    ap.add_argument("--stage_steps", type=int, default=3)
    ap.add_argument("--modes", default="jax_sft,torch_sft,jax_rm,torch_rm")
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return ap.parse_args()


def add_jax_run_args(ap) -> None:
    """How the jaxrlhf worker runs (shared with bench_model.py --hf)."""
    ap.add_argument("--malloc", default="hugepages", choices=["hugepages", "default", "reuse"],
                    help="JAXRLHF_HOST_MALLOC for the jaxrlhf processes (hugepages: as the "
                         "CLI runs; PyTorch: glibc's defaults)")
    ap.add_argument("--logits_chunk", type=int, default=-1,
                    help="jaxrlhf model.logits_chunk (default: the model's)")


def peak_rss_gb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2 ** 20   # KiB on Linux


def random_tokens(rng, shape, vocab, avoid):
    """Token ids in [0, vocab) without the ids in `avoid` (pad / eos: every token is real, so
    HF's "last token that is not pad" is the last position, where jaxrlhf reads too)."""
    import numpy as np
    t = rng.integers(0, vocab, shape).astype(np.int32)
    for a in avoid:
        t[t == a] = (a + 7) % vocab
    return t


# ------------------------------------------------------------------------------------------
# Workers (one per process).

def _jax_model(args, head):
    from jaxrlhf.models import load_hf
    from jaxrlhf.models.config import preset
    from jaxrlhf.models.transformer import init_model
    if args.hf:
        model = load_hf(args.hf, head=head)
    else:
        model = init_model(preset(args.preset), head=head, seed=0)
    if args.remat:
        model.cfg = model.cfg.replace(remat=args.remat)
    if getattr(args, "logits_chunk", -1) >= 0:
        model.cfg = model.cfg.replace(logits_chunk=args.logits_chunk)
    return model


def _torch_model(args, head):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    if args.hf:
        if head == "lm":
            return AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
        return AutoModelForSequenceClassification.from_pretrained(args.hf, num_labels=1,
                                                                  dtype=torch.float32)
    import _bench_common as bc
    import _bench_model_common as bmc
    model = _jax_model(args, head)
    return bc.to_hf_llama(model) if head == "lm" else bmc.to_hf_llama_rm(model)


def worker(args) -> dict:
    import numpy as np
    import bench_model as bm

    mode = args.worker
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    head = "lm" if mode.endswith("sft") else "score"
    pairs = args.batch // 2
    out = {"mode": mode}
    if mode.startswith("jax"):
        import jax
        from jaxrlhf.trainers import rm_steps, sft
        model = _jax_model(args, head)
        cfg = model.cfg
        avoid = [i for i in (cfg.pad_token_id, cfg.eos_token_id) if i is not None]
        out["load_s"] = round(time.perf_counter() - t_start, 2)
        tc = bm.train_config("sft" if head == "lm" else "rm")
        if head == "lm":
            tokens = random_tokens(rng, (args.batch, args.seq), cfg.vocab_size, avoid)
            ones = np.ones_like(tokens)
            batch = {"tokens": tokens, "attention_mask": ones, "loss_mask": ones}
            step, compile_s = bm.jax_train_step(model, sft.train_step, tc, batch)
        else:
            tokens = random_tokens(rng, (pairs, 2, args.seq), cfg.vocab_size, avoid)
            batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens),
                     "ranks": np.tile(np.array([[0, 1]], np.int32), (pairs, 1)),
                     "valid": np.ones((pairs, 2), np.int32)}
            step, compile_s = bm.jax_train_step(
                model, rm_steps.train_step, tc, batch,
                loss_kw=dict(tie_mode="skip", margin=0.0, label_smoothing=0.0))
        del model
        out["compile_s"] = round(compile_s, 2)
        run = lambda: float(jax.device_get(step()["loss"]))
    else:
        import torch
        torch.set_num_threads(args.threads)
        model = _torch_model(args, head)
        cfg = model.config
        if head == "score" and cfg.pad_token_id is None:
            cfg.pad_token_id = cfg.eos_token_id
        avoid = [i for i in (cfg.pad_token_id, cfg.eos_token_id) if i is not None]
        avoid = [a for x in avoid for a in (x if isinstance(x, list) else [x])]
        out["load_s"] = round(time.perf_counter() - t_start, 2)
        model.config.use_cache = False
        model.train()
        opt = bm.torch_adamw(model, bm.train_config("sft" if head == "lm" else "rm"))
        params = list(model.parameters())
        if head == "lm":
            ids = torch.tensor(random_tokens(rng, (args.batch, args.seq), cfg.vocab_size,
                                             avoid), dtype=torch.long)
        else:
            ids = torch.tensor(random_tokens(rng, (pairs, 2, args.seq), cfg.vocab_size,
                                             avoid).reshape(-1, args.seq), dtype=torch.long)
        mask = torch.ones_like(ids)

        def run():
            opt.zero_grad(set_to_none=True)
            if head == "lm":
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            else:
                r = model(input_ids=ids, attention_mask=mask).logits[:, 0].view(pairs, 2)
                loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return float(loss.detach())
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(run())
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    out.update(step_s=round(times[len(times) // 2], 3), step_s_all=[round(t, 3) for t in times],
               loss_first=round(losses[0], 4), peak_rss_gb=round(peak_rss_gb(), 3),
               total_s=round(time.perf_counter() - t_start, 1))
    return out


def run_worker(args, mode: str) -> dict:
    import _bench_common as bc

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), JAXRLHF_NO_PROGRESS="1")
    # PyTorch runs with glibc's defaults (its process imports jaxrlhf's config helpers).
    side = "jax" if mode.startswith("jax") or mode.startswith("stage") else "competitor"
    env = bc.side_env(env, side, args.malloc)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:args.threads])
    if mode.startswith("stage"):
        return run_stage(args, mode, env, cpus)
    cmd = ["taskset", "-c", cpus, sys.executable, os.path.abspath(__file__), "--worker", mode,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--remat", args.remat] if args.remat else []
    if getattr(args, "logits_chunk", -1) >= 0:
        cmd += ["--logits_chunk", str(args.logits_chunk)]
    cmd += ["--hf", args.hf] if args.hf else ["--preset", args.preset]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_stage(args, mode: str, env, cpus) -> dict:
    """The whole CLI stage in a child process; its own peak RSS from /usr/bin/time."""
    if not args.hf:
        raise ValueError("--stages needs --hf")
    stage = mode.split("_", 1)[1]
    workdir = tempfile.mkdtemp(prefix=f"bench_mem_{stage}_")
    per_row = args.batch if stage == "sft" else args.batch // 2
    rss_file = os.path.join(workdir, "maxrss_kb")
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file, "taskset", "-c", cpus,
           sys.executable, "-m", "jaxrlhf.train",
           "--config", f"configs/{stage}.py:data=hh,init_from={args.hf},"
                       f"steps={args.stage_steps}",
           "--workdir", workdir, f"--config.train.batch_size={per_row}",
           f"--config.data.buckets=({args.seq},)", f"--config.eval_data.buckets=({args.seq},)",
           "--config.train.eval_batches=2"]
    cmd += [f"--config.model.remat={args.remat}"] if args.remat else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    with open(rss_file) as f:
        peak = int(f.read().split()[-1]) / 2 ** 20   # KiB
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return {"mode": mode, "peak_rss_gb": round(peak, 3), "wall_s": round(wall, 1), "steps": args.stage_steps,
            "rows_per_step": per_row, "max_len": args.seq,
            "eval_loss": summary.get("eval_loss"), "workdir": workdir}


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    name = os.path.basename(os.path.normpath(args.hf)) if args.hf else args.preset
    modes = [m for m in args.modes.split(",") if m]
    results = {m: run_worker(args, m) for m in modes}
    if args.stages:
        for m in ("stage_sft", "stage_rm"):
            results[m] = run_worker(args, m)
    ratios = {}
    for kind in ("sft", "rm"):
        j, t = results.get(f"jax_{kind}"), results.get(f"torch_{kind}")
        if j and t:
            ratios[kind] = {"peak_rss_jax_over_torch": round(j["peak_rss_gb"] / t["peak_rss_gb"], 3),
                            "step_time_jax_over_torch": round(j["step_s"] / t["step_s"], 3)}
        s = results.get(f"stage_{kind}")
        if s and t:
            ratios[f"stage_{kind}"] = {
                "peak_rss_stage_over_torch_step": round(s["peak_rss_gb"] / t["peak_rss_gb"], 3)}
    import _bench_common as bc
    import jax
    import torch
    import transformers
    out = {"command": " ".join(["python", "tools/bench_memory.py"] + sys.argv[1:]),
           "model": args.hf or f"preset:{args.preset}", "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "threads": args.threads, "jaxrlhf_host_malloc": args.malloc,
           "jax_remat": args.remat or "model default",
           "machine": {"cores": os.cpu_count(), "cpu": bc.cpu_name(),
                       "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
           "versions": {"jax": jax.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "results": results, "ratios": ratios, "target": "peak RSS ratio <= 1.2"}
    path = args.out or os.path.join(ROOT, "experiments", "benchmarks",
                                    f"bench_memory_{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
