"""Failure modes a user meets through the CLI: rejected rows listed once per run, held-out data
under the training data's bad-row policy, a limit on skipped non-finite steps, errors that name
the file or field, one-line errors without a traceback."""
import json
import os
import subprocess
import sys

import pytest

from trainer_utils import REPO, load_config, poison_batches, read_jsonl, shrink

from jaxrlhf.data import REJECTS_FILENAME, BadRowError, build_dataset, load_tokenizer
from jaxrlhf.models import init_model, load_hf, preset, save_hf
from jaxrlhf.trainers import common, runner

TINY = preset("tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64)


def _sft_file(path, n_good=24, n_bad=3):
    """An SFT JSONL file with `n_bad` rows whose response is empty (bad rows)."""
    with open(path, "w") as f:
        for i in range(n_good + n_bad):
            resp = "" if i % 9 == 4 and n_bad else f"yes {i}"
            f.write(json.dumps({"prompt": f"question {i}?", "response": resp}) + "\n")
    return str(path)


def test_rerun_of_a_finished_skip_mode_stage_lists_each_reject_once(tmp_path):
    cfg = shrink(load_config("sft"), steps=2)
    cfg.data.path = _sft_file(tmp_path / "rows.jsonl")
    cfg.data.format = "sft"
    cfg.data.on_bad_row = "skip"
    wd = str(tmp_path / "w")
    runner.run(cfg, wd)
    first = read_jsonl(os.path.join(wd, REJECTS_FILENAME))
    summary, _ = runner.run(cfg, wd)   # finished: restores the last checkpoint, exports again
    again = read_jsonl(os.path.join(wd, REJECTS_FILENAME))
    assert len(first) == 3 and again == first
    assert summary["data_rejected"] == 3


def test_heldout_split_follows_the_training_bad_row_policy(tmp_path):
    tok = load_tokenizer("byte")
    # Built-in task: its test split takes data's options (skip mode, tiny max_len, drop).
    cfg = shrink(load_config("sft"))
    cfg.data.on_bad_row = "skip"
    cfg.data.max_len = 14
    cfg.data.buckets = (14,)
    cfg.data.truncation = "drop"
    train, ev = common.prepare_data(cfg, tok, str(tmp_path / "a"))
    assert train.report.counts_by_reason["too_long"] > 0
    assert ev.report.on_bad_row == "skip" and ev.report.counts_by_reason["too_long"] > 0
    # A held-out file follows data.on_bad_row unless eval_data sets its own.
    cfg = shrink(load_config("sft"))
    cfg.data.path = _sft_file(tmp_path / "train.jsonl", n_bad=0)
    cfg.data.on_bad_row = "skip"
    cfg.eval_data.path = _sft_file(tmp_path / "test.jsonl")
    _, ev = common.prepare_data(cfg, tok, str(tmp_path / "b"))
    assert ev.report.n_rejected == 3 and len(ev.rows) == 24
    cfg.eval_data.on_bad_row = "error"
    with pytest.raises(BadRowError, match=r"test\.jsonl:5: empty_text"):
        common.prepare_data(cfg, tok, str(tmp_path / "c"))


def test_skipped_nonfinite_steps_are_limited(tmp_path, monkeypatch):
    """Every batch from position 1 on is poisoned (NaN loss): under on_nonfinite=skip the run
    stops once more than max_skipped_fraction of its steps were dropped, without an export."""
    poison_batches(monkeypatch, lambda position: position >= 1)
    cfg = shrink(load_config("sft"), steps=5)   # limit: max(1, 0.1 * 5) = 1 skipped step
    cfg.train.on_nonfinite = "skip"
    wd = str(tmp_path / "w")
    with pytest.raises(common.NonFiniteLoss, match="max_skipped_fraction"):
        runner.run(cfg, wd)
    assert not os.path.exists(os.path.join(wd, "hf"))
    rows = [r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1]


def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ds = build_dataset(path=str(empty), format="sft")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*no rows to batch"):
        ds.iterator(8)

    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "llama", oops')
    with pytest.raises(ValueError, match=r"bad_config/config\.json is not valid JSON"):
        load_hf(str(bad_config))

    model_dir = str(tmp_path / "truncated")
    save_hf(init_model(TINY, head="lm", seed=0), model_dir)
    weights = os.path.join(model_dir, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match=r"truncated/model\.safetensors is not a readable "
                                         r"safetensors file"):
        load_hf(model_dir)


def test_csv_rows_are_numbered_by_physical_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,response\n"a\nmulti-line prompt",b\nc,\nd,e\n')
    with pytest.raises(BadRowError, match=r"rows\.csv:4: empty_text"):
        build_dataset(path=str(path), format="sft")


def _cli(tmp_path, *extra):
    env = dict(os.environ, JAXRLHF_NO_PROGRESS="1", PYTHONPATH=REPO, XLA_FLAGS="")
    cmd = [sys.executable, "-m", "jaxrlhf.train", "--config", "configs/sft.py", "--workdir",
           str(tmp_path / "cli"), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def test_user_errors_print_one_line(tmp_path):
    out = _cli(tmp_path, "--config.no_such_field=1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "no_such_field" in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown config field")
    out = _cli(tmp_path, "--config.init_from=/nonexistent/model")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent/model" in errors[0]
    out = _cli(tmp_path, "--config.init_from=/nonexistent/model", "--verbose")
    assert out.returncode != 0 and "Traceback" in out.stderr
