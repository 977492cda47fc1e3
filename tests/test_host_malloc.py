"""The opt-in glibc malloc tuning of `import jaxrlhf` (see jaxrlhf/_host_malloc.py)."""
import platform
import subprocess
import sys

import pytest

import jaxrlhf._host_malloc as h

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


# ---------------------------------------------------------------------------------------
# The CLI's transparent-huge-page tunable.

def _thp_file(tmp_path, text):
    path = tmp_path / "enabled"
    path.write_text(text)
    return str(path)


def test_hugepage_env_adds_the_tunable_once(tmp_path, monkeypatch):
    monkeypatch.setattr(h, "_glibc_has_hugetlb_tunable", lambda: True)
    madvise = _thp_file(tmp_path, "always [madvise] never\n")
    env = h.hugepage_env({"PATH": "/bin"}, madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": h.HUGEPAGE_TUNABLE,
                   "JAXRLHF_HOST_MALLOC": "hugepages"}
    # Appended to the user's own tunables; never twice; off when asked or without THP.
    env = h.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + h.HUGEPAGE_TUNABLE
    assert h.hugepage_env(env, madvise) is None
    for mode in ("default", "reuse"):
        assert h.hugepage_env({"JAXRLHF_HOST_MALLOC": mode}, madvise) is None
    assert h.hugepage_env({}, _thp_file(tmp_path, "always madvise [never]\n")) is None
    assert h.hugepage_env({}, str(tmp_path / "missing")) is None
    monkeypatch.setattr(h, "_glibc_has_hugetlb_tunable", lambda: False)
    assert h.hugepage_env({}, madvise) is None


def test_reexec_only_for_the_train_cli_while_locating_its_module(monkeypatch):
    monkeypatch.setattr(h, "hugepage_env", lambda env: dict(env, GLIBC_TUNABLES="x"))
    calls = []
    execve = lambda exe, argv, env: calls.append((exe, argv, env["GLIBC_TUNABLES"]))
    argv = ["python", "-u", "-m", "jaxrlhf.train", "--config", "c.py"]
    assert h.reexec_train_cli_with_hugepages("-m", argv, {}, execve)
    assert calls == [(sys.executable, argv, "x")]
    assert not h.reexec_train_cli_with_hugepages("/x/jaxrlhf/train.py", argv, {}, execve)
    assert not h.reexec_train_cli_with_hugepages(
        "-m", ["python", "-m", "jaxrlhf.env"], {}, execve)
    assert not h.reexec_train_cli_with_hugepages("-c", ["python", "-c", "..."], {}, execve)
    assert len(calls) == 1


_CONFIG_PROBE = """
import os, sys
print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("JAXRLHF_HOST_MALLOC"), flush=True)
sys.exit(0)
"""


@glibc_only
@pytest.mark.parametrize("env_value", [None, "default"])
def test_train_cli_runs_with_the_tunable_unless_turned_off(tmp_path, env_value):
    """The config file (executed while flags are parsed) sees the re-executed process's
    environment; the THP memset probe shows the tunable is in effect there."""
    if h.hugepage_env({}) is None:
        pytest.skip("this machine has no glibc >= 2.35 with transparent huge pages")
    config = tmp_path / "probe.py"
    config.write_text(_CONFIG_PROBE)
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["JAXRLHF_HOST_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-m", "jaxrlhf.train", "--config", str(config),
                          "--workdir", str(tmp_path / "w")], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    if env_value is None:
        assert out == [h.HUGEPAGE_TUNABLE, "hugepages"]
    else:
        assert out == ["None", "default"]


@glibc_only
def test_tunable_gives_huge_pages_to_large_blocks():
    env = h.hugepage_env({"PATH": "/usr/bin:/bin"})
    if env is None:
        pytest.skip("this machine has no glibc >= 2.35 with transparent huge pages")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert int(out[1]) < 1000, out        # 2 MB pages: ~32 faults for 64 MB, not 16,384
