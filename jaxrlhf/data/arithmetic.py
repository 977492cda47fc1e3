"""The built-in verifiable task: integer arithmetic with an exact-answer checker.

A prompt asks for a + b, a − b or a × b with operands in [0, max_operand]; the answer is the
exact integer. Two renderings of the same problems:

  raw  (chat=False)  "23+58="           for byte-level models; the ideal response is "81"
  chat (chat=True)   one user message "What is 23 + 58? Answer with the number only."
                     (rendered by the tokenizer's chat template)

Rows: `prompt_examples` -> {prompt | messages, answer} (the answer travels to reward functions
as metadata), `sft_examples` -> {prompt, response} / {messages} with the ideal answer.
Deterministic by seed like `SyntheticTask`: example i of a split comes from
np.random.default_rng((seed, 6, crc32(split), i)). Rewards: `jaxrlhf.rewards.arithmetic_exact`
(1 if the response's last integer equals the answer) and `arithmetic_format` (1 if the
response is a bare integer that ended).
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_STREAM = 6


class ArithmeticTask:
    """a <op> b = ? with an exact integer answer."""

    def __init__(self, seed: int = 0, *, max_operand: int = 99, ops: str = "+",
                 chat: bool = False):
        if not ops or any(o not in _OPS for o in ops):
            raise ValueError(f"data.synthetic.ops must be made of '+', '-', '*', got {ops!r}")
        if int(max_operand) < 1:
            raise ValueError(f"data.synthetic.max_operand must be >= 1, got {max_operand!r}")
        self.seed, self.max_operand, self.ops, self.chat = (int(seed), int(max_operand),
                                                            str(ops), bool(chat))

    def problem(self, split: str, i: int) -> tuple[int, str, int]:
        rng = np.random.default_rng((self.seed, _STREAM, zlib.crc32(split.encode()), i))
        a, b = (int(x) for x in rng.integers(0, self.max_operand + 1, size=2))
        return a, self.ops[int(rng.integers(len(self.ops)))], b

    def _row(self, a: int, op: str, b: int) -> dict[str, Any]:
        if self.chat:
            sym = {"*": "×"}.get(op, op)
            return {"messages": [{"role": "user", "content":
                                  f"What is {a} {sym} {b}? Answer with the number only."}]}
        return {"prompt": f"{a}{op}{b}="}

    def prompt_examples(self, n: int, split: str = "train") -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            a, op, b = self.problem(split, i)
            out.append(self._row(a, op, b) | {"answer": str(_OPS[op](a, b))})
        return out

    def sft_examples(self, n: int, split: str = "train") -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            a, op, b = self.problem(split, i)
            row, answer = self._row(a, op, b), str(_OPS[op](a, b))
            if self.chat:
                out.append({"messages": row["messages"] + [{"role": "assistant",
                                                            "content": answer}]})
            else:
                out.append({"prompt": row["prompt"], "response": answer})
        return out
