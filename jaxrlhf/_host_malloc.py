"""Opt-in: keeps XLA's per-step host buffers out of fresh `mmap` pages (Linux / glibc only).

On the CPU backend every execution of a jitted step allocates one temp buffer for all of its
intermediates and frees it at the end. glibc serves any block above its mmap threshold (at
most 32 MB) with a fresh anonymous `mmap`, so every step page-faults the whole buffer back in
(224,774 minor faults per step of the 25M-parameter "base" preset, ~9% of its CPU time). With
`JAXRLHF_HOST_MALLOC=reuse` set before `import jaxrlhf`, glibc runs with one arena, no mmap'd
chunks and a 2 GiB trim threshold, so the buffer is reused from the heap.

It is off by default because at real-model scale it multiplies peak memory: all large blocks
then come from one brk heap that can only shrink from its top, freed blocks of other sizes stay
resident, and the heap grows. SFT on SmolLM2-135M (batch 8 x 256 tokens, 3 steps + eval +
export through the CLI) peaked at 18.9 GB RSS with it and 7.7 GB without, and its steps were
slower (11 s vs 7 s). Use it only for small models whose footprint is far below the machine's
memory (the CPU benchmark scripts of the toy presets set it).

Applied once, on `import jaxrlhf`, before jax / XLA start threads (thread arenas created
before it keep using `mmap` for large blocks: import jaxrlhf first, or start Python with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

applied = False


def tune_host_malloc() -> bool:
    """With JAXRLHF_HOST_MALLOC=reuse: sets glibc malloc to one arena, no mmap'd chunks and a
    2 GiB trim threshold.

    Returns True when the settings were applied; False when the variable is unset or anything
    else (glibc's defaults stay), on non-Linux / non-glibc systems, or when a mallopt call is
    refused.
    """
    global applied
    if applied:
        return True
    if os.environ.get("JAXRLHF_HOST_MALLOC", "").lower() != "reuse":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
          and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1)
    applied = bool(ok)
    return applied
