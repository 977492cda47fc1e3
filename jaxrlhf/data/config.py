"""The `data` config block and its resolved, validated form (`DataOptions`).

Trainers embed `default_data_config()` as `config.data`. Every loader takes either that block
(a `ml_collections.ConfigDict` or any mapping) or plain keyword arguments, or both (keywords win):

  path          file, glob, directory (+ split), hub id, or "synthetic" (the built-in task)
  format        "sft" | "preference" | "hh" | "ranking" | "prompt" | "ptx"; and for HH-RLHF
                transcripts also "hh_sft" (prompt + chosen response) and "hh_prompt" (prompt)
  split         picks `<dir>/<split>.*` for a directory, the hub split, or the synthetic stream
  fields        remapping {canonical name: column in the file}, e.g. {"prompt": "question"}
  on_bad_row    "error" (default: stop with file:line and reason) | "skip" (drop, count by
                reason, write to <workdir>/rejected_rows.jsonl, print the counts)
  buckets       padded lengths; a batch is padded to the smallest bucket that fits its longest row
  max_len       longest row; None = the largest bucket (buckets above it are removed, and
                max_len is added as the last bucket)
  truncation    over-long prompt+response rows (SFT / preference / ranking):
                "left_prompt"    drop the oldest prompt tokens first, down to min_prompt_tokens,
                                 then cut the end of the response(s), down to min_response_tokens;
                "right_response" cut the end of the response(s) first, down to
                                 min_response_tokens, then the oldest prompt tokens;
                "drop"           an over-long row is a bad row (reason "too_long").
                A row that cannot fit even at the minimums is a bad row ("too_long"). A cut
                response loses its EOS (it did not end). PPO prompts longer than max_prompt_len
                are left-truncated (or dropped under "drop"); ptx text longer than max_len is
                split into windows (or dropped under "drop"). Every truncation is counted.
  min_prompt_tokens / min_response_tokens   floors for truncation (a shorter original is kept)
  max_prompt_len   longest PPO prompt; None = max_len // 2. Prompt buckets are the buckets below
                it plus max_prompt_len itself.
  max_k         responses per ranking row; batches always have K = max_k (static shapes);
                rows with more responses are bad rows ("too_many_responses")
  add_bos       prepend the tokenizer's BOS (if it has one) to every prompt and ptx text
                (not to rows rendered with a chat template: the template decides)
  chat_template "auto": chat-shaped rows (messages, HH transcripts parsed into turns) are
                rendered with the tokenizer's chat template when it has one, token ids equal
                to `apply_chat_template` (see `jaxrlhf.data.chat`); over-long chat prompts
                lose their oldest turns first ("left_prompt", counted as prompt_turns_dropped),
                never part of a turn. "raw": the text as it is (HH transcripts verbatim,
                messages through the HH-style fallback template)
  synthetic     the built-in tasks when path == "synthetic": task = "sort" (`SyntheticTask`,
                its parameters) or "arithmetic" (`ArithmeticTask`: max_operand, ops, chat);
                plus num_examples
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FORMATS = ("sft", "preference", "hh", "ranking", "prompt", "ptx", "hh_sft", "hh_prompt")
TRUNCATION_POLICIES = ("left_prompt", "right_response", "drop")
BAD_ROW_MODES = ("error", "skip")


def default_synthetic_config() -> dict[str, Any]:
    """Defaults of the built-in task (see `SyntheticTask` for the meaning of each field)."""
    return dict(seed=0, num_examples=4096, noise=0.2, label_noise=0.1, temperature=0.25,
                tie_margin=0.0, min_letters=3, max_letters=8, alphabet="abcdefghij",
                overlength_penalty=1.0, repeat_penalty=1.0, candidate_noise=(0.0, 0.7),
                task="sort", max_operand=99, ops="+", chat=False)


def default_data_config():
    """The `data` block as an `ml_collections.ConfigDict` (trainers embed it as config.data)."""
    import ml_collections
    from ml_collections import config_dict

    cfg = ml_collections.ConfigDict()
    cfg.path = "synthetic"
    cfg.format = "sft"
    cfg.split = "train"
    cfg.fields = ml_collections.ConfigDict()
    cfg.on_bad_row = "error"
    cfg.buckets = (32, 64, 128, 256, 512)
    cfg.max_len = config_dict.placeholder(int)
    cfg.truncation = "left_prompt"
    cfg.min_prompt_tokens = 8
    cfg.min_response_tokens = 8
    cfg.max_prompt_len = config_dict.placeholder(int)
    cfg.max_k = 4
    cfg.add_bos = False
    cfg.chat_template = "auto"
    cfg.synthetic = ml_collections.ConfigDict(default_synthetic_config())
    return cfg


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict is not a Mapping
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: (_as_dict(v) if hasattr(v, "to_dict") else v) for k, v in cfg.items()}
    raise TypeError(f"data config must be a mapping or ConfigDict, got {type(cfg).__name__}")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Resolved data config; `buckets` already ends with `max_len`."""

    path: str = "synthetic"
    format: str = "sft"
    split: str = "train"
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    on_bad_row: str = "error"
    buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    max_len: int = 512
    truncation: str = "left_prompt"
    min_prompt_tokens: int = 8
    min_response_tokens: int = 8
    max_prompt_len: int = 256
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256)
    max_k: int = 4
    add_bos: bool = False
    chat_template: str = "auto"
    synthetic: Mapping[str, Any] = dataclasses.field(default_factory=default_synthetic_config)


def resolve_options(cfg: Any = None, **overrides: Any) -> DataOptions:
    """Merges defaults, `cfg` and keyword overrides; checks values; derives the bucket lists."""
    merged: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DataOptions)
                              if f.default is not dataclasses.MISSING}
    merged.update(fields={}, synthetic=default_synthetic_config(), max_len=None,
                  max_prompt_len=None)
    given = _as_dict(cfg)
    given.update(overrides)
    # prompt_buckets is derived from buckets and max_prompt_len, never set directly.
    unknown = (set(given) - {f.name for f in dataclasses.fields(DataOptions)}) | (
        {"prompt_buckets"} & set(given))
    if unknown:
        raise ValueError(f"unknown data config fields: {sorted(unknown)}")
    synthetic = dict(merged["synthetic"])
    synthetic.update(_as_dict(given.pop("synthetic", None)))
    merged.update(given)
    merged["synthetic"] = synthetic
    merged["fields"] = dict(_as_dict(merged["fields"]) or {})
    merged.pop("prompt_buckets", None)

    if merged["format"] not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {merged['format']!r}")
    if merged["truncation"] not in TRUNCATION_POLICIES:
        raise ValueError(f"data.truncation must be one of {TRUNCATION_POLICIES}, "
                         f"got {merged['truncation']!r}")
    if merged["on_bad_row"] not in BAD_ROW_MODES:
        raise ValueError(f"data.on_bad_row must be one of {BAD_ROW_MODES}, "
                         f"got {merged['on_bad_row']!r}")
    buckets = sorted({int(b) for b in merged["buckets"]})
    if not buckets or buckets[0] < 2:
        raise ValueError(f"data.buckets must be lengths >= 2, got {merged['buckets']!r}")
    max_len = int(merged["max_len"] or buckets[-1])
    buckets = tuple(b for b in buckets if b < max_len) + (max_len,)
    max_prompt_len = int(merged["max_prompt_len"] or max_len // 2)
    if not 1 <= max_prompt_len <= max_len:
        raise ValueError(f"data.max_prompt_len must be in [1, max_len={max_len}], "
                         f"got {max_prompt_len}")
    prompt_buckets = tuple(b for b in buckets if b < max_prompt_len) + (max_prompt_len,)
    if merged["chat_template"] not in ("auto", "raw"):
        raise ValueError(f"data.chat_template must be 'auto' or 'raw', "
                         f"got {merged['chat_template']!r}")
    if int(merged["max_k"]) < 2:
        raise ValueError(f"data.max_k must be >= 2, got {merged['max_k']}")
    if int(merged["min_prompt_tokens"]) < 1 or int(merged["min_response_tokens"]) < 1:
        raise ValueError("data.min_prompt_tokens and data.min_response_tokens must be >= 1")
    return DataOptions(
        path=str(merged["path"]), format=merged["format"], split=str(merged["split"]),
        fields=merged["fields"], on_bad_row=merged["on_bad_row"], buckets=buckets,
        max_len=max_len, truncation=merged["truncation"],
        min_prompt_tokens=int(merged["min_prompt_tokens"]),
        min_response_tokens=int(merged["min_response_tokens"]),
        max_prompt_len=max_prompt_len, prompt_buckets=prompt_buckets,
        max_k=int(merged["max_k"]), add_bos=bool(merged["add_bos"]),
        chat_template=str(merged["chat_template"]),
        synthetic=merged["synthetic"])
