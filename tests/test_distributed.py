"""Multi-host: 2 processes on localhost (jax.distributed, CPU collectives, 4 fake devices each)
give the same losses as 1 process with 8 fake devices (this test's own process: conftest gives
it 8 fake CPU devices, so the reference run needs no third interpreter)."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

import distributed_worker
from trainer_utils import REPO, read_jsonl

from jaxrlhf.trainers import runner

WORKER = os.path.join(REPO, "tests", "distributed_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = REPO
    return env


def test_two_processes_match_one(tmp_path):
    assert jax.device_count() == 8 and jax.process_count() == 1
    one = str(tmp_path / "one")
    runner.run(distributed_worker.config(), one)

    two = str(tmp_path / "two")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", port, two], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "process 0 of 2 done" in outs[0][0] and "process 1 of 2 done" in outs[1][0]

    ra = read_jsonl(os.path.join(one, "metrics.jsonl"))
    rb = read_jsonl(os.path.join(two, "metrics.jsonl"))
    # eval at step 0 (a fresh run evaluates first), 3 train steps, eval at the end
    assert [r["split"] for r in ra] == [r["split"] for r in rb] == ["eval"] + ["train"] * 3 + [
        "eval"]
    np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=1e-5)
    assert os.path.exists(os.path.join(two, "hf", "model.safetensors"))
