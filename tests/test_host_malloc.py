"""The opt-in glibc malloc tuning of `import jaxrlhf` (see jaxrlhf/_host_malloc.py)."""
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the tuning only exists for Linux / glibc")

_PROBE = """
import ctypes, resource
import jaxrlhf, jaxrlhf._host_malloc as h
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20   # above glibc's largest mmap threshold (32 MB), like XLA's step buffers
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n)
print(h.applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _probe(env_value):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["JAXRLHF_HOST_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_opt_in_tunes_malloc_and_large_blocks_are_reused():
    applied, faults = _probe("reuse")
    assert applied
    assert faults < 1000, faults          # tuned: the freed block is reused from the heap


@glibc_only
@pytest.mark.parametrize("env_value", [None, "default"])
def test_default_leaves_glibc_defaults(env_value):
    applied, faults = _probe(env_value)
    assert not applied
    assert faults > 10000, faults         # a fresh mmap per block: 16,384 4-KB pages
