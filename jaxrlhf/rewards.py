"""Rewards as Python functions (`ppo.reward_fns`), and the built-in ones.

A reward function is any importable callable

    fn(prompts: list[str], responses: list[str], metadata: list[dict]) -> one score per response

(a list, tuple or 1-D array of numbers). `prompts` are the prompt texts (chat prompts rendered
with the template), `responses` the decoded responses without the stop token, and
`metadata[i]` holds `finished` (the response ended with a stop token), `length` (response
tokens) and the prompt row's other data fields (e.g. `answer` for the arithmetic task).

`ppo.reward_fns = "pkg.module:fn, other.module:fn2*0.5"` names them ("*w" weights one;
default 1); the scores are weighted, summed and added to ppo.reward_model_coef × the reward
model's score (when a reward model is given). A function that raises, returns a non-finite
score or the wrong number of scores is never ignored: with ppo.reward_fn_errors = "raise" the
run stops with an error naming the function and the row; with "penalty" the row's score from
that function is ppo.reward_fn_penalty, and the stage counts (`reward_fn_failures`) and logs
each case (`reward_fn_errors.jsonl`: function, row, prompt, response, error).

Built-ins (use them as "jaxrlhf.rewards:<name>"):
  sorting_gold      the sorting task's gold reward in [-1, 1] (default task parameters)
  sorting_exact     1 if the response is exactly the sorted letters and ended, else 0
  arithmetic_exact  1 if the last integer in the response equals metadata["answer"]
  arithmetic_format 1 if the response is a bare integer (spaces / a final "." allowed) and ended
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# ------------------------------------------------------------------------------------------
# Built-in reward functions.

_INT = re.compile(r"-?\d+")
_BARE_INT = re.compile(r"\s*-?\d+\.?\s*")


def _sorting_task():
    from jaxrlhf.data import SyntheticTask
    return SyntheticTask()


def sorting_gold(prompts, responses, metadata):
    """The sorting task's gold reward (`SyntheticTask.gold_reward`), in [-1, 1]."""
    task = _sorting_task()
    return [task.gold_reward(p, r, bool(m.get("finished", True)))
            for p, r, m in zip(prompts, responses, metadata)]


def sorting_exact(prompts, responses, metadata):
    """1.0 if the response is exactly the prompt's letters sorted and it ended, else 0.0."""
    task = _sorting_task()
    return [float(r == task.ideal_response(p) and bool(m.get("finished", True)))
            for p, r, m in zip(prompts, responses, metadata)]


def arithmetic_exact(prompts, responses, metadata):
    """1.0 if the last integer in the response equals metadata["answer"], else 0.0."""
    out = []
    for r, m in zip(responses, metadata):
        found = _INT.findall(r)
        out.append(float(bool(found) and found[-1] == str(m["answer"]).strip()))
    return out


def arithmetic_format(prompts, responses, metadata):
    """1.0 if the response is a bare integer and ended, else 0.0."""
    return [float(bool(_BARE_INT.fullmatch(r)) and bool(m.get("finished", True)))
            for r, m in zip(responses, metadata)]


# ------------------------------------------------------------------------------------------
# Loading and calling.

def parse_reward_fns(spec: str, load: bool = True) -> List[Tuple[str, Optional[Callable], float]]:
    """"mod:fn[*w], ..." -> [(name, fn or None when not `load`, weight)]; ValueError names the
    bad entry."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, _, weight = entry.partition("*")
        name = name.strip()
        module, sep, attr = name.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"entry {entry!r} is not 'package.module:function[*weight]'")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"entry {entry!r}: weight {weight!r} is not a number") from None
        fn = None
        if load:
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"reward function {name!r}: cannot import {module!r} ({e})") \
                    from None
            fn = getattr(mod, attr, None)
            if not callable(fn):
                raise ValueError(f"reward function {name!r}: {module!r} has no function "
                                 f"{attr!r}")
        out.append((name, fn, w))
    return out


class RewardFunctionError(ValueError):
    """A reward function failed and the policy is "raise"."""


@dataclasses.dataclass
class RewardFunctions:
    """The weighted sum of Python reward functions, with the error policy of the module
    docstring. `__call__` returns (scores float32 [B], info): info has each function's mean
    score under "reward/<fn>" (its per-row scores under info["per_row"]["reward/<fn>"]),
    "reward_fn_failures", and the failure records ("failure_records")."""

    fns: List[Tuple[str, Callable, float]]
    on_error: str = "raise"
    penalty: float = -1.0

    @classmethod
    def from_spec(cls, spec: str, on_error: str = "raise", penalty: float = -1.0):
        return cls(parse_reward_fns(spec), on_error, float(penalty))

    def _fail(self, name, row, prompts, responses, error, records):
        if self.on_error == "raise":
            raise RewardFunctionError(
                f"reward function {name!r} failed on row {row} (prompt {prompts[row][:80]!r},"
                f" response {responses[row][:80]!r}): {error}")
        records.append({"function": name, "row": int(row), "prompt": prompts[row],
                        "response": responses[row], "error": error})
        return self.penalty

    def _one(self, name, fn, prompts, responses, metadata, records) -> np.ndarray:
        n = len(responses)
        try:
            vals = fn(prompts, responses, metadata)
        except Exception:   # locate the failing rows one by one
            vals = None
        if vals is not None:
            try:
                arr = np.asarray(vals, np.float64)
            except (TypeError, ValueError) as e:
                raise RewardFunctionError(f"reward function {name!r} returned something that "
                                          f"is not a list of numbers: {e}") from None
            if arr.shape != (n,):
                raise RewardFunctionError(f"reward function {name!r} returned shape "
                                          f"{arr.shape} for {n} responses")
        else:
            arr = np.zeros(n)
            for i in range(n):
                try:
                    v = fn([prompts[i]], [responses[i]], [metadata[i]])
                    arr[i] = float(np.asarray(v, np.float64).reshape(-1)[0])
                except Exception as e:  # noqa: BLE001 - reported by the policy
                    arr[i] = self._fail(name, i, prompts, responses,
                                        f"{type(e).__name__}: {e}", records)
        for i in np.flatnonzero(~np.isfinite(arr)):
            arr[i] = self._fail(name, i, prompts, responses,
                                f"non-finite score {arr[i]!r}", records)
        return arr

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Dict[str, Any]]) -> Tuple[np.ndarray, Dict[str, Any]]:
        prompts, responses, metadata = list(prompts), list(responses), list(metadata)
        total = np.zeros(len(responses))
        info: Dict[str, Any] = {"per_row": {}}
        records: List[Dict[str, Any]] = []
        for name, fn, w in self.fns:
            vals = self._one(name, fn, prompts, responses, metadata, records)
            key = f"reward/{name.rpartition(':')[2]}"
            info[key] = float(np.mean(vals)) if len(vals) else 0.0
            info["per_row"][key] = vals
            total += w * vals
        info["reward_fn_failures"] = float(len(records))
        info["failure_records"] = records
        if not np.all(np.isfinite(total)):
            raise RewardFunctionError("reward functions gave a non-finite weighted sum "
                                      "(a weight or the penalty is not finite)")
        return total.astype(np.float32), info

