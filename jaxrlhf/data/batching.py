"""Tokenise, truncate, pad to a few bucket lengths, shuffle and slice NumPy batches.

Batches are dicts of NumPy arrays with static shapes (no jax here: the trainer `device_put`s
them). The padded length T is the smallest bucket that fits the longest row of the GLOBAL batch,
so every process of a multi-host run pads to the same T. All masks are int32 (1 = real).

  SFT / ptx (right-padded)        tokens [B,T] int32, attention_mask [B,T], loss_mask [B,T]
      loss_mask[t] = 1 where tokens[t] is a target predicted from position t-1: the response
      tokens including the appended EOS for SFT (prompt masked); every real token but the first
      for ptx. EOS stays a target even when pad_id == eos_id: masks never come from `!= pad`.
  preference / hh / ranking (right-padded; a pair is K=2 with ranks [0, 1])
      tokens [B,K,T] int32, attention_mask [B,K,T], ranks [B,K] int32 (0 = best, equal = tie,
      -1 in padded slots), valid [B,K] int32 (1 = a real response; K = 2 for preference / hh,
      K = data.max_k for rankings, whatever the rows' own K),
      prompt_len [B,K] int32 (prompt tokens at the start of each row; 0 in padded slots),
      index [B] int64. Each row = prompt tokens + response tokens + EOS.
  prompt (PPO; LEFT-padded)       prompt_tokens [B,P] int32, prompt_mask [B,P] int32,
      index [B] int64 (row of `PreparedDataset.examples`, to fetch the raw prompt).
  With drop_remainder=False every batch also has batch_mask [B] int32 (0 = filler row that
  repeats a real one, in the last batch of a pass only).
  B is the per-process batch (global batch_size / process_count).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaxrlhf.data import chat
from jaxrlhf.data.config import DataOptions, resolve_options
from jaxrlhf.data.formats import LoadReport, _Bad, _public, load_examples, make_report
from jaxrlhf.data.tokenizer import Tokenizer, fallback_chat_template, load_tokenizer

LM_FORMATS = ("sft", "hh_sft", "ptx")
RANKING_FORMATS = ("preference", "hh", "ranking")
PROMPT_FORMATS = ("prompt", "hh_prompt")

Row = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Tokenisation and truncation.


def prompt_text(example: Mapping[str, Any], tokenizer: Tokenizer, raw: bool = False) -> str:
    """The prompt string of an sft / prompt / ranking example (chat messages are templated:
    with the tokenizer's template, or with the HH-style fallback when `raw`)."""
    if "messages" in example:
        msgs = example["messages"]
        if msgs[-1]["role"] == "assistant":  # an SFT conversation: its prompt is all but the last
            msgs = msgs[:-1]
        if raw:
            return fallback_chat_template(msgs, add_generation_prompt=True)
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return example["prompt"]


def response_text(example: Mapping[str, Any]) -> str:
    """The response string of an SFT example."""
    if "messages" in example:
        return example["messages"][-1]["content"]
    return example["response"]


def fit_lengths(prompt_len: int, response_lens: Sequence[int], max_len: int, policy: str,
                min_prompt: int, min_response: int) -> tuple[int, list[int]] | None:
    """How many prompt tokens (kept from the END) and response tokens (kept from the START).

    One prompt is shared by every response (a ranking row), so it is cut once. Returns None when
    the row cannot fit (always under policy "drop"). See `jaxrlhf.data.config` for the policies.
    A floor larger than the original length is the original length.
    """
    longest = max(response_lens)
    if prompt_len + longest <= max_len:
        return prompt_len, list(response_lens)
    if policy == "drop":
        return None
    floor_p = min(prompt_len, min_prompt)
    floors_r = [min(r, min_response) for r in response_lens]
    if policy == "left_prompt":
        keep_p = min(prompt_len, max(floor_p, max_len - longest))
        keep_r = [min(r, max_len - keep_p) for r in response_lens]
    elif policy == "right_response":
        budget = max(max_len - prompt_len, min_response)
        keep_r = [min(r, budget) for r in response_lens]
        keep_p = min(prompt_len, max_len - max(keep_r))
    else:
        raise ValueError(f"unknown truncation policy {policy!r}")
    if keep_p < floor_p or any(k < f for k, f in zip(keep_r, floors_r)):
        return None
    return keep_p, keep_r


def _bos(tokenizer: Tokenizer, opts: DataOptions) -> list[int]:
    return [tokenizer.bos_id] if opts.add_bos and tokenizer.bos_id is not None else []


def _chat_rows(ex, tok, opts, report, responses: Sequence[str]):
    """(prompt ids, [response ids], (keep_p, keep_r)) of a chat-shaped example rendered with
    the template, or None when it is not chat-shaped. Over-long rows lose their oldest turns
    (left_prompt / right_response), then the ends of their responses; the prompt is never cut
    inside a turn, so a row whose last turn cannot fit is "too_long"."""
    history = chat.chat_prompt_messages(ex, opts.format)
    if history is None:
        return None
    if "messages" not in ex:  # HH responses: " text" after the "Assistant:" marker
        responses = [r.strip() for r in responses]
    p, rs, dropped = chat.encode_fitting(tok, history, responses, opts.max_len,
                                         opts.truncation != "drop")
    fit = fit_lengths(len(p), [len(r) for r in rs], opts.max_len, "right_response"
                      if opts.truncation != "drop" else "drop", len(p), opts.min_response_tokens)
    if fit is None:
        raise _Bad("too_long", f"chat prompt {len(p)} tokens (its last turn) + longest "
                               f"response {max(len(r) for r in rs)} > max_len {opts.max_len}")
    if dropped:
        report.truncation_counts["prompt_turns_dropped"] += 1
    return p, rs, fit


def _tokenize_sft(ex, tok, opts, report) -> list[Row]:
    if chat.uses_template(tok, opts.chat_template):
        rendered = _chat_rows(ex, tok, opts, report, [response_text(ex)])
        if rendered is not None:
            p, (r,), (keep_p, (keep_r,)) = rendered
            _count_cuts(report, False, keep_r < len(r))
            tokens = p + r[:keep_r]
            loss_mask = np.zeros(len(tokens), np.int32)
            loss_mask[len(p):] = 1
            return [{"tokens": np.asarray(tokens, np.int32), "loss_mask": loss_mask,
                     "length": len(tokens)}]
    bos = _bos(tok, opts)
    p = tok.encode(prompt_text(ex, tok, raw=opts.chat_template == "raw"))
    r = tok.encode(response_text(ex)) + [tok.eos_id]
    fit = fit_lengths(len(p), [len(r)], opts.max_len - len(bos), opts.truncation,
                      opts.min_prompt_tokens, opts.min_response_tokens)
    if fit is None:
        raise _Bad("too_long",
                   f"prompt {len(p)} + response {len(r)} tokens > max_len {opts.max_len}")
    keep_p, (keep_r,) = fit
    _count_cuts(report, keep_p < len(p), keep_r < len(r))
    tokens = bos + p[len(p) - keep_p:] + r[:keep_r]
    loss_mask = np.zeros(len(tokens), np.int32)
    loss_mask[len(bos) + keep_p:] = 1
    return [{"tokens": np.asarray(tokens, np.int32), "loss_mask": loss_mask,
             "length": len(tokens)}]


def _tokenize_ptx(ex, tok, opts, report) -> list[Row]:
    tokens = _bos(tok, opts) + tok.encode(ex["text"]) + [tok.eos_id]
    if len(tokens) > opts.max_len and opts.truncation == "drop":
        raise _Bad("too_long", f"text {len(tokens)} tokens > max_len {opts.max_len}")
    # Windows of max_len overlapping by one token: every token but the very first is a target
    # exactly once (the first token of a window is context only, the target of the window before).
    stride = opts.max_len - 1
    starts = range(0, max(len(tokens) - 1, 1), stride)
    if len(starts) > 1:
        report.truncation_counts["ptx_windows"] += len(starts) - 1
    rows = []
    for s in starts:
        window = np.asarray(tokens[s:s + opts.max_len], np.int32)
        loss_mask = np.ones(len(window), np.int32)
        loss_mask[0] = 0
        rows.append({"tokens": window, "loss_mask": loss_mask, "length": len(window)})
    return rows


def _tokenize_ranking(ex, tok, opts, report) -> list[Row]:
    if len(ex["responses"]) > opts.max_k:
        raise _Bad("too_many_responses",
                   f"{len(ex['responses'])} responses > data.max_k = {opts.max_k}")
    rendered = None
    if chat.uses_template(tok, opts.chat_template):
        rendered = _chat_rows(ex, tok, opts, report, ex["responses"])
    if rendered is not None:
        bos = []
        p, rs, (keep_p, keep_r) = rendered
    else:
        bos = _bos(tok, opts)
        p = tok.encode(prompt_text(ex, tok, raw=opts.chat_template == "raw"))
        rs = [tok.encode(r) + [tok.eos_id] for r in ex["responses"]]
        fit = fit_lengths(len(p), [len(r) for r in rs], opts.max_len - len(bos),
                          opts.truncation, opts.min_prompt_tokens, opts.min_response_tokens)
        if fit is None:
            raise _Bad("too_long", f"prompt {len(p)} + longest response {max(map(len, rs))} "
                                   f"tokens > max_len {opts.max_len}")
        keep_p, keep_r = fit
    cut = [tuple(r[:k]) for r, k in zip(rs, keep_r)]
    ranks = ex["ranks"]
    for i in range(len(cut)):
        for j in range(i + 1, len(cut)):
            if cut[i] == cut[j] and ranks[i] != ranks[j]:
                raise _Bad("identical_after_truncation",
                           f"responses {i} and {j} are identical after truncation to "
                           f"max_len {opts.max_len} but ranked differently")
    _count_cuts(report, keep_p < len(p), any(k < len(r) for k, r in zip(keep_r, rs)))
    prompt = bos + p[len(p) - keep_p:]
    seqs = tuple(np.asarray(prompt + list(c), np.int32) for c in cut)
    return [{"tokens": seqs, "prompt_len": len(prompt), "ranks": tuple(ranks),
             "length": max(len(s) for s in seqs)}]


def _tokenize_prompt(ex, tok, opts, report) -> list[Row]:
    if chat.uses_template(tok, opts.chat_template):
        rendered = _chat_prompt(ex, tok, opts, report)
        if rendered is not None:
            return [{"prompt_tokens": np.asarray(rendered, np.int32), "length": len(rendered)}]
    bos = _bos(tok, opts)
    p = tok.encode(prompt_text(ex, tok, raw=opts.chat_template == "raw"))
    budget = opts.max_prompt_len - len(bos)
    if len(p) > budget:
        if opts.truncation == "drop":
            raise _Bad("too_long",
                       f"prompt {len(p)} tokens > max_prompt_len {opts.max_prompt_len}")
        p = p[len(p) - budget:]
        report.truncation_counts["prompt_truncated"] += 1
    tokens = np.asarray(bos + p, np.int32)
    return [{"prompt_tokens": tokens, "length": len(tokens)}]


def _chat_prompt(ex, tok, opts, report) -> list[int] | None:
    """A PPO prompt rendered with the chat template (with the generation prompt); over
    max_prompt_len it loses its oldest turns (never part of one; "drop": a bad row)."""
    history = chat.chat_prompt_messages(ex, opts.format)
    if history is None:
        return None
    p, _, dropped = chat.encode_fitting(tok, history, [], opts.max_prompt_len,
                                        opts.truncation != "drop")
    if len(p) > opts.max_prompt_len:
        raise _Bad("too_long", f"chat prompt {len(p)} tokens (its last turn) > "
                               f"max_prompt_len {opts.max_prompt_len}")
    if dropped:
        report.truncation_counts["prompt_turns_dropped"] += 1
    return p


def _count_cuts(report: LoadReport, prompt_cut: bool, response_cut: bool) -> None:
    if prompt_cut:
        report.truncation_counts["prompt_truncated"] += 1
    if response_cut:
        report.truncation_counts["response_truncated"] += 1


_TOKENIZERS = {"sft": _tokenize_sft, "hh_sft": _tokenize_sft, "ptx": _tokenize_ptx,
               "prompt": _tokenize_prompt, "hh_prompt": _tokenize_prompt,
               **{f: _tokenize_ranking for f in RANKING_FORMATS}}


def tokenize_examples(examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer | str,
                      cfg: Any = None, *, report: LoadReport | None = None,
                      **overrides: Any) -> list[Row]:
    """Tokenised rows of normalised examples (from `load_examples` or `SyntheticTask`).

    Each row has "length" (longest sequence) and "index" (position in `examples`); ptx text may
    give several rows (windows) with one index. Over-long rows follow data.truncation; rows that
    cannot be kept go through the bad-row policy of `report` (reasons too_long,
    too_many_responses, identical_after_truncation), naming the example's file and line.
    """
    opts = resolve_options(cfg, **overrides)
    tok = load_tokenizer(tokenizer)
    report = report or make_report(opts, opts.path, None)
    fn = _TOKENIZERS[opts.format]
    rows: list[Row] = []
    kept = 0
    for index, ex in enumerate(examples):
        try:
            new = fn(ex, tok, opts, report)
        except _Bad as e:
            report.reject(ex.get("_file", "<examples>"), ex.get("_line", index + 1), e.reason,
                          e.detail, _public(ex))
            continue
        for row in new:
            row["index"] = index
        rows.extend(new)
        kept += 1
    report.n_tokenized = kept
    return rows


# --------------------------------------------------------------------------------------------
# Padding to buckets.


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for b in sorted(buckets):
        if length <= b:
            return int(b)
    raise ValueError(f"row of length {length} is longer than the largest bucket {max(buckets)}")


def collate_lm(rows: Sequence[Row], length: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """SFT / ptx rows -> tokens, attention_mask, loss_mask [B, length], right-padded."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    attention = np.zeros((len(rows), length), np.int32)
    loss = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        n = len(row["tokens"])
        tokens[b, :n] = row["tokens"]
        attention[b, :n] = 1
        loss[b, :n] = row["loss_mask"]
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


def collate_ranking(rows: Sequence[Row], length: int, *, pad_id: int,
                    max_k: int) -> dict[str, np.ndarray]:
    """Ranking rows -> tokens / attention_mask [B, max_k, length], ranks / valid / prompt_len
    [B, max_k], index [B]; right-padded, padded response slots have valid 0 and rank -1."""
    b_size = len(rows)
    tokens = np.full((b_size, max_k, length), pad_id, np.int32)
    attention = np.zeros((b_size, max_k, length), np.int32)
    ranks = np.full((b_size, max_k), -1, np.int32)
    valid = np.zeros((b_size, max_k), np.int32)
    prompt_len = np.zeros((b_size, max_k), np.int32)
    index = np.zeros((b_size,), np.int64)
    for b, row in enumerate(rows):
        index[b] = row["index"]
        for k, seq in enumerate(row["tokens"]):
            tokens[b, k, :len(seq)] = seq
            attention[b, k, :len(seq)] = 1
            ranks[b, k] = row["ranks"][k]
            valid[b, k] = 1
            prompt_len[b, k] = row["prompt_len"]
    return {"tokens": tokens, "attention_mask": attention, "ranks": ranks, "valid": valid,
            "prompt_len": prompt_len, "index": index}


def ranked_pairs(ranks_BxK, valid_BxK):
    """[B, K, K] mask of the ranked pairs of a ranking batch: both responses valid and
    response i ranked above response j (rank_i < rank_j; rank 0 is the best). Array
    operators only, so it takes NumPy and JAX arrays alike."""
    valid = valid_BxK if valid_BxK.dtype == bool else valid_BxK > 0
    return (valid[:, :, None] & valid[:, None, :]
            & (ranks_BxK[:, :, None] < ranks_BxK[:, None, :]))


def collate_prompts(rows: Sequence[Row], length: int, *, pad_id: int) -> dict[str, np.ndarray]:
    """Prompt rows -> prompt_tokens / prompt_mask [B, length] LEFT-padded, index [B]."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    index = np.zeros((len(rows),), np.int64)
    for b, row in enumerate(rows):
        n = len(row["prompt_tokens"])
        tokens[b, length - n:] = row["prompt_tokens"]
        mask[b, length - n:] = 1
        index[b] = row["index"]
    return {"prompt_tokens": tokens, "prompt_mask": mask, "index": index}


def collate_for(fmt: str, pad_id: int, max_k: int = 4) -> Callable[[Sequence[Row], int], dict]:
    """The collate function of a format: collate(rows, length) -> batch."""
    if fmt in LM_FORMATS:
        return lambda rows, length: collate_lm(rows, length, pad_id=pad_id)
    if fmt in RANKING_FORMATS:
        return lambda rows, length: collate_ranking(rows, length, pad_id=pad_id, max_k=max_k)
    if fmt in PROMPT_FORMATS:
        return lambda rows, length: collate_prompts(rows, length, pad_id=pad_id)
    raise ValueError(f"unknown data format {fmt!r}")


# --------------------------------------------------------------------------------------------
# The iterator.


class BatchIterator:
    """Shuffled, bucketed batches over tokenised rows, with an exactly restorable position.

    Batch (epoch, position) is a pure function of (seed, epoch, position): the permutation of
    epoch e is `np.random.default_rng((seed, e)).permutation(n)` (identity when shuffle=False)
    and batch p takes its rows [p*B, (p+1)*B). `state()` = {"epoch": e, "position": p} (the
    NEXT batch; position is normalised to 0 at an epoch boundary) and `restore(state)` continues
    identically. Infinite over epochs unless num_epochs is set (e.g. 1 for an eval pass).

    Multi-host: every process builds the same iterator with its process_index; each yields rows
    [i*B/P, (i+1)*B/P) of the global batch (disjoint, union = the global batch), padded to the
    bucket of the GLOBAL batch so shapes agree. batch_size is global and must divide by P.

    drop_remainder=True drops the last partial batch of each epoch. False keeps it, filled up
    to B with repeats of its own rows, and adds batch_mask [B/P] (1 = real row) to every batch.
    """

    def __init__(self, rows: Sequence[Row], batch_size: int, *,
                 collate: Callable[[Sequence[Row], int], dict], buckets: Sequence[int],
                 seed: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % process_count:
            raise ValueError(f"global batch_size {batch_size} is not divisible by "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if not rows:
            raise ValueError("no rows to batch (every row was rejected, or the source is empty)")
        if drop_remainder and len(rows) < batch_size:
            raise ValueError(f"{len(rows)} rows < batch_size {batch_size} with "
                             "drop_remainder=True: no batch could ever be made")
        longest = max(r["length"] for r in rows)
        bucket_length(longest, buckets)  # raises if a row cannot fit
        self.rows = rows
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.collate = collate
        self.buckets = tuple(sorted(buckets))
        self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
        self.process_index, self.process_count = process_index, process_count
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.rows), self.batch_size
        return n // b if self.drop_remainder else -(-n // b)

    def state(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def restore(self, state: Mapping[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"bad iterator state {dict(state)} "
                             f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.position = epoch, position
        self._normalise()

    def _normalise(self) -> None:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.rows)
            perm = (np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle
                    else np.arange(n))
            self._perm = (epoch, perm)
        return self._perm[1]

    def global_indices(self, epoch: int, position: int) -> tuple[np.ndarray, int]:
        """Row ids of the global batch, and how many of them are real (the rest repeat them)."""
        ids = self.permutation(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        n_real = len(ids)
        if n_real < self.batch_size:
            ids = np.resize(ids, self.batch_size)  # cycles the real rows
        return ids, n_real

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `position` of `epoch` (no state change)."""
        ids, n_real = self.global_indices(epoch, position)
        length = bucket_length(max(self.rows[i]["length"] for i in ids), self.buckets)
        lo = self.process_index * self.local_batch_size
        hi = lo + self.local_batch_size
        batch = self.collate([self.rows[i] for i in ids[lo:hi]], length)
        if not self.drop_remainder:
            batch["batch_mask"] = (np.arange(lo, hi) < n_real).astype(np.int32)
        return batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._normalise()
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1
        self._normalise()
        return batch


# --------------------------------------------------------------------------------------------
# One call from config to iterator.


@dataclasses.dataclass
class PreparedDataset:
    """Loaded + tokenised data of one config: examples (normalised rows, e.g. raw prompts for the
    gold reward: `examples[batch["index"][b]]`), rows (tokenised), report, options, tokenizer."""

    examples: list[dict[str, Any]]
    rows: list[Row]
    report: LoadReport
    options: DataOptions
    tokenizer: Tokenizer

    @property
    def format(self) -> str:
        return self.options.format

    @property
    def num_responses(self) -> int:
        """K of ranking batches: 2 for preference / hh pairs, data.max_k for rankings."""
        return 2 if self.options.format in ("preference", "hh") else self.options.max_k

    def iterator(self, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> BatchIterator:
        opts = self.options
        buckets = opts.prompt_buckets if opts.format in PROMPT_FORMATS else opts.buckets
        if not self.rows:
            raise ValueError(
                f"{self.report.source}: no rows to batch (the source is empty, or every row "
                f"was rejected: {self.report.summary()})")
        if drop_remainder and len(self.rows) < batch_size:
            raise ValueError(f"{self.report.source}: {len(self.rows)} rows, fewer than one "
                             f"batch of {batch_size}")
        return BatchIterator(
            self.rows, batch_size, collate=collate_for(opts.format, self.tokenizer.pad_id,
                                                       self.num_responses),
            buckets=buckets, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder,
            process_index=process_index, process_count=process_count, num_epochs=num_epochs)


def build_dataset(cfg: Any = None, tokenizer: Tokenizer | str = "byte", *,
                  workdir: str | None = None, **overrides: Any) -> PreparedDataset:
    """load_examples + tokenize_examples with one report (one rejected_rows.jsonl).

    Pass workdir on process 0 only in multi-host runs (the others would write the same rows).
    """
    opts = resolve_options(cfg, **overrides)
    tok = load_tokenizer(tokenizer)
    examples, report = load_examples(_cfg(opts), workdir=workdir, print_summary=False)
    rows = tokenize_examples(examples, tok, _cfg(opts), report=report)
    if report.n_rejected or report.truncation_counts:
        print(f"[jaxrlhf.data] {report.summary()}", flush=True)
    return PreparedDataset(examples, rows, report, opts, tok)


def _cfg(opts: DataOptions) -> dict[str, Any]:
    """DataOptions back to config fields (prompt_buckets is derived, not a field)."""
    d = dataclasses.asdict(opts)
    d.pop("prompt_buckets")
    return d


class JointIterator:
    """A main batch iterator plus one batch per step of each named extra iterator, merged
    into one flat batch under the keys "<name>_<key>" (only `keys` of it when given), then
    passed through `transform` (e.g. per-pair labels computed from the batch).
    `state()` = the main iterator's state with each extra's under its name; `restore()`
    takes that back, so a resumed run sees the same batches."""

    def __init__(self, main, extras: Optional[Mapping[str, tuple]] = None,
                 transform: Optional[Callable[[dict], dict]] = None):
        self.main = main
        self.extras = dict(extras or {})    # name -> (iterator, keys or None)
        self.transform = transform

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = dict(next(self.main))
        for name, (it, keys) in self.extras.items():
            extra = next(it)
            for k in (keys if keys is not None else list(extra)):
                b[f"{name}_{k}"] = extra[k]
        return self.transform(b) if self.transform is not None else b

    def state(self) -> dict:
        s = dict(self.main.state())
        for name, (it, _) in self.extras.items():
            s[name] = it.state()
        return s

    def restore(self, state) -> None:
        state = dict(state)
        for name, (it, _) in self.extras.items():
            extra = state.pop(name, None)
            if extra is not None:
                it.restore(extra)
        self.main.restore(state)
