"""PPO iterations per second on CPU: jaxrlhf's PPO trainer against TRL 0.29's
`trl.experimental.ppo.PPOTrainer` (PyTorch, HF transformers), same random Llama weights.

    python tools/bench_ppo.py                            # tiny, small; 5 timed iterations, 3 rounds
    python tools/bench_ppo.py --presets tiny --iterations 2 --repeats 1   # quick smoke run
    pip install trl==0.29.0                              # optional: the TRL side
    python tools/bench_ppo.py --hf /tmp/smollm2          # a real model (prompt 64, 128 new
                                                         # tokens, 2 timed iterations, 1 round)

A real model (`--hf DIR`, any local HF Llama-family causal LM): actor and reference are the
checkpoint, reward model and critic its trunk with a fresh score head (exported like an RM
stage); both trainers use the checkpoint's own tokenizer; prompts are --prompt random
one-token words (exactly --prompt ids, no chat template: `data.chat_template = "raw"`);
jaxrlhf runs the pretrained-model recipe's full rematerialisation. Each side's peak RSS is
its worker process's (`peak_rss_gb`); target: ratio >= 2.5 and jaxrlhf's peak RSS <= TRL's;
the JSON is also written to experiments/benchmarks/bench_ppo_<name>.json.

Without TRL installed the jaxrlhf numbers are still measured and printed ("trl": null and a
note on how to install it).

Setup: both trainers pinned to the first `--threads` cores (`_bench_common.pin_cpu_threads`;
XLA's CPU client sizes its thread pool from that mask), fp32.
Torch threads: TRL runs once per count in `--trl-threads` (default 1 and --threads, each a
fresh trainer on the same weights) and the fastest run is reported (`trl.torch_threads`,
`trl_iter_s_median_by_threads`). The reason, as in `bench_generate.py`: when other processes
share the cores, OpenMP's spin-waiting can make 2-thread torch many times slower than
1-thread torch (4-40x measured here), which would flatter jaxrlhf; on an idle machine 2
threads win. A later thread count's run stops after its first iteration slower than 5x the
best median so far (it could not win; this bounds the run time). XLA's thread count is fixed
by the affinity mask at start-up, so jaxrlhf always runs on --threads threads; on a loaded
machine `--threads 1` compares one thread against one thread.

Models: `preset(name)` (vocab 259) with random weights: actor and reference = one LM-head model,
reward model and critic = one score-head model (the critic starts from the reward model, as
both trainers do by default). The HF models get the same weights
(`_bench_common.to_hf_llama`, `_bench_model_common.to_hf_llama_rm`; HF's score layer has no
bias, jaxrlhf's score_b is 0 at init). Batch 8 prompts of exactly 32 real tokens (random
lowercase letters, the same pool for both), exactly 64 sampled response tokens at
temperature 1 (no top-k / top-p), 1 PPO epoch, one minibatch of 8, k1 KL penalty
(coefficient 0.05), GAE (gamma 1, lambda 0.95), advantage whitening, one actor + critic
update (AdamW).

One PPO iteration = generate -> scoring pass (actor log-probs, reference log-probs, values,
reward) -> KL-penalised rewards -> GAE -> whitening -> one actor+critic update, plus what each
trainer's loop does around it every iteration (metrics read back to the host, KL controller
update, TRL's gc.collect / logging callbacks). The two trainers do not do identical work:
TRL takes the actor's old log-probs from the scores `generate` returns (no actor forward in
its scoring pass: reference, value and reward forwards, then the update's actor and value
forward + backward), while jaxrlhf, with one minibatch, fuses its scoring pass with the
update (`ppo.fused_first_update`): reference and reward forwards, then one actor and critic
forward + backward whose forward outputs are pi_old (exactly the sampling distribution, ratio
exactly 1) and the old values -- one forward fewer than TRL per iteration; every jaxrlhf
model runs its last layer only at the positions read (response positions; the reward
model's last token: `Transformer.hidden(select=...)`), TRL's at all positions; jaxrlhf
clips the global gradient norm at 1.0 and TRL's PPO loop does not clip; jaxrlhf's AdamW is
optax with separate actor / critic learning rates, TRL's is torch AdamW over both models.

jaxrlhf: the real trainer, `jaxrlhf.trainers.ppo.run(config, stage_dir)` -- the code behind
`python -m jaxrlhf.train --config configs/ppo.py` -- on a config built from
`base_config("ppo")`, with stage directories written to a temp dir by the library's own
`export_stage_model` (an SFT export for actor/reference, an RM export for reward/critic,
byte tokenizer) and a prompt JSONL file (format "prompt", bucket 32). ppo.iterations =
--warmup + --iterations, rollout_batch = minibatch_size = 8, ppo_epochs = 1,
max_new_tokens = 64, missing_eos_penalty = 0, no evaluation, no samples, no intermediate
checkpoints (the final checkpoint, HF export and plots come after the last timed iteration).
Two things are patched for the measurement only:
  * `jaxrlhf.rollout.generate` is wrapped: it is called with eos_id=-1 (an id never sampled, so every
    response has exactly 64 tokens; the byte tokenizer's EOS 258 is in the vocabulary) and
    timed up to `block_until_ready` (the trainer itself blocks on the result right after);
  * `jaxrlhf.trainers.common.MetricsLogger` gets tensorboard off and records a timestamp in
    `advance()`, which the loop calls once per iteration (after it dispatched the iteration;
    the previous iteration's metrics are read back to the host in it).
Iteration k's wall time = advance(k) - advance(k-1); the first iteration runs from the start
of its generate call to its advance (it includes every compilation).

jaxrlhf's trainer runs in a fresh child process per preset (`--jax-worker`, same cores): run in
one process after tiny, small's iteration was ~6% slower (measured), and every TRL run gets a
fresh process too.
TRL runs in a child process of this script (`--trl-worker`, pinned to the same cores), which
imports torch / transformers / trl but not jax (it does import `_bench_common`, so any
process-wide set-up that module applies holds on both sides). Why a separate process: TRL calls
`gc.collect()` twice per iteration, and a full collection's cost grows with every live Python
object in the process (~0.3 s here with torch + transformers + trl loaded, more with jax and
flax as well), so a shared process would charge TRL for jaxrlhf's objects. The parent saves the
HF models (`save_pretrained`) for it; the child checks that the loaded policy reproduces the
parent's logits (check_trl_loaded_max_logit_diff). For each torch thread count the child builds
`PPOTrainer(args=PPOConfig(...), processing_class=tok, model=policy, ref_model=ref,
reward_model=rm, value_model=critic, train_dataset=prompt token ids)`, driven by `train()` with
total_episodes = 8 * (--warmup + --iterations). PPOConfig: per_device_train_batch_size 8,
gradient_accumulation_steps 1, num_mini_batches 1, num_ppo_epochs 1,
local_rollout_forward_batch_size 8, response_length 64, temperature 1.0, kl_coef 0.05,
kl_estimator k1, stop_token / stop_token_id None, missing_eos_penalty None,
num_sample_generations 0, use_cpu, bf16 / fp16 off, report_to none, save_strategy no,
logging_steps 1, disable_tqdm. The tokenizer is a local `PreTrainedTokenizerFast` over a
WordLevel vocabulary (bytes 0..255, 256 pad, 257 bos, 258 eos of the byte tokenizer, and a TRL
pad token with id 259 outside the model vocabulary, so a sampled token is never mistaken for
padding: TRL finds padding by `token == pad_token_id`). TRL's generation config has no EOS
(stop_token_id None); the wrapped `batch_generation` additionally sets min_new_tokens = 64,
checks that 64 tokens came back, and is timed. A `TrainerCallback` records `on_train_begin` and
every `on_step_end` (called once per iteration after the update and the metrics' `.item()`
reads); iteration k = step_end(k) - step_end(k-1), the first from train_begin.
gc_collect_share: TRL's gc.collect() calls (timed through a wrapper) over the timed iterations.

Timing: the first --warmup iterations of each trainer are excluded; the median of the next
--iterations is reported (iter_per_s = 1 / median). compile_s (jaxrlhf) = first iteration -
median warm iteration. generation_share = sum of the timed iterations' generate calls / sum of
the timed iterations. cpu_iter_s_median: the same medians as process CPU time / threads, a
load-robust cross-check (spinning threads count as CPU time); cpu_ratio compares those.
jaxrlhf runs first, then TRL; they cannot be interleaved (each trainer owns its loop), so
load from other processes may hit them differently: see machine.load_average_*.

Checks: max_logit_diff (actor logits, jaxrlhf vs the HF policy, on 8 prompts) and
max_score_diff (reward model scores) show both sides hold the same weights.

Prints one JSON object: command, setup, machine (cores, matmul rate, load), versions (jax,
flax, torch, transformers, trl), presets [{preset, params, jax {...}, trl {...} or null
(the fastest thread count), trl_iter_s_median_by_threads, ratio (jax iter/s over TRL
iter/s), cpu_ratio, meets_target (ratio >= 3), check {...}}], meets_target (every preset;
null without TRL), and trl_note / trl_error when TRL could not run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

# The toy presets were measured with the opt-in glibc malloc tuning (see
# jaxrlhf/_host_malloc.py); set before jaxrlhf is imported. Export
# JAXRLHF_HOST_MALLOC=default to measure without it.
# A real model (--hf) runs with the allocator the CLI uses (glibc with transparent huge
# pages, `_bench_common.side_env`) unless exported; TRL with glibc's defaults.
REAL_MODEL_MALLOC = os.environ.get("JAXRLHF_HOST_MALLOC", "hugepages")
os.environ.setdefault("JAXRLHF_HOST_MALLOC", "reuse")

import _bench_common as bc  # noqa: E402

TRL_VERSION = "0.29.0"
TRL_INSTALL = f"pip install trl=={TRL_VERSION}"
TARGET_RATIO = 3.0


def add_trainer_bench_args(ap, *, what: str, batch: int, new: int, batch_help: str = ""):
    """The options bench_ppo.py and bench_grpo.py share (presets, timing, threads, shapes,
    the TRL side, --hf, --out)."""
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--iterations", type=int, default=5, help=f"timed {what} iterations")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first iterations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=batch, help=batch_help or None)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=new, help="max new tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-threads", default=None,
                    help="torch thread counts to run TRL with, comma-separated; the fastest "
                         "is reported (default: 1 and --threads)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds of (jaxrlhf, TRL) per preset; each side's fastest is reported")
    ap.add_argument("--hf", default="", help="a local HF causal-LM dir: real-model mode")
    ap.add_argument("--remat", default=None,
                    help="--hf: jaxrlhf's model.remat (default: the pretrained-model recipe's)")
    ap.add_argument("--out", default="", help="where to write the JSON")


def real_model_defaults(args, defaults):
    """--hf: (flag, value) defaults applied unless the flag was given."""
    if args.hf:
        given = " ".join(sys.argv)
        for flag, value in defaults:
            if flag not in given:
                setattr(args, flag[2:], value)
    return args


def machine_and_versions(cores, has_trl: bool, trl_info) -> dict:
    """The "machine" and "versions" blocks of a trainer benchmark's JSON (call after
    pin_cpu_threads: imports jax and torch)."""
    import flax
    import jax
    import torch
    import transformers
    return {"machine": {"cores": cores, "cpu": bc.cpu_name(),
                        "matmul_gflops": round(bc.matmul_gflops(), 1),
                        "load_average_at_start": list(os.getloadavg())},
            "versions": {"jax": jax.__version__, "flax": flax.__version__,
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl_info if has_trl else None}}


def note_trl_and_malloc(out: dict, args, has_trl: bool, trl_info, trainer: str) -> None:
    """Says in `out` why TRL was not measured; with --hf, sets the real-model allocator that
    both workers inherit."""
    if not has_trl:
        out["trl_note"] = (f"TRL not measured ({trl_info}). Install it with `{TRL_INSTALL}` "
                           f"to compare against {trainer}.")
    if args.hf:
        os.environ["JAXRLHF_HOST_MALLOC"] = REAL_MODEL_MALLOC
        out["setup"]["jaxrlhf_host_malloc"] = bc.allocator_note(jax_env())
        out["setup"]["trl_host_malloc"] = bc.allocator_note(trl_env())


def jax_env() -> dict:
    """Environment of a jaxrlhf worker: the allocator JAXRLHF_HOST_MALLOC names."""
    return bc.side_env(os.environ, "jax", os.environ.get("JAXRLHF_HOST_MALLOC", "default"))


def trl_env() -> dict:
    """Environment of a TRL worker (glibc as a plain python starts; `bc.side_env`)."""
    return dict(bc.side_env(os.environ, "competitor"), TRL_EXPERIMENTAL_SILENCE="1")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_trainer_bench_args(ap, what="PPO", batch=8, new=64)
    ap.add_argument("--lora", type=int, default=0,
                    help="also run jaxrlhf with adapters of this rank (config.lora.rank) on "
                         "the actor and critic, in its own process each round")
    return real_model_defaults(ap.parse_args(), (("--new", 128), ("--prompt", 64),
                                                 ("--iterations", 2), ("--repeats", 1)))


def _peak_rss_gb() -> float:
    """This process's own peak RSS in GiB: VmHWM of /proc/self/status, the high-water mark of
    the address space it got at exec. Not ru_maxrss: Linux carries the parent's peak RSS over
    fork + exec into a child's ru_maxrss, so a worker of a parent that imported jax and torch
    and held a model reports at least the parent's RSS (a child of a 0.8 GB parent reported
    0.79 GB, its VmHWM 0.01 GB). Falls back to ru_maxrss without /proc."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
    return round(kib / 2 ** 20, 3)


def _median(xs):
    return float(statistics.median(xs))


def _summary(its, cpus, gens, args, threads):
    """Per-iteration wall / CPU / generate times -> the reported numbers (warm-up excluded)."""
    w = args.warmup
    t_it, t_cpu, t_gen = its[w:], cpus[w:], gens[w:]
    med = _median(t_it)
    out = {
        "iter_per_s": round(1.0 / med, 3),
        "iter_s_median": round(med, 4),
        "iter_s": [round(x, 4) for x in t_it],
        "warmup_iter_s": [round(x, 4) for x in its[:w]],
        "cpu_iter_s_median": round(_median(t_cpu) / threads, 4),
        "generate_s_median": round(_median(t_gen), 4),
        "generation_share": round(sum(t_gen) / sum(t_it), 3),
    }
    return out


# ------------------------------------------------------------------------------------------
# Shared set-up: models, prompts.

def make_prompts(args, rng, n_rows=64):
    """n_rows random lowercase strings of exactly `args.prompt` characters (= byte tokens)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(list(letters), args.prompt)) for _ in range(n_rows)]


def make_word_prompts(args, rng, tok, n_rows=64):
    """n_rows prompts of exactly `args.prompt` tokens of a real tokenizer: words that are one
    token each (with a leading space), drawn at random."""
    words = [w for w in (" the", " a", " cat", " dog", " house", " tree", " water", " sun",
                         " red", " blue", " green", " small", " big", " old", " new", " day",
                         " night", " road", " book", " city", " river", " stone", " bird")
             if len(tok.encode(w)) == 1]
    prompts = ["".join(rng.choice(words, args.prompt)) for _ in range(n_rows)]
    for p in prompts:
        assert len(tok.encode(p)) == args.prompt, p
    return prompts


def export_stages(root, actor, rm, tokenizer_spec="byte"):
    """SFT and RM stage directories (HF export + tokenizer record), as PPO reads them."""
    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.trainers.common import export_stage_model

    tok = load_tokenizer(tokenizer_spec)
    dirs = {}
    for name, model in (("sft", actor), ("rm", rm)):
        d = os.path.join(root, name)
        export_stage_model(model, os.path.join(d, "hf"), tokenizer=tok,
                           tokenizer_spec_=tokenizer_spec, stage=name)
        dirs[name] = d
    return dirs


# ------------------------------------------------------------------------------------------
# jaxrlhf.

def jax_config(args, dirs, prompts_path):
    from jaxrlhf.config import base_config

    c = base_config("ppo")
    c.seed = args.seed
    c.tokenizer = "auto" if args.hf else "byte"
    c.data.path = prompts_path
    c.data.format = "prompt"
    c.data.chat_template = "raw"   # the prompt ids are the text's ids, as TRL gets them
    if args.hf:   # the pretrained-model recipe's (configs/ppo.py:data=hh) unless --remat
        c.model.remat = getattr(args, "remat", None) or "full"
    c.lora.rank = int(getattr(args, "lora_rank", 0))
    c.data.buckets = (args.prompt,)
    c.data.max_len = args.prompt
    c.data.max_prompt_len = args.prompt
    c.train.log_every = 10 ** 9
    c.train.save_every = 0
    c.train.eval_every = 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    p = c.ppo
    p.actor_init, p.reward_init = dirs["sft"], dirs["rm"]
    p.iterations = args.warmup + args.iterations
    p.rollout_batch = args.batch
    p.minibatch_size = args.batch
    p.ppo_epochs = 1
    p.max_new_tokens = args.new
    p.temperature, p.top_k, p.top_p = 1.0, 0, 1.0
    p.kl_coef = 0.05
    p.kl_estimator = "k1"
    p.missing_eos_penalty = 0.0   # as TRL's missing_eos_penalty=None (no response ends)
    p.sample_every = 0
    p.gold_reward = False
    p.eval_prompts = 0
    return c


def run_jax(args, dirs, prompts_path, stage_dir):
    import jax

    from jaxrlhf import rollout
    from jaxrlhf.trainers import common
    from jaxrlhf.trainers import ppo as ppo_mod

    gen_calls, marks = [], []
    orig_generate, orig_logger = rollout.generate, common.MetricsLogger
    steps = []

    def timed_generate(*a, **kw):
        kw["eos_id"] = -1  # never sampled: every response has exactly max_new_tokens tokens
        t0, c0 = time.perf_counter(), time.process_time()
        res = orig_generate(*a, **kw)
        jax.block_until_ready(res.tokens)
        gen_calls.append((t0, c0, time.perf_counter()))
        steps.append(res.num_steps)
        return res

    class TimedLogger(orig_logger):
        def __init__(self, *a, **kw):
            kw["tensorboard"] = False
            super().__init__(*a, **kw)

        def advance(self, n: int = 1) -> None:
            marks.append((time.perf_counter(), time.process_time()))
            super().advance(n)

    cfg = jax_config(args, dirs, prompts_path)
    rollout.generate, common.MetricsLogger = timed_generate, TimedLogger
    prev_env = os.environ.get("JAXRLHF_NO_PROGRESS")
    os.environ["JAXRLHF_NO_PROGRESS"] = "1"
    t_call = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            ppo_mod.run(cfg, stage_dir)
    finally:
        rollout.generate, common.MetricsLogger = orig_generate, orig_logger
        if prev_env is None:
            os.environ.pop("JAXRLHF_NO_PROGRESS", None)
        else:
            os.environ["JAXRLHF_NO_PROGRESS"] = prev_env
    n_it = args.warmup + args.iterations
    if len(gen_calls) != n_it or len(marks) != n_it:
        raise RuntimeError(f"expected {n_it} generate calls and iterations, got "
                           f"{len(gen_calls)} and {len(marks)}")
    if any(int(s) != args.new for s in steps):
        raise RuntimeError(f"a rollout stopped early: num_steps {[int(s) for s in steps]}")
    starts = [(gen_calls[0][0], gen_calls[0][1])] + marks[:-1]
    its = [m[0] - s[0] for m, s in zip(marks, starts)]
    cpus = [m[1] - s[1] for m, s in zip(marks, starts)]
    gens = [g[2] - g[0] for g in gen_calls]
    out = _summary(its, cpus, gens, args, args.threads)
    out["first_iter_s"] = round(its[0], 3)
    out["compile_s"] = round(its[0] - out["iter_s_median"], 2)
    out["first_generate_s"] = round(gens[0], 3)
    out["setup_s"] = round(gen_calls[0][0] - t_call, 2)
    return out


# ------------------------------------------------------------------------------------------
# TRL.

def trl_tokenizer():
    """A local fast tokenizer: bytes 0..255 as <0xNN>, 256 <pad_byte>, 257 <bos>, 258 <eos>
    (the byte tokenizer's ids) and <pad> = 259, outside the model's 259-token vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab.update({"<pad_byte>": 256, "<bos>": 257, "<eos>": 258, "<pad>": 259, "<unk>": 260})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", padding_side="left")


def save_hf_models(actor, rm, out_dir):
    """The HF policy (LlamaForCausalLM) and reward model (LlamaForSequenceClassification) with
    the jaxrlhf weights, saved for the TRL worker process. Returns their directories."""
    import _bench_model_common as bmc

    dirs = {"policy": os.path.join(out_dir, "hf_policy"), "rm": os.path.join(out_dir, "hf_rm")}
    bc.to_hf_llama(actor).save_pretrained(dirs["policy"])
    bmc.to_hf_llama_rm(rm).save_pretrained(dirs["rm"])
    return dirs


class _TooSlow(Exception):
    pass



def iteration_timer(callback_cls, marks: list, abort_s):
    """A TrainerCallback (`callback_cls` is transformers' class, imported by the worker) that
    appends (wall, CPU) seconds to `marks` at on_train_begin and every on_step_end, and raises
    `_TooSlow` after an iteration longer than `abort_s` (None: never)."""
    class Timer(callback_cls):
        def on_train_begin(self, *a, **kw):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **kw):
            marks.append((time.perf_counter(), time.process_time()))
            dt = marks[-1][0] - marks[-2][0]
            if abort_s is not None and dt > abort_s:
                raise _TooSlow(f"stopped after an iteration of {dt:.2f} s (> {abort_s:.2f} s, "
                               "5x the fastest median of a previous thread count)")

    return Timer()

def run_trl(args, hf_dirs, prompt_ids, out_dir, threads, abort_s=None):
    """One TRL PPOTrainer.train() run with `threads` torch threads (in the worker process).
    With `abort_s`, the run stops after the first iteration that takes longer (returns
    {"aborted": reason, "iter_s": [...]})."""
    import gc as gc_module
    import types

    import torch
    from datasets import Dataset
    from transformers import (LlamaForCausalLM, LlamaForSequenceClassification,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    load = dict(dtype=torch.float32, local_files_only=True)
    policy = LlamaForCausalLM.from_pretrained(hf_dirs["policy"], **load)
    ref = LlamaForCausalLM.from_pretrained(hf_dirs["policy"], **load).eval()
    reward = LlamaForSequenceClassification.from_pretrained(hf_dirs["rm"], **load).eval()
    value = LlamaForSequenceClassification.from_pretrained(hf_dirs["rm"], **load)
    if getattr(args, "hf", ""):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.hf, padding_side="left")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    else:
        tok = trl_tokenizer()
    ds = Dataset.from_dict({"input_ids": [list(map(int, r)) for r in prompt_ids]})
    n_it = args.warmup + args.iterations
    config = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=1, local_rollout_forward_batch_size=args.batch,
        total_episodes=args.batch * n_it, response_length=args.new, temperature=1.0,
        kl_coef=0.05, kl_estimator="k1", stop_token=None, stop_token_id=None,
        missing_eos_penalty=None, num_sample_generations=0, dataloader_num_workers=0)

    gen_calls, gc_calls, marks = [], [], []
    orig_batch_generation, orig_gc = trl_ppo.batch_generation, trl_ppo.gc
    width = args.prompt + args.new

    def timed_batch_generation(model, queries, fwd_bs, pad_id, generation_config):
        generation_config.min_new_tokens = args.new
        t0 = time.perf_counter()
        out = orig_batch_generation(model, queries, fwd_bs, pad_id, generation_config)
        gen_calls.append(time.perf_counter() - t0)
        if out[0].shape[1] != width:
            raise RuntimeError(f"TRL generated {out[0].shape[1] - args.prompt} tokens, "
                               f"not {args.new}")
        return out

    def timed_collect(*a, **kw):
        t0 = time.perf_counter()
        r = gc_module.collect(*a, **kw)
        gc_calls.append((len(marks), time.perf_counter() - t0))
        return r

    t_setup = time.perf_counter()
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, train_dataset=ds, value_model=value,
                         callbacks=[iteration_timer(TrainerCallback, marks, abort_s)])
    setup_s = time.perf_counter() - t_setup
    trl_ppo.batch_generation = timed_batch_generation
    trl_ppo.gc = types.SimpleNamespace(collect=timed_collect)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            trainer.train()
    except _TooSlow as e:
        return {"aborted": str(e), "torch_threads": threads, "iter_s_median": None,
                "iter_s": [round(b[0] - a[0], 4) for a, b in zip(marks, marks[1:])]}
    finally:
        trl_ppo.batch_generation, trl_ppo.gc = orig_batch_generation, orig_gc
    if len(marks) != n_it + 1 or len(gen_calls) != n_it:
        raise RuntimeError(f"TRL ran {len(marks) - 1} iterations / {len(gen_calls)} "
                           f"generations, expected {n_it}")
    its = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out = _summary(its, cpus, gen_calls, args, threads)
    # gc.collect() (TRL calls it in the scoring phase and after each step): a call made
    # while len(marks) == i + 1 falls in iteration i (0-based); timed iterations only.
    gc_s = sum(dt for k, dt in gc_calls if args.warmup <= k - 1 < n_it)
    out["gc_collect_share"] = round(gc_s / sum(its[args.warmup:]), 3)
    out["first_iter_s"] = round(its[0], 3)
    out["setup_s"] = round(setup_s, 2)
    out["torch_threads"] = threads
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    out["optimizer"] = type(opt).__name__
    return out


def trl_worker(spec_path):
    """`--trl-worker SPEC`: runs TRL for each thread count in a process without jax (so
    TRL's per-iteration gc.collect() scans only what a TRL run has) and prints JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    args = argparse.Namespace(**spec["args"])
    bc.pin_cpu_threads(args.threads)
    try:
        import numpy as np
        import torch
        import trl
        from transformers import LlamaForCausalLM
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
    except Exception as e:  # not installed, or a version without trl.experimental.ppo
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return

    # The saved policy must reproduce the jaxrlhf actor's logits (same-weights check).
    prompts = torch.tensor(spec["prompt_ids"][:args.batch], dtype=torch.long)
    policy = LlamaForCausalLM.from_pretrained(spec["hf_dirs"]["policy"], local_files_only=True)
    with torch.no_grad():
        logits = policy(input_ids=prompts).logits.numpy()
    expected = np.load(spec["expected_logits"])
    runs = {}
    for t in spec["threads"]:  # later thread counts stop early when 5x slower (see above)
        done = [r["iter_s_median"] for r in runs.values() if r["iter_s_median"] is not None]
        runs[str(t)] = run_trl(args, spec["hf_dirs"], spec["prompt_ids"],
                               os.path.join(spec["out_dir"], f"trl{t}"), t,
                               abort_s=5 * min(done) if done else None)
    print(json.dumps({"runs": runs, "trl_version": trl.__version__, "peak_rss_gb": _peak_rss_gb(),
                      "loaded_policy_max_logit_diff": float(np.abs(logits - expected).max())}))


def jax_worker(spec_path):
    """`--jax-worker SPEC`: `run_jax` in a fresh process; prints its JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    args = argparse.Namespace(**spec["args"])
    bc.pin_cpu_threads(args.threads)
    out = run_jax(args, spec["dirs"], spec["prompts_path"], spec["stage_dir"])
    out["peak_rss_gb"] = _peak_rss_gb()
    print(json.dumps(out))


def _run_worker(flag, spec, spec_path, env=None):
    """Runs this script as `flag SPEC_PATH` in a child process (it inherits the CPU affinity)
    with `spec` written to spec_path: (JSON of its last stdout line or None, exit code)."""
    import subprocess

    with open(spec_path, "w") as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), flag, spec_path],
                          stdout=subprocess.PIPE, env=env, text=True)
    if proc.returncode != 0:
        return None, proc.returncode
    return json.loads(proc.stdout.strip().splitlines()[-1]), 0


def run_jax_subprocess(args, dirs, prompts_path, stage_dir):
    """jaxrlhf's trainer in a child process pinned to the same cores, so every preset starts
    from a fresh process, as each TRL run does (measured here: small's iteration is ~6%
    slower when it runs after tiny in one process)."""
    spec = {"args": vars(args), "dirs": dirs, "prompts_path": prompts_path,
            "stage_dir": stage_dir}
    out, rc = _run_worker("--jax-worker", spec, stage_dir + "_jax_spec.json", env=jax_env())
    if rc:
        raise RuntimeError(f"jaxrlhf worker failed (exit {rc}); see stderr")
    return out


def run_trl_subprocess(args, actor, rm, prompt_ids, work):
    """TRL in a child process (pinned to the same cores): (result dict or None, error)."""
    import numpy as np
    import torch

    hf_dirs = save_hf_models(actor, rm, work)
    hf = bc.to_hf_llama(actor)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(prompt_ids[:args.batch])).logits.numpy()
    np.save(os.path.join(work, "expected_logits.npy"), logits)
    spec = {"args": {k: getattr(args, k) for k in ("warmup", "iterations", "threads", "batch",
                                                   "prompt", "new", "seed", "hf")},
            "hf_dirs": hf_dirs, "prompt_ids": np.asarray(prompt_ids).tolist(),
            "threads": trl_thread_counts(args), "out_dir": work,
            "expected_logits": os.path.join(work, "expected_logits.npy")}
    out, rc = _run_worker("--trl-worker", spec, os.path.join(work, "trl_spec.json"),
                          env=trl_env())
    if rc:
        return None, f"TRL worker failed (exit {rc}); see stderr"
    return out, None


def trl_thread_counts(args):
    if args.trl_threads:
        return [int(t) for t in args.trl_threads.split(",")]
    return sorted({1, args.threads})


def trl_available():
    """(installed, version or reason); trl itself is imported only by the worker process."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return False, "ImportError: No module named 'trl'"
    return True, importlib.metadata.version("trl")


# ------------------------------------------------------------------------------------------

def same_weights_check(actor, rm, prompt_ids):
    """(max |logit diff|, max |score diff|) between jaxrlhf and the HF conversions."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    import _bench_model_common as bmc

    tokens = np.asarray(prompt_ids, np.int32)
    mask = np.ones_like(tokens)
    hf, hf_rm = bc.to_hf_llama(actor), bmc.to_hf_llama_rm(rm)
    with torch.no_grad():
        t = torch.tensor(tokens, dtype=torch.long)
        logits_h = hf(input_ids=t).logits.numpy()
        score_h = hf_rm(input_ids=t).logits[:, 0].numpy()
    logits_j = np.asarray(actor(jnp.asarray(tokens), jnp.asarray(mask)))
    score_j = np.asarray(rm(jnp.asarray(tokens), jnp.asarray(mask)))[:, -1]
    return (float(np.abs(logits_j - logits_h).max()),
            float(np.abs(score_j - score_h).max()))


def bench_preset(name, args, use_trl, root):
    import numpy as np

    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.models.config import preset
    from jaxrlhf.models.transformer import init_model

    cfg = preset(name)
    actor = init_model(cfg, head="lm", seed=args.seed)
    rm = init_model(cfg, head="score", seed=args.seed + 1)
    work = os.path.join(root, name)
    dirs = export_stages(work, actor, rm)
    rng = np.random.default_rng(args.seed)
    prompts = make_prompts(args, rng)
    prompts_path = os.path.join(work, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    byte_tok = load_tokenizer("byte")
    prompt_ids = np.array([byte_tok.encode(p) for p in prompts], np.int64)
    assert prompt_ids.shape == (len(prompts), args.prompt)

    res = {"preset": name, "params": cfg.num_params()}
    return run_rounds(res, args, use_trl, actor, rm, dirs, prompts_path, prompt_ids, work)


def bench_hf_model(args, use_trl, root):
    """The real model in `args.hf`: actor and reference from it, reward model and critic = the
    same trunk with a fresh score head (exported like an RM stage); its own tokenizer; prompts
    of exactly --prompt one-token words."""
    import numpy as np

    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.models import load_hf

    actor = load_hf(args.hf, head="lm")
    rm = load_hf(args.hf, head="score")
    work = os.path.join(root, "hf")
    dirs = export_stages(work, actor, rm, tokenizer_spec=os.path.abspath(args.hf))
    tok = load_tokenizer(args.hf)
    prompts = make_word_prompts(args, np.random.default_rng(args.seed), tok)
    prompts_path = os.path.join(work, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    prompt_ids = np.array([tok.encode(p) for p in prompts], np.int64)
    res = {"preset": os.path.basename(os.path.normpath(args.hf)),
           "params": actor.cfg.num_params()}
    return run_rounds(res, args, use_trl, actor, rm, dirs, prompts_path, prompt_ids, work)


def run_rounds(res, args, use_trl, actor, rm, dirs, prompts_path, prompt_ids, work):
    """--repeats rounds of (jaxrlhf, TRL), each in fresh processes; fills `res`."""
    logit_diff, score_diff = same_weights_check(actor, rm, prompt_ids[:args.batch])
    res["trl"] = None
    # --repeats rounds alternate the two sides; each side reports its fastest round (the VM's
    # speed drifts by up to 2x over minutes, so one round can land in a slow patch).
    jax_rounds, trl_rounds, lora_rounds = [], [], []
    for r in range(args.repeats):
        jax_rounds.append(run_jax_subprocess(args, dirs, prompts_path,
                                             os.path.join(work, f"ppo{r}")))
        if getattr(args, "lora", 0):
            lora_args = argparse.Namespace(**dict(vars(args), lora_rank=args.lora))
            lora_rounds.append(run_jax_subprocess(lora_args, dirs, prompts_path,
                                                  os.path.join(work, f"ppo_lora{r}")))
        if not use_trl:
            continue
        worker, err = run_trl_subprocess(args, actor, rm, prompt_ids, work)
        if err or "error" in worker:
            res["trl_error"] = err or worker["error"]
            use_trl = False
            continue
        runs = worker["runs"]
        best = min((t for t in runs if runs[t]["iter_s_median"] is not None),
                   key=lambda t: runs[t]["iter_s_median"])
        trl_rounds.append(dict(runs[best], iter_s_median_by_threads={
            t: r["iter_s_median"] if r["iter_s_median"] is not None else r["aborted"]
            for t, r in runs.items()}))
        res["check_trl_loaded_max_logit_diff"] = worker["loaded_policy_max_logit_diff"]
        res.setdefault("trl_peak_rss_gb_by_round", []).append(worker["peak_rss_gb"])
    res["jax"] = min(jax_rounds, key=lambda x: x["iter_s_median"])
    res["jax_iter_s_median_by_round"] = [x["iter_s_median"] for x in jax_rounds]
    res["peak_rss_gb"] = {"jax": max(x["peak_rss_gb"] for x in jax_rounds),
                          "trl": max(res.get("trl_peak_rss_gb_by_round") or [0]) or None}
    if lora_rounds:   # adapters on a frozen base vs full fine-tuning, both jaxrlhf
        best = min(lora_rounds, key=lambda x: x["iter_s_median"])
        res["jax_lora"] = dict(best, rank=args.lora)
        res["peak_rss_gb"]["jax_lora"] = max(x["peak_rss_gb"] for x in lora_rounds)
        res["lora_vs_full"] = {
            "peak_rss_fraction": round(res["peak_rss_gb"]["jax_lora"]
                                       / res["peak_rss_gb"]["jax"], 3),
            "iter_time_fraction": round(best["iter_s_median"]
                                        / res["jax"]["iter_s_median"], 3)}
    if trl_rounds:
        res["trl"] = min(trl_rounds, key=lambda x: x["iter_s_median"])
        res["trl_iter_s_median_by_threads"] = res["trl"].pop("iter_s_median_by_threads")
        res["trl_iter_s_median_by_round"] = [x["iter_s_median"] for x in trl_rounds]
    if res["trl"] is not None:
        ratio = res["trl"]["iter_s_median"] / res["jax"]["iter_s_median"]
        res["ratio"] = round(ratio, 2)
        res["cpu_ratio"] = round(res["trl"]["cpu_iter_s_median"]
                                 / res["jax"]["cpu_iter_s_median"], 2)
        res["meets_target"] = bool(ratio >= TARGET_RATIO)
    else:
        res["ratio"] = res["cpu_ratio"] = res["meets_target"] = None
    res["check"] = {"max_logit_diff": logit_diff, "max_score_diff": score_diff,
                    "response_tokens": args.new}
    return res


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--jax-worker":
        return jax_worker(sys.argv[2])
    args = parse_args()
    if args.iterations < 1 or args.warmup < 1:
        raise SystemExit("--iterations and --warmup must be >= 1")
    cores = bc.pin_cpu_threads(args.threads)  # before jax / torch are imported
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    has_trl, trl_info = (False, "skipped (--no-trl)") if args.no_trl else trl_available()
    out = {
        "command": "python " + " ".join(sys.argv),
        "setup": {"batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
                  "ppo_epochs": 1, "minibatch": args.batch, "temperature": 1.0,
                  "kl_coef": 0.05, "kl_estimator": "k1", "threads": args.threads,
                  "warmup_iterations": args.warmup, "timed_iterations": args.iterations,
                  "repeats": args.repeats,
                  "trl_torch_threads_tried": trl_thread_counts(args) if has_trl else None,
                  "dtype": "float32",
                  "order": "per preset: jaxrlhf, then TRL, each in a fresh child process"},
        **machine_and_versions(cores, has_trl, trl_info),
        "presets": [],
    }
    note_trl_and_malloc(out, args, has_trl, trl_info, "trl.experimental.ppo.PPOTrainer")
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as root:
        if args.hf:
            out["presets"].append(bench_hf_model(args, has_trl, root))
        for name in ([] if args.hf else args.presets.split(",")):
            out["presets"].append(bench_preset(name, args, has_trl, root))
            out["machine"].setdefault("load_average_after", []).append(
                [name, list(os.getloadavg())])
    flags = [p["meets_target"] for p in out["presets"]]
    out["target"] = f"ratio (jaxrlhf iter/s / TRL iter/s) >= {TARGET_RATIO:g} on every preset"
    out["meets_target"] = None if None in flags else all(flags)
    if args.hf:
        out["target"] = "ratio >= 2.5 and jaxrlhf peak RSS <= TRL's"
        p = out["presets"][0]
        rss = p["peak_rss_gb"]
        p["meets_target"] = (None if p["ratio"] is None else
                             bool(p["ratio"] >= 2.5 and rss["trl"] and rss["jax"] <= rss["trl"]))
        out["meets_target"] = p["meets_target"]
        bc.write_result(out, f"bench_ppo_{p['preset']}", args.out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
