"""GRPO iteration time and peak memory on CPU: jaxrlhf's critic-free PPO stage with
`apply_algorithm(config.ppo, "grpo")` against TRL 0.29's `trl.GRPOTrainer` (PyTorch, HF
transformers), same weights, same prompts, same Python reward function.

    python tools/bench_grpo.py                            # tiny, small; 5 timed iterations, 3 rounds
    python tools/bench_grpo.py --presets tiny --iterations 2 --repeats 1   # quick smoke run
    pip install trl==0.29.0                               # optional: the TRL side
    python tools/bench_grpo.py --hf /tmp/smollm2          # a real model (prompt 64, 2 timed
                                                          # iterations, 1 round)

Both sides, per iteration: 4 prompts (--batch) x 8 samples (--k) = 32 completions of up to 128
new tokens (--new), temperature 1, no top-k / top-p, rows stop at the tokenizer's EOS (not
forced off: the mean completion length each side sampled is reported, `completion_length_mean`,
with `eos_rate`), one optimizer step on all 32 completions (one minibatch, one epoch), GRPO
advantages ((r - group mean) / (group std + eps) over a prompt's 8 samples), the clipped
surrogate with pi_old = the sampling policy (ratio exactly 1), + 0.04 x k3 KL(pi || pi_ref) in
the loss (so both sides run the frozen reference forward), the loss averaged per sequence then
over rows ("seq_mean" / TRL loss_type="grpo"), global grad-norm clip 1.0, AdamW at lr 1e-6,
fp32. Reward: `distinct_char_reward` below (distinct characters / length of the decoded
completion), a cheap deterministic Python function, given to both trainers.

What each side does in one iteration (read from the code: jaxrlhf/trainers/ppo.py +
ppo_steps.py; trl/trainer/grpo_trainer.py 0.29.0):
  jaxrlhf  1. `generate(num_samples=8)`: each of the 4 prompts is prefilled once and its KV
              cache shared by its 8 samples; 32 rows decoded in one jitted loop, which stops
              once every row has sampled EOS;
           2. host: responses decoded, the reward function called on the 32 texts;
           3. one jitted program (`ppo_steps.fused_first_update`, one minibatch): actor
              forward under `jax.vjp` (last layer only at the response positions; LM head,
              log-probs and entropy through `Transformer.head_reduce`, chunked over positions
              by model.logits_chunk: auto for vocabularies >= 32k, at most 1,024 rows x
              positions per chunk, i.e. 32 positions for 32 rows; the entropy is a metric
              with no backward) -- its log-probs ARE pi_old, no separate
              old-log-prob forward --, reference forward (response positions), group
              advantages, loss, backward through the same actor forward, clip, optax AdamW;
              the actor and reference forwards run each prompt's positions once for its 8
              samples (`ppo.share_prompt_forward`, default on; `--share-prompt-forward 0`
              runs all 32 rows at every position, as TRL does);
              a real model (--hf) runs `model.remat = "full"` (the forward recomputed in the
              backward), as the pretrained-model recipe does;
           4. the previous iteration's metrics read back to the host.
  TRL      1. the 4 prompt texts, each repeated 8 times by TRL's RepeatSampler, tokenized and
              generated as one batch of 32 rows by `model.generate` (each row prefilled
              separately; stops when every row has EOS); completions masked after the first
              EOS; decoded;
           2. under no_grad: NO policy forward for old log-probs (TRL skips it when
              generation and optimizer steps are aligned: steps_per_generation 1,
              num_iterations 1, so old_per_token_logps = per_token_logps.detach() in the
              loss), the reference model's forward on the 32 prompt+completion rows (LM head
              only at the completion positions: logits_to_keep), the reward function,
              advantages (std + 1e-4);
           3. `compute_loss`: policy forward (LM head at completion positions; entropy computed
              under no_grad for logging), backward, grad clip (max_grad_norm 1.0), torch
              AdamW step, linear LR schedule; metrics `.item()`s. Gradient checkpointing
              follows jaxrlhf's remat: on for a real model (GRPOConfig's own default,
              gradient_checkpointing=True: each decoder layer recomputed in the backward), off
              for the presets (jaxrlhf's toy runs keep activations too).
  Neither side computes an extra old-log-prob forward: each runs generate + reference forward
  + one policy forward/backward. Differences that remain: jaxrlhf prefills a prompt once for
  its 8 samples (TRL: 32 prefills), and its training forwards run a prompt's positions once
  for its 8 samples and stop at the last response position that predicts a token (TRL: all
  32 rows at all positions, the LM head at the completion positions); the
  two remat schemes differ in detail (jaxrlhf "full" vs. HF's per-layer checkpointing);
  completion lengths differ by sampling (EOS), see completion_length_mean.

Same weights: presets (`preset(name)`, vocab 259, random weights, byte tokenizer) are exported
as a jaxrlhf SFT stage and, through `_bench_common.to_hf_llama`, as an HF LlamaForCausalLM that
TRL loads (policy; TRL loads its reference from the same directory); TRL's tokenizer is a
local byte-level `PreTrainedTokenizerFast` with the byte tokenizer's ids (bytes 0..255, pad
256, bos 257, eos 258). A real model (`--hf DIR`, a local HF Llama-family causal LM) is loaded
by jaxrlhf (`load_hf`), exported as the SFT stage and re-exported for TRL the same way; both
sides use the checkpoint's own tokenizer. Prompts (`bench_ppo.make_prompts` /
`make_word_prompts`): 64 rows of exactly --prompt tokens (random lowercase letters / random
one-token words), written as a "prompt" JSONL for jaxrlhf (`data.chat_template = "raw"`: the
text's own ids) and given as the same texts to TRL (non-conversational); the TRL worker checks
that its tokenizer gives the same ids (`check.trl_prompt_ids_match`). Checks: max_logit_diff
(jaxrlhf actor vs the HF policy on 4 prompts) and trl_loaded_max_logit_diff (the policy the TRL
worker loaded).

jaxrlhf: the real trainer, `jaxrlhf.trainers.ppo.run(config, stage_dir)` (what
`python -m jaxrlhf.train` runs), on `bench_ppo.jax_config` (base_config("ppo"), data, no eval,
no samples, no intermediate checkpoints; missing_eos_penalty 0: TRL has none) then
`apply_algorithm(ppo, "grpo")` (advantage_estimator grpo, critic none, loss_agg seq_mean,
kl_coef 0, kl_loss_coef 0.04 with k3), samples_per_prompt 8, rollout_batch 4, minibatch_size
32, ppo_epochs 1, actor_lr 1e-6, reward_init "" and reward_fns "bench_grpo:distinct_char_reward".
Timed by wrapping `jaxrlhf.rollout.generate` (timed up to block_until_ready; the trainer blocks
on it right after anyway; records the response lengths) and `MetricsLogger.advance` (called
once per iteration after it was dispatched): iteration k = advance(k) - advance(k-1), the first
from the start of its generate call. An update executes asynchronously after its dispatch, so
every interval holds one generate and one update's execution (the previous iteration's), and
the first (first_iter_s) holds generate + every compilation + the host reward + the first
update's dispatch, not its execution; "first iteration - median" is then no compile time, and
compile_s is measured on its own: the time jax reports in its compile events during the run
(tracing, lowering and XLA compilation: `jax.monitoring`, "/jax/core/compile/*";
compile_s_by_phase, and the XLA compile time of the slowest functions,
xla_compile_s_by_function). Run in a fresh child process (`--jax-worker`).
TRL: `GRPOTrainer(model=policy, reward_funcs=[trl_distinct_char_reward], args=GRPOConfig(
num_generations 8, per_device_train_batch_size 32, gradient_accumulation_steps 1,
steps_per_generation 1, num_iterations 1, max_completion_length 128, beta 0.04, loss_type
"grpo", temperature 1.0, top_k 0, top_p 1.0, learning_rate 1e-6, use_vllm False, use_cpu,
bf16 / fp16 off, gradient_checkpointing = real model, report_to none, save_strategy no,
max_steps = --warmup + --iterations, default logging (every 10 steps)),
processing_class=tok, train_dataset={"prompt": texts})`, driven by
`train()`. A `TrainerCallback` records on_train_begin and each on_step_end (once per optimizer
step = once per generation round); `_generate_single_turn` is wrapped to time generation and
record completion lengths and prompt ids. Each torch thread count (`--trl-threads`, default 1
and --threads; the fastest is reported, as in bench_ppo.py: on a shared machine OpenMP
spin-waits can make 2-thread torch far slower) runs in its own fresh child process
(`--trl-worker`), which imports torch / transformers / trl but not jax; a later thread count
stops after an iteration 5x slower than the best median so far.

Both sides pinned to the first --threads cores (`_bench_common.pin_cpu_threads`). Peak memory
= each worker process's peak RSS (`peak_rss_gb`; TRL's is that of the reported thread count's
process). Timing: the first --warmup iterations excluded, the median of the next --iterations
reported; ratio = TRL median / jaxrlhf median; cpu_ratio the same with process CPU time /
threads (load-robust cross-check). Target: ratio >= 3 and jaxrlhf peak RSS <= TRL's. The two
sides run one after the other, so load from other processes may hit them differently: see
machine.load_average_*. Without TRL installed the jaxrlhf numbers are still measured ("trl":
null, trl_note).

Prints one JSON object (command, setup, machine, versions, presets [{preset, params, jax, trl,
ratio, cpu_ratio, peak_rss_gb, meets_target, check}], target, meets_target) and writes it to
experiments/benchmarks/bench_grpo_<name>.json (name: the --hf dir's basename, else the presets
joined by "_"; --out overrides the path).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import bench_ppo as bp  # noqa: E402  (sets the host-malloc default first, as bench_ppo runs)
import _bench_common as bc  # noqa: E402

TARGET_RATIO = 3.0
REWARD_FN = "bench_grpo:distinct_char_reward"   # jaxrlhf imports it in its worker process
KL_LOSS_COEF = 0.04


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bp.add_trainer_bench_args(ap, what="GRPO", batch=4, new=128,
                              batch_help="prompts per iteration")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--share-prompt-forward", type=int, default=1, choices=(0, 1),
                    help="jaxrlhf's ppo.share_prompt_forward (1: each prompt's positions run "
                         "once for its K samples in the actor / reference forwards)")
    return bp.real_model_defaults(ap.parse_args(), (("--prompt", 64), ("--iterations", 2),
                                                    ("--repeats", 1)))


# ------------------------------------------------------------------------------------------
# The reward, the same function on both sides.

def distinct_char_reward(prompts, responses, metadata=None):
    """jaxrlhf's signature fn(prompts, responses, metadata): distinct characters / length of
    each response (0 for an empty one)."""
    return [len(set(r)) / max(len(r), 1) for r in responses]


def trl_distinct_char_reward(prompts, completions, **kwargs):
    """TRL's signature fn(prompts, completions, completion_ids, trainer_state, ...)."""
    return distinct_char_reward(prompts, completions)


def byte_hf_tokenizer():
    """An HF fast tokenizer with jaxrlhf's byte-tokenizer ids: text -> its UTF-8 bytes 0..255
    (byte-level BPE without merges), pad 256, bos 257, eos 258; decodes bytes back to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update({"<pad_byte>": 256, "<bos>": 257, "<eos>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad_byte>",
                                   bos_token="<bos>", eos_token="<eos>", padding_side="left")


def _lengths_summary(lengths, eos_rates, warmup):
    """Mean completion length over all iterations (and per iteration), EOS rate."""
    return {"completion_length_mean": round(sum(map(sum, lengths)) / sum(map(len, lengths)), 2),
            "completion_length_by_iter": [round(sum(x) / len(x), 2) for x in lengths],
            "completion_length_max": max(map(max, lengths)),
            "eos_rate": round(sum(eos_rates) / len(eos_rates), 3)}


# ------------------------------------------------------------------------------------------
# jaxrlhf.

def grpo_config(args, sft_dir, prompts_path):
    """bench_ppo's PPO config (data, no eval / samples / checkpoints) turned into GRPO with a
    Python reward and no reward model."""
    from jaxrlhf.options import apply_algorithm

    c = bp.jax_config(args, {"sft": sft_dir, "rm": ""}, prompts_path)
    p = c.ppo
    apply_algorithm(p, "grpo")
    p.samples_per_prompt = args.k
    p.minibatch_size = args.batch * args.k   # one minibatch: scoring fused with the update
    p.reward_fns = REWARD_FN
    p.actor_lr = 1e-6
    p.share_prompt_forward = bool(args.share_prompt_forward)
    assert p.kl_loss_coef == KL_LOSS_COEF and p.critic == "none", (p.kl_loss_coef, p.critic)
    return c


def run_jax(args, sft_dir, prompts_path, stage_dir):
    import jax
    import numpy as np

    from jaxrlhf import rollout
    from jaxrlhf.trainers import common
    from jaxrlhf.trainers import ppo as ppo_mod

    gens, marks, results = [], [], []
    orig_generate, orig_logger = rollout.generate, common.MetricsLogger

    def timed_generate(*a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        res = orig_generate(*a, **kw)
        jax.block_until_ready(res.tokens)
        gens.append((t0, c0, time.perf_counter()))
        results.append((res.response_mask, res.finished, res.num_steps))
        return res

    class TimedLogger(orig_logger):
        def __init__(self, *a, **kw):
            super().__init__(*a, **dict(kw, tensorboard=False))

        def advance(self, n: int = 1) -> None:
            marks.append((time.perf_counter(), time.process_time()))
            super().advance(n)

    compiles = {}   # jax's compile events: {event: [seconds, count]}, XLA compiles by function

    def on_compile_event(event, seconds, **kw):
        if event.startswith("/jax/core/compile/"):
            rec = compiles.setdefault(event.rsplit("/", 1)[1], [0.0, 0])
            rec[0], rec[1] = rec[0] + seconds, rec[1] + 1
            if event.endswith("backend_compile_duration"):
                key = f"xla:{kw.get('fun_name', '?')}"
                compiles[key] = compiles.get(key, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(on_compile_event)
    cfg = grpo_config(args, sft_dir, prompts_path)
    rollout.generate, common.MetricsLogger = timed_generate, TimedLogger
    os.environ["JAXRLHF_NO_PROGRESS"] = "1"   # a worker process: nothing to restore
    t_call = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            ppo_mod.run(cfg, stage_dir)
    finally:
        rollout.generate, common.MetricsLogger = orig_generate, orig_logger
    n_it = args.warmup + args.iterations
    if len(gens) != n_it or len(marks) != n_it:
        raise RuntimeError(f"expected {n_it} generate calls and iterations, got "
                           f"{len(gens)} and {len(marks)}")
    starts = [gens[0][:2]] + marks[:-1]
    its = [m[0] - s[0] for m, s in zip(marks, starts)]
    cpus = [m[1] - s[1] for m, s in zip(marks, starts)]
    out = bp._summary(its, cpus, [g[2] - g[0] for g in gens], args, args.threads)
    out["first_iter_s"] = round(its[0], 3)
    xla = {k[4:]: round(v, 2) for k, v in compiles.items() if k.startswith("xla:")}
    phases = {k: round(v[0], 2) for k, v in compiles.items() if not k.startswith("xla:")}
    out["compile_s"] = round(sum(phases.values()), 2)
    out["compile_s_by_phase"] = phases
    out["xla_compile_s_by_function"] = dict(sorted(xla.items(), key=lambda kv: -kv[1])[:6])
    out["first_generate_s"] = round(gens[0][2] - gens[0][0], 3)
    out["setup_s"] = round(gens[0][0] - t_call, 2)
    host = [tuple(np.asarray(x) for x in r) for r in results]
    out.update(_lengths_summary([m.sum(-1).tolist() for m, _, _ in host],
                                [float(f.mean()) for _, f, _ in host], args.warmup))
    out["decode_steps_by_iter"] = [int(s) for _, _, s in host]
    return out


def jax_worker(spec_path):
    """`--jax-worker SPEC`: `run_jax` in a fresh process; prints its JSON."""
    spec, args = _worker_spec(spec_path)
    out = run_jax(args, spec["sft_dir"], spec["prompts_path"], spec["stage_dir"])
    out["peak_rss_gb"] = bp._peak_rss_gb()
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------
# TRL.

def run_trl(args, spec, threads, abort_s=None):
    """One GRPOTrainer.train() run with `threads` torch threads (in the worker process); with
    `abort_s`, stops after the first iteration that takes longer."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32,
                                                  local_files_only=True)
    with torch.no_grad():   # the loaded policy reproduces the jaxrlhf actor's logits
        logits = policy(input_ids=torch.tensor(spec["prompt_ids"][:args.batch])).logits.numpy()
    loaded_diff = float(np.abs(logits - np.load(spec["expected_logits"])).max())
    if args.hf:
        tok = AutoTokenizer.from_pretrained(args.hf, padding_side="left")
    else:
        tok = byte_hf_tokenizer()
    n_it = args.warmup + args.iterations
    config = GRPOConfig(
        output_dir=spec["out_dir"], report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=True, bf16=False, fp16=False, seed=args.seed, use_vllm=False,
        per_device_train_batch_size=args.batch * args.k, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.k,
        max_completion_length=args.new, beta=KL_LOSS_COEF, loss_type="grpo",
        temperature=1.0, top_k=0, top_p=1.0, learning_rate=1e-6, max_steps=n_it,
        gradient_checkpointing=bool(args.hf), dataloader_num_workers=0)
    ds = Dataset.from_dict({"prompt": spec["prompts"]})

    gens, marks, lengths, eos_rates = [], [], [], []
    known_prompts = {tuple(r) for r in spec["prompt_ids"]}
    prompts_match = []

    t_setup = time.perf_counter()
    trainer = GRPOTrainer(model=policy, reward_funcs=[trl_distinct_char_reward], args=config,
                          train_dataset=ds, processing_class=tok,
                          callbacks=[bp.iteration_timer(TrainerCallback, marks, abort_s)])
    setup_s = time.perf_counter() - t_setup
    orig_generate = trainer._generate_single_turn

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = orig_generate(prompts)
        gens.append(time.perf_counter() - t0)
        prompt_ids, completion_ids = out[0], out[1]
        prompts_match.append(all(tuple(p) in known_prompts for p in prompt_ids))
        lengths.append([len(c) for c in completion_ids])
        eos_rates.append(float(np.mean([bool(c) and c[-1] == trainer.eos_token_id
                                        for c in completion_ids])))
        return out

    trainer._generate_single_turn = timed_generate
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            trainer.train()
    except bp._TooSlow as e:
        return {"aborted": str(e), "torch_threads": threads, "iter_s_median": None,
                "iter_s": [round(b[0] - a[0], 4) for a, b in zip(marks, marks[1:])]}
    if len(marks) != n_it + 1 or len(gens) != n_it or any(len(x) != args.batch * args.k
                                                          for x in lengths):
        raise RuntimeError(f"TRL ran {len(marks) - 1} steps / {len(gens)} generations of "
                           f"{[len(x) for x in lengths]} rows, expected {n_it} of "
                           f"{args.batch * args.k}")
    its = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out = bp._summary(its, cpus, gens, args, threads)
    out.update(_lengths_summary(lengths, eos_rates, args.warmup))
    out.update(first_iter_s=round(its[0], 3), setup_s=round(setup_s, 2), torch_threads=threads,
               ref_model_loaded=trainer.ref_model is not None,
               gradient_checkpointing=bool(trainer.model.is_gradient_checkpointing),
               loaded_policy_max_logit_diff=loaded_diff, prompt_ids_match=all(prompts_match))
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    out["optimizer"] = type(opt).__name__
    return out


def trl_worker(spec_path):
    """`--trl-worker SPEC`: one TRL run (one torch thread count) in a process without jax;
    prints its JSON (or {"error": ...} when TRL cannot be imported)."""
    spec, args = _worker_spec(spec_path)
    try:
        import trl
        from trl import GRPOTrainer  # noqa: F401
    except Exception as e:  # not installed, or a version without GRPOTrainer
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return
    out = run_trl(args, spec, spec["torch_threads"], spec["abort_s"])
    out.update(peak_rss_gb=bp._peak_rss_gb(), trl_version=trl.__version__)
    print(json.dumps(out))


def _worker_spec(spec_path):
    """In a worker process: (its spec, the parent's args), pinned to the parent's cores."""
    with open(spec_path) as f:
        spec = json.load(f)
    args = argparse.Namespace(**spec["args"])
    bc.pin_cpu_threads(args.threads)  # before jax / torch are imported
    return spec, args


def _worker(flag, spec, spec_path, env=None):
    """This script as `flag SPEC_PATH` in a child process (inheriting the CPU affinity): the
    JSON of its last stdout line; RuntimeError when it fails."""
    import subprocess

    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), flag, spec_path],
                          stdout=subprocess.PIPE, env=env, text=True)
    if proc.returncode:
        raise RuntimeError(f"{flag} failed (exit {proc.returncode}); see stderr")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_trl_threads(args, policy_dir, prompts, prompt_ids, work):
    """TRL once per thread count in --trl-threads, each in a fresh worker: {threads: result}
    (or {"error": ...})."""
    runs = {}
    for t in bp.trl_thread_counts(args):
        done = [r["iter_s_median"] for r in runs.values() if r["iter_s_median"] is not None]
        spec = {"args": vars(args), "policy_dir": policy_dir, "prompts": prompts,
                "prompt_ids": prompt_ids, "expected_logits": os.path.join(work, "logits.npy"),
                "out_dir": os.path.join(work, f"trl{t}"), "torch_threads": t,
                "abort_s": 5 * min(done) if done else None}
        res = _worker("--trl-worker", spec, os.path.join(work, f"trl{t}_spec.json"),
                      env=bp.trl_env())
        if "error" in res:
            return res
        runs[str(t)] = res
    return runs


# ------------------------------------------------------------------------------------------

def bench_model(name, args, actor, tok_spec, prompts, use_trl, root):
    """--repeats rounds of (jaxrlhf, TRL) on one model: its result dict."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.trainers.common import export_stage_model

    work = os.path.join(root, name)
    tok = load_tokenizer(tok_spec)
    sft_dir = os.path.join(work, "sft")
    export_stage_model(actor, os.path.join(sft_dir, "hf"), tokenizer=tok,
                       tokenizer_spec_=tok_spec, stage="sft")
    prompts_path = os.path.join(work, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    prompt_ids = [tok.encode(p) for p in prompts]
    assert all(len(r) == args.prompt for r in prompt_ids), "prompts must be --prompt tokens"

    # Same weights: the HF policy TRL loads, against the jaxrlhf actor.
    policy_dir = os.path.join(work, "hf_policy")
    hf = bc.to_hf_llama(actor)
    hf.save_pretrained(policy_dir)
    tokens = np.asarray(prompt_ids[:args.batch], np.int32)
    with torch.no_grad():
        logits_h = hf(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.save(os.path.join(work, "logits.npy"), logits_h)
    logits_j = np.asarray(actor(jnp.asarray(tokens), jnp.ones_like(tokens)))
    del hf

    res = {"preset": name, "params": actor.cfg.num_params(), "trl": None,
           "check": {"max_logit_diff": float(np.abs(logits_j - logits_h).max())}}
    jax_rounds, trl_rounds = [], []
    for r in range(args.repeats):
        spec = {"args": vars(args), "sft_dir": sft_dir, "prompts_path": prompts_path,
                "stage_dir": os.path.join(work, f"grpo{r}")}
        jax_rounds.append(_worker("--jax-worker", spec, os.path.join(work, f"jax{r}.json"),
                                  env=bp.jax_env()))
        if not use_trl:
            continue
        runs = run_trl_threads(args, policy_dir, prompts, prompt_ids, work)
        if "error" in runs:
            res["trl_error"], use_trl = runs["error"], False
            continue
        best = min((t for t in runs if runs[t]["iter_s_median"] is not None),
                   key=lambda t: runs[t]["iter_s_median"])
        trl_rounds.append(dict(runs[best], iter_s_median_by_threads={
            t: x["iter_s_median"] if x["iter_s_median"] is not None else x["aborted"]
            for t, x in runs.items()}))
    res["jax"] = min(jax_rounds, key=lambda x: x["iter_s_median"])
    res["jax_iter_s_median_by_round"] = [x["iter_s_median"] for x in jax_rounds]
    res["peak_rss_gb"] = {"jax": max(x["peak_rss_gb"] for x in jax_rounds), "trl": None}
    res["ratio"] = res["cpu_ratio"] = res["meets_target"] = None
    if trl_rounds:
        trl = res["trl"] = min(trl_rounds, key=lambda x: x["iter_s_median"])
        res["trl_iter_s_median_by_threads"] = trl.pop("iter_s_median_by_threads")
        res["trl_iter_s_median_by_round"] = [x["iter_s_median"] for x in trl_rounds]
        res["peak_rss_gb"]["trl"] = trl["peak_rss_gb"]
        res["check"]["trl_loaded_max_logit_diff"] = trl.pop("loaded_policy_max_logit_diff")
        res["check"]["trl_prompt_ids_match"] = trl.pop("prompt_ids_match")
        ratio = trl["iter_s_median"] / res["jax"]["iter_s_median"]
        res["ratio"] = round(ratio, 2)
        res["cpu_ratio"] = round(trl["cpu_iter_s_median"] / res["jax"]["cpu_iter_s_median"], 2)
        res["meets_target"] = bool(ratio >= TARGET_RATIO
                                   and res["peak_rss_gb"]["jax"] <= trl["peak_rss_gb"])
    return res


def bench_preset(name, args, use_trl, root):
    import numpy as np

    from jaxrlhf.models.config import preset
    from jaxrlhf.models.transformer import init_model

    actor = init_model(preset(name), head="lm", seed=args.seed)
    prompts = bp.make_prompts(args, np.random.default_rng(args.seed))
    return bench_model(name, args, actor, "byte", prompts, use_trl, root)


def bench_hf(args, use_trl, root):
    import numpy as np

    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.models import load_hf

    actor = load_hf(args.hf, head="lm")
    prompts = bp.make_word_prompts(args, np.random.default_rng(args.seed),
                                   load_tokenizer(args.hf))
    return bench_model(os.path.basename(os.path.normpath(args.hf)), args, actor,
                       os.path.abspath(args.hf), prompts, use_trl, root)


def main():
    if len(sys.argv) == 3 and sys.argv[1] in ("--jax-worker", "--trl-worker"):
        return (jax_worker if sys.argv[1] == "--jax-worker" else trl_worker)(sys.argv[2])
    args = parse_args()
    if args.iterations < 1 or args.warmup < 1:
        raise SystemExit("--iterations and --warmup must be >= 1")
    cores = bc.pin_cpu_threads(args.threads)  # before jax / torch are imported
    import torch

    torch.set_num_threads(args.threads)
    has_trl, trl_info = (False, "skipped (--no-trl)") if args.no_trl else bp.trl_available()
    out = {
        "command": "python " + " ".join(sys.argv),
        "setup": {"prompts_per_iteration": args.batch, "samples_per_prompt": args.k,
                  "completions_per_iteration": args.batch * args.k, "prompt": args.prompt,
                  "max_new_tokens": args.new, "stop_at_eos": True, "temperature": 1.0,
                  "epochs": 1, "minibatch": args.batch * args.k, "kl_loss_coef": KL_LOSS_COEF,
                  "kl_loss_estimator": "k3", "loss": "grpo (per-sequence mean)",
                  "jaxrlhf_share_prompt_forward": bool(args.share_prompt_forward),
                  "lr": 1e-6, "reward": REWARD_FN, "threads": args.threads,
                  "warmup_iterations": args.warmup, "timed_iterations": args.iterations,
                  "repeats": args.repeats,
                  "trl_torch_threads_tried": bp.trl_thread_counts(args) if has_trl else None,
                  "dtype": "float32",
                  "order": "per model: jaxrlhf, then TRL per thread count, each in a fresh "
                           "child process"},
        **bp.machine_and_versions(cores, has_trl, trl_info),
        "presets": [],
    }
    bp.note_trl_and_malloc(out, args, has_trl, trl_info, "trl.GRPOTrainer")
    if args.hf:
        out["setup"]["jaxrlhf_remat"] = args.remat or "full"
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as root:
        for name in ([None] if args.hf else args.presets.split(",")):
            res = bench_hf(args, has_trl, root) if args.hf else bench_preset(name, args,
                                                                             has_trl, root)
            out["presets"].append(res)
            out["machine"].setdefault("load_average_after", []).append(
                [res["preset"], list(os.getloadavg())])
    flags = [p["meets_target"] for p in out["presets"]]
    out["target"] = (f"ratio (TRL iteration time / jaxrlhf's) >= {TARGET_RATIO:g} and jaxrlhf "
                     "peak RSS <= TRL's, on every model")
    out["meets_target"] = None if None in flags else all(flags)
    name = "_".join(p["preset"] for p in out["presets"])
    path = bc.write_result(out, f"bench_grpo_{name}", args.out)
    print(f"[bench_grpo] wrote {path}", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
