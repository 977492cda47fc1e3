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

The CLI default: transparent huge pages. `python -m jaxrlhf.train` on Linux / glibc >= 2.35
with transparent huge pages available ("madvise" or "always" in
/sys/kernel/mm/transparent_hugepage/enabled) re-executes itself once, on `import jaxrlhf`,
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` added (glibc reads tunables only at process
start). malloc then asks for 2 MB pages on its mmap'd chunks, so a fresh step buffer costs one
page fault per 2 MB instead of per 4 KB, and weight reads miss the TLB less. On SmolLM2-135M
a rollout's one-off buffers (per-layer weight slices, the transposed LM head) and its decode
steps got faster with no change in peak RSS (see the README's real-model tables).
`JAXRLHF_HOST_MALLOC=default` (or `reuse`) keeps the process as started; a library user (a
notebook, a script) gets the same by starting Python with that variable set, see
`hugepage_env`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Callable, Mapping, Optional, Sequence

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


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available(path: str = _THP_ENABLED) -> bool:
    """The kernel offers transparent huge pages to madvise'd memory ("always" or "madvise")."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def _glibc_has_hugetlb_tunable() -> bool:
    if platform.system() != "Linux":
        return False
    name, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and (major, minor) >= (2, 35)


def hugepage_env(env: Mapping[str, str], thp_path: str = _THP_ENABLED) -> Optional[dict]:
    """`env` with glibc's huge-page malloc tunable added (and JAXRLHF_HOST_MALLOC=hugepages),
    or None when it does not apply: JAXRLHF_HOST_MALLOC set to anything but "hugepages", the
    tunable already in GLIBC_TUNABLES, not Linux / glibc >= 2.35, or no transparent huge
    pages. Child processes that should run as the CLI does start with this environment."""
    mode = env.get("JAXRLHF_HOST_MALLOC", "").lower()
    tunables = env.get("GLIBC_TUNABLES", "")
    if mode not in ("", "hugepages") or "glibc.malloc.hugetlb" in tunables:
        return None
    if not (_glibc_has_hugetlb_tunable() and _thp_available(thp_path)):
        return None
    out = dict(env)
    out["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    out["JAXRLHF_HOST_MALLOC"] = "hugepages"
    return out


def without_hugepages(env: Mapping[str, str]) -> dict:
    """`env` without glibc's huge-page tunable and without the JAXRLHF_HOST_MALLOC=hugepages
    marker `hugepage_env` adds (other tunables and modes are kept)."""
    out = dict(env)
    tunables = [t for t in out.pop("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb")]
    if tunables:
        out["GLIBC_TUNABLES"] = ":".join(tunables)
    if out.get("JAXRLHF_HOST_MALLOC", "").lower() == "hugepages":
        del out["JAXRLHF_HOST_MALLOC"]
    return out


def _is_train_cli(orig_argv: Sequence[str]) -> bool:
    """The interpreter was started as `python [options] -m jaxrlhf.train ...`."""
    args = list(orig_argv[1:])
    return any(a == "-m" and b == "jaxrlhf.train" for a, b in zip(args, args[1:]))


def reexec_train_cli_with_hugepages(
        argv0: Optional[str] = None, orig_argv: Optional[Sequence[str]] = None,
        env: Optional[Mapping[str, str]] = None,
        execve: Callable[..., None] = os.execve) -> bool:
    """When this process is `python -m jaxrlhf.train` still locating its module (argv[0] is
    "-m", i.e. called from the package's import) and `hugepage_env` applies: replaces the
    process with the same command line under that environment (does not return). Returns
    False when nothing was done."""
    argv0 = sys.argv[0] if argv0 is None and sys.argv else argv0
    orig_argv = getattr(sys, "orig_argv", None) if orig_argv is None else orig_argv
    if argv0 != "-m" or not orig_argv or not _is_train_cli(orig_argv):
        return False
    new_env = hugepage_env(os.environ if env is None else env)
    if new_env is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, list(orig_argv), new_env)
    return True
