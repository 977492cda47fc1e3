"""SFT and reward-model trainers: runs, exact resume, checkpoint safety, non-finite handling,
one trace per step, sharded == unsharded, RM learnability on a marker-token task."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer_utils import REPO, load_config, poison_batches, read_jsonl, shrink

from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.models import load_hf
from jaxrlhf.trainers import common, runner, sft


def _params(stage_dir):
    """Final params of a stage from its last checkpoint (as numpy)."""
    ck = Checkpointer(os.path.join(stage_dir, "checkpoints"))
    state, _ = ck.restore_raw()
    ck.close()
    return jax.tree.map(np.asarray, state["params"])


def _train_rows(stage_dir):
    return [r for r in read_jsonl(os.path.join(stage_dir, "metrics.jsonl"))]


def _interrupt_at(monkeypatch, position):
    """SIGTERM ourselves when the train iterator hands out batch `position` (deterministic)."""
    orig = common.data_iterators

    def patched(config, train_ds, eval_ds, *, batch_size):
        it, ev = orig(config, train_ds, eval_ds, batch_size=batch_size)
        nxt = type(it).__next__

        class Interrupting(type(it)):
            def __next__(self):
                if self.position == position and self.epoch == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
                return nxt(self)

        it.__class__ = Interrupting
        return it, ev

    monkeypatch.setattr(common, "data_iterators", patched)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, stage):
    cfg = shrink(load_config(stage))
    full = str(tmp_path / "full")
    runner.run(cfg, full)

    part = str(tmp_path / "part")
    with monkeypatch.context() as m:
        _interrupt_at(m, position=2)
        with pytest.raises(common.Preempted):
            runner.run(cfg, part)
    assert Checkpointer(os.path.join(part, "checkpoints")).latest_step() == 3
    runner.run(cfg, part)  # the same command again resumes

    a, b = _params(full), _params(part)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)  # bitwise
    assert _train_rows(full) == _train_rows(part)
    summary = json.load(open(os.path.join(part, "summary.json")))
    assert summary["steps"] == 6
    for f in ("metrics.jsonl", "summary.json", "curves.png"):
        assert os.path.exists(os.path.join(part, f)), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(part))
    # The export loads back as an HF model with the right head.
    model = load_hf(os.path.join(part, "hf"), head="lm" if stage == "sft" else "score")
    assert model.head == ("lm" if stage == "sft" else "score")


def test_grad_accumulation_is_exact(tmp_path):
    # 6 steps: the grad_accum=1 run is the same program as test_resume_equals_uninterrupted's
    # (compiled once per session), and 6 steps compare more updates than 2 would.
    cfg = shrink(load_config("sft"), steps=6)
    cfg.train.eval_every = 0
    runner.run(cfg, str(tmp_path / "a1"))
    cfg.train.grad_accum = 4
    runner.run(cfg, str(tmp_path / "a4"))
    la = [r["loss"] for r in _train_rows(str(tmp_path / "a1"))]
    lb = [r["loss"] for r in _train_rows(str(tmp_path / "a4"))]
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 _params(str(tmp_path / "a1")), _params(str(tmp_path / "a4")))


def test_one_trace_per_step(tmp_path, monkeypatch):
    traces = []
    orig = sft.train_step

    @functools.wraps(orig)   # same jit name, same program as the other 6-step SFT runs
    def counting(*a, **k):
        traces.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(sft, "train_step", counting)
    cfg = shrink(load_config("sft"), steps=6)
    cfg.data.buckets = (32, 64)
    runner.run(cfg, str(tmp_path / "w"))
    # 6 steps with an eval and a checkpoint in between (step 3) and at the end; one bucket of
    # synthetic data.
    assert len(traces) == 1


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss(tmp_path, monkeypatch, mode):
    """A poisoned batch (byte 255, never in the data) makes the loss NaN at step 3."""
    poison_batches(monkeypatch, lambda position: position == 2)
    cfg = shrink(load_config("sft"), steps=5)
    cfg.train.on_nonfinite = mode
    wd = str(tmp_path / "w")
    if mode == "stop":
        with pytest.raises(common.NonFiniteLoss, match=r"step 3 \(batch epoch 0 position 2\)"):
            runner.run(cfg, wd)
        return
    runner.run(cfg, wd)
    rows = [r for r in _train_rows(wd) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(_params(wd)))


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    """SIGKILL a process while it writes checkpoint 2: checkpoint 1 stays the usable latest."""
    d = str(tmp_path / "ck")
    small = {"w": np.arange(10, dtype=np.float32)}
    ck = Checkpointer(d)
    ck.save(1, small, {"note": "one"})
    ck.close()
    code = (
        "import numpy as np, sys; from jaxrlhf.checkpoint import Checkpointer\n"
        "ck = Checkpointer(sys.argv[1])\n"
        "big = {'w': np.arange(10, dtype=np.float32),"
        " 'x': np.random.default_rng(0).standard_normal((64, 1024, 1024)).astype(np.float32)}\n"
        "print('saving', flush=True)\n"
        "ck.save(2, big, {'note': 'two'})\n")
    proc = subprocess.Popen([sys.executable, "-c", code, d], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the temporary directory of step 2 exists
        if any("tmp" in n for n in os.listdir(d)) or os.path.exists(os.path.join(d, "2")):
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    ck = Checkpointer(d)
    assert ck.latest_step() == 1
    state, meta = ck.restore({"w": jax.ShapeDtypeStruct((10,), jnp.float32)})
    np.testing.assert_array_equal(state["w"], small["w"])
    assert meta == {"note": "one"}
    ck.close()


def test_sharded_run_matches_single_device(tmp_path, monkeypatch):
    """Steps 1-3 and an eval on a (2, 2, 2) mesh equal the 1-device run; the 8-device
    checkpoint of step 3 then resumes on a 1-device mesh and step 4 and the final eval equal
    the uninterrupted 1-device run's too. (One config for all runs: each mesh's step compiles
    once.)"""
    cfg = shrink(load_config("sft"), steps=4)
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    runner.run(cfg, one)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    with monkeypatch.context() as m:
        _interrupt_at(m, position=2)
        with pytest.raises(common.Preempted):
            runner.run(cfg, eight)
    assert Checkpointer(os.path.join(eight, "checkpoints")).latest_step() == 3
    rows = _train_rows(eight)
    # eval at step 0, 3 steps and the eval at step 3, all on 8 devices
    assert [r["split"] for r in rows] == ["eval"] + ["train"] * 3 + ["eval"]
    np.testing.assert_allclose([r["loss"] for r in rows],
                               [r["loss"] for r in _train_rows(one)[:5]], rtol=1e-5)
    # Restore the 8-device checkpoint onto a 1-device mesh: resume works across meshes.
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    runner.run(cfg, eight)
    assert Checkpointer(os.path.join(eight, "checkpoints")).latest_step() == 4
    la, lb = _train_rows(one), _train_rows(eight)
    splits = ["eval"] + ["train"] * 3 + ["eval", "train", "eval"]
    assert [r["split"] for r in lb] == [r["split"] for r in la] == splits
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)


def _marker_file(path, n, seed, swap=False):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij"))
    with open(path, "w") as f:
        for i in range(n):
            prompt = "".join(rng.choice(letters, 6)) + ">"
            good = "".join(rng.choice(letters, 8))
            pos = rng.integers(0, 8)
            good = good[:pos] + "#" + good[pos + 1:]   # the marker token
            bad = "".join(rng.choice(letters, 8))
            c, r = (bad, good) if swap else (good, bad)
            f.write(json.dumps({"prompt": prompt, "chosen": c, "rejected": r}) + "\n")


@pytest.mark.parametrize("swap", [False, True])
def test_reward_model_learns_marker(tmp_path, swap):
    _marker_file(tmp_path / "train.jsonl", 512, 0, swap=swap)
    _marker_file(tmp_path / "test.jsonl", 128, 1)   # always the true labels
    cfg = shrink(load_config("rm", f"data={tmp_path / 'train.jsonl'}"), steps=60,
                 batch_size=16)
    cfg.eval_data.path = str(tmp_path / "test.jsonl")
    cfg.eval_data.format = "preference"
    cfg.train.lr = 3e-3
    cfg.train.eval_every = 0
    cfg.train.save_every = 0
    cfg.train.eval_batches = 0
    cfg.data.buckets = (32,)
    cfg.eval_data.buckets = (32,)
    summary, _ = runner.run(cfg, str(tmp_path / "rm"))
    if swap:
        assert summary["eval_accuracy"] < 0.05
    else:
        assert summary["eval_accuracy"] > 0.95


def test_rm_centring_in_the_weights_keeps_the_bias_at_zero(tmp_path):
    """rm.center_loss_coef: the prompts' mean reward is pulled to 0 by the weights; the score
    bias (which HF score heads cannot hold) stays exactly 0, so no post-hoc offset exists.
    Also: a fresh run evaluates before its first step (eval row at step 0)."""
    _marker_file(tmp_path / "train.jsonl", 256, 0)
    cfg = shrink(load_config("rm", f"data={tmp_path / 'train.jsonl'}"), steps=30,
                 batch_size=16)
    cfg.train.lr = 3e-3
    cfg.train.eval_every = 0
    cfg.train.save_every = 0
    cfg.data.buckets = (32,)
    cfg.rm.center_on_sft = False
    cfg.rm.center_loss_coef = 1.0
    summary, _ = runner.run(cfg, str(tmp_path / "rm"))
    with open(tmp_path / "rm" / "hf" / "config.json") as f:
        assert json.load(f)["jaxrlhf_score_bias"] == 0.0
    with open(tmp_path / "rm" / "hf" / "jaxrlhf.json") as f:
        assert json.load(f)["hf_score_offset"] == 0.0
    evals = [r for r in _train_rows(str(tmp_path / "rm")) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30]
    assert summary["eval_accuracy"] > 0.9 and summary["eval_mean_margin"] > 1.0
    assert summary["eval_center_penalty"] < 0.05 * summary["eval_mean_margin"] ** 2


def test_rm_centring_makes_demonstrations_score_zero(tmp_path):
    # 6 steps: the same train step program as test_resume_equals_uninterrupted[rm].
    cfg = shrink(load_config("rm"), steps=6)
    summary, model = runner.run(cfg, str(tmp_path / "rm"))
    assert summary["centring_examples"] > 0
    # Re-score the same demonstrations with the exported model: mean 0.
    from jaxrlhf.data import build_dataset
    ds = build_dataset(cfg.rm.center_data, "byte")
    rows = ds.iterator(16, shuffle=False, drop_remainder=False, num_epochs=1)
    m = load_hf(str(tmp_path / "rm" / "hf"), head="score")
    from jaxrlhf.models import gather_last
    tot, n = 0.0, 0
    for b in rows:
        r = np.asarray(gather_last(m(b["tokens"], b["attention_mask"]), b["attention_mask"]))
        keep = b["batch_mask"] > 0
        tot += r[keep].sum()
        n += keep.sum()
        if n >= cfg.rm.center_examples:
            break
    assert abs(tot / n) < 1e-4


def test_cli_entry_point_and_config_errors(tmp_path):
    env = dict(os.environ, JAXRLHF_NO_PROGRESS="1", PYTHONPATH=REPO)
    env["XLA_FLAGS"] = ""
    base = [sys.executable, "-m", "jaxrlhf.train", "--config", "configs/sft.py",
            "--workdir", str(tmp_path / "cli")]
    small = ["--config.train.steps=2", "--config.model.d_model=32", "--config.model.n_layers=1",
             "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
             "--config.model.mlp_dim=32", "--config.data.synthetic.num_examples=64",
             "--config.train.eval_every=0", "--config.train.batch_size=8"]
    out = subprocess.run(base + small, cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.exists(tmp_path / "cli" / "summary.json")
    bad = subprocess.run(base + ["--config.train.stepz=2"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "stepz" in bad.stderr
    missing = subprocess.run(base + small + ["--config.init_from=/nonexistent/model"], cwd=REPO,
                             env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "/nonexistent/model" in missing.stderr
