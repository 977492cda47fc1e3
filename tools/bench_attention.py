"""Attention implementations side by side in one process: the einsum path against
`jax.nn.dot_product_attention` (model.attention = "einsum" | "xla" [| "cudnn" on a GPU]), and
the einsum path's causal query blocks against one block ("einsum/0": attention_block=0).

    python tools/bench_attention.py --hf /tmp/smollm2            # SmolLM2's shapes
    python tools/bench_attention.py --hf /tmp/smollm2 --impls einsum/0,einsum --remat full \
        --seq 512 --new 0                                        # query blocks, train step only
    python tools/bench_attention.py --preset small --batch 8

The model is the config (`--hf` reads config.json only) with random weights, fp32 on CPU
(`--dtype` to change). Per implementation, interleaved over `--rounds` rounds so that machine
load hits all alike:
  train_step_s   value_and_grad of a forward over --batch x --seq tokens (one row left-padded)
  decode_ms      one greedy decode step: (generate --new tokens - generate 1 token) / (new - 1),
                 batch --batch, prompt --prompt (--new 0: not measured)
  temp_mb        XLA's temporaries of the train-step program
  tokens_equal   greedy tokens equal to the einsum path's
Prints one JSON object; --out writes it too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import _bench_common as bc  # noqa: E402  (tools/, beside this script)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", default="")
    src.add_argument("--preset", default="")
    ap.add_argument("--impls", default="einsum,xla")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", default="none", help="the model's remat policy")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxrlhf.generation import generate
    from jaxrlhf.models.config import preset
    from jaxrlhf.models.hf_io import config_from_hf, read_json
    from jaxrlhf.models.transformer import init_model

    cfg = (config_from_hf(read_json(os.path.join(args.hf, "config.json")), dtype=args.dtype)
           if args.hf else preset(args.preset, dtype=args.dtype))
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.int32).at[0, :args.seq // 4].set(0)
    prompt = tokens[:, :args.prompt]
    pmask = mask[:, :args.prompt]
    runs = {}
    for variant in args.impls.split(","):
        impl, _, block = variant.partition("/")
        model = init_model(cfg.replace(attention=impl, remat=args.remat,
                                       attention_block=int(block) if block else None), seed=0)
        graphdef, state = nnx.split(model)

        def loss(st):
            h = nnx.merge(graphdef, st).hidden(tokens, mask)
            return jnp.mean(h.astype(jnp.float32) ** 2)
        step = jax.jit(jax.value_and_grad(loss))
        temp = step.lower(state).compile().memory_analysis().temp_size_in_bytes
        gen = lambda n: generate(model, prompt, pmask, jax.random.key(0), max_new_tokens=n,
                                 eos_id=-1, pad_id=0, greedy=True)
        jax.block_until_ready(step(state))
        first = gen(max(args.new, 1))
        jax.block_until_ready(gen(1).response_tokens)
        runs[variant] = dict(step=lambda step=step, state=state: jax.block_until_ready(step(state)),
                          gen=gen, temp=temp, tokens=np.asarray(first.response_tokens),
                          train=[], decode=[])
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            r["step"]()
            r["train"].append(time.perf_counter() - t0)
            if args.new < 2:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(r["gen"](args.new).response_tokens)
            t_new = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(r["gen"](1).response_tokens)
            r["decode"].append((t_new - (time.perf_counter() - t0)) / (args.new - 1))
    base = runs[next(iter(runs))]["tokens"]
    out = {"model": args.hf or args.preset, "backend": jax.default_backend(),
           "machine": f"{bc.cpu_name()}, {os.cpu_count()} cores, load "
                      f"{os.getloadavg()[0]:.1f}",
           "batch": args.batch, "seq": args.seq, "prompt": args.prompt, "new": args.new,
           "dtype": cfg.dtype, "remat": args.remat, "impls": {}}
    for impl, r in runs.items():
        out["impls"][impl] = {"train_step_s": round(min(r["train"]), 3),
                              "decode_ms": round(1000 * min(r["decode"]), 2) if r["decode"]
                              else None,
                              "temp_mb": round(r["temp"] / 2 ** 20, 1),
                              "tokens_equal": bool((r["tokens"] == base).all())}
    print(json.dumps(out, indent=1))
    if args.out:
        bc.write_result(out, "", args.out)
    return out


if __name__ == "__main__":
    main()
