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


def test_shared_prompt_forward_equals_the_full_forward_in_the_fused_update(tmp_path,
                                                                          stage_dirs):
    """One minibatch (the fused scoring pass + first update): the actor and reference forwards
    with each prompt run once for its 4 samples (ppo.share_prompt_forward, default) give the
    metrics and parameters of the full forwards up to float rounding; ratio exactly 1."""
    runs = {}
    for share in (True, False):
        d = str(tmp_path / f"share_{share}")
        runner.run(_config(stage_dirs, iterations=2, minibatch_size=16,
                           share_prompt_forward=share), d)
        runs[share] = (metric_rows(d), checkpoint_state(d))
    (ra, sa), (rb, sb) = runs[True], runs[False]
    assert len(ra) == len(rb) == 2
    assert all(r["first_ratio_mean"] == 1.0 and r["first_approx_kl"] == 0.0 for r in ra)
    for k in ("reward", "kl", "kl_loss", "entropy", "loss", "policy_loss", "grad_norm",
              "advantage_mean"):
        np.testing.assert_allclose([r[k] for r in ra], [r[k] for r in rb], rtol=1e-4,
                                   atol=1e-6, err_msg=k)
    assert ra[1]["kl"] != 0.0   # the actor moved
    # Adam's first steps are ±lr per element whatever the gradient's size, so an element
    # whose gradient is at rounding level (a rare token's embedding row) may step the other
    # way: the parameters agree up to a few such elements (measured: 19 of 35,168).
    close = [np.isclose(x, y, rtol=1e-4, atol=1e-6)
             for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"]))]
    assert sum(int(c.size - c.sum()) for c in close) <= 1e-3 * sum(c.size for c in close)


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
