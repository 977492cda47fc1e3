"""K samples per prompt: the shared prompt cache against the prompts repeated K times, one JSON.

    python tools/bench_prompt_sharing.py --hf /tmp/smollm2                    # 4 x 8, P 64
    python tools/bench_prompt_sharing.py --hf /tmp/smollm2 --prompts 2 --prompt 1024

Runs jaxrlhf `generate` (sampling at temperature 1, no stop id, exactly --new tokens) two
ways in one process, alternating, on the same random prompts:
  * shared: `num_samples=K`: each prompt is prefilled once and its keys / values stay one
    copy per prompt (`KVCache.prefix_k`), which the decode step's attention reads once for
    the K rows; the rows' own cache holds the N response slots;
  * repeated: the prompts repeated K times with `num_samples=1`: every row prefills and
    caches its own copy of the prompt (P + N slots per row), as a rollout without prompt
    sharing does.
Both sample the same distribution: their log-probs agree to float rounding, and so do the
tokens until a draw lands within that rounding of a boundary ("agreement" counts the rows
where that happened; tests/test_generation.py checks token equality on a small model).
Reported per mode: the whole rollout
(s), one new token (s_1_token: mostly the prefill), the decode step ((s - s_1) / (N - 1)),
and the KV cache's bytes. Written to experiments/benchmarks/bench_prompt_sharing_<name>_
p<P>.json with --out or by default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import _bench_common as bc


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="a local HF causal-LM dir")
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    return ap.parse_args()


def agreement(a, b) -> dict:
    """How the two rollouts (same rng) agree: rows whose tokens differ somewhere, and the
    largest |log-prob difference| over the positions before a row's first differing token
    (float rounding of the two cache layouts; a draw that lands within it of a boundary
    of the inverse CDF takes the other token, and the row continues differently)."""
    import numpy as np

    ta, tb = np.asarray(a.response_tokens), np.asarray(b.response_tokens)
    same_so_far = np.cumsum(ta != tb, axis=1) == 0
    dlogp = np.abs(np.asarray(a.logprobs) - np.asarray(b.logprobs))[same_so_far]
    return {"rows": int(ta.shape[0]), "rows_differing": int((~same_so_far).any(axis=1).sum()),
            "max_abs_logprob_diff_before_divergence": float(dlogp.max())}


def main():
    args = parse_args()
    cores = bc.run_as_the_cli(args.threads)   # the allocator the CLI runs with
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrlhf import generation
    from jaxrlhf.models.hf_io import load_hf

    model = load_hf(args.hf)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (args.prompts, args.prompt)),
                         jnp.int32)
    mask = jnp.ones_like(tokens)
    k = args.k
    inputs = {"shared": (tokens, mask, k),
              "repeated": (jnp.repeat(tokens, k, 0), jnp.repeat(mask, k, 0), 1)}

    def run(mode, new):
        toks, m, samples = inputs[mode]
        res = generation.generate(model, toks, m, jax.random.PRNGKey(0), max_new_tokens=new,
                                  eos_id=-1, pad_id=0, num_samples=samples)
        jax.block_until_ready(res.tokens)
        return res

    first = {}
    for mode in inputs:   # compile both lengths of both modes
        first[mode] = run(mode, args.new)
        run(mode, 1)
    times = {mode: {args.new: [], 1: []} for mode in inputs}
    for _ in range(args.repeats):   # alternating, so drifts of the machine hit both
        for mode in inputs:
            for new in (args.new, 1):
                times[mode][new].append(bc.timed(lambda: run(mode, new), repeats=1)[0])

    rows = args.prompts * k
    slot_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.dim_per_head * 4   # keys + values
    cache_slots = {"shared": args.prompts * args.prompt + rows * args.new,
                   "repeated": rows * (args.prompt + args.new)}
    out = {"command": "python " + " ".join(sys.argv),
           "setup": {"hf": os.path.abspath(args.hf), "prompts": args.prompts, "k": k,
                     "prompt": args.prompt, "new_tokens": args.new, "threads": args.threads,
                     "repeats": args.repeats, "host_malloc": bc.allocator_note(os.environ),
                     "order": "one process, modes alternating; min over repeats"},
           "machine": {"cores": cores, "cpu": bc.cpu_name(),
                       "load_average_end": os.getloadavg()},
           "agreement": agreement(first["shared"], first["repeated"])}
    for mode in inputs:
        s, s1 = min(times[mode][args.new]), min(times[mode][1])
        out[mode] = {"s": round(s, 4), "s_1_token": round(s1, 4),
                     "step_ms": round((s - s1) / (args.new - 1) * 1e3, 2),
                     "kv_cache_mb": round(cache_slots[mode] * slot_bytes / 1e6, 1)}
    out["speedup"] = round(out["repeated"]["s"] / out["shared"]["s"], 3)
    out["step_speedup"] = round(out["repeated"]["step_ms"] / out["shared"]["step_ms"], 3)
    name = os.path.basename(os.path.normpath(args.hf))
    path = bc.write_result(out, f"bench_prompt_sharing_{name}_p{args.prompt}", args.out)
    print(json.dumps(out, indent=1))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
