"""Keeps XLA's per-step host buffers out of fresh `mmap` pages (Linux / glibc only).

Why: on the CPU backend every execution of a jitted step allocates one temp buffer for all
of its intermediates (the base preset's SFT step: ~0.9 GB) and frees it at the end. glibc
serves any block above its mmap threshold (at most 32 MB) with a fresh anonymous `mmap`, so
every step page-faults the whole buffer back in: 224,774 minor faults per base-preset step,
~9% of the step's CPU time (`tools/bench_model.py`, measured on the 2-core CI-like VM). With
`mmap` off and trimming of the heap top raised, the buffer is reused from the heap and a
warm step takes no page faults — the same thing a caching allocator does. The cost: memory a
step freed stays with the process (its RSS stays at the peak) instead of going back to the OS.

Applied once, on `import jaxrlhf`, before jax / XLA start threads (thread arenas created
before it keep using `mmap` for large blocks: import jaxrlhf first, or start Python with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`).
Set `JAXRLHF_HOST_MALLOC=default` to leave glibc's settings alone.
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
    """Sets glibc malloc to one arena, no mmap'd chunks and a 2 GiB trim threshold.

    Returns True when the settings were applied; False on non-Linux / non-glibc systems, when
    `JAXRLHF_HOST_MALLOC=default`, or when a mallopt call is refused.
    """
    global applied
    if applied:
        return True
    if os.environ.get("JAXRLHF_HOST_MALLOC", "").lower() in ("default", "0", "off"):
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
