"""The critic-free family in the RL stage: GRPO / DAPO / REINFORCE++ runs on the built-in
task with Python rewards (no reward model, no critic), first-minibatch ratio 1, exact resume,
and the reward-function error policy wired through the stage."""
import os

import jax
import numpy as np
import pytest

from trainer_utils import (checkpoint_state, load_config, metric_rows, read_jsonl, run_preempted,
                          shrink_ppo)

from jaxrlhf.rewards import RewardFunctionError
from jaxrlhf.trainers import runner


def _config(stage_dirs, algo="grpo", **ppo):
    """4 prompts x 4 samples = 16 rows, two minibatches of 8, two epochs."""
    c = shrink_ppo(load_config("grpo", f"sft={stage_dirs['sft']},algo={algo}"), iterations=3)
    c.ppo.rollout_batch = 4
    c.ppo.samples_per_prompt = 4
    c.ppo.minibatch_size = 8
    # The random tiny policy scores -1 on the gold reward for every sample (uniform groups):
    # a reward that varies between its samples, plus the built-in one.
    c.ppo.reward_fns = ("trainer_utils:distinct_chars_reward, "
                        "jaxrlhf.rewards:sorting_gold*0.5, jaxrlhf.rewards:sorting_exact*0")
    if algo == "dapo":
        c.ppo.overlong_buffer = 2
    for k, v in ppo.items():
        c.ppo[k] = v
    return c




@pytest.mark.parametrize("algo", ["grpo", "dapo", "reinforce_pp"])
def test_critic_free_runs_without_critic_or_reward_model(tmp_path, stage_dirs, algo):
    d = str(tmp_path / algo)
    summary, _ = runner.run(_config(stage_dirs, algo), d)
    rows = metric_rows(d)
    assert len(rows) == 3
    for r in rows:
        # The sampler and the trainer share one distribution: the first minibatch's ratio is 1.
        assert r["first_ratio_mean"] == 1.0 and abs(r["first_approx_kl"]) < 1e-10
        for k in ("reward", "reward/sorting_gold", "reward/sorting_exact",
                  "reward/distinct_chars_reward", "kl", "entropy", "policy_loss",
                  "advantage_mean", "uniform_groups", "response_length"):
            assert np.isfinite(r[k]), k
        assert "value_loss" not in r and "rm_score" not in r
        assert r["reward_fn_failures"] == 0.0 and r["uniform_groups"] < 1.0
        # The reward is the weighted sum of the functions' scores.
        want = r["reward/distinct_chars_reward"] + 0.5 * r["reward/sorting_gold"]
        assert abs(r["reward"] - want) < 1e-5
    if algo == "grpo":
        assert all(r["kl_loss"] >= 0.0 for r in rows) and rows[-1]["kl_loss"] > 0.0
    state = checkpoint_state(d)
    assert set(state["params"]) == {"actor"}   # no critic parameters or optimizer state
    assert "eval_final_reward/sorting_exact" in summary
    assert os.path.exists(os.path.join(d, "hf", "config.json"))


def test_grpo_resume_equals_uninterrupted(tmp_path, stage_dirs, monkeypatch):
    cfg = _config(stage_dirs, "grpo", iterations=4, reward_norm="running")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    runner.run(cfg, full)
    assert run_preempted(cfg, part, monkeypatch) == 3
    jax.tree.map(np.testing.assert_array_equal, checkpoint_state(full), checkpoint_state(part))
    ra, rb = metric_rows(full), metric_rows(part)
    for x, y in zip(ra, rb):
        for k in ("generation_time_share", "elapsed_s"):   # wall-clock values
            x.pop(k), y.pop(k)
    assert ra == rb and len(ra) == 4


def test_reward_function_failures_follow_the_policy(tmp_path, stage_dirs):
    cfg = _config(stage_dirs, "grpo", iterations=1, reward_fns="trainer_utils:flaky_reward",
                  reward_fn_errors="penalty", reward_fn_penalty=-3.0)
    d = str(tmp_path / "penalty")
    runner.run(cfg, d)
    (row,) = metric_rows(d)
    logged = read_jsonl(os.path.join(d, "reward_fn_errors.jsonl"))
    assert row["reward_fn_failures"] == len(logged) > 0
    for rec in logged:
        assert rec["function"] == "trainer_utils:flaky_reward" and rec["iteration"] == 1
        assert "RuntimeError" in rec["error"] or "non-finite" in rec["error"]
    cfg.ppo.reward_fn_errors = "raise"
    with pytest.raises(RewardFunctionError, match=r"flaky_reward.* failed on row \d+"):
        runner.run(cfg, str(tmp_path / "raise"))
