"""DPO train-step time and peak memory on CPU: jaxrlhf's `trainers.dpo.train_step` against TRL
0.29's `trl.DPOTrainer` (PyTorch, HF transformers), same weights, same token ids.

    python tools/bench_dpo.py                            # tiny, small; 8 pairs of 256 + 256 tokens
    python tools/bench_dpo.py --presets tiny --batch 2 --prompt 16 --completion 16 --steps 2 \\
        --warmup 1                                       # quick smoke run
    python tools/bench_dpo.py --no-trl                   # the jaxrlhf side only
    pip install trl==0.29.0                              # optional: the TRL side
    python tools/bench_dpo.py --hf /tmp/smollm2          # a real model (3 timed steps, 1 warm-up)

One step, both sides: --batch preference pairs (default 8), each a prompt of exactly --prompt
tokens and two responses (chosen, rejected) of exactly --completion tokens whose last token is
the tokenizer's EOS, so 2 x batch sequences of T = prompt + completion tokens, no padding; the
DPO sigmoid loss -log sigmoid(beta (s_chosen - s_rejected)) with beta 0.1 and no label
smoothing, averaged over the pairs, s = log pi(y|x) - log pi_ref(y|x) with log pi(y|x) the sum
of the response tokens' log-probs (EOS included); global grad-norm clip 1.0; AdamW with
`bench_model.train_config("dpo")` (lr 1e-4 constant: no warm-up, no decay; b1 0.9, b2 0.95,
eps 1e-8, weight decay 0.01 on the matrices -- TRL's decay split, no decay for norm weights and
biases, gives Llama the same set); fp32; the reference is the initial policy. Every step trains
on the same B pairs (TRL: a B-row dataset, one batch per epoch, max_steps = warmup + steps).

Two modes (--modes), as the DPO stage's `dpo.ref_logps`:
  cached  the reference log-probs are computed once per pair before training and read from the
          batch in every step: jaxrlhf's default (the stage caches them per data row and drops
          the reference weights) against DPOConfig(precompute_ref_log_probs=True);
  step    the frozen reference runs in every step: jaxrlhf's dpo.ref_logps="step" against TRL's
          default (precompute_ref_log_probs=False).

What each side runs per timed step (read from jaxrlhf/trainers/dpo.py and
trl/trainer/dpo_trainer.py 0.29.0, transformers' Trainer loop):
  jaxrlhf  one jitted program, built as `dpo.build` builds it: `dpo.train_step(state, batch,
           [ref_params], graphdef, optimizer=common.make_optimizer(...), grad_accum=1,
           on_nonfinite="stop", loss_kw=dpo.loss_kw_of(DPOOptions(beta=0.1)))`, jitted by
           `common.compile_step` (cached: the state donated, batch["ref_logps"] [B, 2] from the
           cache) or by `jax.jit(partial(train_step, ref_graphdef=...), in_shardings=(state,
           None, ref), donate_argnums=0)` with the reference parameters as the third argument
           (step); state from `common.init_train_state` on a 1-device mesh. Inside: the policy
           forward of the 2B rows [B, 2, T] under value_and_grad (`dpo.response_logps`:
           `Transformer.hidden` then `target_logprobs` -- LM head and log-softmax at the
           T - 1 target positions, chunked over positions by model.logits_chunk, auto for
           vocabularies >= 32k), in "step" mode the reference forward of the same rows
           (stop_gradient), the loss, its metrics (accuracy, reward margin, chosen / rejected
           log-probs and log-ratios), backward, clip + optax AdamW, the grad norm. Timed from
           the call to `jax.block_until_ready` on the new state and metrics; the batch is
           already on the device (`common.to_global`, as the stage's loop passes it).
  TRL      between `on_step_begin` and `on_step_end` (a TrainerCallback), i.e.
           `training_step` -> `DPOTrainer._compute_loss`: ONE concatenated forward of the 2B
           rows (chosen rows then rejected rows, right-padded; here none padded) through
           `LlamaForCausalLM` with full-vocabulary logits [2B, T, V] at every position, a
           shifted `.contiguous()` copy, `selective_log_softmax`, completion-masked sum; in
           "step" mode the reference model's forward of the same 2B rows under torch.no_grad
           (same logits path), in "cached" mode `ref_chosen_logps` / `ref_rejected_logps`
           from the batch; the sigmoid loss; TRL's per-step metrics (the entropy of the full
           logits at every position, then averaged over the completion positions, mean
           logits, argmax token accuracy, rewards, margins, log-probs: a dozen `.item()` host
           syncs); backward; then the Trainer's `clip_grad_norm_(1.0)`, torch AdamW step
           (transformers' default optim on this CPU: "adamw_torch_fused", reported as
           `optim`), constant LR scheduler, zero_grad. The
           collation and device transfer of the batch happen before on_step_begin and the
           logging after on_step_end (both in `interval_s`, on_step_end to on_step_end).
           Gradient checkpointing follows jaxrlhf's remat: on for a real model (HF's
           per-layer checkpointing; jaxrlhf model.remat = "full"), off for the presets
           (remat "none").
  Differences that remain: TRL computes its logging metrics (full-logit entropy at all
  2B x T positions, argmax) inside the step and syncs the host a dozen times; jaxrlhf's
  metrics are part of its compiled program. Both sides run the LM head at every position, but
  with logits_chunk active (vocabularies >= 32k, i.e. real models) jaxrlhf never holds more
  than one chunk of logits, while TRL materialises the [2B, T, V] logits and a shifted copy
  (the presets' vocabulary of 259 is unchunked on both sides). In "cached" mode TRL keeps the
  reference model loaded for the whole run (it precomputes, then never frees it), while
  jaxrlhf's stage frees the reference parameters once its cache is built (so does the worker
  here): the cached peak RSS compares that, on top of the step itself. The two remat schemes
  differ in detail (jaxrlhf "full" vs. HF's checkpointing of each decoder layer). TRL's batch
  is collated and moved every step (outside step_s, inside interval_s); jaxrlhf's stays on
  the device between steps.

One-time cost of the reference cache (`ref_cache`, "cached" mode): jaxrlhf: the jitted
`dpo.response_logps` of the reference over the B pairs, as `dpo.build` jits it
(`jax.jit(partial(response_logps, ref_params, ref_graphdef))`), compile (lower + compile) and
one run timed apart (the stage also fingerprints the rows and writes an .npz, not timed here);
TRL: `DPOTrainer._precompute_ref_logps` over the same B pairs inside DPOTrainer.__init__
(DataLoader + collator, the reference forward under no_grad, np.savez_compressed of its cache
file, two `add_column`s), timed by a subclass that wraps it.

Same weights and data: a preset (`preset(name)`, vocab 259, random weights) is exported for TRL
through `_bench_common.to_hf_llama` + `save_pretrained`; the jaxrlhf worker re-creates it from
the same seed (`init_model`). TRL's tokenizer is `bench_grpo.byte_hf_tokenizer` (the byte
tokenizer's ids, EOS 258). Texts: random lowercase letters (`bench_ppo.make_prompts`), one byte
token each. A real model (`--hf DIR`, a local HF Llama-family causal LM) is loaded by jaxrlhf
(`load_hf`, model.remat "full") and by TRL from DIR itself, each side with the checkpoint's
tokenizer; texts are random one-token words (`bench_ppo.make_word_prompts`). jaxrlhf's rows are
encode(prompt) + encode(response) + [EOS] with jaxrlhf's tokenizer; TRL gets the texts
(non-conversational: it tokenizes prompt and prompt + response + eos_token itself) and the TRL
worker checks that its prompt / chosen / rejected ids are exactly jaxrlhf's
(`check.trl_ids_match`). Policy and reference: TRL loads both from the same HF directory.
Checks (`check`): the first step's loss on both sides (log 2 = 0.693147: the policy is its
reference), the first step's mean chosen / rejected log-prob sums (before any update) on both
sides, and in "cached" mode the max |difference| of the 2B reference log-prob sums the two
caches hold.

Processes and timing: each (side, mode) runs in a fresh child process of this script
(`--jax-worker` / `--trl-worker`, pinned to the first --threads cores by
`_bench_common.pin_cpu_threads`; the TRL worker imports torch / transformers / trl, not jax),
so its peak RSS (`peak_rss_gb`: its VmHWM, see `bench_ppo._peak_rss_gb`) is its own. Order per
model and mode: jaxrlhf, then TRL once per torch thread count of --trl-threads (default 1 and
--threads, as bench_ppo.py: when other processes share the cores, OpenMP spin-waiting can
make 2-thread torch many times slower than 1-thread torch -- 75x in a tiny-preset smoke run
on a 2-core machine that another job kept busy -- which would flatter jaxrlhf; the fastest
run is reported, `trl_step_s_by_threads`; a later thread count stops after a step slower than
5x the best median so far). step_s = the median of --steps steps after --warmup;
`cpu_step_s` the same in process CPU time / threads (a load-robust cross-check); compile_s
(jaxrlhf: lower + compile of the step) is in no step time; speedup = TRL step_s / jaxrlhf
step_s; tok_s = 2 B T / step_s. The sides run one after the other, so load from other
processes may hit them differently: see machine.load_average_*.
Without TRL installed (or with --no-trl) the jaxrlhf numbers are still measured.

Prints one JSON object (command, setup, machine, versions, presets [{preset, params, remat,
seq_len, tokens_per_step, modes {cached | step: {step_s, speedup, cpu_speedup, tok_s,
peak_rss_gb, ref_cache, check, jax {...}, trl {...} or null}}}]) and writes it to
experiments/benchmarks/bench_dpo_<name>.json (name: the presets joined by "_", or
"hf_<dirname>" with --hf; --out overrides the path).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time

import bench_ppo as bp  # noqa: E402  (first: sets the host-malloc default, as bench_ppo runs)
import bench_grpo as bg  # noqa: E402
import _bench_common as bc  # noqa: E402

BETA = 0.1
MODES = ("cached", "step")
FIRST_KEYS = ("loss", "chosen_logps", "rejected_logps")   # jaxrlhf metrics, first step


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--hf", default="", help="a local HF causal-LM dir: real-model mode")
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--completion", type=int, default=256,
                    help="tokens of each response, its EOS included")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-threads", default=None,
                    help="torch thread counts for TRL, comma-separated; the fastest is "
                         "reported (default: 1 and --threads)")
    ap.add_argument("--modes", default=",".join(MODES), help="cached, step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    ap.add_argument("--out", default="", help="where to write the JSON")
    args = bp.real_model_defaults(ap.parse_args(), (("--steps", 3), ("--warmup", 1)))
    modes = args.modes.split(",")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    if args.completion < 2 or args.prompt < 1 or args.batch < 1:
        raise SystemExit("--completion must be >= 2 (a token and EOS), --prompt, --batch >= 1")
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: a comma list of {', '.join(MODES)}")
    return args


def _step_times(times, cpus, warmup, threads) -> dict:
    """Per-step wall / CPU seconds -> the reported numbers (the first `warmup` excluded)."""
    return {"step_s": round(bp._median(times[warmup:]), 4),
            "step_s_all": [round(x, 4) for x in times[warmup:]],
            "warmup_step_s": [round(x, 4) for x in times[:warmup]],
            "cpu_step_s": round(bp._median(cpus[warmup:]) / threads, 4)}


# ------------------------------------------------------------------------------------------
# The data: texts for TRL, the same ids for jaxrlhf.

def make_pairs(args, tok) -> dict:
    """--batch (prompt, chosen, rejected) texts and jaxrlhf's rows of them: tokens [B, 2, T]
    (chosen, rejected: encode(prompt) + encode(response) + [EOS]) and prompt_len [B]."""
    import numpy as np

    rng = np.random.default_rng(args.seed)

    def texts(n_tokens):
        a = argparse.Namespace(prompt=n_tokens)
        if args.hf:
            return bp.make_word_prompts(a, rng, tok, args.batch)
        return bp.make_prompts(a, rng, args.batch)

    prompts, chosen, rejected = (texts(args.prompt), texts(args.completion - 1),
                                 texts(args.completion - 1))
    ids = {"prompt": [tok.encode(p) for p in prompts],
           "chosen": [tok.encode(c) + [tok.eos_id] for c in chosen],
           "rejected": [tok.encode(r) + [tok.eos_id] for r in rejected]}
    tokens = [[p + c, p + r] for p, c, r in zip(ids["prompt"], ids["chosen"], ids["rejected"])]
    if {len(row) for pair in tokens for row in pair} != {args.prompt + args.completion}:
        raise RuntimeError("a pair's rows are not prompt + completion tokens long")
    return {"texts": {"prompt": prompts, "chosen": chosen, "rejected": rejected}, "ids": ids,
            "tokens": tokens, "prompt_len": [len(p) for p in ids["prompt"]]}


def host_batch(spec) -> dict:
    """The DPO stage's batch layout: tokens / attention_mask [B, 2, T], prompt_len, ranks
    (0 = chosen), valid [B, 2], index [B]."""
    import numpy as np

    tokens = np.asarray(spec["tokens"], np.int32)
    b = tokens.shape[0]
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens),
            "prompt_len": np.repeat(np.asarray(spec["prompt_len"], np.int32)[:, None], 2, 1),
            "ranks": np.tile(np.array([[0, 1]], np.int32), (b, 1)),
            "valid": np.ones((b, 2), np.int32), "index": np.arange(b, dtype=np.int32)}


# ------------------------------------------------------------------------------------------
# jaxrlhf.

def run_jax(args, spec) -> dict:
    """One mode of jaxrlhf's DPO step in this (worker) process."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import bench_model as bm
    from jaxrlhf import sharding as shd
    from jaxrlhf.options import DPOOptions
    from jaxrlhf.trainers import common, dpo

    mode, out = spec["mode"], {}
    t0 = time.perf_counter()
    if args.hf:
        from jaxrlhf.models import load_hf
        model = common.with_run_options(load_hf(args.hf, head="lm"), {"remat": "full"})
    else:
        from jaxrlhf.models.config import preset
        from jaxrlhf.models.transformer import init_model
        model = init_model(preset(spec["preset"]), head="lm", seed=args.seed)
    out.update(load_s=round(time.perf_counter() - t0, 2), params=model.cfg.num_params(),
               remat=model.cfg.remat, logits_chunk=model.cfg.logits_chunk)
    mesh = shd.make_mesh({"fsdp": -1})
    tc = bm.train_config("dpo")
    graphdef, params = nnx.graphdef(model), common.params_of(model)
    optimizer, schedule = common.make_optimizer(tc)
    state, state_sh = common.init_train_state(params, optimizer,
                                              common.param_shardings(model, mesh), mesh,
                                              args.seed)
    ref_params = jax.tree.map(jnp.copy, params)   # as dpo.build: the state is donated
    del model, params
    host = host_batch(spec)
    fn = functools.partial(dpo.train_step, graphdef=graphdef, optimizer=optimizer,
                           schedule=schedule, grad_accum=int(tc.grad_accum),
                           on_nonfinite=tc.on_nonfinite,
                           loss_kw=dpo.loss_kw_of(DPOOptions(loss="sigmoid", beta=BETA,
                                                             ref_logps=mode)))
    if mode == "cached":
        # The reference cache of the B pairs, as dpo.build computes it (RefCache.build), then
        # the reference weights are dropped and the step reads batch["ref_logps"].
        g = common.to_global(host, mesh)
        ref_in = (g["tokens"], g["attention_mask"], g["prompt_len"])
        ref_fn = jax.jit(functools.partial(dpo.response_logps, ref_params, graphdef))
        t0 = time.perf_counter()
        ref_compiled = ref_fn.lower(*ref_in).compile()
        t1 = time.perf_counter()
        ref_logps = np.asarray(jax.block_until_ready(ref_compiled(*ref_in)[0]))
        out["ref_cache"] = {"compile_s": round(t1 - t0, 3),
                            "run_s": round(time.perf_counter() - t1, 4)}
        out["ref_logps"] = ref_logps.tolist()
        del ref_fn, ref_compiled, ref_params, g, ref_in
        batch = common.to_global(dict(host, ref_logps=ref_logps.astype(np.float32)), mesh)
        jitted, extra = common.compile_step(fn, state_sh), ()
    else:
        batch = common.to_global(host, mesh)
        ref_sh = jax.tree.map(lambda x: x.sharding, ref_params)
        jitted = jax.jit(functools.partial(fn, ref_graphdef=graphdef),
                         in_shardings=(state_sh, None, ref_sh), out_shardings=(state_sh, None),
                         donate_argnums=(0,))
        extra = (ref_params,)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, *extra).compile()
    out["compile_s"] = round(time.perf_counter() - t0, 2)

    times, cpus, first = [], [], None
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch, *extra)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if first is None:
            first = {k: float(v) for k, v in jax.device_get(metrics).items() if k in FIRST_KEYS}
    last_loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(last_loss):
        raise FloatingPointError(f"jaxrlhf DPO loss {last_loss} after {len(times)} steps")
    out.update(_step_times(times, cpus, args.warmup, args.threads))
    out.update(first_step=first, last_loss=last_loss)
    return out


# ------------------------------------------------------------------------------------------
# TRL.

def _step_timer(callback_cls, abort_s):
    """A TrainerCallback (`callback_cls` is transformers' class, imported by the worker) that
    keeps each optimizer step's wall and CPU seconds (on_step_begin to on_step_end), the wall
    seconds from one on_step_end to the next (`intervals`: + data loading and logging) and the
    logged dicts; raises bp._TooSlow after a step longer than `abort_s`."""
    clock = lambda: (time.perf_counter(), time.process_time())

    class StepTimer(callback_cls):
        def __init__(self):
            self.wall, self.cpu, self.intervals, self.logs = [], [], [], []
            self._begin = self._last_end = None

        def on_step_begin(self, *a, **kw):
            self._begin = clock()

        def on_step_end(self, *a, **kw):
            now = clock()
            self.wall.append(now[0] - self._begin[0])
            self.cpu.append(now[1] - self._begin[1])
            if self._last_end is not None:
                self.intervals.append(now[0] - self._last_end)
            self._last_end = now[0]
            if abort_s is not None and self.wall[-1] > abort_s:
                raise bp._TooSlow(f"stopped after a step of {self.wall[-1]:.2f} s (> "
                                  f"{abort_s:.2f} s, 5x the fastest median so far)")

        def on_log(self, *a, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return StepTimer()


def run_trl(args, spec, threads, abort_s=None) -> dict:
    """One DPOTrainer.train() run with `threads` torch threads (in the worker process); with
    `abort_s`, stops after the first step that takes longer."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    mode, o, n_steps = spec["mode"], spec["optim"], args.warmup + args.steps
    load = dict(dtype=torch.float32, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **load)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **load).eval()
    tok = AutoTokenizer.from_pretrained(args.hf) if args.hf else bg.byte_hf_tokenizer()
    config = DPOConfig(
        output_dir=spec["out_dir"], report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        beta=BETA, loss_type="sigmoid", learning_rate=o["lr"], lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=o["b1"], adam_beta2=o["b2"], adam_epsilon=o["eps"],
        weight_decay=o["weight_decay"], max_grad_norm=o["grad_clip"],
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=n_steps, precompute_ref_log_probs=mode == "cached",
        gradient_checkpointing=bool(args.hf), max_length=None, dataloader_num_workers=0)
    timer, precompute = _step_timer(TrainerCallback, abort_s), []

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **kw):
            t0 = time.perf_counter()
            res = super()._precompute_ref_logps(*a, **kw)
            precompute.append(time.perf_counter() - t0)
            return res

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        trainer = TimedDPOTrainer(model=policy, ref_model=ref, args=config,
                                  train_dataset=Dataset.from_dict(spec["texts"]),
                                  processing_class=tok, callbacks=[timer])
        setup_s = time.perf_counter() - t0
        ds = trainer.train_dataset
        ids_match = all(list(ds[i][f"{k}_ids"]) == spec["ids"][k][i]
                        for i in range(args.batch) for k in ("prompt", "chosen", "rejected"))
        try:
            trainer.train()
        except bp._TooSlow as e:
            return {"aborted": str(e), "torch_threads": threads, "step_s": None,
                    "step_s_all": [round(t, 4) for t in timer.wall]}
    if len(timer.wall) != n_steps:
        raise RuntimeError(f"TRL ran {len(timer.wall)} steps, expected {n_steps}")
    out = _step_times(timer.wall, timer.cpu, args.warmup, threads)
    out["interval_s"] = round(bp._median(timer.intervals[args.warmup - 1:]), 4)
    out.update(setup_s=round(setup_s, 2), torch_threads=threads, ids_match=ids_match,
               gradient_checkpointing=bool(trainer.model.is_gradient_checkpointing),
               first_step={"loss": timer.logs[0]["loss"],
                           "chosen_logps": timer.logs[0]["logps/chosen"],
                           "rejected_logps": timer.logs[0]["logps/rejected"]},
               last_loss=timer.logs[-1]["loss"])
    if mode == "cached":
        out["ref_cache"] = {"precompute_s": round(precompute[0], 4)}
        out["ref_logps"] = [list(x) for x in zip(ds["ref_chosen_logps"],
                                                 ds["ref_rejected_logps"])]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    out.update(optimizer=type(opt).__name__, lr_scheduler=type(trainer.lr_scheduler).__name__,
               optim=getattr(trainer.args.optim, "value", trainer.args.optim))
    return out


def worker(flag, spec_path):
    """`--jax-worker SPEC` / `--trl-worker SPEC`: one side's run of one mode in this fresh
    process (the TRL worker imports torch / transformers / trl, not jax); prints its JSON
    with the process's peak RSS, or {"error": ...} when TRL cannot be imported."""
    spec, args = bg._worker_spec(spec_path)   # pinned to the parent's cores
    if flag == "--jax-worker":
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            out = run_jax(args, spec)
    else:
        try:
            import trl
            trl.DPOTrainer  # noqa: B018  (trl's lazy module imports the trainer here)
        except Exception as e:  # not installed, or a version without DPOTrainer
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            return
        out = run_trl(args, spec, spec["torch_threads"], spec["abort_s"])
        out["trl_version"] = trl.__version__
    out["peak_rss_gb"] = bp._peak_rss_gb()
    print(json.dumps(out))


def _child(flag, spec, work) -> dict:
    """This script as `flag SPEC` in a fresh child process (it inherits the CPU affinity; the
    environment of its side, `bench_ppo.jax_env` / `trl_env`): the JSON of its last stdout
    line."""
    import subprocess

    path = os.path.join(work, f"{flag[2:]}_{spec['mode']}_{spec.get('torch_threads', 0)}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), flag, path]
    env = bp.jax_env() if flag == "--jax-worker" else bp.trl_env()
    stdout = subprocess.check_output(cmd, text=True, env=dict(env, JAXRLHF_NO_PROGRESS="1"))
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------

def compare(mode, jax_res, trl_runs, tokens) -> dict:
    """One mode's result: both sides (TRL: its fastest thread count), speedup, checks."""
    res = {"step_s": {"jax": jax_res["step_s"], "trl": None}, "speedup": None,
           "cpu_speedup": None, "tok_s": {"jax": round(tokens / jax_res["step_s"], 1),
                                          "trl": None},
           "peak_rss_gb": {"jax": jax_res["peak_rss_gb"], "trl": None},
           "check": {"first_step": {"jax": jax_res["first_step"], "trl": None,
                                    "log2": round(math.log(2), 6)}}}
    jax_ref = jax_res.pop("ref_logps", None)
    if mode == "cached":
        res["ref_cache"] = {"jax_compile_s": jax_res["ref_cache"]["compile_s"],
                            "jax_s": jax_res["ref_cache"]["run_s"], "trl_precompute_s": None}
    res["jax"], res["trl"] = jax_res, None
    if not trl_runs:
        return res
    res["trl_step_s_by_threads"] = {t: r["step_s"] or r["aborted"] for t, r in trl_runs.items()}
    trl_runs = {t: r for t, r in trl_runs.items() if r["step_s"] is not None}
    trl = min(trl_runs.values(), key=lambda r: r["step_s"])
    res["trl"] = trl
    res["step_s"]["trl"] = trl["step_s"]
    res["speedup"] = round(trl["step_s"] / jax_res["step_s"], 3)
    res["cpu_speedup"] = round(trl["cpu_step_s"] / jax_res["cpu_step_s"], 3)
    res["tok_s"]["trl"] = round(tokens / trl["step_s"], 1)
    res["peak_rss_gb"]["trl"] = trl["peak_rss_gb"]
    first_j, first_t = jax_res["first_step"], trl["first_step"]
    check = res["check"]
    check["first_step"]["trl"] = first_t
    check["first_step_max_abs_diff"] = max(abs(first_j[k] - first_t[k]) for k in FIRST_KEYS)
    check["trl_ids_match"] = all(r["ids_match"] for r in trl_runs.values())
    trl_ref = trl.pop("ref_logps", None)
    for r in trl_runs.values():
        r.pop("ref_logps", None)
    if mode == "cached":
        res["ref_cache"]["trl_precompute_s"] = trl["ref_cache"]["precompute_s"]
        check["ref_logps_max_abs_diff"] = max(abs(a - b) for ra, rb in zip(jax_ref, trl_ref)
                                              for a, b in zip(ra, rb))
        check["ref_logps_row0"] = {"jax": jax_ref[0], "trl": trl_ref[0]}
    return res


def bench_one(name, args, policy_dir, tok, trl_threads, root) -> dict:
    """Every mode of one model (a preset, or the --hf model): its result dict."""
    import bench_model as bm

    work = os.path.join(root, name)
    os.makedirs(work, exist_ok=True)
    data = make_pairs(args, tok)
    tc = bm.train_config("dpo")
    spec = dict(data, args=vars(args), preset=name, policy_dir=policy_dir,
                out_dir=os.path.join(work, "trl"),
                optim={k: float(tc[k]) for k in ("lr", "b1", "b2", "eps", "weight_decay",
                                                 "grad_clip")})
    seq = args.prompt + args.completion
    tokens = 2 * args.batch * seq
    res = {"preset": name, "seq_len": seq, "tokens_per_step": tokens, "modes": {}}
    for mode in args.modes.split(","):
        jax_res = _child("--jax-worker", dict(spec, mode=mode), work)
        trl_runs = {}
        for t in trl_threads:
            done = [r["step_s"] for r in trl_runs.values() if r["step_s"] is not None]
            run = _child("--trl-worker", dict(spec, mode=mode, torch_threads=t,
                                              abort_s=5 * min(done) if done else None), work)
            if "error" in run:
                res["trl_error"], trl_threads = run["error"], []
                break
            trl_runs[str(t)] = run
        res.update(params=jax_res["params"], remat=jax_res["remat"])
        res["modes"][mode] = compare(mode, jax_res, trl_runs, tokens)
        print(f"[bench_dpo] {name} {mode}: {json.dumps(res['modes'][mode]['step_s'])}",
              file=sys.stderr, flush=True)
    return res


def bench_preset(name, args, trl_threads, root) -> dict:
    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.models.config import preset
    from jaxrlhf.models.transformer import init_model

    policy_dir = os.path.join(root, name, "hf_policy")
    bc.to_hf_llama(init_model(preset(name), head="lm", seed=args.seed)).save_pretrained(
        policy_dir)
    return bench_one(name, args, policy_dir, load_tokenizer("byte"), trl_threads, root)


def main():
    if len(sys.argv) == 3 and sys.argv[1] in ("--jax-worker", "--trl-worker"):
        return worker(sys.argv[1], sys.argv[2])
    args = parse_args()
    cores = bc.pin_cpu_threads(args.threads)  # before jax / torch are imported
    has_trl, trl_info = (False, "skipped (--no-trl)") if args.no_trl else bp.trl_available()
    trl_threads = bp.trl_thread_counts(args) if has_trl else []
    out = {
        "command": "python " + " ".join(sys.argv),
        "setup": {"pairs_per_step": args.batch, "prompt": args.prompt,
                  "completion": args.completion, "seq_len": args.prompt + args.completion,
                  "sequences_per_step": 2 * args.batch, "padding": "none",
                  "loss": "sigmoid (DPO), mean over pairs", "beta": BETA,
                  "optimizer": "AdamW, bench_model.train_config('dpo'): lr 1e-4 constant, "
                               "b2 0.95, weight decay 0.01 on matrices, grad clip 1.0",
                  "modes": args.modes.split(","), "threads": args.threads,
                  "trl_torch_threads": trl_threads or None,
                  "warmup_steps": args.warmup, "timed_steps": args.steps,
                  "dtype": "float32", "statistic": "median",
                  "jaxrlhf_remat": "full" if args.hf else "none (preset)",
                  "trl_gradient_checkpointing": bool(args.hf),
                  "order": "per model and mode: jaxrlhf, then TRL per thread count, each in a "
                           "fresh child process"},
        **bp.machine_and_versions(cores, has_trl, trl_info),
        "presets": [],
    }
    bp.note_trl_and_malloc(out, args, has_trl, trl_info, "trl.DPOTrainer")
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as root:
        if args.hf:
            from jaxrlhf.data import load_tokenizer

            name = "hf_" + os.path.basename(os.path.normpath(args.hf))
            out["setup"]["hf"] = os.path.abspath(args.hf)
            results = [bench_one(name, args, os.path.abspath(args.hf),
                                 load_tokenizer(os.path.abspath(args.hf)), trl_threads, root)]
        else:
            results = [bench_preset(p, args, trl_threads, root)
                       for p in args.presets.split(",")]
            name = "_".join(args.presets.split(","))
        out["presets"] = results
        out["machine"]["load_average_after"] = list(os.getloadavg())
    path = bc.write_result(out, f"bench_dpo_{name}", args.out)
    print(f"[bench_dpo] wrote {path}", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
