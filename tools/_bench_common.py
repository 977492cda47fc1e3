"""Shared helpers for the benchmark scripts in `tools/`.

- `pin_cpu_threads(n)`: restrict this process (XLA and PyTorch) to n CPU cores. Call it
  before importing jax/torch so both libraries size their thread pools to n.
  `run_as_the_cli(n)`: the same after re-executing under the CLI's host allocator.
- `memory_bandwidth_gbps()`, `matmul_gflops()`: the machine's memory bandwidth (copy and
  read) and fp32 matmul rate, measured in the calling process (the same run as the timings).
- `to_hf_llama(model)`: the same weights as a `transformers.LlamaForCausalLM` (PyTorch, fp32),
  through `jaxrlhf.models.save_hf` + `from_pretrained`.
- `param_bytes(state)`, `timed(fn)`: bytes of a pytree; best-of-k wall time.
- `cpu_name()`: the CPU model for a JSON's "machine" block (speed ratios against PyTorch
  differ between CPU models: record which one measured them).
- `write_result(out, name, path)`: a benchmark's JSON into experiments/benchmarks/.
"""
from __future__ import annotations

import os
import time
from typing import Callable, List, Optional, Tuple

import numpy as np

# First, before jax and torch start threads: tunes glibc malloc for XLA's per-step buffers
# (`jaxrlhf/_host_malloc.py`), exactly as `python -m jaxrlhf.train` runs. It applies to the
# whole process, so the PyTorch side of every comparison runs with the same allocator.
import jaxrlhf  # noqa: E402,F401


def side_env(env, side: str, malloc: str = "hugepages") -> dict:
    """Environment of a benchmark's child process.

    side "jax": JAXRLHF_HOST_MALLOC=`malloc`; "hugepages" (what `python -m jaxrlhf.train`
    runs with) adds glibc's transparent-huge-page tunable where the machine has it
    (`jaxrlhf._host_malloc.hugepage_env`), else falls back to "default".
    side "competitor": glibc as a plain `python` starts (any huge-page tunable removed), or,
    with JAXRLHF_BENCH_COMPETITOR_HUGEPAGES=1 in the environment, with the same tunable, to
    measure the competitor under jaxrlhf's allocator setting too.
    """
    from jaxrlhf import _host_malloc

    env = _host_malloc.without_hugepages(env)
    if side == "competitor":
        if env.get("JAXRLHF_BENCH_COMPETITOR_HUGEPAGES") == "1":
            env.pop("JAXRLHF_HOST_MALLOC", None)
            return _host_malloc.hugepage_env(env) or dict(env, JAXRLHF_HOST_MALLOC="default")
        return dict(env, JAXRLHF_HOST_MALLOC="default")
    if malloc == "hugepages":
        env.pop("JAXRLHF_HOST_MALLOC", None)
        return _host_malloc.hugepage_env(env) or dict(env, JAXRLHF_HOST_MALLOC="default")
    return dict(env, JAXRLHF_HOST_MALLOC=malloc)


def allocator_note(env) -> str:
    """The allocator setting a child process ran with, for the JSON."""
    mode = env.get("JAXRLHF_HOST_MALLOC", "default")
    return mode + (" (GLIBC_TUNABLES=" + env["GLIBC_TUNABLES"] + ")"
                   if env.get("GLIBC_TUNABLES") else "")


def run_as_the_cli(threads: int) -> List[int]:
    """For a script that runs jaxrlhf only: re-executes it once under the host allocator the
    CLI runs with (`jaxrlhf._host_malloc.hugepage_env`), then `pin_cpu_threads(threads)`;
    returns the cores. Call first thing, before jax starts."""
    import sys

    from jaxrlhf import _host_malloc
    env = _host_malloc.hugepage_env(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    return pin_cpu_threads(threads)


def pin_cpu_threads(n: int) -> List[int]:
    """Pins the process to the first `n` allowed cores and sets thread-count env vars.

    Call before importing jax (XLA sizes its pool from the affinity mask) and torch.
    Returns the cores used.
    """
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cores)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return cores


def timed(fn: Callable[[], object], repeats: int = 3) -> Tuple[float, object]:
    """(best wall seconds over `repeats` calls, last result). `fn` must block until done."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def memory_bandwidth_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """The machine's memory bandwidth (GB/s) from a 256 MB float32 array, best of `repeats`.

      copy_gbps:   nbytes / t of a numpy copy (bytes moved, each read once and written once)
      copy_traffic_gbps: 2 * nbytes / t of the same copy (read + write traffic, the STREAM
                   "copy" convention)
      read_gbps:   nbytes / t of a numpy sum (read only)
      floor_gbps:  max(copy_traffic_gbps, read_gbps): the rate at which a kernel that only
                   reads (a decode step reading weights and cache) can at best stream bytes;
                   the largest measured number, so a floor computed from it is the lowest.
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    t_copy, _ = timed(lambda: np.copyto(dst, src), repeats)
    t_read, _ = timed(lambda: src.sum(), repeats)
    out = {"bytes": int(src.nbytes), "copy_gbps": src.nbytes / t_copy / 1e9,
           "copy_traffic_gbps": 2 * src.nbytes / t_copy / 1e9,
           "read_gbps": src.nbytes / t_read / 1e9}
    out["floor_gbps"] = max(out["copy_traffic_gbps"], out["read_gbps"])
    return out


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name with its family / model numbers and widest vector ISA, from the
    first processor block of `cpuinfo` (e.g. "AMD EPYC (family 25, model 17, avx512f)");
    `platform.machine()` where it is unreadable."""
    import platform
    try:
        with open(cpuinfo) as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    isa = next((x for x in ("avx512f", "avx2", "avx", "asimd", "neon") if x in flags), "")
    name = fields.get("model name") or fields.get("Model") or platform.machine()
    parts = [f"family {fields['cpu family']}" if "cpu family" in fields else "",
             f"model {fields['model']}" if "model" in fields else "", isa]
    parts = [x for x in parts if x]
    return f"{name} ({', '.join(parts)})" if parts else name


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matmul through XLA (uses the process's CPU threads)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t, _ = timed(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / t / 1e9


def write_result(out: dict, name: str, path: str = "") -> str:
    """Writes a benchmark's JSON to `path`, default experiments/benchmarks/<name>.json of this
    checkout; returns the path."""
    import json

    path = path or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments", "benchmarks", f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return path


def param_bytes(tree) -> int:
    """Total bytes of the arrays in a pytree (e.g. an `nnx.State`)."""
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype")))


def to_hf_llama(model, attn_implementation: Optional[str] = None):
    """A `transformers.LlamaForCausalLM` (fp32, eval mode) with `model`'s weights.

    Goes through the library's exporter: `jaxrlhf.models.save_hf` writes `model` (LM head) to
    a temporary directory in HF's LlamaForCausalLM layout, and
    `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)` loads it back, so the
    weight layout lives in one place (`jaxrlhf/models/hf_io.py`). `save_hf` raises for a
    config that HF Llama cannot express (e.g. qkv_bias != out_bias); a non-llama family
    loads as its own HF class. `attn_implementation` ("eager", "sdpa", ...) is passed to
    `from_pretrained`; None keeps transformers' default.
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from jaxrlhf.models import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                  attn_implementation=attn_implementation)
    return hf.eval()
