"""Prompts -> sampled, scored experience: the part every on-policy RL stage shares.

    sampling = Sampling(max_new_tokens=64, temperature=1.0)
    rollout  = sample(policy, prompt_tokens, prompt_mask, rng, sampling, eos_id=..., pad_id=...,
                      k=4)                    # K samples per prompt, rows prompt-major
    ref_logp = response_logprobs(ref_graphdef, ref_params, rollout, sampling)     # [B·K, N]
    score    = ModelReward(rm_graphdef)(rm_params, rollout["tokens"], rollout["mask"])

A rollout is a dict of arrays: tokens / mask [B, L = P + N] (left-padded prompt + response),
response_tokens / response_mask [B, N] (the mask covers the response up to and including its
first stop token) and finished [B] (a stop token was sampled). The hidden state at position
P - 1 + t predicts response token t, so a response's log-probs and values are read from the
positions P - 1 .. L - 2 (`response_rows`). Log-probs are under the sampling distribution
(`jaxrlhf.generation.sampling_logprobs`: temperature, top-k, top-p), the distribution the
tokens were drawn from.

Reward sources:
  ModelReward(graphdef)                 a reward model's score at the last real token; with
                                        ensemble_coef=λ, a stacked ensemble's mean − λ·std
                                        (`jaxrlhf.objectives.uncertainty_reward`). Pure: it
                                        runs inside the jitted scoring program.
Python reward functions of the decoded texts are `jaxrlhf.rewards.RewardFunctions` (host side,
before the scoring program; `decode_responses` gives their texts).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx

from jaxrlhf.generation import generate, sampling_logprobs
from jaxrlhf.models.reward import member_rewards, sequence_rewards
from jaxrlhf.objectives.uncertainty import uncertainty_reward

ROLLOUT_KEYS = ("tokens", "mask", "response_tokens", "response_mask", "finished")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling distribution of a rollout and of its log-probs."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def logprob_kw(self) -> Dict[str, Any]:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def sample(policy, prompt_tokens, prompt_mask, rng, sampling: Sampling, *, eos_id, pad_id: int,
           k: int = 1, mesh=None, greedy: bool = False) -> Dict[str, jax.Array]:
    """K sampled responses per prompt (row i·K + j is sample j of prompt i) as a rollout dict.
    `policy` is an LM-head `Transformer` or its (graphdef, params) pair. Each prompt is
    prefilled once and its KV cache shared by its K samples (`generate(num_samples=k)`); the
    result equals sampling the prompts repeated K times with the same rng. `greedy` takes the
    argmax instead (log-probs still under `sampling`)."""
    res = generate(policy, prompt_tokens, prompt_mask, rng,
                   max_new_tokens=sampling.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                   num_samples=k, mesh=mesh, greedy=greedy, **sampling.logprob_kw())
    return {"tokens": res.tokens, "mask": res.mask, "response_tokens": res.response_tokens,
            "response_mask": res.response_mask, "finished": res.finished}


def response_rows(tokens, n_resp: int) -> slice:
    """The positions whose hidden states predict the N response tokens: P-1 .. L-2. Model
    forwards take it as `select`, so their last layer runs only there."""
    length = tokens.shape[1]
    return slice(length - n_resp - 1, length - 1)


def response_logprobs(graphdef, params, rollout, sampling: Sampling, group: int = 1):
    """log π(response token) [B, N] under the sampling distribution (the LM head chunked over
    positions for large vocabularies: `Transformer.head_reduce`). `group` = K for a rollout
    of K samples per prompt in sample order: each prompt's positions run once for its K rows
    (`Transformer.hidden`)."""
    model = nnx.merge(graphdef, params)
    resp, tokens = rollout["response_tokens"], rollout["tokens"]
    h = model.hidden(tokens, rollout["mask"], select=response_rows(tokens, resp.shape[1]),
                     group=group)
    return model.head_reduce(
        h, lambda z, y: sampling_logprobs(z, y, **sampling.logprob_kw()), resp)


@dataclasses.dataclass(frozen=True)
class ModelReward:
    """A reward model (or a stacked ensemble with `ensemble_coef`) as a pure function
    (params, tokens [B, T], mask [B, T]) -> scores [B]."""

    graphdef: Any
    ensemble_coef: Optional[float] = None

    def __call__(self, params, tokens, mask):
        if self.ensemble_coef is None:
            return sequence_rewards(params, self.graphdef, tokens, mask)
        return uncertainty_reward(member_rewards(params, self.graphdef, tokens, mask),
                                  self.ensemble_coef)


def decode_responses(tokenizer, response_tokens, response_mask,
                     skip_ids: Sequence[int] = ()) -> List[str]:
    """Texts of the masked response tokens (without `skip_ids`)."""
    skip = set(int(i) for i in skip_ids)
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m and int(t) not in skip])
            for row, mrow in zip(np.asarray(response_tokens), np.asarray(response_mask))]


def sample_texts(policy, dataset, sampling: Sampling, *, k: int, batch_size: int,
                 key_fn: Callable[[int, int], jax.Array], tokenizer, mesh=None,
                 skip_ids: Sequence[int] = ()) -> Dict[int, List[Tuple[str, bool]]]:
    """{data row index: [(response text, ended), ...] × k} for every row of a prompt-format
    dataset (one pass, in order); sample j of batch i is drawn with key_fn(i, j)."""
    out: Dict[int, List[Tuple[str, bool]]] = {}
    it = dataset.iterator(batch_size, shuffle=False, drop_remainder=False, num_epochs=1)
    for i, b in enumerate(it):
        keep = b["batch_mask"] > 0
        for j in range(k):
            r = sample(policy, b["prompt_tokens"], b["prompt_mask"], key_fn(i, j), sampling,
                       eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id, mesh=mesh)
            texts = decode_responses(tokenizer, r["response_tokens"], r["response_mask"],
                                     skip_ids)
            fin = np.asarray(r["finished"])
            for row in np.nonzero(keep)[0]:
                out.setdefault(int(b["index"][row]), []).append((texts[row], bool(fin[row])))
    return out
