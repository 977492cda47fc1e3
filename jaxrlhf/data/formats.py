"""Reading rows from files and checking them against a format; the bad-row policy.

Sources (`read_rows`):
  *.jsonl, *.jsonl.gz, *.json, *.json.gz  read line by line here, so a malformed JSON line or a
      non-UTF-8 byte is reported with its exact 1-based line number. A *.json file whose first
      character is "[" is a JSON array; each element is reported with the line it starts on (a
      syntax error inside an array makes the rest of the file unreadable: always an error).
      Blank lines are not rows.
  *.parquet, *.csv          loaded with HF `datasets`; "line" is the 1-based row number. CSV
      columns are read as strings; list fields (messages, responses, ranks) are JSON in the cell.
      A file that cannot be parsed at all, or a CSV with non-UTF-8 bytes (reported with its
      physical line), raises `BadRowError` in both modes: datasets cannot skip a single row.
  a directory + split       the files `<dir>/<split>.<ext>` / `<dir>/<split>-*.<ext>`
  a glob                    every matching file, sorted
  anything else             a hub id: `datasets.load_dataset(path, split=split)` (needs network;
      never used by tests or the default job)

Formats and their normalised examples (file rows and synthetic rows alike; `fields` remaps names):
  sft         {prompt, response} or {messages: [{role, content}, ...]} ending with an assistant
              turn (rendered with the tokenizer's chat template at tokenisation time)
  preference  {prompt, chosen, rejected}            -> {prompt, responses: [chosen, rejected],
                                                        ranks: [0, 1]}
  hh          {chosen, rejected} HH-RLHF transcripts; the prompt is the text up to and including
              the last "\\n\\nAssistant:" and must be the same in both, else the row is bad
              ("mismatched_prefix"); the response is the rest  -> as preference
  ranking     {prompt, responses: [...], ranks: [...]}  K >= 2, rank 0 is best, equal ranks tie
  prompt      {prompt} or {messages}                 (RL prompts; the row's other fields are
                                                     kept as "meta", the metadata reward
                                                     functions receive)
  ptx         {text}                                 (pretraining text)
Every example also carries "_file" and "_line" (where it came from). Text fields must be
non-empty after stripping whitespace.

Bad rows (`LoadReport.reject`): with on_bad_row="error" a `BadRowError("<file>:<line>: <reason>:
<detail>")` is raised; with "skip" the row is dropped, counted by reason, appended to
`<workdir>/rejected_rows.jsonl` as {"file", "line", "reason", "detail", "row"} and the counts
are printed. "row" is the row as read (the raw line text when it could not be parsed), or the
normalised example for the reasons found at tokenisation time. The file is appended to, so the
loads of several datasets / stages can share one workdir.
Reasons: invalid_utf8, malformed_json, wrong_type, missing_field, empty_text,
identical_responses, no_assistant_turn, mismatched_prefix, bad_messages, bad_ranks, plus the
tokenisation-time reasons too_long, too_many_responses, identical_after_truncation.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import zlib
from typing import Any, Iterator, Mapping, Sequence

from jaxrlhf import paths
from jaxrlhf.data.config import DataOptions, resolve_options
from jaxrlhf.data.tokenizer import CHAT_ROLES

HH_ASSISTANT = "\n\nAssistant:"
REJECTS_FILENAME = "rejected_rows.jsonl"
_LINE_EXTS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_DATASETS_EXTS = (".parquet", ".csv")
_LIST_FIELDS = ("messages", "responses", "ranks")


class BadRowError(ValueError):
    """A row that breaks its format; message "<file>:<line>: <reason>: <detail>"."""

    def __init__(self, file: str, line: int, reason: str, detail: str = ""):
        self.file, self.line, self.reason, self.detail = file, line, reason, detail
        super().__init__(f"{file}:{line}: {reason}" + (f": {detail}" if detail else ""))


class _Bad(Exception):
    """Internal: raised by the validators, turned into `LoadReport.reject`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class LoadReport:
    """Counts of one load (and of its tokenisation), and the bad-row policy that produced them.

    counts_by_reason: bad rows by reason; truncation_counts: rows kept but changed
    ("prompt_truncated", "response_truncated", "ptx_windows"); n_read = n_loaded + rows rejected
    while loading; n_tokenized = rows that survived tokenisation (None before it).
    rejects_path: where skipped rows go (None: not written, e.g. on non-zero processes).
    """

    source: str
    on_bad_row: str = "error"
    rejects_path: str | None = None
    n_read: int = 0
    n_loaded: int = 0
    n_tokenized: int | None = None
    counts_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncation_counts: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)

    @property
    def n_rejected(self) -> int:
        return sum(self.counts_by_reason.values())

    def reject(self, file: str, line: int, reason: str, detail: str, row: Any) -> None:
        """Applies the bad-row policy to one row: raise, or count and record it."""
        if self.on_bad_row == "error":
            raise BadRowError(file, line, reason, detail)
        self.counts_by_reason[reason] += 1
        if self.rejects_path is not None:
            record = {"file": file, "line": line, "reason": reason, "detail": detail, "row": row}
            paths.append_lines(self.rejects_path, [json.dumps(record, default=repr) + "\n"])

    def summary(self) -> str:
        parts = [f"{self.source}: read {self.n_read}, loaded {self.n_loaded}"]
        if self.n_tokenized is not None:
            parts.append(f"tokenized {self.n_tokenized}")
        if self.counts_by_reason:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts_by_reason.items()))
            parts.append(f"rejected {self.n_rejected} ({reasons})")
            parts.append(f"rows written to {self.rejects_path}" if self.rejects_path
                         else "rows not written (no workdir)")
        if self.truncation_counts:
            parts.append("truncated: " + ", ".join(
                f"{k}={v}" for k, v in sorted(self.truncation_counts.items())))
        return "; ".join(parts)

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat integer counts for a metrics logger."""
        out = {f"{prefix}n_read": self.n_read, f"{prefix}n_loaded": self.n_loaded,
               f"{prefix}n_rejected": self.n_rejected}
        if self.n_tokenized is not None:
            out[f"{prefix}n_tokenized"] = self.n_tokenized
        out.update({f"{prefix}rejected/{k}": v for k, v in self.counts_by_reason.items()})
        out.update({f"{prefix}truncated/{k}": v for k, v in self.truncation_counts.items()})
        return out


# --------------------------------------------------------------------------------------------
# Reading raw rows.


@dataclasses.dataclass
class RawRow:
    """One row as read: `value` is the parsed object, or None with `error` = (reason, detail)."""

    file: str
    line: int
    value: Any
    raw: Any
    error: tuple[str, str] | None = None
    from_csv: bool = False


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of a possibly gzipped file; a corrupt or truncated file
    raises `BadRowError` "unreadable_file" (in both modes) naming the last line read."""
    lineno = 0
    try:
        with _open_bytes(path) as f:
            for lineno, data in enumerate(f, start=1):
                yield lineno, data
    except (OSError, EOFError, zlib.error) as e:
        raise BadRowError(path, lineno + 1, "unreadable_file",
                          f"{type(e).__name__}: {e}") from e


def _read_json_lines(path: str) -> Iterator[RawRow]:
    for lineno, data in _lines(path):
        if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # UTF-8 byte-order mark
        if not data.strip():
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(path, lineno, None, data.decode("utf-8", "backslashreplace"),
                         ("invalid_utf8", f"byte {e.start}: {e.reason}"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield RawRow(path, lineno, None, text.rstrip("\n"),
                         ("malformed_json", f"{e.msg} at column {e.colno}"))
            continue
        yield RawRow(path, lineno, value, value)


def _has_surrogates(obj: Any) -> bool:
    if isinstance(obj, str):
        return any("\udc80" <= ch <= "\udcff" for ch in obj)
    if isinstance(obj, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogates(v) for v in obj)
    return False


def _scrub(obj: Any) -> Any:
    """Surrogate-escaped bytes -> backslash escapes, so a bad row can be written as JSON."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(obj, dict):
        return {_scrub(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _read_json_array(path: str, text: str) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos = len(text) - len(text.lstrip(ws)) + 1  # just after "["

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    def fail(i: int, msg: str) -> BadRowError:
        # A syntax error inside an array leaves no reliable way to find the next element.
        return BadRowError(path, line_of(i), "malformed_json",
                           f"{msg}; the rest of this JSON array file cannot be read")

    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        start = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        if _has_surrogates(value):
            yield RawRow(path, line_of(start), None, _scrub(value),
                         ("invalid_utf8", "the row contains bytes that are not UTF-8"))
        else:
            yield RawRow(path, line_of(start), value, value)
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif not (pos < len(text) and text[pos] == "]"):
            raise fail(pos, "expected ',' or ']'")


def _read_json_file(path: str) -> Iterator[RawRow]:
    if path.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_json_lines(path)
        return
    with _open_bytes(path) as f:
        try:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        except (OSError, EOFError, zlib.error) as e:
            raise BadRowError(path, 1, "unreadable_file", f"{type(e).__name__}: {e}") from e
    if head.startswith(b"["):
        data = b"".join(line for _, line in _lines(path))
        text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
        yield from _read_json_array(path, text)
    else:
        yield from _read_json_lines(path)


def _read_with_datasets(path: str) -> Iterator[RawRow]:
    import datasets  # lazy: only Parquet / CSV / hub sources need it

    try:
        if path.endswith(".csv"):
            import csv

            _check_utf8_lines(path)
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            # All columns as strings (no type inference: "12" stays text), "" stays "".
            features = datasets.Features({name: datasets.Value("string") for name in header})
            ds = datasets.load_dataset("csv", data_files=path, split="train", features=features,
                                       na_filter=False)
        else:
            ds = datasets.load_dataset("parquet", data_files=path, split="train")
    except BadRowError:
        raise
    except Exception as e:  # a file that cannot be parsed at all: never skipped silently
        raise BadRowError(path, 0, "unreadable_file", f"{type(e).__name__}: {e}") from e
    if path.endswith(".csv"):
        lines = _csv_record_lines(path)
        if len(lines) != len(ds):  # the two parsers disagree: assume one line per record
            lines = [i + 1 for i in range(1, len(ds) + 1)]
        for line, row in zip(lines, ds):
            yield RawRow(path, line, row, row, from_csv=True)
        return
    for i, row in enumerate(ds, start=1):
        yield RawRow(path, i, row, row)


def _csv_record_lines(path: str) -> list[int]:
    """The physical line each data record of a CSV file starts on (the header is line 1;
    quoted cells may span lines; blank lines hold no record)."""
    import csv

    starts = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        end = reader.line_num
        for record in reader:
            if record:
                starts.append(end + 1)
            end = reader.line_num
    return starts


def _check_utf8_lines(path: str) -> None:
    """CSV goes through HF datasets, which cannot skip one undecodable row: refuse the file with
    the first bad line (in both on_bad_row modes; re-encode the file as UTF-8)."""
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRowError(path, lineno, "invalid_utf8",
                                  f"byte {e.start}: {e.reason}; CSV files must be UTF-8, the "
                                  "whole file is refused") from None


def _read_hub(path: str, split: str) -> Iterator[RawRow]:
    import datasets

    ds = datasets.load_dataset(path, split=split)
    for i, row in enumerate(ds, start=1):
        yield RawRow(path, i, row, row)


def _supported(path: str) -> bool:
    return path.endswith(_LINE_EXTS + _DATASETS_EXTS)


def resolve_files(path: str, split: str | None = None) -> list[str] | None:
    """The local files `path` stands for; None if it is not local (then it is a hub id)."""
    if os.path.isdir(path):
        if not split:
            raise ValueError(f"{path} is a directory; set data.split to pick its files")
        files = sorted(f for pattern in (f"{split}.*", f"{split}-*", f"{split}_*")
                       for f in glob.glob(os.path.join(path, pattern)) if _supported(f))
        if not files:
            kinds = ", ".join(_LINE_EXTS + _DATASETS_EXTS)
            raise FileNotFoundError(f"no {split}.* data file ({kinds}) in {path}")
        return files
    if os.path.isfile(path):
        if not _supported(path):
            raise ValueError(f"unsupported data file type: {path}")
        return [path]
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"no file matches {path}")
        for f in files:
            if not _supported(f):
                raise ValueError(f"unsupported data file type: {f}")
        return files
    if _supported(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file not found: {path}")
    return None


def read_rows(path: str, split: str | None = None) -> Iterator[RawRow]:
    """Raw rows of a file, glob, directory (+ split) or hub id, in file order."""
    files = resolve_files(path, split)
    if files is None:
        yield from _read_hub(path, split or "train")
        return
    for file in files:
        if file.endswith(_DATASETS_EXTS):
            yield from _read_with_datasets(file)
        else:
            yield from _read_json_file(file)


# --------------------------------------------------------------------------------------------
# Validating and normalising rows.


def _field(row: Mapping[str, Any], name: str, fields: Mapping[str, str]) -> Any:
    column = fields.get(name, name)
    if column not in row or row[column] is None:
        shown = name if column == name else f"{name!r} (column {column!r})"
        raise _Bad("missing_field", f"field {shown} is missing")
    return row[column]


def _has(row: Mapping[str, Any], name: str, fields: Mapping[str, str]) -> bool:
    return row.get(fields.get(name, name)) is not None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad("empty_text", f"field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # e.g. a lone surrogate written as a "\udc80" JSON escape
        raise _Bad("invalid_utf8", f"field {name!r} is not valid Unicode text") from None
    return value


def _list(value: Any, name: str, from_csv: bool) -> list:
    if from_csv and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Bad("wrong_type", f"CSV field {name!r} must hold a JSON list") from None
    if not isinstance(value, (list, tuple)):
        raise _Bad("wrong_type", f"field {name!r} must be a list, got {type(value).__name__}")
    return list(value)


def _messages(value: Any, from_csv: bool, last_role: str | None) -> list[dict[str, str]]:
    msgs = _list(value, "messages", from_csv)
    if not msgs:
        raise _Bad("bad_messages", "messages is an empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise _Bad("wrong_type", f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _Bad("bad_messages", f"messages[{i}].role {role!r} is not one of {CHAT_ROLES}")
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
    if last_role == "assistant":
        if out[-1]["role"] != "assistant" or len(out) < 2:
            raise _Bad("bad_messages", "SFT messages must end with an assistant turn after at "
                                       "least one other message")
    elif out[-1]["role"] == "assistant":
        raise _Bad("bad_messages", "prompt messages must not end with an assistant turn")
    return out


def _rank(value: Any, i: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad("wrong_type", f"ranks[{i}] must be an integer, got {type(value).__name__}")
    if value != int(value) or value < 0:
        raise _Bad("bad_ranks", f"ranks[{i}] = {value!r} is not an integer >= 0")
    return int(value)


def _ranking(prompt: str, responses: Sequence[str], ranks: Sequence[int]) -> dict[str, Any]:
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i] == responses[j] and ranks[i] != ranks[j]:
                what = ("chosen == rejected" if len(responses) == 2
                        else f"responses {i} and {j} are identical but ranked differently")
                raise _Bad("identical_responses", what)
    return {"prompt": prompt, "responses": list(responses), "ranks": list(ranks)}


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of an HH-RLHF transcript pair.

    The prompt is the text up to and including the last "\\n\\nAssistant:" of each transcript;
    both must agree (raises `_Bad` "mismatched_prefix" otherwise).
    """
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        which = "chosen" if cut_c < 0 else "rejected"
        raise _Bad("no_assistant_turn", f"{which} has no {HH_ASSISTANT!r} turn")
    cut_c += len(HH_ASSISTANT)
    cut_r += len(HH_ASSISTANT)
    if chosen[:cut_c] != rejected[:cut_r]:
        raise _Bad("mismatched_prefix", "chosen and rejected differ before their last "
                                        "Assistant turn, so the prompt is ambiguous")
    return chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]


def normalize_row(row: Any, fmt: str, fields: Mapping[str, str] | None = None,
                  from_csv: bool = False) -> dict[str, Any]:
    """Checks one row against `fmt` and returns its normalised example (see module docstring).

    Raises `_Bad` (reason, detail) for a bad row; `load_examples` turns that into the policy.
    """
    fields = fields or {}
    if not isinstance(row, Mapping):
        raise _Bad("wrong_type", f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "prompt":   # the row's other fields travel to reward functions as metadata
        meta = {k: v for k, v in row.items()
                if k not in (fields.get("prompt", "prompt"), fields.get("messages", "messages"))}
        if _has(row, "messages", fields):
            return {"messages": _messages(_field(row, "messages", fields), from_csv, None),
                    "meta": meta}
        return {"prompt": _text(_field(row, "prompt", fields), "prompt"), "meta": meta}
    if fmt == "sft" and _has(row, "messages", fields):
        return {"messages": _messages(_field(row, "messages", fields), from_csv, "assistant")}
    if fmt == "sft":
        return {"prompt": _text(_field(row, "prompt", fields), "prompt"),
                "response": _text(_field(row, "response", fields), "response")}
    if fmt == "ptx":
        return {"text": _text(_field(row, "text", fields), "text")}
    if fmt == "preference":
        prompt = _text(_field(row, "prompt", fields), "prompt")
        chosen = _text(_field(row, "chosen", fields), "chosen")
        rejected = _text(_field(row, "rejected", fields), "rejected")
        return _ranking(prompt, [chosen, rejected], [0, 1])
    if fmt in ("hh", "hh_sft", "hh_prompt"):
        # hh_sft: SFT on the chosen response; hh_prompt: the shared prefix as a PPO prompt.
        chosen = _text(_field(row, "chosen", fields), "chosen")
        rejected = _text(_field(row, "rejected", fields), "rejected")
        if chosen == rejected:
            raise _Bad("identical_responses", "chosen == rejected")
        prompt, resp_c, resp_r = split_hh(chosen, rejected)
        _text(resp_c, "chosen response")
        _text(resp_r, "rejected response")
        if fmt == "hh_sft":
            return {"prompt": prompt, "response": resp_c}
        if fmt == "hh_prompt":
            return {"prompt": prompt}
        return _ranking(prompt, [resp_c, resp_r], [0, 1])
    if fmt == "ranking":
        prompt = _text(_field(row, "prompt", fields), "prompt")
        responses = _list(_field(row, "responses", fields), "responses", from_csv)
        ranks = _list(_field(row, "ranks", fields), "ranks", from_csv)
        responses = [_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
        if len(responses) < 2:
            raise _Bad("bad_ranks", f"a ranking needs >= 2 responses, got {len(responses)}")
        if len(ranks) != len(responses):
            raise _Bad("bad_ranks", f"{len(responses)} responses but {len(ranks)} ranks")
        return _ranking(prompt, responses, [_rank(r, i) for i, r in enumerate(ranks)])
    raise ValueError(f"unknown data format {fmt!r}")


def _public(example: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if not k.startswith("_")}


def normalize_rows(rows: Iterator[RawRow], fmt: str, fields: Mapping[str, str],
                   report: LoadReport) -> list[dict[str, Any]]:
    """Normalises raw rows; bad ones go through `report.reject`."""
    examples = []
    for raw in rows:
        report.n_read += 1
        try:
            if raw.error is not None:
                raise _Bad(*raw.error)
            example = normalize_row(raw.value, fmt, fields, raw.from_csv)
        except _Bad as bad:
            report.reject(raw.file, raw.line, bad.reason, bad.detail, raw.raw)
            continue
        example["_file"], example["_line"] = raw.file, raw.line
        examples.append(example)
    report.n_loaded = len(examples)
    return examples


def make_report(opts: DataOptions, source: str, workdir: str | None) -> LoadReport:
    rejects = None
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        rejects = os.path.join(workdir, REJECTS_FILENAME)
    return LoadReport(source=source, on_bad_row=opts.on_bad_row, rejects_path=rejects)


def load_examples(cfg: Any = None, *, workdir: str | None = None,
                  report: LoadReport | None = None, print_summary: bool = True,
                  **overrides: Any) -> tuple[list[dict[str, Any]], LoadReport]:
    """Reads and checks the rows named by the data config; returns (examples, report).

    `cfg` is the `data` config block (ConfigDict or mapping) and/or keyword overrides (path,
    format, split, fields, on_bad_row, ...; see `jaxrlhf.data.config`). path == "synthetic"
    generates rows with `SyntheticTask` (cfg.synthetic) instead of reading files.
    Skipped rows are appended to `<workdir>/rejected_rows.jsonl` (not written when workdir is
    None: pass it on process 0 only in multi-host runs). Prints the summary when any row was
    rejected.
    """
    opts = resolve_options(cfg, **overrides)
    source = opts.path if opts.path == "synthetic" else f"{opts.path} [{opts.format}]"
    report = report or make_report(opts, source, workdir)
    if opts.path == "synthetic":
        from jaxrlhf.data.synthetic import synthetic_rows

        rows = iter(synthetic_rows(opts))
    else:
        rows = read_rows(opts.path, opts.split)
    examples = normalize_rows(rows, opts.format, opts.fields, report)
    if report.n_rejected and print_summary:
        print(f"[jaxrlhf.data] {report.summary()}", flush=True)
    return examples, report
