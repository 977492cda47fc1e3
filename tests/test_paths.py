"""The path layer (`jaxrlhf.paths`) on local paths and on a bucket URL: a stage run with
workdir gs://bucket/run writes the same metrics, summary, plot, export and checkpoints as a
local run, and resumes from them. The bucket is an fsspec filesystem registered for gs:// that
keeps its objects under a temporary directory (no network); orbax's own gs:// support
(tensorstore) is orbax's, so the checkpoint directory is mapped to the same local files."""
import importlib
import json
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from trainer_utils import load_config, shrink

from jaxrlhf import paths
from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.models import load_hf
from jaxrlhf.trainers import common, runner


class FakeGCS(LocalFileSystem):
    """gs://... -> ROOT[0]/... (set per test by the `bucket` fixture)."""
    protocol = ("gs", "gcs")
    root_marker = ""
    ROOT = {0: ""}

    def __init__(self, *args, **kw):   # an object store has no directories to create first
        super().__init__(*args, **dict(kw, auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        root = cls.ROOT[0]
        if path.startswith(root):
            return path
        return os.path.join(root, path.split("://", 1)[-1].lstrip("/"))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://... -> tmp_path/gcs/... through fsspec (what etils.epath uses for gs://)."""
    root = str(tmp_path / "gcs")
    os.makedirs(root)
    monkeypatch.setitem(FakeGCS.ROOT, 0, root)
    registry = importlib.import_module("fsspec.registry")._registry
    for proto in ("gs", "gcs"):
        monkeypatch.setitem(registry, proto, FakeGCS)

    class LocalCheckpointer(Checkpointer):
        def __init__(self, directory, **kw):
            super().__init__(os.path.join(root, directory.split("://", 1)[-1]), **kw)
    monkeypatch.setattr(common, "Checkpointer", LocalCheckpointer)
    return root


def test_layer_on_a_bucket(bucket):
    d = "gs://b/run/"
    assert paths.is_remote(d) and paths.absolute(d) == "gs://b/run"
    assert paths.join("gs://b/run", "x", "y.txt") == "gs://b/run/x/y.txt"
    paths.makedirs(paths.join(d, "sub"))
    with paths.open(paths.join(d, "a.json"), "w") as f:
        json.dump({"a": 1}, f)
    paths.append_lines(paths.join(d, "log.jsonl"), ["1\n"])
    paths.append_lines(paths.join(d, "log.jsonl"), ["2\n", "3\n"])
    with pytest.raises(ValueError, match="cannot append"):
        paths.open(paths.join(d, "log.jsonl"), "a")
    with paths.staged_dir(paths.join(d, "hf")) as local:
        assert not paths.is_remote(local)
        with open(os.path.join(local, "w.bin"), "wb") as f:
            f.write(b"\x00\x01")
    paths.write_bytes(paths.join(d, "checkpoints", "c.bin"), b"ckpt")
    assert paths.listdir(d) == ["a.json", "checkpoints", "hf", "log.jsonl", "sub"]
    with open(os.path.join(bucket, "b", "run", "log.jsonl")) as f:
        assert f.read() == "1\n2\n3\n"
    local = paths.local_copy(d)
    assert sorted(os.listdir(local)) == ["a.json", "hf", "log.jsonl", "sub"]   # no checkpoints
    with open(os.path.join(local, "hf", "w.bin"), "rb") as f:
        assert f.read() == b"\x00\x01"
    root = os.path.dirname(local)   # the process's download cache, removed at exit
    assert root in paths._CACHE_ROOTS and os.path.basename(root) == f"jaxrlhf-cache-{os.getpid()}"
    paths.rmtree(paths.join(d, "sub"))
    assert not paths.exists(paths.join(d, "sub"))


def test_local_paths_take_the_plain_calls(tmp_path):
    p = str(tmp_path / "x.txt")
    paths.append_lines(p, ["a\n"])
    paths.append_lines(p, ["b\n"])
    paths.write_bytes(str(tmp_path / "y.bin"), b"y")
    assert open(p).read() == "a\nb\n" and not os.path.exists(str(tmp_path / "y.bin.tmp"))
    with paths.staged_dir(str(tmp_path / "hf")) as local:
        assert local == str(tmp_path / "hf") and os.path.isdir(local)
    assert paths.local_copy(str(tmp_path)) == str(tmp_path)


def _rows(text):
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def test_sft_stage_in_a_bucket_equals_a_local_run_and_resumes(tmp_path, bucket):
    cfg = shrink(load_config("sft"), steps=6)
    local = str(tmp_path / "local")
    runner.run(cfg, local)
    runner.run(cfg, "gs://b/runs/sft")
    where = os.path.join(bucket, "b", "runs", "sft")
    for name in ("metrics.jsonl", "summary.json", "curves.png", "hf/config.json",
                 "hf/model.safetensors", "hf/jaxrlhf.json", "checkpoints"):
        assert os.path.exists(os.path.join(where, name)), name
    assert any(n.startswith("events.") for n in os.listdir(where))   # TensorBoard, uploaded
    with open(os.path.join(where, "metrics.jsonl")) as f:
        remote_rows = _rows(f.read())
    with open(os.path.join(local, "metrics.jsonl")) as f:
        local_rows = _rows(f.read())
    assert [r["loss"] for r in remote_rows if r["split"] == "train"] == \
        [r["loss"] for r in local_rows if r["split"] == "train"]
    assert len(remote_rows) == len(local_rows)
    # The same command again: resumes from the bucket's checkpoint, metrics not duplicated.
    runner.run(cfg, "gs://b/runs/sft")
    with open(os.path.join(where, "metrics.jsonl")) as f:
        assert len(_rows(f.read())) == len(remote_rows)
    # The export loads from the bucket (downloaded once) with the local run's weights.
    a, b = load_hf("gs://b/runs/sft/hf"), load_hf(os.path.join(local, "hf"))
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(a(tokens)), np.asarray(b(tokens)))
