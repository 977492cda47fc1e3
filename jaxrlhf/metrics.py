"""What the user sees while training: progress bar, metric lines, JSONL, TensorBoard, plots.

Files written into a stage directory:
  metrics.jsonl   one JSON object per logged step: {"step": n, "split": "train"|"eval", ...}
  events.*        TensorBoard event files (tensorboardX)
  summary.json    final metrics, wall time, and the stage's key results
  curves.png      loss / accuracy (or reward / KL) curves

On resume, metric lines beyond the restored step are dropped so that the file equals the one
an uninterrupted run would have written.

A workdir that is a URL (gs://...): metrics.jsonl and the event files are written to a local
directory and uploaded whole (an object store cannot append) at most every
`SYNC_SECONDS`, at `sync()` and at `close()`; everything else goes through `jaxrlhf.paths`.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from jaxrlhf import paths

SYNC_SECONDS = 60.0


def _to_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class MetricsLogger:
    """Writes metrics to JSONL + TensorBoard and drives a tqdm progress bar with ETA."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 desc: str = "train", log_every: int = 10, tensorboard: bool = True,
                 is_main: bool = True, stream=None, echo_keys=None):
        self.workdir = workdir
        self.is_main = is_main
        self.log_every = max(1, log_every)
        self.desc = desc
        self.stream = stream or sys.stderr
        self.echo_keys = echo_keys
        self._t0 = time.time()
        self._tb = None
        self._bar = None
        self._local = workdir
        self._synced = time.time()
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not is_main:
            return
        paths.makedirs(workdir)
        if paths.is_remote(workdir):   # written here, uploaded by sync()
            self._local = tempfile.mkdtemp(prefix="jaxrlhf-metrics-")
            self.path = os.path.join(self._local, "metrics.jsonl")
            remote = paths.join(workdir, "metrics.jsonl")
            if paths.exists(remote):
                paths.copy(remote, self.path)
        self._truncate_after(start_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(logdir=self._local, flush_secs=30)
            except ImportError:  # optional: JSONL is the source of truth
                self._tb = None
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                             dynamic_ncols=True, file=self.stream, mininterval=1.0,
                             disable=os.environ.get("JAXRLHF_NO_PROGRESS") == "1")
        except ImportError:
            self._bar = None

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train",
              echo: Optional[bool] = None) -> None:
        """Appends one metrics line; prints it every `log_every` steps (or when `echo`)."""
        if not self.is_main:
            return
        row = {"step": int(step), "split": split}
        row.update({k: _to_float(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        if self._local != self.workdir and time.time() - self._synced > SYNC_SECONDS:
            self.sync()
        if echo is None:
            echo = split != "train" or step % self.log_every == 0
        if echo:
            keys = [k for k in (self.echo_keys or metrics) if k in metrics]
            self.print(f"[{self.desc}] step {step} {split}: " + format_metrics(metrics, keys))

    def print(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def sync(self) -> None:
        """Uploads metrics.jsonl and the event files of a URL workdir (no-op when local)."""
        if not self.is_main or self._local == self.workdir:
            return
        if self._tb is not None:
            self._tb.flush()
        for name in os.listdir(self._local):
            paths.sync_file(os.path.join(self._local, name), paths.join(self.workdir, name))
        self._synced = time.time()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self.is_main and self._local != self.workdir:
            self.sync()
            shutil.rmtree(self._local, ignore_errors=True)

    @property
    def elapsed(self) -> float:
        return time.time() - self._t0


def format_metrics(metrics: Mapping[str, float], keys: Optional[Iterable[str]] = None) -> str:
    keys = list(keys or metrics.keys())
    parts = []
    for k in keys:
        v = _to_float(metrics[k])
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def read_metrics(path: str):
    """All rows of a metrics.jsonl file (a stage dir or the file itself)."""
    if paths.isdir(path):
        path = paths.join(path, "metrics.jsonl")
    with paths.open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def write_summary(workdir: str, summary: Mapping) -> str:
    path = paths.join(workdir, "summary.json")
    with paths.open(path, "w") as f:
        json.dump({k: _to_float(v) for k, v in summary.items()}, f, indent=2, sort_keys=True)
    return path


def plot_curves(workdir: str, panels: Sequence[Sequence[str]], filename: str = "curves.png",
                title: str = "") -> Optional[str]:
    """One subplot per panel; each panel lists metric keys (train and eval rows both drawn)."""
    try:   # a Figure of its own: pyplot's backend (a notebook's inline one) is left alone
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = read_metrics(workdir) if paths.exists(paths.join(workdir, "metrics.jsonl")) else []
    panels = [p for p in panels if any(k in r for r in rows for k in p)]
    if not panels:
        return None
    fig = Figure(figsize=(4.5 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            for split, style in (("train", "-"), ("eval", "o-")):
                pts = [(r["step"], r[key]) for r in rows
                       if r.get("split") == split and isinstance(r.get(key), (int, float))]
                if pts:
                    xs, ys = np.array(pts, dtype=float).T
                    ax.plot(xs, ys, style, label=f"{split} {key}", markersize=3,
                            alpha=0.9 if split == "eval" else 0.6)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, paths.join(workdir, filename))


def save_figure(fig, path: str) -> str:
    """Writes a matplotlib Figure as a PNG to a local path or a URL (`jaxrlhf.paths`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    paths.write_bytes(path, buf.getvalue())
    return path
