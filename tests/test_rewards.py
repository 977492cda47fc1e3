"""Python reward functions: the spec parser, the error policy, the built-in rewards, the
arithmetic task's data, and the critic-free options' checks."""
import math

import numpy as np
import pytest

from trainer_utils import flaky_reward

from jaxrlhf import rewards as rw
from jaxrlhf.data import load_examples
from jaxrlhf.data.arithmetic import ArithmeticTask
from jaxrlhf.options import ALGORITHMS, PPOOptions, apply_algorithm, config_block, parse


def test_parse_reward_fns():
    fns = rw.parse_reward_fns("jaxrlhf.rewards:sorting_gold, jaxrlhf.rewards:sorting_exact*0.5")
    assert [(n, w) for n, _, w in fns] == [("jaxrlhf.rewards:sorting_gold", 1.0),
                                           ("jaxrlhf.rewards:sorting_exact", 0.5)]
    assert fns[0][1] is rw.sorting_gold
    for bad, msg in (("nocolon", "not 'package.module:function"),
                     ("jaxrlhf.rewards:sorting_gold*x", "weight 'x'"),
                     ("no_such_module_xyz:f", "cannot import"),
                     ("jaxrlhf.rewards:no_such_fn", "has no function")):
        with pytest.raises(ValueError, match=msg):
            rw.parse_reward_fns(bad)


def test_weighted_sum_and_per_function_means():
    fns = rw.RewardFunctions.from_spec(
        "jaxrlhf.rewards:arithmetic_exact, jaxrlhf.rewards:arithmetic_format*0.1")
    meta = [{"answer": "12", "finished": True}, {"answer": "5", "finished": True},
            {"answer": "-3", "finished": False}]
    total, info = fns(["7+5=", "2+3=", "1-4="], ["12", "it is 5.", "-3"], meta)
    np.testing.assert_allclose(total, [1.1, 1.0, 1.0], rtol=1e-6)
    assert info["reward/arithmetic_exact"] == 1.0
    assert math.isclose(info["reward/arithmetic_format"], 1 / 3)
    assert info["reward_fn_failures"] == 0 and info["failure_records"] == []


def test_error_policy_penalty_counts_and_records_each_row():
    fns = rw.RewardFunctions.from_spec("trainer_utils:flaky_reward", "penalty", -2.0)
    responses = ["xyz", "hha", "llb", "ok"]
    total, info = fns(["p"] * 4, responses, [{}] * 4)
    np.testing.assert_allclose(total, [3.0, -2.0, -2.0, 2.0])
    assert info["reward_fn_failures"] == 2
    rows = {r["row"]: r for r in info["failure_records"]}
    assert set(rows) == {1, 2}
    assert "RuntimeError" in rows[1]["error"] and "non-finite" in rows[2]["error"]
    assert rows[1]["response"] == "hha"


def test_error_policy_raise_names_the_function_and_row():
    fns = rw.RewardFunctions.from_spec("trainer_utils:flaky_reward", "raise")
    with pytest.raises(rw.RewardFunctionError, match=r"flaky_reward' failed on row 1"):
        fns(["p"] * 3, ["ok", "an a", "ok"], [{}] * 3)
    with pytest.raises(rw.RewardFunctionError, match="non-finite"):
        fns(["p"], ["b"], [{}])


def test_wrong_number_of_scores_always_raises():
    fns = rw.RewardFunctions([("x:f", lambda p, r, m: [1.0], 1.0)], "penalty")
    with pytest.raises(rw.RewardFunctionError, match=r"shape \(1,\) for 2 responses"):
        fns(["a", "b"], ["a", "b"], [{}, {}])
    assert flaky_reward(["p"], ["xx"], [{}]) == [2.0]


def test_sorting_rewards():
    assert rw.sorting_exact(["dbca>"], ["abcd"], [{"finished": True}]) == [1.0]
    assert rw.sorting_exact(["dbca>"], ["abcd"], [{"finished": False}]) == [0.0]
    assert rw.sorting_exact(["dbca>"], ["abdc"], [{"finished": True}]) == [0.0]
    assert rw.sorting_gold(["dbca>"], ["abcd"], [{"finished": True}]) == [1.0]
    assert rw.sorting_gold(["dbca>"], ["abcd"], [{"finished": False}]) == [0.0]


def test_arithmetic_rewards():
    meta = [{"answer": "81", "finished": True}] * 4
    assert rw.arithmetic_exact(["q"] * 4, ["81", "The answer is 81.", "18", "8 1"], meta) \
        == [1.0, 1.0, 0.0, 0.0]
    assert rw.arithmetic_format(["q"] * 4, ["81", " 81. ", "81 apples", ""], meta) \
        == [1.0, 1.0, 0.0, 0.0]


def test_arithmetic_task_rows_are_deterministic_and_correct():
    task = ArithmeticTask(3, max_operand=50, ops="+-*")
    rows = task.prompt_examples(50, "train")
    assert rows == ArithmeticTask(3, max_operand=50, ops="+-*").prompt_examples(50, "train")
    assert rows != task.prompt_examples(50, "test")
    for r in rows:
        expr = r["prompt"][:-1]
        assert r["prompt"].endswith("=") and str(eval(expr)) == r["answer"]   # noqa: S307
    sft = task.sft_examples(5)
    assert [s["response"] for s in sft] == [r["answer"] for r in rows[:5]]
    chat = ArithmeticTask(3, max_operand=50, ops="+-*", chat=True)
    m = chat.prompt_examples(1)[0]
    assert m["messages"][0]["role"] == "user" and "Answer with the number only" in \
        m["messages"][0]["content"]
    assert chat.sft_examples(1)[0]["messages"][-1] == {"role": "assistant",
                                                        "content": m["answer"]}


def test_arithmetic_prompts_carry_the_answer_as_metadata():
    examples, _ = load_examples(path="synthetic", format="prompt",
                                synthetic={"task": "arithmetic", "num_examples": 3})
    for e in examples:
        a, b = e["prompt"][:-1].split("+")
        assert e["meta"]["answer"] == str(int(a) + int(b))
    with pytest.raises(ValueError, match="arithmetic task has no 'ranking'"):
        load_examples(path="synthetic", format="ranking",
                      synthetic={"task": "arithmetic", "num_examples": 3})


def _ppo(**kw):
    block = config_block(PPOOptions)
    for k, v in kw.items():
        block[k] = v
    return parse(PPOOptions, block, "ppo")


def test_critic_free_option_checks():
    assert _ppo(advantage_estimator="grpo", samples_per_prompt=4).critic_kind == "none"
    assert _ppo().critic_kind == "separate"
    for kw, msg in ((dict(advantage_estimator="grpo"), "ppo.samples_per_prompt must be >= 2"),
                    (dict(advantage_estimator="grpo", samples_per_prompt=2, critic="shared"),
                     "ppo.critic must be 'auto' or 'none'"),
                    (dict(critic="none"), "ppo.critic 'none' needs a critic-free"),
                    (dict(samples_per_prompt=3, rollout_batch=32, minibatch_size=64),
                     "ppo.minibatch_size .* must divide the rollout rows"),
                    (dict(overlong_buffer=100, max_new_tokens=16), "ppo.overlong_buffer"),
                    (dict(reward_fns="nocolon"), "ppo.reward_fns entry"),
                    (dict(reward_fn_errors="ignore"), "ppo.reward_fn_errors")):
        with pytest.raises(ValueError, match=msg):
            _ppo(**kw)
    # Every named algorithm is a valid option set (with K = 4).
    for name in ALGORITHMS:
        block = config_block(PPOOptions)
        block.samples_per_prompt = 4
        apply_algorithm(block, name)
        parse(PPOOptions, block, "ppo")
    with pytest.raises(ValueError, match="unknown algorithm"):
        apply_algorithm(config_block(PPOOptions), "ppo2")
