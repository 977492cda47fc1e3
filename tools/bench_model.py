"""Training speed on CPU: jaxrlhf's real SFT and reward-model train steps against the same
random Llama in PyTorch (HF transformers, eager), plus forward throughput and model-FLOPs
utilisation (MFU).

    python tools/bench_model.py                          # tiny, small, base; 2 threads
    python tools/bench_model.py --presets base --steps 20
    python tools/bench_model.py --quick                  # tiny only, 3 steps (smoke test)
    python tools/bench_model.py --table out.json         # README tables from a saved run
    python tools/bench_model.py --hf /tmp/smollm2        # a real model: 8 x 512, time + memory
    python tools/bench_model.py --hf DIR --batch 1 --seq 2048 --remat none

A real model (`--hf DIR`, any local HF causal LM; e.g. `tools/get_smollm2.py`): the SFT and RM
train steps of jaxrlhf and of PyTorch (HF transformers + torch AdamW) on `--batch` rows of
`--seq` real tokens (RM: batch/2 pairs), each side in a fresh child process
(`tools/bench_memory.py` workers) so that its peak RSS is its own; prints one JSON object with
step time, tokens/s, speedup (PyTorch step time / jaxrlhf's), peak RSS of both sides, compile
time and the first loss of both (a same-weights check), and writes it to
experiments/benchmarks/bench_model_<name>_<batch>x<seq>.json. `--remat` defaults to "full"
here (the pretrained-model recipe of configs/sft.py and rm.py). Targets: speedup >= 1.3 and
jaxrlhf's peak RSS <= PyTorch's, for both steps.

Threads. Both frameworks run in this one process, pinned to the first `--threads` cores
(`os.sched_setaffinity` before jax and torch are imported: XLA's CPU client sizes its
thread pool from the affinity mask, so it runs 2 worker threads; torch gets
`torch.set_num_threads(2)` and OMP_NUM_THREADS=2). Everything is fp32.

Models. `preset(name)` (vocab 259; `--remat` overrides the preset's remat policy) with
random weights; the HF models get the same weights (`_bench_common.to_hf_llama`,
`_bench_model_common.to_hf_llama_rm`). HF attention is its default ("sdpa").

What is timed (median over --steps calls after --warmup calls; jax and torch calls
interleaved so that load from other processes hits both alike; jax outputs are waited for
with `jax.block_until_ready`):

  train  jaxrlhf `trainers.sft.train_step` (masked next-token NLL; AdamW from
         `common.make_optimizer`: global-norm clip 1.0, weight decay on matrices), jitted by
         `common.compile_step` with the state donated, as the SFT trainer does, against
         `LlamaForCausalLM(input_ids, labels=input_ids)` + backward + `clip_grad_norm_(1.0)` +
         `torch.optim.AdamW(foreach=True)` (same hyper-parameters and decay mask).
         Batch 16 sequences x 128 tokens, all real (no padding).
  fwd    logits of the same batch: jitted `model(tokens, mask)` against HF under no_grad.
  rm     jaxrlhf `trainers.rm_steps.train_step` (K=2 rankings, so 8 pairs -> 16 sequences of
         128; InstructGPT loss) against `LlamaForSequenceClassification(num_labels=1)` with
         −log σ(r_chosen − r_rejected) on the same pairs + clip + AdamW.

Compile time (`compile_s`: `lower` + `compile` of the jitted step) is not in any timing.

MFU = model FLOPs of the call / its median wall time / the machine's fp32 matmul rate. The
rate is measured in the same rounds as the steps: each round times the jax call, the torch
call and an XLA 2048x2048 @ 2048x2048 matmul on the same threads, so a busy machine slows
the reference as it slows the step (`matmul_gflops` next to each MFU; `machine` also has the
rate at the start and the end of the run). FLOPs are counted as in `_bench_model_common.py`:
6·N·tokens (N = matmul weights incl. the LM head, without the embedding lookup) +
12·L·T·H·Dh·tokens for attention scores and values (the full T×T, both frameworks compute it).

CPU-time cross-check ("cpu" block of each result): the same medians measured as process CPU
time / threads. On a loaded machine wall time includes waiting for a core, while CPU time
does not, so `cpu.mfu` (against the matmul's CPU-time rate) is what a quiet machine would
show if every thread stays busy; on a quiet machine the two agree. Wall time is the
headline number; PyTorch's CPU time includes its OpenMP threads spinning at barriers.

Prints one JSON object: command, setup, machine (cores, matmul rates), versions, and per
preset: jax_train_tok_s, torch_train_tok_s, ratio (jax / torch speed), jax_fwd_tok_s,
torch_fwd_tok_s, fwd_ratio, compile_s, model_flops_per_step, mfu, torch_mfu, step times,
loss_first (both frameworks, a same-weights check), cpu, rm_step {...}, targets.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

# The toy presets were measured with the opt-in glibc malloc tuning (see
# jaxrlhf/_host_malloc.py); set before jaxrlhf is imported. Export
# JAXRLHF_HOST_MALLOC=default to measure without it.
os.environ.setdefault("JAXRLHF_HOST_MALLOC", "reuse")

import _bench_common as bc  # noqa: E402
import _bench_model_common as bmc  # noqa: E402

BATCH, SEQ = 16, 128          # SFT step / forward: 16 sequences of 128 tokens
RM_PAIRS = 8                  # RM step: 8 prompts x K=2 responses of 128 tokens


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--remat", default=None,
                    help="override the preset's remat policy (none, dots, full, ...)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: fwd,train,rm")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny, 3 steps, 1 warm-up (unless given explicitly)")
    ap.add_argument("--hf", default="", help="a local HF model dir: real-model mode")
    ap.add_argument("--batch", type=int, default=8, help="--hf: rows per SFT step")
    ap.add_argument("--seq", type=int, default=512, help="--hf: tokens per row")
    ap.add_argument("--out", default="", help="--hf: where to write the JSON")
    import bench_memory
    bench_memory.add_jax_run_args(ap)   # --malloc, --logits_chunk (with --hf)
    ap.add_argument("--kinds", default="sft,rm", help="--hf: which steps (sft, rm)")
    args = ap.parse_args()
    if args.quick:
        given = " ".join(sys.argv)
        if "--presets" not in given:
            args.presets = "tiny"
        if "--steps" not in given:
            args.steps = 3
        if "--warmup" not in given:
            args.warmup = 1
    if args.hf:   # a real model's step takes seconds: fewer calls unless asked for
        given = " ".join(sys.argv)
        if "--steps" not in given:
            args.steps = 3
        if "--warmup" not in given:
            args.warmup = 1
    args.warmup = max(args.warmup, 1)
    return args


def model_config(name, args):
    from jaxrlhf.models.config import preset

    return preset(name, **({"remat": args.remat} if args.remat else {}))


def train_config(stage: str):
    """The trainer's own defaults with a constant learning rate (no warm-up, no decay), so
    the two frameworks apply the same update at every step."""
    from jaxrlhf.config import base_config

    tc = base_config(stage).train
    tc.lr, tc.warmup_steps, tc.min_lr_ratio = 1e-4, 0, 1.0
    return tc


def torch_adamw(model, tc):
    """torch AdamW with optax's decay mask (matrices decay; vectors and [1, D] do not)."""
    import torch

    decays = lambda p: p.ndim >= 2 and p.shape[0] != 1
    return torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if decays(p)],
          "weight_decay": tc.weight_decay},
         {"params": [p for p in model.parameters() if not decays(p)], "weight_decay": 0.0}],
        lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps, foreach=True)


def jax_train_step(model, step_fn, tc, batch, **step_kw):
    """(blocking step callable, compile seconds), set up exactly as the trainers do:
    1-device mesh, `init_train_state`, `compile_step` with the state donated."""
    import jax
    from flax import nnx

    from jaxrlhf import sharding as shd
    from jaxrlhf.trainers import common

    mesh = shd.make_mesh({"fsdp": -1})
    graphdef = nnx.graphdef(model)
    params = common.params_of(model)
    params_sh = common.param_shardings(model, mesh)
    optimizer, schedule = common.make_optimizer(tc)
    state, state_sh = common.init_train_state(params, optimizer, params_sh, mesh, 0)
    step = common.compile_step(
        functools.partial(step_fn, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
                          grad_accum=int(tc.grad_accum), on_nonfinite=tc.on_nonfinite,
                          **step_kw),
        state_sh, None)
    batch = jax.device_put(batch, shd.batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def run():
        box["state"], metrics = compiled(box["state"], batch)
        return jax.block_until_ready(metrics)

    return run, compile_s


def timed_pair(jax_fn, torch_fn, tokens, flops, probe, args):
    """Warm-up, then `--steps` rounds of (jax call, torch call, 2048² matmul), interleaved so
    that load from other processes hits all three alike. Speeds, and MFU against the matmul
    rate measured in the same rounds."""
    import numpy as np

    for _ in range(args.warmup):
        jax_fn()
        torch_fn()
    mm_fn, mm_flops = probe
    wall, cpu = bmc.median_times({"jax": jax_fn, "torch": torch_fn, "matmul": mm_fn},
                                 args.steps, threads=args.threads)
    tj, tt = bmc.median(wall["jax"]), bmc.median(wall["torch"])
    cj, ct = bmc.median(cpu["jax"]), bmc.median(cpu["torch"])
    rate = mm_flops / bmc.median(wall["matmul"])          # FLOP/s, wall clock
    rate_cpu = mm_flops / bmc.median(cpu["matmul"])       # FLOP/s per CPU second / threads
    ms = lambda x: round(x * 1e3, 2)
    return {
        "jax_tok_s": round(tokens / tj, 1), "torch_tok_s": round(tokens / tt, 1),
        "ratio": round(tt / tj, 3),
        "model_flops": flops,
        "mfu": round(flops / tj / rate, 4),
        "torch_mfu": round(flops / tt / rate, 4),
        "matmul_gflops": round(rate / 1e9, 1),
        "jax_ms": ms(tj), "torch_ms": ms(tt),
        "jax_ms_iqr": [ms(float(np.percentile(wall["jax"], q))) for q in (25, 75)],
        "torch_ms_iqr": [ms(float(np.percentile(wall["torch"], q))) for q in (25, 75)],
        "cpu": {"jax_ms": ms(cj), "torch_ms": ms(ct), "ratio": round(ct / cj, 3),
                "mfu": round(flops / cj / rate_cpu, 4),
                "torch_mfu": round(flops / ct / rate_cpu, 4),
                "matmul_gflops": round(rate_cpu / 1e9, 1)},
    }


def bench_lm(name, args, probe):
    """Forward and SFT train step of the LM-head model."""
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from jaxrlhf.models.transformer import init_model
    from jaxrlhf.trainers import sft

    cfg = model_config(name, args)
    skip = set(args.skip.split(","))
    model = init_model(cfg, seed=args.seed)
    hf = bc.to_hf_llama(model)
    hf.config.use_cache = False
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, 256, (BATCH, SEQ)).astype(np.int32)
    ones = np.ones((BATCH, SEQ), np.int32)
    ids_t, mask_t = torch.tensor(tokens, dtype=torch.long), torch.tensor(ones)
    n_tok = BATCH * SEQ
    res = {"params": cfg.num_params(), "matmul_params": bmc.matmul_params(cfg),
           "remat": cfg.remat}

    if "fwd" not in skip:
        graphdef, params = nnx.split(model)
        fwd = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m))
        tok_j, mask_j = jax.device_put(tokens), jax.device_put(ones)
        jax_fwd = lambda: jax.block_until_ready(fwd(params, tok_j, mask_j))
        hf.eval()

        def torch_fwd():
            with torch.no_grad():
                return hf(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits

        diff = float(np.abs(np.asarray(jax_fwd()) - torch_fwd().numpy()).max())
        f = timed_pair(jax_fwd, torch_fwd, n_tok, bmc.model_flops(cfg, BATCH, SEQ, train=False),
                       probe, args)
        res.update({"jax_fwd_tok_s": f["jax_tok_s"], "torch_fwd_tok_s": f["torch_tok_s"],
                    "fwd_ratio": f["ratio"], "fwd_mfu": f["mfu"], "fwd_max_logit_diff": diff,
                    "fwd_matmul_gflops": f["matmul_gflops"],
                    "fwd_cpu": f["cpu"]})

    if "train" not in skip:
        batch = {"tokens": tokens, "attention_mask": ones, "loss_mask": ones}
        jax_step, compile_s = jax_train_step(model, sft.train_step, train_config("sft"), batch)
        tc = train_config("sft")
        hf.train()
        opt = torch_adamw(hf, tc)
        params_t = list(hf.parameters())

        def torch_step():
            opt.zero_grad(set_to_none=True)
            loss = hf(input_ids=ids_t, attention_mask=mask_t, labels=ids_t,
                      use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params_t, tc.grad_clip)
            opt.step()
            return loss.detach()

        loss_first = [round(float(jax_step()["loss"]), 5), round(float(torch_step()), 5)]
        t = timed_pair(jax_step, torch_step, n_tok,
                       bmc.model_flops(cfg, BATCH, SEQ, train=True), probe, args)
        res.update({
            "jax_train_tok_s": t["jax_tok_s"], "torch_train_tok_s": t["torch_tok_s"],
            "ratio": t["ratio"], "compile_s": round(compile_s, 2),
            "model_flops_per_step": t["model_flops"], "mfu": t["mfu"],
            "torch_mfu": t["torch_mfu"], "matmul_gflops": t["matmul_gflops"],
            "jax_step_ms": t["jax_ms"],
            "torch_step_ms": t["torch_ms"], "jax_step_ms_iqr": t["jax_ms_iqr"],
            "torch_step_ms_iqr": t["torch_ms_iqr"], "loss_first": loss_first, "cpu": t["cpu"]})
    return res


def bench_rm(name, args, probe):
    """The reward-model train step (score head, pairs)."""
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from jaxrlhf.models.transformer import init_model
    from jaxrlhf.models.reward import sequence_rewards
    from jaxrlhf.trainers import rm_steps

    cfg = model_config(name, args)
    model = init_model(cfg, head="score", seed=args.seed)
    hf = bmc.to_hf_llama_rm(model)
    hf.config.use_cache = False
    tc = train_config("rm")
    rng = np.random.default_rng(args.seed + 1)
    # Token ids avoid the pad id, so HF's "last non-pad token" is the last position, which
    # is also where jaxrlhf reads the reward (all tokens are real).
    tokens = rng.integers(3, 256, (RM_PAIRS, 2, SEQ)).astype(np.int32)
    ones = np.ones((RM_PAIRS, 2, SEQ), np.int32)
    batch = {"tokens": tokens, "attention_mask": ones,
             "ranks": np.tile(np.array([[0, 1]], np.int32), (RM_PAIRS, 1)),  # 0 = chosen
             "valid": np.ones((RM_PAIRS, 2), np.int32)}
    ids_t = torch.tensor(tokens.reshape(-1, SEQ), dtype=torch.long)   # rows c0, r0, c1, r1..
    mask_t = torch.tensor(ones.reshape(-1, SEQ))
    # Same weights, same rewards (before the train step donates the parameters).
    graphdef = nnx.graphdef(model)
    rewards_j = jax.jit(functools.partial(sequence_rewards, graphdef=graphdef))(
        nnx.to_pure_dict(nnx.state(model)), tokens=tokens, mask=ones)
    with torch.no_grad():
        rewards_t = hf(input_ids=ids_t, attention_mask=mask_t).logits[:, 0].view(RM_PAIRS, 2)
    reward_diff = float(np.abs(np.asarray(rewards_j) - rewards_t.numpy()).max())
    jax_step, compile_s = jax_train_step(
        model, rm_steps.train_step, tc, batch,
        loss_kw=dict(tie_mode="skip", margin=0.0, label_smoothing=0.0))
    hf.train()
    opt = torch_adamw(hf, tc)
    params_t = list(hf.parameters())

    def torch_step():
        opt.zero_grad(set_to_none=True)
        r = hf(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits[:, 0]
        r = r.view(RM_PAIRS, 2)
        loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_t, tc.grad_clip)
        opt.step()
        return loss.detach()

    loss_first = [round(float(jax_step()["loss"]), 5), round(float(torch_step()), 5)]
    n_seq = RM_PAIRS * 2
    t = timed_pair(jax_step, torch_step, n_seq * SEQ,
                   bmc.model_flops(cfg, n_seq, SEQ, head="score", train=True), probe,
                   args)
    return {"jax_train_tok_s": t["jax_tok_s"], "torch_train_tok_s": t["torch_tok_s"],
            "ratio": t["ratio"], "compile_s": round(compile_s, 2),
            "model_flops_per_step": t["model_flops"], "mfu": t["mfu"],
            "torch_mfu": t["torch_mfu"], "matmul_gflops": t["matmul_gflops"],
            "jax_step_ms": t["jax_ms"],
            "torch_step_ms": t["torch_ms"], "jax_step_ms_iqr": t["jax_ms_iqr"],
            "torch_step_ms_iqr": t["torch_ms_iqr"], "loss_first": loss_first,
            "max_reward_diff": reward_diff, "cpu": t["cpu"]}


def targets(name, res):
    """Targets: train steps at least as fast as PyTorch on every preset;
    >= 70% MFU on base."""
    out = {}
    if "ratio" in res:
        out["train_at_least_torch"] = res["ratio"] >= 1.0
    if "rm_step" in res:
        out["rm_at_least_torch"] = res["rm_step"]["ratio"] >= 1.0
    if name == "base":
        if "mfu" in res:
            out["train_mfu_ge_70"] = res["mfu"] >= 0.70
        if "rm_step" in res:
            out["rm_mfu_ge_70"] = res["rm_step"]["mfu"] >= 0.70
    return out


def markdown(out) -> str:
    """README tables from the JSON this script prints."""
    m = out["machine"]
    lines = [
        f"`{out['command']}` — {out['setup']['threads']} threads, fp32, batch "
        f"{out['setup']['batch']}x{out['setup']['seq']} tokens (RM: {out['setup']['rm_pairs']} "
        f"pairs = {2 * out['setup']['rm_pairs']}x{out['setup']['seq']}), median of "
        f"{out['setup']['steps']} steps; XLA fp32 matmul {m['xla_matmul_gflops']} GFLOP/s "
        f"(2048², same run; {m.get('xla_matmul_gflops_at_end', '?')} at the end), "
        f"jax {out['versions']['jax']}, torch {out['versions']['torch']}.",
        "",
        "| preset | params | train tok/s jax | train tok/s torch | ratio | MFU jax (torch) "
        "| fwd tok/s jax | fwd tok/s torch | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    na = "–"
    for name, r in out["presets"].items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r.get('jax_train_tok_s', na)} | "
            f"{r.get('torch_train_tok_s', na)} | {r.get('ratio', na)}x | "
            f"{r.get('mfu', 0):.0%} ({r.get('torch_mfu', 0):.0%}) | {r.get('jax_fwd_tok_s', na)} | "
            f"{r.get('torch_fwd_tok_s', na)} | {r.get('compile_s', na)} |")
    if any("rm_step" in r for r in out["presets"].values()):
        lines += ["", "| preset | RM step tok/s jax | RM step tok/s torch | ratio "
                      "| MFU jax (torch) | compile s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in out["presets"].items():
            if "rm_step" in r:
                q = r["rm_step"]
                lines.append(f"| {name} | {q['jax_train_tok_s']} | {q['torch_train_tok_s']} | "
                             f"{q['ratio']}x | {q['mfu']:.0%} ({q['torch_mfu']:.0%}) | "
                             f"{q['compile_s']} |")
    return "\n".join(lines)


def bench_hf(args) -> dict:
    """SFT and RM steps of a real model, each side in its own process (time + peak RSS)."""
    import bench_memory
    args.remat = args.remat or "full"
    args.preset, args.worker = "", ""
    kinds = [k for k in args.kinds.split(",") if k]
    runs = {f"{side}_{k}": bench_memory.run_worker(args, f"{side}_{k}")
            for k in kinds for side in ("jax", "torch")}
    out = {"command": "python " + " ".join(sys.argv),
           "setup": {"hf": os.path.abspath(args.hf), "batch": args.batch, "seq": args.seq,
                     "rm_pairs": args.batch // 2, "threads": args.threads,
                     "steps": args.steps, "warmup": args.warmup, "remat": args.remat,
                     "logits_chunk": args.logits_chunk,
                     "malloc": args.malloc, "dtype": "float32", "statistic": "median",
                     "processes": "one fresh process per side and step kind"},
           "machine": {"cpu": bc.cpu_name(),
                       "load_average_end": os.getloadavg()}}
    meets = True
    for kind in kinds:
        j, t = runs[f"jax_{kind}"], runs[f"torch_{kind}"]
        tokens = args.batch * args.seq
        speedup = t["step_s"] / j["step_s"]
        ok = speedup >= 1.3 and j["peak_rss_gb"] <= t["peak_rss_gb"]
        meets = meets and ok
        out[kind] = {"jax_step_s": j["step_s"], "torch_step_s": t["step_s"],
                     "jax_tok_s": round(tokens / j["step_s"], 1),
                     "torch_tok_s": round(tokens / t["step_s"], 1),
                     "speedup": round(speedup, 3),
                     "jax_peak_rss_gb": j["peak_rss_gb"], "torch_peak_rss_gb": t["peak_rss_gb"],
                     "peak_rss_jax_over_torch": round(j["peak_rss_gb"] / t["peak_rss_gb"], 3),
                     "jax_compile_s": j["compile_s"],
                     "loss_first": {"jax": j["loss_first"], "torch": t["loss_first"]},
                     "step_s_all": {"jax": j["step_s_all"], "torch": t["step_s_all"]},
                     "meets_target": bool(ok)}
    out["meets_target"] = meets
    return out


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":   # render a saved result
        with open(sys.argv[2]) as f:
            print(markdown(json.load(f)))
        return
    args = parse_args()
    if args.hf:
        out = bench_hf(args)
        name = os.path.basename(os.path.normpath(args.hf))
        bc.write_result(out, f"bench_model_{name}_{args.batch}x{args.seq}", args.out)
        print(json.dumps(out, indent=1))
        return
    cores = bc.pin_cpu_threads(args.threads)   # before jax / torch are imported
    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rate = bmc.matmul_rate_gflops(threads=args.threads)
    probe = bmc.matmul_probe()
    out = {
        "command": "python " + " ".join(sys.argv),
        "setup": {"batch": BATCH, "seq": SEQ, "rm_pairs": RM_PAIRS, "vocab": 259,
                  "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                  "dtype": "float32", "statistic": "median",
                  "torch": "eager, HF attn_implementation=sdpa"},
        "machine": {"cores": cores, "cpu": bc.cpu_name(),
                    "xla_matmul_gflops": round(rate["median"], 1),
                    "xla_matmul_gflops_best": round(rate["best"], 1),
                    "xla_matmul_gflops_cpu_time": round(rate["cpu_median"], 1),
                    "torch_matmul_gflops": round(bmc.torch_matmul_rate_gflops(), 1),
                    "matmul": "2048x2048 @ 2048x2048 fp32, median of 10"},
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "presets": {},
    }
    skip = set(args.skip.split(","))
    for name in args.presets.split(","):
        res = bench_lm(name, args, probe)
        if "rm" not in skip:
            res["rm_step"] = bench_rm(name, args, probe)
        res["targets"] = targets(name, res)
        out["presets"][name] = res
        print(f"[bench_model] {name}: {json.dumps(res)}", file=sys.stderr, flush=True)
    # The rate again at the end: MFU is only as good as this number is stable.
    out["machine"]["xla_matmul_gflops_at_end"] = round(
        bmc.matmul_rate_gflops(threads=args.threads)["median"], 1)
    print(json.dumps(out, indent=1))
    print(markdown(out), file=sys.stderr)


if __name__ == "__main__":
    main()
