"""Low-rank adapters (LoRA) on a frozen base model, and their export.

With adapters of rank r on a projection W [in, out] (`ModelConfig.lora_*`), the layer computes

    y = x W + (alpha / r) · (x A) B,      A [in, r] ~ U(±1/√in),  B [r, out] = 0 at the start,

so the adapted model equals the base model until B moves. Only A, B (and a score head, which
is new or task-specific) are trained: the base weights are a separate, frozen pytree that is
never differentiated, donated or checkpointed, and "adapters off" (the same base weights under
the graph of the model without adapters) is the frozen reference of DPO and PPO, with no
second copy.

Parameters are nnx pure dicts (`nnx.to_pure_dict`); `split` / `join` move between the full
dict and (trainable, base). Exports:
  * `merged`: a model without adapters whose weights are W + (alpha / r) A B (what
    `save_hf` writes, loadable by transformers with no extra package);
  * `save_peft` / `load_peft`: the PEFT adapter format (adapter_config.json +
    adapter_model.safetensors with PEFT's tensor names: lora_A.weight [r, in], lora_B.weight
    [out, r] in HF's [out, in] layout; a reward model's score head under "score.weight", as
    PEFT's modules_to_save stores it) for every family but GPT-2.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import LORA_TARGETS, ModelConfig
from jaxrlhf.models.transformer import Transformer, lora_in_dims

HEAD_KEYS = ("score_w", "score_b")   # a score head trains with the adapters
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# Our target names -> the HF module names PEFT's target_modules use (every family but GPT-2).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}


def _is_trainable(key: str) -> bool:
    return key.startswith("lora_") or key in HEAD_KEYS


def split(params: Mapping) -> Tuple[Dict, Dict]:
    """Full pure dict -> (trainable: adapters and score head, base: everything else)."""
    trainable, base = {}, {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            t, b = split(v)
            if t:
                trainable[k] = t
            if b:
                base[k] = b
        elif _is_trainable(str(k)):
            trainable[k] = v
        else:
            base[k] = v
    return trainable, base


def join(base: Optional[Mapping], trainable: Mapping) -> Dict:
    """The union of two disjoint nested dicts (`split`'s inverse); base None -> trainable."""
    if base is None:
        return trainable
    out = dict(base)
    for k, v in trainable.items():
        out[k] = join(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


def with_adapters(cfg: ModelConfig, rank: int, alpha: float,
                  targets: Sequence[str]) -> ModelConfig:
    """`cfg` with adapters of rank `rank` on `targets` ("all" = every projection)."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if targets in ((), ("all",)):
        targets = cfg.lora_target_names()
    return cfg.replace(lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=targets)


def without_adapters(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(lora_rank=0, lora_targets=())


def _abstract(cfg: ModelConfig, head: str):
    return jax.eval_shape(lambda: nnx.split(Transformer(cfg, head=head, rngs=nnx.Rngs(0))))


def graphdef_of(cfg: ModelConfig, head: str):
    """The graphdef of a model with config `cfg` (e.g. the base model: adapters off)."""
    return _abstract(cfg, head)[0]


def add_adapters(model: Transformer, rank: int, alpha: float, targets: Sequence[str], *,
                 seed: int = 0, mesh=None, rules=None) -> Transformer:
    """`model` with fresh adapters (A uniform, B zero; seeded per parameter path), placed by
    their logical axes on `mesh`; the base weights are the same arrays (no copy)."""
    from jaxrlhf.sharding import state_shardings
    cfg = with_adapters(model.cfg, rank, alpha, targets)
    graphdef, abstract = _abstract(cfg, model.head)
    flat = dict(nnx.to_flat_state(abstract))
    have = dict(nnx.to_flat_state(nnx.state(model)))
    shardings = (dict(nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
                 if mesh is not None else {})
    key = jax.random.PRNGKey(seed)
    for path, var in flat.items():
        if path in have:
            flat[path] = var.replace(have[path].get_value())
            continue
        leaf = str(path[-1])
        shape = var.get_value().shape
        if leaf.startswith("lora_a_"):
            n_in = lora_in_dims(leaf[len("lora_a_"):])
            # shape = ([L,] in..., r): the input dims are the n_in before the rank
            bound = 1.0 / np.sqrt(np.prod(shape[-1 - n_in:-1]))
            k = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()))
            value = jax.random.uniform(k, shape, jnp.float32, -bound, bound)
        elif leaf.startswith("lora_b_"):
            value = jnp.zeros(shape, jnp.float32)
        else:
            raise KeyError(f"{'/'.join(map(str, path))} is neither a base weight nor an "
                           "adapter")
        sh = shardings.get(path)
        flat[path] = var.replace(jax.device_put(value, sh.get_value() if sh is not None
                                                else None))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def adapter_count(params: Mapping) -> int:
    """Number of adapter weights in a (trainable or full) pure dict."""
    n = 0
    for k, v in params.items():
        if isinstance(v, Mapping):
            n += adapter_count(v)
        elif str(k).startswith("lora_"):
            n += int(np.prod(v.shape))
    return n


def deltas(model: Transformer) -> Dict[str, Any]:
    """{target: (alpha / r) A B reshaped to its base weight's shape [L, in..., out...]}."""
    cfg = model.cfg
    out = {}
    for t in cfg.lora_targets if cfg.lora_rank else ():
        mod, _ = LORA_TARGETS[t]
        m = getattr(model.layers, mod)
        a = getattr(m, "lora_a_" + t)[...].astype(jnp.float32)   # [L, in..., r]
        b = getattr(m, "lora_b_" + t)[...].astype(jnp.float32)   # [L, r, out...]
        n_layers, r = a.shape[0], a.shape[-1]
        d = jnp.einsum("lir,lro->lio", a.reshape(n_layers, -1, r), b.reshape(n_layers, r, -1))
        out[t] = cfg.lora_scale() * d.reshape(a.shape[:-1] + b.shape[2:])
    return out


def merged(model: Transformer) -> Transformer:
    """A model without adapters whose projections are W + (alpha / r) A B, every weight in
    the config's param dtype (a base kept in bfloat16 is widened back)."""
    cfg = model.cfg
    if not cfg.lora_rank:
        return model
    base_cfg = without_adapters(cfg)
    graphdef = graphdef_of(base_cfg, model.head)
    trained, base = split(nnx.to_pure_dict(nnx.state(model)))
    dt = cfg.jnp_param_dtype
    base = jax.tree.map(lambda x: x.astype(dt), base)
    for k in HEAD_KEYS:
        if k in trained:
            base[k] = trained[k]
    layers = jax.tree.map(lambda x: x, base["layers"])
    for t, d in deltas(model).items():
        mod, wname = LORA_TARGETS[t]
        w = layers[mod][wname]
        layers[mod][wname] = (w.astype(jnp.float32) + d).astype(dt)
    base["layers"] = layers
    return nnx.merge(graphdef, base)


# ------------------------------------------------------------------------------------------
# PEFT format.

def _peft_prefix(head: str) -> str:
    # PeftModel wraps the HF model as base_model.model; Llama / Qwen2 keep the decoder under
    # .model for both the CausalLM and the SequenceClassification class.
    return "base_model.model.model.layers.{i}."


def save_peft(model: Transformer, out_dir: str, *, base_model: str = "",
              extra: Optional[Mapping[str, Any]] = None) -> str:
    """Writes the adapters of `model` in PEFT's format: `peft.PeftModel.from_pretrained(base,
    out_dir)` on the base HF model gives this model's logits (a score head is stored as
    modules_to_save "score"; its bias, which HF's score layer lacks, goes in `extra`'s
    jaxrlhf.json like a full export's)."""
    from safetensors.numpy import save_file
    cfg = model.cfg
    if not cfg.lora_rank:
        raise ValueError("save_peft: the model has no adapters (lora.rank = 0).")
    if cfg.family == "gpt2":
        raise ValueError(f"PEFT adapter export supports the llama, qwen, mistral and gemma "
                         f"families, not "
                         f"{cfg.family!r} (GPT-2 fuses q|k|v in one c_attn module); the merged "
                         "HF export holds the trained model.")
    tensors = {}
    prefix = _peft_prefix(model.head)
    for t in cfg.lora_targets:
        mod, _ = LORA_TARGETS[t]
        m = getattr(model.layers, mod)
        a = np.asarray(jax.device_get(getattr(m, "lora_a_" + t)[...]), np.float32)
        b = np.asarray(jax.device_get(getattr(m, "lora_b_" + t)[...]), np.float32)
        for i in range(cfg.n_layers):
            name = prefix.format(i=i) + HF_MODULES[t]
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(
                a[i].reshape(-1, cfg.lora_rank).T)                     # [r, in]
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(
                b[i].reshape(cfg.lora_rank, -1).T)                     # [out, r]
    if model.head == "score":
        w = np.asarray(jax.device_get(model.score_w[...]), np.float32)
        tensors["base_model.model.score.weight"] = w[None, :]
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if model.head == "score" else "CAUSAL_LM",
        "base_model_name_or_path": base_model, "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in cfg.lora_targets),
        "modules_to_save": ["score"] if model.head == "score" else None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if extra:
        with open(os.path.join(out_dir, "jaxrlhf.json"), "w") as f:
            json.dump(dict(extra), f, indent=2)
    return out_dir


def read_peft_config(adapter_dir: str) -> Dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter, checked for what `load_peft` supports."""
    path = os.path.join(adapter_dir, PEFT_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora.adapter={adapter_dir!r}: {path} does not exist (a PEFT "
                                "adapter directory holds adapter_config.json and "
                                "adapter_model.safetensors).")
    with open(path) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r} is not LORA.")
    for field in ("use_rslora", "use_dora"):
        if c.get(field):
            raise ValueError(f"{path}: {field}=true is not supported.")
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if c.get(field):
            raise ValueError(f"{path}: {field} is not supported (one rank and alpha for "
                             "every layer).")
    names = {v.split(".")[1]: k for k, v in HF_MODULES.items()}
    tm = c.get("target_modules") or []
    if isinstance(tm, str):
        raise ValueError(f"{path}: target_modules={tm!r} (a pattern) is not supported; list "
                         f"the modules ({sorted(names)}).")
    bad = [m for m in tm if m not in names]
    if bad:
        raise ValueError(f"{path}: target_modules {bad} are not projections of a llama / qwen2 "
                         f"decoder ({sorted(names)}).")
    c["jaxrlhf_targets"] = tuple(t for t in HF_MODULES if HF_MODULES[t].split(".")[1] in tm)
    return c


def load_peft(model: Transformer, adapter_dir: str, *, mesh=None, rules=None) -> Transformer:
    """`model` (the base, no adapters) with the adapters of a PEFT directory (and its score
    head, for a reward model saved with modules_to_save "score")."""
    from safetensors.numpy import load_file
    from jaxrlhf.sharding import state_shardings
    c = read_peft_config(adapter_dir)
    with_a = add_adapters(model, int(c["r"]), float(c["lora_alpha"]), c["jaxrlhf_targets"],
                          mesh=None)
    cfg = with_a.cfg
    tensors = load_file(os.path.join(adapter_dir, PEFT_WEIGHTS))
    strip = lambda n: n.replace(".default.", ".")
    tensors = {strip(k): v for k, v in tensors.items()}
    graphdef, state = nnx.split(with_a)
    flat = dict(nnx.to_flat_state(state))
    shardings = (dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
                 if mesh is not None else {})
    prefix = _peft_prefix(model.head)
    used = set()

    def get(name, shape):
        if name not in tensors:
            raise ValueError(f"{adapter_dir}: {PEFT_WEIGHTS} lacks {name}.")
        used.add(name)
        v = np.asarray(tensors[name], np.float32)
        if v.shape != shape:
            raise ValueError(f"{adapter_dir}: {name} has shape {v.shape}, the model needs "
                             f"{shape}.")
        return v

    def put(path, value):
        sh = shardings.get(path)
        flat[path] = flat[path].replace(
            jax.device_put(value, sh.get_value() if sh is not None else None))

    r = cfg.lora_rank
    for t in cfg.lora_targets:
        mod, _ = LORA_TARGETS[t]
        pa, pb = ("layers", mod, "lora_a_" + t), ("layers", mod, "lora_b_" + t)
        sa, sb = flat[pa].get_value().shape, flat[pb].get_value().shape
        n_in, n_out = int(np.prod(sa[1:-1])), int(np.prod(sb[2:]))
        a = np.stack([get(prefix.format(i=i) + HF_MODULES[t] + ".lora_A.weight", (r, n_in)).T
                      for i in range(cfg.n_layers)]).reshape(sa)
        b = np.stack([get(prefix.format(i=i) + HF_MODULES[t] + ".lora_B.weight", (n_out, r)).T
                      for i in range(cfg.n_layers)]).reshape(sb)
        put(pa, a)
        put(pb, b)
    if model.head == "score" and "base_model.model.score.weight" in tensors:
        put(("score_w",), get("base_model.model.score.weight", (1, cfg.d_model))[0])
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{adapter_dir}: {len(unused)} tensor(s) of {PEFT_WEIGHTS} do not map "
                         f"to this model: {unused[:4]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
