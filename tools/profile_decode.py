"""Where a decode step's time goes: jaxrlhf `generate` under the JAX profiler, one JSON.

    python tools/profile_decode.py --hf /tmp/smollm2                # batch 8, prompt 64, 128 new
    python tools/profile_decode.py --hf DIR --batch 1 --new 64

Runs `generate` (sampling at temperature 1, no stop id, exactly --new tokens) once to compile,
times it warm (and with one new token, for the decode step = (t(new) - t(1)) / (new - 1)),
then once more under `jax.profiler` with XLA's optimized HLO dumped for this process. Each
XLA CPU op executed exactly new - 1 times is one op of the decode loop's body; the ops are
grouped by kind and output shape, with their operands' shapes from the HLO, and summed per
step. For a matmul-like op (the largest operand a weight) it prints that operand's bytes and
the read rate it reached. Ops executed once (prefill, slicing the stacked weights per layer,
the LM head's transpose) are summed separately.

Event durations overlap when XLA's threads run ops concurrently and the profiler adds a
little per op, so the per-step sum is not the wall-clock step (both are printed, and their
ratio, `op_concurrency`: two independent dots such as gate and up run side by side, each on
one thread).
The read rate of one large dot outside the loop (the LM head's weight shape, `dot_gbps`) and
a streaming sum (`sum_gbps`) measured in the same process tell what this machine's kernels
reach. Written to experiments/benchmarks/profile_decode_<name>.json with --out or by default.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import _bench_common as bc


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="a local HF causal-LM dir")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=16, help="op groups listed per step")
    ap.add_argument("--out", default="")
    return ap.parse_args()


_SHAPE = r"(?:\(|)[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?"
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (" + _SHAPE + r")[^=]*? ([\w\-]+)\((.*?)\)",
                    re.M)


def _hlo_table(dump_dir: str, pattern: str) -> dict:
    """name -> (output shape, op, operand names) over the optimized HLO of `pattern`."""
    table = {}
    for path in glob.glob(os.path.join(dump_dir, pattern)):
        with open(path) as f:
            for m in _INSTR.finditer(f.read()):
                operands = re.findall(r"%([\w.\-]+)", m.group(4))
                table[m.group(1)] = (m.group(2).split("{")[0], m.group(3), operands)
    return table


def _nbytes(shape: str) -> int:
    m = re.match(r"\(?([a-z]+)(\d+)\[([0-9,]*)\]", shape)
    if not m:
        return 0
    bits = int(m.group(2)) if m.group(2) else 8
    n = 1
    for d in filter(None, m.group(3).split(",")):
        n *= int(d)
    return n * bits // 8


def _trace_events(trace_dir: str) -> collections.Counter:
    """(name -> [total us, count]) of the complete events in the Perfetto trace."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X":
            rec = out[e["name"]]
            rec[0] += e.get("dur", 0)
            rec[1] += 1
    return out


def _is_op(name: str) -> bool:
    return not name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool", "end: ",
                                "PjitFunction", "CommonPjRt", "DevicePut"))


def main():
    args = parse_args()
    cores = bc.run_as_the_cli(args.threads)   # the allocator the CLI runs with
    dump = tempfile.mkdtemp(prefix="jaxrlhf-hlo-")   # XLA reads its flags when jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxrlhf import generation
    from jaxrlhf.models.hf_io import load_hf

    model = load_hf(args.hf)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size
    tokens = jnp.asarray(rng.integers(0, vocab, (args.batch, args.prompt)), jnp.int32)
    mask = jnp.ones_like(tokens)

    def run(new):
        res = generation.generate((graphdef, state), tokens, mask, jax.random.PRNGKey(0),
                                  max_new_tokens=new, eos_id=-1, pad_id=0)
        jax.block_until_ready(res.tokens)

    times = {}
    for new in (1, args.new):
        run(new)
        times[new] = bc.timed(lambda new=new: run(new), repeats=3)[0]
    step_ms = (times[args.new] - times[1]) / (args.new - 1) * 1e3

    trace_dir = tempfile.mkdtemp(prefix="jaxrlhf-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    run(args.new)
    jax.profiler.stop_trace()
    events = _trace_events(trace_dir)
    hlo = _hlo_table(dump, "*jit__generate_impl*after_optimizations.txt")

    steps = args.new - 1
    per_step = collections.defaultdict(lambda: [0.0, 0, "", 0])
    once = collections.defaultdict(lambda: [0.0, 0])
    for name, (us, count) in events.items():
        if not _is_op(name):
            continue
        kind = re.sub(r"\.\d+$", "", name)
        shape, _, operands = hlo.get(name, ("?", "", []))
        if count == steps:
            op_shapes = [hlo[o][0] for o in operands if o in hlo]
            key = (kind, shape, ",".join(op_shapes))
            rec = per_step[key]
            rec[0] += us / steps
            rec[1] += 1
            rec[3] = max([_nbytes(s) for s in op_shapes] or [0])
        elif count < steps:
            rec = once[kind]
            rec[0] += us
            rec[1] += count
    groups = []
    for (kind, shape, operands), (us, n, _, big) in sorted(per_step.items(),
                                                           key=lambda kv: -kv[1][0]):
        g = {"kind": kind, "output": shape, "operands": operands, "ops_per_step": n,
             "us_per_step": round(us, 1)}
        if big and us:
            g["largest_operand_mb"] = round(big * n / 1e6, 2)
            g["largest_operand_gbps"] = round(big * n / (us * 1e-6) / 1e9, 1)
        groups.append(g)
    total_us = sum(g["us_per_step"] for g in groups)

    # What the machine's kernels reach on a DRAM-resident weight of the LM head's shape.
    d, v = model.cfg.d_model, vocab
    w = jnp.asarray(rng.standard_normal((d, v)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((args.batch, d)).astype(np.float32))
    dot = jax.jit(lambda x, w: x @ w)
    total = jax.jit(jnp.sum)
    dot_s = bc.timed(lambda: jax.block_until_ready(dot(x, w)), repeats=5)[0]
    sum_s = bc.timed(lambda: jax.block_until_ready(total(w)), repeats=5)[0]

    name = os.path.basename(os.path.normpath(args.hf))
    out = {"command": "python " + " ".join(sys.argv),
           "setup": {"hf": os.path.abspath(args.hf), "batch": args.batch,
                     "prompt": args.prompt, "new_tokens": args.new, "threads": args.threads,
                     "host_malloc": bc.allocator_note(os.environ)},
           "machine": {"cores": cores, "cpu": bc.cpu_name(),
                       "load_average_end": os.getloadavg()},
           "s_new_tokens": round(times[args.new], 4), "s_1_token": round(times[1], 4),
           "step_ms": round(step_ms, 3),
           "profiled_step_ms": round(total_us / 1e3, 3),
           "op_concurrency": round(total_us / 1e3 / step_ms, 2),
           "weight_mb": round(bc.param_bytes(state) / 1e6, 1),
           "step": groups[:args.top],
           "step_other_us": round(sum(g["us_per_step"] for g in groups[args.top:]), 1),
           "once_ms": {k: round(us / 1e3, 1) for k, (us, _) in
                       sorted(once.items(), key=lambda kv: -kv[1][0])[:8]},
           "dot_gbps": round(w.nbytes / dot_s / 1e9, 1),
           "sum_gbps": round(w.nbytes / sum_s / 1e9, 1)}
    path = bc.write_result(out, f"profile_decode_{name}", args.out)
    print(json.dumps(out, indent=1))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
