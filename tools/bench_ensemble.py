"""Step time and memory of an M-member reward-model ensemble: one vmapped compiled step
(`jaxrlhf.trainers.rm_ensemble.ensemble_train_step`) against M separate models stepped one
after the other with the single-model step (what M separate runs do on one device).

  python tools/bench_ensemble.py --members 1,4,8 --preset tiny --batch 16 --seq 64
  python tools/bench_ensemble.py --members 1,4,8 --preset small --batch 32 --seq 256  # GPU

Prints one JSON object. Per M:
  vmapped / separate .step_s    best (minimum) wall time of one ensemble step (all M members
                                updated; separate = M single-model steps, each blocked on) over
                                --steps steps after 2 warm-up steps; .step_s_median the median.
                                The minimum is the robust number on a shared, loaded machine.
  .compile_s                    lower + compile time of the step function(s)
  .xla_bytes                    XLA's memory analysis of the compiled step: arguments, outputs,
                                temporaries, aliased (donated) bytes. `peak_estimate` =
                                arguments + outputs + temporaries − aliased for the vmapped
                                step; for separate runs M × state bytes (all M states stay
                                resident) + the single step's temporaries and batch.
  .device_peak_bytes            `memory_stats()["peak_bytes_in_use"]` after that variant ran
                                (GPU/TPU only; it is a high-water mark of the process, so the
                                variants run in increasing order of expected memory)
Data: random tokens, K = 2 responses, all positions real (the cost does not depend on content).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxrlhf.models import init_model, preset
from jaxrlhf.models.reward import stack_trees
from jaxrlhf.trainers import common, rm_ensemble, rm_steps


def _train_cfg():
    t = ml_collections.ConfigDict(dict(lr=1e-3, steps=1000, warmup_steps=10, min_lr_ratio=0.1,
                                       weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
                                       grad_clip=1.0))
    return t


def _batch(rng, b, m, k, t, vocab):
    tokens = rng.integers(3, vocab, size=(b, m, k, t)).astype(np.int32)
    ranks = np.broadcast_to(np.arange(k, dtype=np.int32), (b, m, k)).copy()
    return {"tokens": tokens, "attention_mask": np.ones_like(tokens),
            "ranks": ranks, "valid": np.ones((b, m, k), np.int32)}


def _xla_bytes(compiled):
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 — not every backend reports it
        return None
    if ma is None:
        return None
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0))
           for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _device_peak():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _tree_bytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def bench(m, args, cfg, optimizer, schedule):
    graphdef = nnx.graphdef(init_model(cfg, head="score", seed=0))
    params = [common.params_of(init_model(cfg, head="score", seed=s)) for s in range(m)]
    member_step = functools.partial(rm_steps.train_step, graphdef=graphdef, optimizer=optimizer,
                                    schedule=schedule, grad_accum=1, on_nonfinite="stop",
                                    loss_kw=dict(tie_mode="skip", margin=0.0,
                                                 label_smoothing=0.0))
    rng = np.random.default_rng(0)
    batches = [{k: jnp.asarray(v) for k, v in _batch(rng, args.batch, m, 2, args.seq,
                                                     cfg.vocab_size).items()}
               for _ in range(4)]
    out = {}

    # Separate: M states, one compiled single-model step, called M times per ensemble step.
    states = [{"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.copy, p),
               "opt_state": optimizer.init(p),
               "rng": jax.random.PRNGKey(s)} for s, p in enumerate(params)]
    one = jax.jit(member_step, donate_argnums=(0,))
    mb = {k: v[:, 0] for k, v in batches[0].items()}
    t0 = time.perf_counter()
    compiled_one = one.lower(states[0], mb).compile()
    compile_one = time.perf_counter() - t0
    slices = [[{k: v[:, i] for k, v in b.items()} for i in range(m)] for b in batches]
    times = []
    for it in range(args.steps + 2):
        t0 = time.perf_counter()
        for i in range(m):
            states[i], met = compiled_one(states[i], slices[it % len(batches)][i])
            jax.block_until_ready(met["loss"])
        if it >= 2:
            times.append(time.perf_counter() - t0)
    xb = _xla_bytes(compiled_one)
    state_bytes = _tree_bytes(states[0])
    sep = {"step_s": min(times), "step_s_median": statistics.median(times),
           "compile_s": compile_one, "xla_bytes": xb,
           "state_bytes_per_member": state_bytes,
           "device_peak_bytes": _device_peak()}
    if xb:
        sep["peak_estimate"] = (m - 1) * state_bytes + xb["peak_estimate"]
    out["separate"] = sep
    del states

    # Vmapped: one stacked state, one compiled ensemble step.
    stacked = stack_trees(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": stacked,
             "opt_state": jax.vmap(optimizer.init)(stacked),
             "rng": jnp.stack([jax.random.PRNGKey(s) for s in range(m)])}
    ens = jax.jit(functools.partial(rm_ensemble.ensemble_train_step, member_step=member_step),
                  donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = ens.lower(state, batches[0]).compile()
    compile_ens = time.perf_counter() - t0
    times = []
    for it in range(args.steps + 2):
        t0 = time.perf_counter()
        state, met = compiled(state, batches[it % len(batches)])
        jax.block_until_ready(met["loss"])
        if it >= 2:
            times.append(time.perf_counter() - t0)
    xb = _xla_bytes(compiled)
    out["vmapped"] = {"step_s": min(times), "step_s_median": statistics.median(times),
                      "compile_s": compile_ens,
                      "xla_bytes": xb, "peak_estimate": xb["peak_estimate"] if xb else None,
                      "device_peak_bytes": _device_peak()}
    out["speedup_vmapped_over_separate"] = out["separate"]["step_s"] / out["vmapped"]["step_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", default="1,4,8")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="prompts (pairs) per member per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    cfg = preset(args.preset)
    optimizer, schedule = common.make_optimizer(_train_cfg())
    n_params = _tree_bytes(common.params_of(init_model(cfg, head="score"))) // 4
    result = {"device": str(jax.devices()[0]), "platform": jax.default_backend(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "preset": args.preset, "params_per_member": n_params,
              "batch_pairs_per_member": args.batch, "seq": args.seq, "k": 2,
              "steps_timed": args.steps, "members": {}}
    for m in [int(x) for x in args.members.split(",")]:
        result["members"][str(m)] = bench(m, args, cfg, optimizer, schedule)
        print(f"M={m}: {json.dumps(result['members'][str(m)])}", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
