"""One path layer for every file a run writes or reads back: local paths and URLs
(`gs://bucket/run`, `s3://...`) alike.

Local paths take the plain `os` / `open` calls. A URL goes through `etils.epath` -- the path
type orbax itself uses, backed by fsspec (`pip install gcsfs` for gs://, the `.[gcs]` extra) --
so a workdir in a bucket holds the checkpoints (orbax writes there directly, from every
process of a multi-host run), the metrics, plots, summaries and HF exports.

Object stores cannot append to or memory-map a file, and some libraries only write local
files (safetensors, tokenizers' save_pretrained, tensorboardX). For those:
  `staged_dir(dst)`   a local directory whose files are uploaded to dst when the block ends
  `local_copy(src)`   a local directory holding src's files (downloaded once per process)
Both are the identity on local paths.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Iterator, List


def is_remote(path) -> bool:
    """Whether `path` is a URL (scheme://...) rather than a local path."""
    return "://" in str(path)


def _epath(path):
    from etils import epath
    return epath.Path(str(path))


def absolute(path: str) -> str:
    """A local path made absolute (~ expanded); a URL unchanged (without a trailing /)."""
    path = str(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
    return os.path.join(str(path), *parts) if not is_remote(path) else \
        "/".join([str(path).rstrip("/")] + [p.strip("/") for p in parts])


def exists(path) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> List[str]:
    if is_remote(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def open(path, mode: str = "r", **kw):   # noqa: A001 (the builtin's drop-in)
    """`open` for local paths and URLs; "a" (append) is local only."""
    if not is_remote(path):
        return builtins.open(path, mode, **kw)
    if "a" in mode:
        raise ValueError(f"{path}: an object store cannot append; write the file whole.")
    return _epath(path).open(mode, **kw)


def append_lines(path, lines) -> None:
    """Appends text lines (each ending in a newline) to a file; on an object store the file
    is read and written whole (for small logs: samples, rejected rows, reward errors)."""
    text = "".join(lines)
    if not is_remote(path):
        with builtins.open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = _epath(path).read_text() if exists(path) else ""
    _epath(path).write_text(old + text)


def write_bytes(path, data: bytes) -> None:
    """Writes a file whole and atomically: a local file through a temporary file and a
    rename; an object-store write is atomic by itself."""
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    tmp = f"{path}.tmp"
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove(path) -> None:
    if is_remote(path):
        _epath(path).unlink()
    else:
        os.remove(path)


def rmtree(path) -> None:
    if is_remote(path):
        _epath(path).rmtree()
    else:
        shutil.rmtree(path)


def copy(src, dst) -> None:
    """Copies one file (either side may be a URL)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
        return
    with open(src, "rb") as f_in, open(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)


def copytree(src, dst, skip=()) -> None:
    """Copies the files under src into dst (created), keeping relative paths; directories
    named in `skip` are left out."""
    makedirs(dst)
    for name in listdir(src):
        s, d = join(src, name), join(dst, name)
        if isdir(s):
            if name not in skip:
                copytree(s, d, skip)
        else:
            copy(s, d)


@contextlib.contextmanager
def staged_dir(dst: str) -> Iterator[str]:
    """Yields a local directory to write into; for a URL `dst` its files are uploaded to dst
    when the block ends without an error (a local `dst` is yielded itself, created)."""
    if not is_remote(dst):
        makedirs(dst)
        yield dst
        return
    tmp = tempfile.mkdtemp(prefix="jaxrlhf-stage-")
    try:
        yield tmp
        copytree(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_CACHE_ROOTS: set = set()   # download caches this process created (removed at exit)


def local_copy(src: str) -> str:
    """A local directory with src's files: src itself when local, else a download into a
    per-process cache under the temp directory (one download per URL and process; the
    checkpoints/ subdirectories of stage directories are not downloaded). The cache is
    removed when the process exits."""
    if not is_remote(src):
        return src
    key = hashlib.sha1(src.encode()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), f"jaxrlhf-cache-{os.getpid()}")
    if root not in _CACHE_ROOTS:
        _CACHE_ROOTS.add(root)
        atexit.register(shutil.rmtree, root, True)
    dst = os.path.join(root, key)
    if not os.path.isdir(dst):
        copytree(src, dst + ".part", skip=("checkpoints",))
        os.replace(dst + ".part", dst)
    return dst


def sync_file(local: str, remote: str) -> None:
    """Uploads one local file over `remote` (no-op when remote is the same local path)."""
    if os.path.abspath(local) != (remote if is_remote(remote) else os.path.abspath(remote)):
        copy(local, remote)
