"""What this machine gives a run: python -m jaxrlhf.env [--config configs/<name>.py[:variant]]
[--config.a.b=value ...] [--json].

Prints the JAX version and backend, the devices (kind, count, this process's share in a
multi-process run, memory where the backend reports it), what `dtype: "auto"` resolves to,
and, with --config, the mesh the config would build and the stage's model dtypes: a check of a
TPU VM, GPU host or Colab runtime before a long run. Nothing is trained or downloaded.
"""
from __future__ import annotations

import json
import os
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


_ATTENTION = {
    "einsum": "einsum (grouped-query einsums, float32 softmax)",
    "xla": "xla (jax.nn.dot_product_attention, XLA implementation)",
    "cudnn": "cudnn (jax.nn.dot_product_attention, cuDNN fused kernel; XLA where it refuses)",
}


def _model_attention(model, init_dir: str) -> str:
    """What the config's model attends with here: its `attention` resolved for this
    backend, from the preset or the HF config.json of init_from (no weights are read)."""
    from jaxrlhf.config import model_config_from
    from jaxrlhf.models.hf_io import config_from_hf, read_json
    from jaxrlhf.models.transformer import resolve_attention
    block = {k: v for k, v in model.items() if v is not None}
    try:
        if init_dir:
            cfg = config_from_hf(read_json(os.path.join(init_dir, "config.json")),
                                 dtype=block.get("dtype") or "auto")
            if block.get("attention"):
                cfg = cfg.replace(attention=block["attention"])
        else:
            cfg = model_config_from(block)
    except (OSError, ValueError, KeyError) as e:
        return f"unknown ({e})"
    return _ATTENTION[resolve_attention(cfg)]


def _cli_malloc() -> str:
    """The host allocator setting `python -m jaxrlhf.train` runs with in this environment."""
    from jaxrlhf import _host_malloc
    # As the environment was before a re-executed CLI (this process may be one) added them.
    env = _host_malloc.without_hugepages(os.environ)
    if _host_malloc.hugepage_env(env) is not None:
        return f"hugepages ({_host_malloc.HUGEPAGE_TUNABLE})"
    mode = env.get("JAXRLHF_HOST_MALLOC", "").lower()
    return mode if mode in ("reuse", "default") else "default (no transparent huge pages here)"


def describe(config=None) -> Dict[str, Any]:
    """The environment report as a dict (what `main` prints)."""
    import jax

    from jaxrlhf.models.config import ModelConfig, resolve_dtype
    from jaxrlhf.models.transformer import resolve_attention
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
        "attention_auto": _ATTENTION[resolve_attention(ModelConfig(), resolve_dtype("auto"))],
        "cli_host_malloc": _cli_malloc(),
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
                        "remat": model.get("remat") or "none",
                        "attention": _model_attention(model, init)}
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
