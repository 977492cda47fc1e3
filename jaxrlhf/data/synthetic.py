"""The built-in synthetic task: sort the letters, with a hidden gold reward (see SYNTHETIC.md).

A prompt is 3-8 distinct letters from "abcdefghij" followed by ">", e.g. "dbca>"; the ideal
response is the letters sorted, "abcd", then EOS. Everything is printable ASCII, so the byte
tokenizer applies, and prompt + response + EOS is at most 18 bytes.

  SFT demonstrations   the ideal response corrupted at rate `noise` (per letter: substitute,
                       drop, duplicate or swap), so SFT learns a mediocre policy and PPO has
                       headroom.
  rankings / pairs     K distinct candidates per prompt with corruption rates drawn from
                       U(0, 0.7), ranked by a noisy Bradley-Terry labeller on the gold reward.
  prompts              PPO prompts from the same distribution.
  ptx text             1-3 lines of the sibling task "letters<" + letters sorted DESCENDING
                       (same language, different skill; the gold ">" answers never leak into it).

Gold reward (`gold_reward`, in [-1, 1]), n = number of prompt letters:
  1 - 2 * edit_distance(response, ideal) / n
  - overlength_penalty * max(0, len(response) - n) / n
  - repeat_penalty * (len(response) - number of distinct characters) / n
  - 1 if the response never ended (no EOS), clipped to [-1, 1].
Edit distance (rather than per-position matching) keeps the score graded: one dropped letter
costs 2/n wherever it is, instead of shifting every later letter out of place.
A proxy reward model trained on the rankings only sees near-length, ended responses, so it can
like long strings full of the prompt's letters; the gold reward punishes exactly those exploits.

Labeller: the order is a Plackett-Luce sample with weights exp(gold / temperature) (sort of
gold / temperature + Gumbel noise), so for a pair P(a > b) = sigmoid((g_a - g_b) / temperature)
(Bradley-Terry); with probability `label_noise` the labeller is careless and the ranking is a
uniformly random permutation (a pair is then flipped with probability label_noise / 2 on top).
With tie_margin > 0, neighbours in the order whose gold rewards differ by <= tie_margin share a
rank (never in a careless ranking).

Determinism: example i of a stream is drawn from np.random.default_rng((seed, stream, split, i)),
so the same seed gives the same examples, `sft_examples(10)` is a prefix of `sft_examples(100)`,
and split="train" / "test" give independent streams.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import numpy as np

# Keys of the `data.synthetic` block that belong to the arithmetic task (and its selector).
ARITHMETIC_KEYS = ("task", "max_operand", "ops", "chat")

_STREAMS = {"sft": 1, "ranking": 2, "preference": 3, "prompt": 4, "ptx": 5}


def _split_id(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


class SyntheticTask:
    """Letter sorting with a hidden gold reward; all generators are deterministic by seed."""

    marker = ">"
    ptx_marker = "<"

    def __init__(self, seed: int = 0, *, noise: float = 0.2, label_noise: float = 0.1,
                 temperature: float = 0.25, tie_margin: float = 0.0, min_letters: int = 3,
                 max_letters: int = 8, alphabet: str = "abcdefghij",
                 overlength_penalty: float = 1.0, repeat_penalty: float = 1.0,
                 candidate_noise: tuple[float, float] = (0.0, 0.7)):
        if not 1 <= min_letters <= max_letters <= len(alphabet):
            raise ValueError("need 1 <= min_letters <= max_letters <= len(alphabet)")
        if len(set(alphabet)) != len(alphabet) or not all(c.isalpha() and c.isascii()
                                                          for c in alphabet):
            raise ValueError("alphabet must be distinct ASCII letters")
        if temperature <= 0 or not 0 <= label_noise <= 1 or not 0 <= noise <= 1:
            raise ValueError("need temperature > 0 and noise, label_noise in [0, 1]")
        self.seed = int(seed)
        self.noise, self.label_noise = float(noise), float(label_noise)
        self.temperature, self.tie_margin = float(temperature), float(tie_margin)
        self.min_letters, self.max_letters = int(min_letters), int(max_letters)
        self.alphabet = alphabet
        self.overlength_penalty = float(overlength_penalty)
        self.repeat_penalty = float(repeat_penalty)
        self.candidate_noise = tuple(candidate_noise)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any) -> "SyntheticTask":
        """From the `data.synthetic` block (num_examples is ignored here)."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        for k in ("num_examples",) + ARITHMETIC_KEYS:
            d.pop(k, None)
        return cls(d.pop("seed", 0), **d)

    @property
    def max_response_len(self) -> int:
        """Length of the longest ideal response (EOS not counted)."""
        return self.max_letters

    # ---------------------------------------------------------------------------- generation

    def _rng(self, stream: str, split: str, i: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, _STREAMS[stream], _split_id(split), i))

    def sample_prompt(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.min_letters, self.max_letters + 1))
        letters = rng.choice(list(self.alphabet), size=n, replace=False)
        return "".join(letters) + self.marker

    def letters(self, prompt: str) -> str:
        """The prompt's letters (prompt without its marker)."""
        return prompt[:-1] if prompt.endswith(self.marker) else prompt

    def ideal_response(self, prompt: str) -> str:
        return "".join(sorted(self.letters(prompt)))

    def corrupt(self, response: str, rate: float, rng: np.random.Generator) -> str:
        """Each letter, with probability `rate`: substituted, dropped, duplicated or swapped."""
        out = list(response)
        i = 0
        while i < len(out):
            if rng.random() < rate:
                op = int(rng.integers(4))
                if op == 0:  # substitute
                    out[i] = str(rng.choice([c for c in self.alphabet if c != out[i]]))
                elif op == 1:  # drop
                    del out[i]
                    continue
                elif op == 2:  # duplicate (repetition)
                    out.insert(i, out[i])
                    i += 1
                elif i + 1 < len(out):  # swap with the next letter
                    out[i], out[i + 1] = out[i + 1], out[i]
                    i += 1
            i += 1
        if not out:
            out = [str(rng.choice(list(self.alphabet)))]
        return "".join(out)

    def sft_examples(self, n: int, split: str = "train") -> list[dict[str, str]]:
        """{prompt, response}: noisy demonstrations (the ideal corrupted at rate `noise`)."""
        out = []
        for i in range(n):
            rng = self._rng("sft", split, i)
            prompt = self.sample_prompt(rng)
            out.append({"prompt": prompt,
                        "response": self.corrupt(self.ideal_response(prompt), self.noise, rng)})
        return out

    def _candidates(self, prompt: str, k: int, rng: np.random.Generator) -> list[str]:
        ideal = self.ideal_response(prompt)
        lo, hi = self.candidate_noise
        found: list[str] = []
        for _ in range(50 * k):
            cand = self.corrupt(ideal, float(rng.uniform(lo, hi)), rng)
            if cand not in found:
                found.append(cand)
                if len(found) == k:
                    return found
        raise RuntimeError(f"could not draw {k} distinct candidates for {prompt!r}")

    def ranking_examples(self, n: int, k: int = 4, split: str = "train",
                         min_k: int | None = None) -> list[dict[str, Any]]:
        """{prompt, responses, ranks}: K distinct candidates ranked by the noisy labeller.

        K is `k`, or uniform in [min_k, k] per row when min_k is given (variable K).
        """
        out = []
        for i in range(n):
            rng = self._rng("ranking", split, i)
            prompt = self.sample_prompt(rng)
            kk = k if min_k is None else int(rng.integers(min_k, k + 1))
            responses = self._candidates(prompt, kk, rng)
            out.append({"prompt": prompt, "responses": responses,
                        "ranks": self.label_ranking(prompt, responses, rng=rng)})
        return out

    def preference_examples(self, n: int, split: str = "train") -> list[dict[str, str]]:
        """{prompt, chosen, rejected}: two candidates labelled by the noisy BT labeller."""
        out = []
        for i in range(n):
            rng = self._rng("preference", split, i)
            prompt = self.sample_prompt(rng)
            a, b = self._candidates(prompt, 2, rng)
            first = self.gold_label(prompt, a, b, rng=rng)
            chosen, rejected = (a, b) if first == 0 else (b, a)
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    def prompt_examples(self, n: int, split: str = "train") -> list[dict[str, str]]:
        """{prompt}: PPO prompts."""
        return [{"prompt": self.sample_prompt(self._rng("prompt", split, i))} for i in range(n)]

    def ptx_examples(self, n: int, split: str = "train") -> list[dict[str, str]]:
        """{text}: 1-3 lines "letters<" + letters sorted descending (the sibling skill)."""
        out = []
        for i in range(n):
            rng = self._rng("ptx", split, i)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                letters = self.letters(self.sample_prompt(rng))
                lines.append(letters + self.ptx_marker + "".join(sorted(letters, reverse=True)))
            out.append({"text": "\n".join(lines)})
        return out

    # ---------------------------------------------------------------------------- gold oracle

    def gold_reward(self, prompt: str, response: str, ended: bool = True) -> float:
        """Hidden gold reward in [-1, 1] (see module docstring).

        `response` is the decoded response text without EOS; `ended` says whether the policy
        produced EOS (False: it never ended, -1 penalty).
        """
        target = self.ideal_response(prompt)
        n = max(len(target), 1)
        score = 1.0 - 2.0 * edit_distance(response, target) / n
        score -= self.overlength_penalty * max(0, len(response) - n) / n
        score -= self.repeat_penalty * (len(response) - len(set(response))) / n
        if not ended:
            score -= 1.0
        # Rounded so that equal scores reached by different float paths compare equal (ties).
        return round(min(1.0, max(-1.0, score)), 6)

    def gold_reward_batch(self, prompts: Sequence[str], responses: Sequence[str],
                          ended: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
        """float32 [B] gold rewards; ended defaults to all True."""
        if ended is None:
            ended = [True] * len(prompts)
        if not len(prompts) == len(responses) == len(ended):
            raise ValueError("prompts, responses and ended must have the same length")
        return np.asarray([self.gold_reward(p, r, bool(e))
                           for p, r, e in zip(prompts, responses, ended)], np.float32)

    def label_ranking(self, prompt: str, responses: Sequence[str],
                      rng: np.random.Generator | None = None,
                      ended: Sequence[bool] | None = None) -> list[int]:
        """Ranks (0 = best) from the labeller. rng=None: the noiseless oracle (sort by gold,
        ties by position); otherwise the noisy Plackett-Luce / Bradley-Terry labeller."""
        ended = [True] * len(responses) if ended is None else list(ended)
        gold = np.asarray([self.gold_reward(prompt, r, e) for r, e in zip(responses, ended)])
        careless = rng is not None and rng.random() < self.label_noise
        if rng is None:
            order = np.argsort(-gold, kind="stable")
        elif careless:
            order = rng.permutation(len(responses))
        else:
            order = np.argsort(-(gold / self.temperature + rng.gumbel(size=len(responses))),
                               kind="stable")
        ranks = [0] * len(responses)
        rank = 0
        for pos, idx in enumerate(order):
            if pos > 0:
                tie = (not careless and self.tie_margin > 0
                       and abs(gold[idx] - gold[order[pos - 1]]) <= self.tie_margin)
                rank += 0 if tie else 1
            ranks[int(idx)] = rank
        return ranks

    def gold_label(self, prompt: str, a: str, b: str, *, ended_a: bool = True,
                   ended_b: bool = True, rng: np.random.Generator | None = None) -> int:
        """0 if `a` is preferred to `b`, 1 otherwise. rng=None: the noiseless oracle (a tie goes
        to a); with rng: the noisy BT labeller, P(a > b) = (1 - label_noise) *
        sigmoid((g_a - g_b) / temperature) + label_noise / 2."""
        ga = self.gold_reward(prompt, a, ended_a)
        gb = self.gold_reward(prompt, b, ended_b)
        if rng is None:
            return 0 if ga >= gb else 1
        if rng.random() < self.label_noise:
            return int(rng.integers(2))
        p_a = 1.0 / (1.0 + np.exp(-(ga - gb) / self.temperature))
        return 0 if rng.random() < p_a else 1

    def random_text(self, n: int, seed: int = 0, max_len: int | None = None) -> list[str]:
        """Random printable-ASCII strings (a baseline the gold reward must rank low)."""
        rng = np.random.default_rng((self.seed, 99, seed))
        max_len = max_len or 2 * self.max_letters
        return ["".join(chr(int(c)) for c in rng.integers(33, 127, rng.integers(1, max_len + 1)))
                for _ in range(n)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def synthetic_rows(opts) -> list:
    """Rows of the format in `opts` (a DataOptions) from the synthetic task, for load_examples."""
    from jaxrlhf.data.formats import RawRow

    syn = dict(opts.synthetic)
    n = int(syn.get("num_examples", 4096))
    fmt, split = opts.format, opts.split
    kind = syn.get("task", "sort")
    if kind == "arithmetic":
        from jaxrlhf.data.arithmetic import ArithmeticTask
        arith = ArithmeticTask(int(syn.get("seed", 0)), max_operand=syn.get("max_operand", 99),
                               ops=syn.get("ops", "+"), chat=syn.get("chat", False))
        if fmt not in ("sft", "prompt"):
            raise ValueError(f"the arithmetic task has no {fmt!r} data (it has sft, prompt)")
        rows = (arith.sft_examples if fmt == "sft" else arith.prompt_examples)(n, split)
        name = f"synthetic:arithmetic:{fmt}:{split}"
        return [RawRow(name, i + 1, row, row) for i, row in enumerate(rows)]
    if kind != "sort":
        raise ValueError(f"data.synthetic.task must be 'sort' or 'arithmetic', got {kind!r}")
    task = SyntheticTask.from_config(syn)
    if fmt == "sft":
        rows = task.sft_examples(n, split)
    elif fmt == "ranking":
        rows = task.ranking_examples(n, opts.max_k, split)
    elif fmt == "preference":
        rows = task.preference_examples(n, split)
    elif fmt == "prompt":
        rows = task.prompt_examples(n, split)
    elif fmt == "ptx":
        rows = task.ptx_examples(n, split)
    else:
        raise ValueError(f"the synthetic task has no {fmt!r} data (it has sft, ranking, "
                         "preference, prompt, ptx)")
    name = f"synthetic:{fmt}:{split}"
    return [RawRow(name, i + 1, row, row) for i, row in enumerate(rows)]
