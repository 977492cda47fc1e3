"""PPO-ptx trainer and the pipeline stage: runs, first-minibatch invariants, KL 0 at
actor == reference, exact resume (KL controller and running reward statistics included),
8 fake devices, and a pipeline that resumes after being killed in each stage."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from trainer_utils import (checkpoint_state, load_config, metric_rows, read_jsonl, run_preempted,
                          shrink_pipeline, shrink_ppo)

from jaxrlhf.data import batching
from jaxrlhf.trainers import common, runner


# test_ppo_runs_and_first_minibatch_invariants and the 1-device run of
# test_ppo_on_eight_devices_matches_one use the same config (ptx term, critic as a value head on
# the actor's trunk; the separate critic runs in the resume and pipeline tests), so the
# session's compilation cache compiles its programs once for both.
SHARED_RUN = dict(ptx_coef=0.1, critic="shared")


def _ppo_config(stage_dirs, **ppo):
    """`stage_dirs` (conftest.py): tiny SFT and RM exports, shared by the whole session."""
    c = shrink_ppo(load_config("ppo", f"sft={stage_dirs['sft']},rm={stage_dirs['rm']}"))
    for k, v in ppo.items():
        c.ppo[k] = v
    return c




def test_ppo_runs_and_first_minibatch_invariants(tmp_path, stage_dirs):
    """Every iteration's first minibatch has ratio 1, approx_kl 0 and clipfrac 0; the first
    iteration (actor == reference) has KL exactly 0. The scoring pass and the update step are
    different XLA programs (batch 8 vs minibatch 4), so single log-probs may differ by one
    float32 ulp: approx_kl is 0 up to ~1e-14, the ratio mean is exactly 1."""
    cfg = _ppo_config(stage_dirs, **SHARED_RUN)
    summary, _ = runner.run(cfg, str(tmp_path / "ppo"))
    rows = metric_rows(str(tmp_path / "ppo"))
    assert len(rows) == 3
    for r in rows:
        assert r["first_ratio_mean"] == 1.0
        assert abs(r["first_approx_kl"]) < 1e-10
        assert r["first_clipfrac"] == 0.0
        for k in ("rm_score", "gold_reward", "kl", "entropy", "clipfrac", "approx_kl",
                  "value_loss", "explained_variance", "response_length", "eos_rate",
                  "ratio_mean", "ratio_max", "ptx_loss"):
            assert np.isfinite(r[k]), k
    assert rows[0]["kl"] == 0.0 and rows[0]["kl_per_token"] == 0.0
    assert rows[-1]["kl"] != 0.0   # the actor moved
    d = str(tmp_path / "ppo")
    for f in ("summary.json", "curves.png", "samples.jsonl", "eval_initial_policy.json",
              os.path.join("hf", "config.json")):
        assert os.path.exists(os.path.join(d, f)), f
    assert summary["eval_initial_kl"] == 0.0
    assert "eval_final_gold_reward" in summary


def test_ppo_resume_equals_uninterrupted(tmp_path, stage_dirs, monkeypatch):
    """Adaptive KL controller + running reward normalisation: both are in the resumed state."""
    cfg = _ppo_config(stage_dirs, iterations=4, kl_controller="adaptive", kl_target=0.01,
                      kl_horizon=100, reward_norm="running")
    full = str(tmp_path / "full")
    runner.run(cfg, full)

    part = str(tmp_path / "part")
    assert run_preempted(cfg, part, monkeypatch) == 3

    a, b = checkpoint_state(full), checkpoint_state(part)
    jax.tree.map(np.testing.assert_array_equal, a, b)   # bitwise, every piece of state
    assert float(a["kl_ctl"]["kl_coef"]) != cfg.ppo.kl_coef   # the controller really moved
    assert float(a["reward_stats"]["count"]) == 4 * cfg.ppo.rollout_batch
    ra, rb = metric_rows(full), metric_rows(part)
    for x, y in zip(ra, rb):
        for k in ("generation_time_share", "elapsed_s"):   # wall-clock values
            x.pop(k), y.pop(k)
    assert ra == rb


def test_fused_first_update_equals_two_programs(tmp_path, stage_dirs):
    """One minibatch per epoch: the fused scoring pass + first update (default) against the
    separate programs (ppo.fused_first_update=False) -- same losses, metrics and parameters up
    to float rounding (the unfused path permutes the minibatch's rows), over two iterations of
    two epochs with the ptx term and a separate critic; the fused update's ratio is exactly 1
    and its approx_kl and clipfrac exactly 0."""
    runs = {}
    for fused in (True, False):
        cfg = _ppo_config(stage_dirs, iterations=2, minibatch_size=8, ptx_coef=0.1,
                          fused_first_update=fused)
        d = str(tmp_path / f"fused_{fused}")
        runner.run(cfg, d)
        runs[fused] = (metric_rows(d), checkpoint_state(d))
    (ra, sa), (rb, sb) = runs[True], runs[False]
    assert len(ra) == len(rb) == 2
    for r in ra:
        assert r["first_ratio_mean"] == 1.0
        assert r["first_approx_kl"] == 0.0 and r["first_clipfrac"] == 0.0
    for k in ("rm_score", "kl", "entropy", "loss", "policy_loss", "value_loss", "ptx_loss",
              "approx_kl", "ratio_mean", "explained_variance", "grad_norm", "value_mean",
              "return_mean"):
        np.testing.assert_allclose([r[k] for r in ra], [r[k] for r in rb], rtol=1e-4,
                                   atol=1e-6, err_msg=k)
    assert ra[1]["kl"] != 0.0   # the actor moved
    for part in ("params", "opt_state", "reward_stats"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                     sa[part], sb[part])
    assert int(sa["updates"]) == int(sb["updates"]) == 4


def test_ppo_on_eight_devices_matches_one(tmp_path, stage_dirs):
    cfg = _ppo_config(stage_dirs, **SHARED_RUN)
    runner.run(cfg, str(tmp_path / "one"))
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    runner.run(cfg, str(tmp_path / "eight"))
    ra, rb = metric_rows(str(tmp_path / "one")), metric_rows(str(tmp_path / "eight"))
    assert len(ra) == len(rb) == cfg.ppo.iterations
    for k in ("rm_score", "kl", "loss", "value_loss", "response_length", "ptx_loss"):
        np.testing.assert_allclose([r[k] for r in ra], [r[k] for r in rb], rtol=2e-4,
                                   atol=1e-5, err_msg=k)


def _pipeline_config():
    return shrink_pipeline(load_config("tiny_pipeline", "iterations=2"))


def test_pipeline_resumes_after_kill_in_each_stage(tmp_path, monkeypatch):
    cfg = _pipeline_config()
    full = str(tmp_path / "full")
    runner.run(cfg, full)

    # Kill (SIGTERM) once in SFT, once in RM, once in PPO: the k-th training batch overall.
    part = str(tmp_path / "part")
    orig = batching.BatchIterator.__next__
    calls = {"n": 0}
    for kill_at, stage in ((2, "sft"), (3, "rm"), (2, "ppo")):
        calls["n"] = 0

        def interrupting(self, kill_at=kill_at):
            if self.shuffle:
                calls["n"] += 1
                if calls["n"] == kill_at + 1:
                    os.kill(os.getpid(), signal.SIGTERM)
            return orig(self)

        with monkeypatch.context() as m:
            m.setattr(batching.BatchIterator, "__next__", interrupting)
            with pytest.raises(common.Preempted, match=stage):
                runner.run(cfg, part)
    runner.run(cfg, part)
    for stage in ("sft", "rm", "ppo"):
        a, b = checkpoint_state(os.path.join(full, stage)), checkpoint_state(os.path.join(part, stage))
        jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    s = json.load(open(os.path.join(part, "summary.json")))
    assert set(s) == {"sft", "rm", "ppo"}


def test_iterated_rlhf_round_labels_policy_samples(tmp_path):
    """Round 2 of iterated RLHF: K samples of the PPO policy per fresh prompt ranked by the
    built-in labeller, the RM retrained on them from round 1's, PPO continued from the policy
    with the SFT model as reference."""
    cfg = _pipeline_config()
    cfg.pipeline.iterations = 2
    cfg.pipeline.comparisons_per_round = 8
    cfg.pipeline.rm_round_steps = 2
    d = str(tmp_path / "run")
    summaries, _ = runner.run(cfg, d)
    assert set(summaries) == {"sft", "rm", "ppo", "rm_2", "ppo_2"}
    rows = read_jsonl(os.path.join(d, "round_2", "comparisons.jsonl"))
    assert 0 < len(rows) <= 8
    for row in rows:
        assert len(set(row["responses"])) == len(row["ranks"]) >= 2
    assert summaries["rm_2"]["steps"] == 2
