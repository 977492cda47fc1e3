"""Test-wide JAX settings.

Every test process sees 8 fake CPU devices so mesh tests can run anywhere, and rank
promotion raises (house style) so silent broadcasting bugs fail loudly.

XLA compilation dominates the suite's time on CPU, and many tests compile the same programs
(model init, the same tiny train step in every resumed run, ...). A persistent compilation
cache in a fresh per-session directory, shared by the pytest-xdist workers (the controller
creates it before the workers start; they inherit the environment), compiles each program
once per session. It only skips recompiling identical HLO: what runs is unchanged. The cache
size limit turns on JAX's file lock, so the two workers never read a half-written entry.
JAXRLHF_TEST_JAX_CACHE=off turns it off; set to a directory, that directory is used (and kept).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if not os.environ.get("JAXRLHF_TEST_JAX_CACHE"):
    _cache = tempfile.mkdtemp(prefix="jaxrlhf-test-jax-cache-")
    os.environ["JAXRLHF_TEST_JAX_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ["JAXRLHF_TEST_JAX_CACHE"] != "off":
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXRLHF_TEST_JAX_CACHE"])
    # Programs that compile in under 0.3 s are not worth a cache entry: the cache size limit
    # makes every write scan the whole directory, so thousands of tiny entries would cost more
    # than they save.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)


@pytest.fixture(scope="session")
def stage_dirs(tmp_path_factory):
    """Tiny random SFT and RM exports (read-only inputs of PPO), built once per test process
    and shared by test_ppo.py and test_configs.py."""
    from trainer_utils import tiny_stage_dirs
    return tiny_stage_dirs(str(tmp_path_factory.mktemp("stages")))
