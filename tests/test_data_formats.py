"""Loading every format from every file type, field remapping, the bad-input matrix in both
`on_bad_row` modes, and the real hh-rlhf files with their exact row and bad-row counts."""
import csv
import gzip
import json
import pathlib

import pytest

from jaxrlhf.data import (REJECTS_FILENAME, BadRowError, build_dataset, load_examples,
                          normalize_row, read_rows, split_hh)

HH_DIR = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless"

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
HH_C = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
HH_R = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"

# format -> (rows as written in the file, normalised examples expected back)
FORMAT_CASES = {
    "sft": ([{"prompt": "2+2=", "response": "4"}, {"prompt": "hi", "response": "yo", "x": 1}],
            [{"prompt": "2+2=", "response": "4"}, {"prompt": "hi", "response": "yo"}]),
    "sft_messages": ([{"messages": MSGS}], [{"messages": MSGS}]),
    "preference": ([{"prompt": "p", "chosen": "good", "rejected": "bad"}],
                   [{"prompt": "p", "responses": ["good", "bad"], "ranks": [0, 1]}]),
    "hh": ([{"chosen": HH_C, "rejected": HH_R}],
           [{"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:",
             "responses": [" like this", " no"], "ranks": [0, 1]}]),
    "ranking": ([{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
                 {"prompt": "q", "responses": ["x", "y"], "ranks": [0, 1]}],
                [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
                 {"prompt": "q", "responses": ["x", "y"], "ranks": [0, 1]}]),
    # Other fields of a prompt row travel as "meta" (reward functions' metadata).
    "prompt": ([{"prompt": "tell me", "answer": "x"}, {"prompt": "2+2=", "answer": "4"}],
               [{"prompt": "tell me", "meta": {"answer": "x"}},
                {"prompt": "2+2=", "meta": {"answer": "4"}}]),
    "prompt_messages": ([{"messages": MSGS[:2]}], [{"messages": MSGS[:2], "meta": {}}]),
    "ptx": ([{"text": "once upon a time"}], [{"text": "once upon a time"}]),
}
FILE_TYPES = ["jsonl", "jsonl.gz", "json", "json.gz", "parquet", "csv"]


def write_rows(path, rows, kind=None):
    """Writes rows to `path` in the file type its name says (CSV list cells are JSON)."""
    path = pathlib.Path(path)
    name = path.name
    if name.endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".csv"):
        columns = sorted({k for r in rows for k in r})
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                            for k, v in r.items()})
    else:
        if ".json." in name + "." and not name.endswith(".jsonl.gz"):
            data = json.dumps(rows, indent=2).encode()  # a JSON array file
        else:
            data = b"".join(
                (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
        if name.endswith(".gz"):
            data = gzip.compress(data)
        path.write_bytes(data)
    return str(path)


def public(examples):
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in examples]


@pytest.mark.parametrize("ftype", FILE_TYPES)
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_every_format_from_every_file_type(tmp_path, case, ftype):
    rows, expected = FORMAT_CASES[case]
    path = write_rows(tmp_path / f"data.{ftype}", rows)
    examples, report = load_examples(path=path, format=case.split("_")[0])
    assert public(examples) == expected
    assert report.n_read == report.n_loaded == len(rows) and not report.counts_by_reason
    assert [e["_line"] for e in examples][0] in (1, 2)  # JSON arrays start at line 2
    assert all(e["_file"] == path for e in examples)


def test_field_remapping_glob_and_directory(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    write_rows(tmp_path / "train-0.jsonl", rows[:2])
    write_rows(tmp_path / "train-1.jsonl", rows[2:])
    write_rows(tmp_path / "test.jsonl", rows[:1])
    fields = {"prompt": "question", "response": "answer"}
    by_glob, _ = load_examples(path=str(tmp_path / "train-*.jsonl"), format="sft", fields=fields)
    by_dir, _ = load_examples(path=str(tmp_path), split="train", format="sft", fields=fields)
    assert public(by_glob) == public(by_dir) == [
        {"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    test, _ = load_examples(path=str(tmp_path), split="test", format="sft", fields=fields)
    assert len(test) == 1
    with pytest.raises(BadRowError, match=r"missing_field: field 'prompt' \(column 'question2'\)"):
        load_examples(path=str(tmp_path / "test.jsonl"), format="sft",
                      fields={"prompt": "question2", "response": "answer"})


def test_missing_local_file_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_examples(path=str(tmp_path / "nope.jsonl"), format="sft")
    with pytest.raises(FileNotFoundError):
        load_examples(path=str(tmp_path / "*.jsonl"), format="sft")


# ------------------------------------------------------------------------- bad-input matrix

LONG = "x" * 100
# (reason, format, the bad line as written to a JSONL file, extra options). Options apply to the
# whole file; the good rows of each format are short enough for them.
BAD_CASES = [
    ("malformed_json", "sft", b'{"prompt": "a", "response": ', {}),
    ("invalid_utf8", "sft", b'{"prompt": "caf\xe9", "response": "x"}', {}),
    ("invalid_utf8", "sft", b'{"prompt": "\\udc80", "response": "x"}', {}),
    ("missing_field", "sft", {"prompt": "a"}, {}),
    ("missing_field", "sft", {"prompt": "a", "response": None}, {}),
    ("wrong_type", "sft", {"prompt": 3, "response": "x"}, {}),
    ("wrong_type", "sft", [1, 2], {}),
    ("empty_text", "sft", {"prompt": "a", "response": " \n "}, {}),
    ("empty_text", "ptx", {"text": ""}, {}),
    ("bad_messages", "sft", {"messages": [{"role": "user", "content": "hi"}]}, {}),
    ("bad_messages", "prompt", {"messages": [{"role": "robot", "content": "hi"}]}, {}),
    ("identical_responses", "preference", {"prompt": "p", "chosen": "x", "rejected": "x"}, {}),
    ("identical_responses", "hh", {"chosen": HH_C, "rejected": HH_C}, {}),
    ("mismatched_prefix", "hh",
     {"chosen": HH_C, "rejected": HH_R.replace("hello", "hey")}, {}),
    ("no_assistant_turn", "hh", {"chosen": "\n\nHuman: hi", "rejected": HH_R}, {}),
    ("bad_ranks", "ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, {}),
    ("bad_ranks", "ranking", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}, {}),
    ("wrong_type", "ranking", {"prompt": "p", "responses": "ab", "ranks": [0, 1]}, {}),
    ("too_long", "sft", {"prompt": "p", "response": LONG}, {"max_len": 32, "truncation": "drop"}),
    ("too_long", "prompt", {"prompt": LONG}, {"max_len": 64, "truncation": "drop"}),
    ("too_long", "ranking", {"prompt": LONG, "responses": [LONG, "b"], "ranks": [0, 1]},
     {"max_len": 32, "truncation": "left_prompt", "min_prompt_tokens": 8,
      "min_response_tokens": 30}),
    ("too_many_responses", "ranking",
     {"prompt": "p", "responses": list("abcde"), "ranks": [0, 1, 2, 3, 4]}, {"max_k": 4}),
    ("identical_after_truncation", "preference",
     {"prompt": "p", "chosen": LONG + "A", "rejected": LONG + "B"},
     {"max_len": 32, "truncation": "right_response"}),
]
TOKENIZE_REASONS = ("too_long", "too_many_responses", "identical_after_truncation")
GOOD = {"sft": {"prompt": "a", "response": "b"}, "ptx": {"text": "t"}, "prompt": {"prompt": "p"},
        "preference": {"prompt": "p", "chosen": "x", "rejected": "y"},
        "hh": {"chosen": HH_C, "rejected": HH_R},
        "ranking": {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}}
CASE_IDS = [f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(BAD_CASES)]


def _bad_file(tmp_path, fmt, bad):
    return write_rows(tmp_path / "rows.jsonl", [GOOD[fmt], bad, GOOD[fmt]])


@pytest.mark.parametrize("reason,fmt,bad,opts", BAD_CASES, ids=CASE_IDS)
def test_bad_row_error_mode_names_file_line_and_reason(tmp_path, reason, fmt, bad, opts):
    path = _bad_file(tmp_path, fmt, bad)
    with pytest.raises(BadRowError) as err:
        build_dataset(path=path, format=fmt, workdir=str(tmp_path / "wd"), **opts)
    assert str(err.value).startswith(f"{path}:2: {reason}")
    assert (err.value.file, err.value.line, err.value.reason) == (path, 2, reason)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("reason,fmt,bad,opts", BAD_CASES, ids=CASE_IDS)
def test_bad_row_skip_mode_counts_and_writes_every_row(tmp_path, capsys, reason, fmt, bad, opts):
    path = _bad_file(tmp_path, fmt, bad)
    workdir = tmp_path / "wd"
    data = build_dataset(path=path, format=fmt, on_bad_row="skip", workdir=str(workdir), **opts)
    assert data.report.counts_by_reason == {reason: 1}
    assert data.report.n_read == 3 and data.report.n_tokenized == 2
    assert sorted({data.examples[row["index"]]["_line"] for row in data.rows}) == [1, 3]
    (record,) = [json.loads(line) for line in (workdir / REJECTS_FILENAME).read_text().splitlines()]
    assert (record["file"], record["line"], record["reason"]) == (path, 2, reason)
    if reason in TOKENIZE_REASONS:  # found after loading: the normalised example is written
        assert record["row"] == normalize_row(bad, fmt)
    elif isinstance(bad, (dict, list)):
        assert record["row"] == bad
    else:
        try:
            assert record["row"] == json.loads(bad.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):  # unparseable lines are kept as text
            assert isinstance(record["row"], str) and record["row"]
    assert f"{reason}=1" in capsys.readouterr().out


def test_skip_mode_mixed_file_counts_per_reason(tmp_path, capsys):
    sft_cases = [c for c in BAD_CASES if c[1] == "sft" and not c[3]]
    lines = [GOOD["sft"]]
    for _, _, bad, _ in sft_cases:
        lines += [bad, GOOD["sft"]]
    path = write_rows(tmp_path / "mixed.jsonl", lines)
    examples, report = load_examples(path=path, format="sft", on_bad_row="skip",
                                     workdir=str(tmp_path))
    expected = {}
    for reason, *_ in sft_cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.counts_by_reason) == expected
    assert len(examples) == report.n_loaded == len(sft_cases) + 1
    assert report.n_read == report.n_loaded + report.n_rejected
    records = [json.loads(x) for x in (tmp_path / REJECTS_FILENAME).read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(2, 2 * len(sft_cases) + 1, 2))
    assert [r["reason"] for r in records] == [c[0] for c in sft_cases]
    out = capsys.readouterr().out
    assert all(f"{k}={v}" in out for k, v in expected.items())
    assert report.metrics()["data/n_rejected"] == len(sft_cases)


def test_jsonl_starting_with_a_list_is_not_a_json_array(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [[1, 2], GOOD["sft"]])
    examples, report = load_examples(path=path, format="sft", on_bad_row="skip")
    assert len(examples) == 1 and report.counts_by_reason == {"wrong_type": 1}


def test_json_array_files(tmp_path):
    good = json.dumps(GOOD["sft"])
    body = f'[\n  {good},\n  {{"prompt": "caf\udce9", "response": "x"}},\n  {good}\n]\n'
    path = tmp_path / "rows.json"
    path.write_bytes(body.encode("utf-8", "surrogateescape"))  # a raw 0xE9 byte on line 3
    with pytest.raises(BadRowError, match=r"rows\.json:3: invalid_utf8"):
        load_examples(path=str(path), format="sft")
    examples, report = load_examples(path=str(path), format="sft", on_bad_row="skip")
    assert [e["_line"] for e in examples] == [2, 4] and report.counts_by_reason == {
        "invalid_utf8": 1}
    broken = tmp_path / "broken.json"
    broken.write_text(f"[\n  {good},\n  {{oops}}\n]")
    for mode in ("error", "skip"):  # a broken array cannot be resynchronised: always an error
        with pytest.raises(BadRowError, match=r"broken\.json:3: malformed_json"):
            load_examples(path=str(broken), format="sft", on_bad_row=mode)


@pytest.mark.parametrize("ftype,line", [("parquet", 2), ("csv", 3)])
def test_bad_rows_in_datasets_files_use_row_numbers(tmp_path, ftype, line):
    """Parquet rows are numbered from 1; CSV rows by their physical line (the header is
    line 1), like every other text format."""
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""},
            {"prompt": "c", "response": "d"}]
    path = write_rows(tmp_path / f"rows.{ftype}", rows)
    with pytest.raises(BadRowError, match=rf"rows\.{ftype}:{line}: empty_text"):
        load_examples(path=path, format="sft")
    examples, report = load_examples(path=path, format="sft", on_bad_row="skip")
    assert public(examples) == [rows[0], rows[2]] and report.counts_by_reason == {
        "empty_text": 1}


def test_unreadable_csv_is_refused_in_both_modes(tmp_path):
    bad_bytes = tmp_path / "latin1.csv"
    bad_bytes.write_bytes(b"prompt,response\na,b\ncaf\xe9,x\n")
    broken = tmp_path / "broken.csv"
    broken.write_text('prompt,response\na,b\n"unterminated,x\n')
    for mode in ("error", "skip"):
        with pytest.raises(BadRowError, match=r"latin1\.csv:3: invalid_utf8"):
            load_examples(path=str(bad_bytes), format="sft", on_bad_row=mode)
        with pytest.raises(BadRowError, match=r"broken\.csv:0: unreadable_file"):
            load_examples(path=str(broken), format="sft", on_bad_row=mode)


def test_csv_numbers_stay_text(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("prompt,response\n12,34\n")
    examples, _ = load_examples(path=str(path), format="sft")
    assert public(examples) == [{"prompt": "12", "response": "34"}]


def test_normalize_row_and_split_hh_directly():
    assert split_hh(HH_C, HH_R)[1:] == (" like this", " no")
    assert normalize_row({"q": "a", "r": "b"}, "sft", {"prompt": "q", "response": "r"}) == {
        "prompt": "a", "response": "b"}
    assert normalize_row({"prompt": "p", "responses": ["a", "a"], "ranks": [1, 1]},
                         "ranking")["ranks"] == [1, 1]  # identical but tied: allowed


def test_read_rows_reports_blank_lines_as_nothing(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [(r.line, r.value) for r in read_rows(str(path))] == [(1, {"text": "a"}),
                                                                 (4, {"text": "b"})]


# ----------------------------------------------------------------------------- real hh-rlhf

# Measured once with this loader (byte tokenizer, default data config: max_len 512,
# truncation "left_prompt", min 8 prompt / 8 response tokens) by running build_dataset on each
# split with on_bad_row="skip" and printing report.counts_by_reason / truncation_counts, then
# cross-checked with an independent script that splits each transcript pair at its last
# "\n\nAssistant:". The bad rows are: empty chosen response (" ") at train lines 70, 390, 716 and
# test line 96; chosen/rejected prefixes that differ (the README's known quirk) at train lines
# 1322, 1531, 1597 and test lines 108, 166.
HH_EXPECTED = {
    "train": dict(n_read=1800, n_loaded=1794, bad={"empty_text": 3, "mismatched_prefix": 3},
                  bad_lines=[70, 390, 716, 1322, 1531, 1597],
                  truncated={"prompt_truncated": 1035, "response_truncated": 219},
                  too_long_if_dropped=1035),
    "test": dict(n_read=200, n_loaded=197, bad={"empty_text": 1, "mismatched_prefix": 2},
                 bad_lines=[96, 108, 166],
                 truncated={"prompt_truncated": 125, "response_truncated": 27},
                 too_long_if_dropped=125),
}
needs_hh = pytest.mark.skipif(not HH_DIR.is_dir(),
                              reason=f"shared hh-rlhf data not present at {HH_DIR}")


@needs_hh
@pytest.mark.parametrize("split", ["train", "test"])
def test_hh_rlhf_exact_counts(tmp_path, split):
    want = HH_EXPECTED[split]
    data = build_dataset(path=str(HH_DIR), split=split, format="hh", on_bad_row="skip",
                         workdir=str(tmp_path))
    r = data.report
    assert (r.n_read, r.n_loaded, r.n_tokenized) == (want["n_read"], want["n_loaded"],
                                                     want["n_loaded"])
    assert dict(r.counts_by_reason) == want["bad"]
    assert dict(r.truncation_counts) == want["truncated"]
    records = [json.loads(x) for x in (tmp_path / REJECTS_FILENAME).read_text().splitlines()]
    assert [rec["line"] for rec in records] == want["bad_lines"]
    assert all(rec["file"].endswith(f"{split}.jsonl.gz") for rec in records)
    assert all(set(rec["row"]) == {"chosen", "rejected"} for rec in records)
    # Every kept pair shares its prompt and ends each response with EOS unless it was cut.
    assert len(data.rows) == want["n_loaded"] and all(len(row["tokens"]) == 2
                                                      for row in data.rows)
    assert max(row["length"] for row in data.rows) <= 512

    dropped = build_dataset(path=str(HH_DIR), split=split, format="hh", on_bad_row="skip",
                            truncation="drop", workdir=str(tmp_path / "drop"))
    assert dropped.report.counts_by_reason == {**want["bad"],
                                               "too_long": want["too_long_if_dropped"]}
    assert dropped.report.n_tokenized == want["n_loaded"] - want["too_long_if_dropped"]


@needs_hh
def test_hh_rlhf_error_mode_stops_at_first_bad_row():
    with pytest.raises(BadRowError) as err:
        load_examples(path=str(HH_DIR), split="train", format="hh")
    assert err.value.file.endswith("train.jsonl.gz")
    assert (err.value.line, err.value.reason) == (70, "empty_text")


def test_truncated_gzip_is_refused_with_its_file(tmp_path):
    data = gzip.compress(b"".join(json.dumps(GOOD["sft"]).encode() + b"\n" for _ in range(500)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    for mode in ("error", "skip"):
        with pytest.raises(BadRowError, match=r"cut\.jsonl\.gz:\d+: unreadable_file"):
            load_examples(path=str(path), format="sft", on_bad_row=mode)


def test_hh_sft_and_prompt_formats_on_real_data():
    """hh_sft / hh_prompt split HH transcripts like "hh" and keep the same bad-row rules."""
    import os
    from jaxrlhf.data import load_examples
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                        "hh-rlhf-harmless", "test.jsonl.gz")
    if not os.path.exists(path):
        pytest.skip("../shared/data/hh-rlhf-harmless is absent on this machine")
    pairs, rep_pairs = load_examples(path=path, format="hh", on_bad_row="skip")
    sft, rep_sft = load_examples(path=path, format="hh_sft", on_bad_row="skip")
    prompts, _ = load_examples(path=path, format="hh_prompt", on_bad_row="skip")
    assert len(pairs) == len(sft) == len(prompts) == 197
    assert dict(rep_sft.counts_by_reason) == dict(rep_pairs.counts_by_reason)
    for p, s, q in zip(pairs, sft, prompts):
        assert s["prompt"] == p["prompt"] == q["prompt"]
        assert s["response"] == p["responses"][p["ranks"].index(0)]
