"""What this machine gives a run: python -m jaxrlhf.env [--config configs/<name>.py[:variant]]
[--config.a.b=value ...] [--json].

Prints the JAX version and backend, the devices (kind, count, this process's share in a
multi-process run, memory where the backend reports it), what `dtype: "auto"` resolves to,
and, with --config, the mesh the config would build and the stage's model dtypes: a check of a
TPU VM, GPU host or Colab runtime before a long run. Nothing is trained or downloaded.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:variant]); optional.", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def _memory_gb(device) -> Optional[float]:
    try:
        stats = device.memory_stats() or {}
    except Exception:   # backends without memory statistics (CPU)
        return None
    limit = stats.get("bytes_limit")
    return round(limit / 2 ** 30, 2) if limit else None


def describe(config=None) -> Dict[str, Any]:
    """The environment report as a dict (what `main` prints)."""
    import jax

    from jaxrlhf.models.config import resolve_dtype
    devices = jax.devices()
    out: Dict[str, Any] = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "process": f"{jax.process_index()} of {jax.process_count()}",
        "devices": len(devices),
        "local_devices": jax.local_device_count(),
        "device_kind": sorted({d.device_kind for d in devices}),
        "device_memory_gb": _memory_gb(devices[0]),
        "dtype_auto": resolve_dtype("auto"),
        "attention": "XLA einsum softmax attention (jaxrlhf.models.transformer.Attention)",
    }
    if config is not None:
        from jaxrlhf import sharding as shd
        mesh = shd.make_mesh(dict(config.mesh))
        out["stage"] = config.stage
        out["mesh"] = dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape)))
        blocks = [config] if config.stage != "pipeline" else [
            config.pipeline[k] for k in ("sft", "rm", "dpo", "ppo") if config.pipeline.get(k)]
        model = blocks[0].model
        init = blocks[0].get("init_from", "") or (
            blocks[0].ppo.actor_init if "ppo" in blocks[0] else "")
        out["model"] = {"preset": model.get("preset"), "init_from": init or None,
                        "dtype": resolve_dtype(model.get("dtype") or "auto"),
                        "param_dtype": model.get("param_dtype") or "float32",
                        "remat": model.get("remat") or "none"}
        lora = blocks[0].get("lora")
        if lora is not None and int(lora.rank):
            out["lora"] = {"rank": int(lora.rank), "alpha": float(lora.alpha),
                           "targets": lora.targets}
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)   # jax's backend probing logs at INFO
    report = describe(_CONFIG.value)
    if _JSON.value:
        print(json.dumps(report, indent=1))
        return
    for k, v in report.items():
        print(f"{k:18s} {v}")


if __name__ == "__main__":
    app.run(main)
