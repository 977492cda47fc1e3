"""Device-memory budget of a full fine-tuning train step, from XLA's buffer assignment: does
SFT (or reward-model) training of a model fit an accelerator of a given size?

    python tools/device_budget.py --hf /tmp/smollm2                     # T4: 15 GiB, bf16
    python tools/device_budget.py --hf DIR --stage rm --batch 8 --seq 512 --device_gb 40
    python tools/device_budget.py --preset 1b --remat none,dots,full

No weights are read or allocated: the model comes from the HF config.json (or a preset) under
`nnx.eval_shape`, and the train step -- the stage's own (`trainers.sft.train_step` or
`trainers.rm_steps.train_step`, AdamW, fp32 master weights, the state donated as the stages do
through `common.compile_step`) -- is lowered on abstract shapes and compiled for this machine's
backend. For each remat policy it reports, in GiB:

  params, opt_state     the fp32 weights and AdamW's two moments (arguments, donated)
  batch                 the token / mask arrays
  temp                  XLA's temporaries (activations saved for the backward pass, logits
                        chunks, gradients, fusion buffers)
  peak                  arguments + outputs - donated aliases + temporaries
  fits                  peak <= --device_gb x --mem_fraction (JAX preallocates 75% of a GPU's
                        memory by default: XLA_PYTHON_CLIENT_MEM_FRACTION)

Compiled here on CPU, the buffer assignment is the CPU backend's; a GPU's differs in fusion
(cuDNN attention keeps no [T, S] probabilities), so treat it as an estimate with that margin.
Prints one JSON object; --out writes it too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import _bench_common as bc  # noqa: E402  (tools/, beside this script)

GIB = 2 ** 30


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", default="", help="local HF directory (its config.json only)")
    src.add_argument("--preset", default="", help="jaxrlhf preset")
    ap.add_argument("--stage", default="sft", choices=["sft", "rm"])
    ap.add_argument("--batch", type=int, default=8, help="rows per step (RM: batch/2 pairs)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (GPU 'auto' = bf16)")
    ap.add_argument("--remat", default="none,dots,full", help="comma-separated policies")
    ap.add_argument("--logits_chunk", type=int, default=-1, help="-1: the model's default")
    ap.add_argument("--device_gb", type=float, default=15.0,
                    help="device memory in GiB (a 16 GB T4 reports 15.0)")
    ap.add_argument("--mem_fraction", type=float, default=0.75,
                    help="share of it JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION)")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def model_config(args):
    from jaxrlhf.models.config import preset
    from jaxrlhf.models.hf_io import config_from_hf, read_json
    if args.hf:
        cfg = config_from_hf(read_json(os.path.join(args.hf, "config.json")), dtype=args.dtype)
    else:
        cfg = preset(args.preset, dtype=args.dtype)
    if args.logits_chunk >= 0:
        cfg = cfg.replace(logits_chunk=args.logits_chunk)
    return cfg


def budget(cfg, stage: str, batch: int, seq: int) -> dict:
    """Memory of one compiled train step of `cfg` (sizes in bytes)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf import sharding as shd
    from jaxrlhf.config import base_config
    from jaxrlhf.models.transformer import init_model
    from jaxrlhf.trainers import common, rm_steps, sft

    head = "lm" if stage == "sft" else "score"
    abstract = nnx.eval_shape(lambda: init_model(cfg, head=head, seed=0))
    mesh = shd.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])   # one device's share
    params = common.params_of(abstract)
    params_sh = common.param_shardings(abstract, mesh)
    tc = base_config(stage).train
    optimizer, schedule = common.make_optimizer(tc)
    opt_state = jax.eval_shape(optimizer.init, params)
    os_sh = common.opt_state_shardings(optimizer, params, params_sh, mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sds = jax.ShapeDtypeStruct
    state = {"step": sds((), jnp.int32), "params": params, "opt_state": opt_state,
             "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
    state_sh = {"step": rep, "params": params_sh, "opt_state": os_sh, "rng": rep}
    kw = dict(graphdef=nnx.graphdef(abstract), optimizer=optimizer, schedule=schedule,
              grad_accum=1, on_nonfinite=tc.on_nonfinite)
    if stage == "sft":
        fn = functools.partial(sft.train_step, **kw)
        tok = sds((batch, seq), jnp.int32)
        data = {"tokens": tok, "attention_mask": tok, "loss_mask": tok}
    else:
        fn = functools.partial(rm_steps.train_step, **kw, loss_kw=dict(
            tie_mode="skip", margin=0.0, label_smoothing=0.0))
        pairs = batch // 2
        tok = sds((pairs, 2, seq), jnp.int32)
        data = {"tokens": tok, "attention_mask": tok, "ranks": sds((pairs, 2), jnp.int32),
                "valid": sds((pairs, 2), jnp.int32)}
    step = common.compile_step(fn, state_sh, shd.batch_sharding(mesh))
    ma = step.lower(state, data).compile().memory_analysis()
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes)
    nbytes = bc.param_bytes
    return {"params": nbytes(params), "opt_state": nbytes(opt_state), "batch": nbytes(data),
            "arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
            "donated_aliases": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
            "peak": peak}


def main(argv=None):
    args = parse_args(argv)
    import jax
    cfg = model_config(args)
    limit = args.device_gb * args.mem_fraction
    out = {"model": args.hf or args.preset, "stage": args.stage, "batch": args.batch,
           "seq": args.seq, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
           "params_m": None, "device_gb": args.device_gb, "usable_gb": round(limit, 2),
           "compiled_on": f"{jax.default_backend()} ({platform.machine()})", "remat": {}}
    for remat in [r for r in args.remat.split(",") if r]:
        b = budget(cfg.replace(remat=remat), args.stage, args.batch, args.seq)
        out["params_m"] = round(b["params"] / 4 / 1e6, 1)
        row = {k: round(v / GIB, 3) for k, v in b.items()}
        row["fits"] = b["peak"] / GIB <= limit
        out["remat"][remat] = row
        print(f"{remat:6s} peak {row['peak']:.2f} GiB (temp {row['temp']:.2f}) "
              f"{'fits' if row['fits'] else 'does NOT fit'} {limit:.2f} GiB", file=sys.stderr)
    print(json.dumps(out, indent=1))
    if args.out:
        bc.write_result(out, "", args.out)
    return out


if __name__ == "__main__":
    main()
