"""Hugging Face checkpoint I/O: `load_hf` / `save_hf` for the Llama, Qwen2, Qwen3, Mistral and
GPT-2 families.

Only `config.json` (JSON) and `*.safetensors` are read, so loading never executes foreign
code (no pickle, no `trust_remote_code`), and torch is not needed.

Layout conversion is table-driven: a family is a list of `_Rule`s, each tying one or more
Flax parameters (paths into the `Transformer` state) to one or more HF tensors, with a `load`
(HF arrays -> Flax arrays) and a `save` (the inverse) function. Per-layer rules name their HF
tensors with `{i}` and their Flax parameters are stacked over a leading layer axis.

    HF Linear weight [out, in]   ->  Flax [in, out] (split into heads where the model has them)
    GPT-2 Conv1D weight [in, out] (c_attn fuses q|k|v along out)  ->  Flax [in, ...]

Tensor names are HF's own `save_pretrained` names: a base-model prefix ("model." or
"transformer.") plus `lm_head.weight` / `score.weight` at top level. Checkpoints without the
prefix (a bare `LlamaModel`, the original `gpt2` files) load too.

Reward models (score head). jaxrlhf reads r(x, y) at the last real token of each row (from
the attention mask). transformers' `*ForSequenceClassification` reads it at the last token whose
id is not `config.pad_token_id`, so an export whose pad id can also be a row's real last token
(pad == EOS, the usual case for chat models) would be scored one token early there. `save_hf`
therefore takes the pad id to write (`score_pad_id` picks one that never ends a row; the
trainers save the tokenizer with the same pad token), and then HF scores every row, single or
padded on either side, at the token jaxrlhf scores. The score head's bias `score_b` has no HF
counterpart (HF's `score` Linear has no bias); it travels in config.json as
"jaxrlhf_score_bias", which HF ignores: a transformers user adds it to HF's logits (or trains
with `rm.center_loss_coef` and no post-hoc bias, so that it is 0).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import struct
import sys
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxrlhf import paths
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import Transformer
from jaxrlhf.sharding import state_shardings

SCORE_BIAS_KEY = "jaxrlhf_score_bias"

# model_type -> (CausalLM class, SequenceClassification class, base-model tensor prefix).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification", "model."),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "model."),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "model."),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification", "model."),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "model."),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "model."),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "transformer."),
}
_SUPPORTED = ", ".join(f"{t} ({', '.join(_ARCHITECTURES[t][:2])})" for t in sorted(_ARCHITECTURES))

# Tensors HF checkpoints may carry that hold no parameters (buffers of older versions).
_IGNORABLE = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$"),  # GPT-2 causal-mask buffers
)

_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all are tanh-approximate GELU
# ModelConfig.family of an HF model_type, where they differ
_FAMILY = {"gemma3_text": "gemma3"}
_MODEL_TYPE = {v: k for k, v in _FAMILY.items()}

# safetensors dtype tags -> numpy dtypes (bf16/fp8 through ml_dtypes, which jax ships).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# ----------------------------------------------------------------------------------------
# Config mapping.

def _model_type(hf: Mapping[str, Any]) -> str:
    model_type = hf.get("model_type")
    archs = list(hf.get("architectures") or [])
    if model_type is None:  # very old configs: infer from the class name
        for t, (lm_cls, cls_cls, _) in _ARCHITECTURES.items():
            if any(a in (lm_cls, cls_cls) for a in archs):
                model_type = t
    if model_type == "gemma3":
        raise ValueError("model_type 'gemma3' is the multimodal Gemma 3; jaxrlhf loads the text "
                         "model (model_type 'gemma3_text', Gemma3ForCausalLM: the 1B "
                         "checkpoint, or the text_config of a larger one).")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"Unsupported Hugging Face architecture: model_type={model_type!r}, "
                         f"architectures={archs}. Supported model types: {_SUPPORTED}.")
    return model_type


def _single_id(hf: Mapping[str, Any], key: str) -> Optional[int]:
    value = hf.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            warnings.warn(f"config.json has {key}={list(value)}; jaxrlhf keeps one id per role and "
                          f"uses the first ({value[0]}).", stacklevel=3)
        value = value[0] if value else None
    return None if value is None else int(value)


def _rope_from_hf(hf: Mapping[str, Any]) -> Tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or the legacy
    `rope_theta` + `rope_scaling` keys (transformers 4)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    scaling = legacy or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if "partial_rotary_factor" in scaling or hf.get("partial_rotary_factor") not in (None, 1.0):
        raise ValueError("partial_rotary_factor is not supported (rotary on all head dims only).")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported; supported: 'default', "
                         "'linear', 'llama3'.")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"llama3 rope scaling in config.json lacks {missing}.")
    out = {k: scaling[k] for k in keys}
    out["rope_type"] = "llama3"
    return theta, out


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "auto",
                   param_dtype: str = "float32") -> ModelConfig:
    """A `ModelConfig` from a Hugging Face config.json dict (Llama, Qwen2, Qwen3, Mistral or
    GPT-2; sliding-window layers of Mistral / Qwen included).

    Raises ValueError for unsupported architectures or features (non-llama3 rope scaling,
    activations other than SiLU / tanh-GELU, Mistral's alternating layer_types, ...).
    """
    model_type = _model_type(hf)
    ids = dict(pad_token_id=_single_id(hf, "pad_token_id"),
               bos_token_id=_single_id(hf, "bos_token_id"),
               eos_token_id=_single_id(hf, "eos_token_id"))
    common = dict(family=_FAMILY.get(model_type, model_type), vocab_size=int(hf["vocab_size"]),
                  dtype=dtype, param_dtype=param_dtype, **ids)
    if model_type in ("gemma2", "gemma3_text"):
        return _gemma_from_hf(hf, model_type, common)
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GELU_TANH:
            raise ValueError(f"GPT-2 activation_function={act!r} is not supported; "
                             f"supported: {_GELU_TANH}.")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("GPT-2 with scale_attn_weights=false or "
                             "scale_attn_by_inverse_layer_idx=true is not supported.")
        if hf.get("add_cross_attention"):
            raise ValueError("GPT-2 with add_cross_attention=true is not supported.")
        d, h = int(hf["n_embd"]), int(hf["n_head"])
        return ModelConfig(
            **common, d_model=d, n_layers=int(hf["n_layer"]), n_heads=h, n_kv_heads=h,
            head_dim=d // h, mlp_dim=int(hf.get("n_inner") or 4 * d), norm="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu",
            positions="learned", max_positions=int(hf.get("n_positions", 1024)),
            qkv_bias=True, out_bias=True, mlp_bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)))

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type} hidden_act={act!r} is not supported (SwiGLU needs 'silu').")
    if model_type == "qwen2":
        biases = dict(qkv_bias=True, out_bias=False, mlp_bias=False)
    else:
        attention_bias = bool(hf.get("attention_bias", False))
        biases = dict(qkv_bias=attention_bias, out_bias=attention_bias,
                      mlp_bias=bool(hf.get("mlp_bias", False)))
    window = _sliding_from_hf(hf, model_type)
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, scaling = _rope_from_hf(hf)
    return ModelConfig(
        **common, **biases, d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=h,
        n_kv_heads=int(hf.get("num_key_value_heads") or h),
        head_dim=int(hf.get("head_dim") or d // h), mlp_dim=int(hf["intermediate_size"]),
        norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
        positions="rope", max_positions=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta, rope_scaling=scaling, qk_norm=model_type == "qwen3", **window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _gemma_from_hf(hf: Mapping[str, Any], model_type: str, common) -> ModelConfig:
    """Gemma 2 / Gemma 3 (text): (1 + w) RMSNorms before and after attention and the MLP,
    GeGLU, embeddings times sqrt(d), query_pre_attn_scalar, soft-capping, sliding layers by
    layer_types; Gemma 3 adds q/k norms and a RoPE base of its own for sliding layers."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise ValueError(f"{model_type} hidden_activation={act!r} is not supported "
                         f"(supported: {_GELU_TANH}).")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{model_type} with use_bidirectional_attention=true is not supported.")
    n, d, h = int(hf["num_hidden_layers"]), int(hf["hidden_size"]), int(hf["num_attention_heads"])
    types = hf.get("layer_types")
    if not types:
        period = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    kinds = _kinds_from_hf(types, model_type)
    window = hf.get("sliding_window")
    if "sliding" in kinds and not window:
        raise ValueError(f"{model_type}: layer_types has sliding layers but sliding_window is "
                         "not set.")
    rope = dict(hf.get("rope_parameters") or {})
    local_theta = None
    if "full_attention" in rope:   # Gemma 3, transformers 5: one RoPE per layer type
        local = dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{model_type}: sliding layers with rope type "
                             f"{local.get('rope_type')!r} are not supported.")
        local_theta = float(local.get("rope_theta", 10000.0))
        theta, scaling = _rope_from_hf(dict(rope_parameters=rope["full_attention"]))
    else:
        theta, scaling = _rope_from_hf(hf)
        if model_type == "gemma3_text":
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    # HF's defaults when config.json lacks the keys: Gemma 2 caps (50 / 30), Gemma 3 does not
    g2 = model_type == "gemma2"
    attn_cap = hf.get("attn_logit_softcapping", 50.0 if g2 else None)
    final = hf.get("final_logit_softcapping", 30.0 if g2 else None)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **common, d_model=d, n_layers=n, n_heads=h,
        n_kv_heads=int(hf.get("num_key_value_heads") or h),
        head_dim=int(hf.get("head_dim") or d // h), mlp_dim=int(hf["intermediate_size"]),
        norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="geglu",
        positions="rope", max_positions=int(hf.get("max_position_embeddings", 8192)),
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        qkv_bias=attention_bias, out_bias=attention_bias, mlp_bias=False,
        qk_norm=model_type == "gemma3_text", norm_offset=1.0, post_norms=True,
        embed_scale=float(d) ** 0.5,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256),
        attn_softcap=float(attn_cap) if attn_cap else None,
        final_softcap=float(final) if final else None,
        sliding_window=int(window) if "sliding" in kinds else None,
        layer_types=kinds if "sliding" in kinds else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _kinds_from_hf(types, model_type: str) -> Tuple[str, ...]:
    """HF layer_types ("sliding_attention" / "full_attention") -> ModelConfig.layer_types."""
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ValueError(f"{model_type} layer_types {list(types)} are not supported (one of "
                         "'full_attention' / 'sliding_attention' per layer).")
    return tuple("sliding" if t == "sliding_attention" else "full" for t in types)


def _types_to_hf(cfg: ModelConfig) -> List[str]:
    """ModelConfig's per-layer kinds as HF layer_types."""
    return ["sliding_attention" if x else "full_attention" for x in cfg.sliding_layers()]


def _sliding_from_hf(hf: Mapping[str, Any], model_type: str) -> Dict[str, Any]:
    """{sliding_window, layer_types} of a Llama / Qwen / Mistral config.json: Mistral slides
    on every layer when sliding_window is set; Qwen2 / Qwen3 on the layers whose layer_types
    entry is "sliding_attention" (by default those from max_window_layers on) when
    use_sliding_window is true."""
    n = int(hf["num_hidden_layers"])
    if model_type == "mistral":
        if hf.get("layer_types"):
            raise ValueError("Mistral configs with layer_types (alternating attention) are not "
                             "supported.")
        w = hf.get("sliding_window")
        return {"sliding_window": int(w)} if w else {}
    if model_type in ("qwen2", "qwen3"):
        w = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if not w:
            return {}
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= int(hf.get("max_window_layers", n)) else "full_attention"
            for i in range(n)]
        if len(types) != n:
            raise ValueError(f"{model_type} layer_types {types} name {len(types)} layers, the "
                             f"model has {n}.")
        kinds = _kinds_from_hf(types, model_type)
        return {"sliding_window": int(w), "layer_types": kinds} if "sliding" in kinds else {}
    if hf.get("sliding_window") or hf.get("layer_types"):
        raise ValueError(f"{model_type} with sliding-window attention is not supported.")
    return {}


def _check_exportable(cfg: ModelConfig) -> None:
    """Raises if `cfg` uses a combination its family's HF class cannot express."""
    rope = dict(norm="rms", mlp="swiglu", positions="rope", qk_norm=False, norm_offset=0.0,
                post_norms=False, embed_scale=1.0, attn_softcap=None, final_softcap=None,
                query_pre_attn_scalar=None, rope_local_theta=None)
    gemma = dict(rope, mlp="geglu", norm_offset=1.0, post_norms=True, mlp_bias=False,
                 out_bias=cfg.qkv_bias, embed_scale=float(cfg.d_model) ** 0.5,
                 attn_softcap=cfg.attn_softcap, final_softcap=cfg.final_softcap,
                 query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    want = {
        "gemma2": dict(gemma, rope_local_theta=None),
        "gemma3": dict(gemma, qk_norm=True, rope_local_theta=cfg.rope_local_theta or 1e4),
        "llama": dict(rope, sliding_window=None),
        "qwen2": dict(rope, qkv_bias=True, out_bias=False, mlp_bias=False),
        "qwen3": dict(rope, qk_norm=True, out_bias=cfg.qkv_bias, mlp_bias=False),
        "mistral": dict(rope, qkv_bias=False, out_bias=False, mlp_bias=False,
                        layer_types=None),
        "gpt2": dict(norm="layer", mlp="gelu", positions="learned", qkv_bias=True,
                     out_bias=True, mlp_bias=True, n_kv_heads=cfg.n_heads,
                     dim_per_head=cfg.d_model // cfg.n_heads, qk_norm=False,
                     sliding_window=None, post_norms=False, embed_scale=1.0,
                     attn_softcap=None, final_softcap=None, norm_offset=0.0),
    }[cfg.family]
    if cfg.family == "llama" and cfg.qkv_bias != cfg.out_bias:
        want["out_bias"] = cfg.qkv_bias  # HF Llama has one switch (attention_bias) for both
    bad = {k: getattr(cfg, k) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise ValueError(f"This {cfg.family} config cannot be expressed as a Hugging Face "
                         f"{cfg.family} model: it has {bad}, HF needs "
                         f"{ {k: want[k] for k in bad} }.")


def config_to_hf(cfg: ModelConfig, head: str = "lm") -> Dict[str, Any]:
    """The config.json dict HF's `save_pretrained` would write for this architecture.

    Keys not held by `ModelConfig` (dropouts, init range, ...) get HF's class defaults. RoPE
    is written both as `rope_parameters` (transformers 5) and as `rope_theta` +
    `rope_scaling` (transformers 4) so either version loads it.
    """
    _check_exportable(cfg)
    model_type = _MODEL_TYPE.get(cfg.family, cfg.family)
    lm_cls, cls_cls, _ = _ARCHITECTURES[model_type]
    out: Dict[str, Any] = {"architectures": [lm_cls if head == "lm" else cls_cls],
                           "model_type": model_type}
    if cfg.family == "gpt2":
        d = cfg.d_model
        out.update(
            activation_function="gelu_new", add_cross_attention=False, attn_pdrop=0.1,
            embd_pdrop=0.1, initializer_range=0.02, layer_norm_epsilon=cfg.norm_eps, n_embd=d,
            n_head=cfg.n_heads, n_inner=None if cfg.mlp_dim == 4 * d else cfg.mlp_dim,
            n_layer=cfg.n_layers, n_positions=cfg.max_positions, reorder_and_upcast_attn=False,
            resid_pdrop=0.1, scale_attn_by_inverse_layer_idx=False, scale_attn_weights=True,
            summary_activation=None, summary_first_dropout=0.1, summary_proj_to_labels=True,
            summary_type="cls_index", summary_use_proj=True)
    elif cfg.family in ("gemma2", "gemma3"):
        out.update(_gemma_to_hf(cfg))
    else:
        scaling = dict(cfg.rope_scaling or ())
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **scaling}
        out.update(
            attention_dropout=0.0, hidden_act="silu", hidden_size=cfg.d_model,
            initializer_range=0.02, intermediate_size=cfg.mlp_dim,
            max_position_embeddings=cfg.max_positions, num_attention_heads=cfg.n_heads,
            num_hidden_layers=cfg.n_layers, num_key_value_heads=cfg.n_kv_heads,
            rms_norm_eps=cfg.norm_eps, rope_parameters=rope, rope_theta=cfg.rope_theta,
            rope_scaling=scaling or None)
        if cfg.family == "llama":
            out.update(attention_bias=cfg.qkv_bias, head_dim=cfg.dim_per_head,
                       mlp_bias=cfg.mlp_bias, pretraining_tp=1)
        elif cfg.family == "mistral":
            out.update(head_dim=cfg.dim_per_head, sliding_window=cfg.sliding_window)
        else:
            sliding = cfg.sliding_layers()
            types = _types_to_hf(cfg)
            # HF derives layer_types from max_window_layers when they are not given; both
            # are written, consistent with each other when the sliding layers are a suffix.
            first = next((i for i, x in enumerate(sliding) if x), 28)   # 28: HF's default
            out.update(layer_types=types, max_window_layers=first,
                       sliding_window=cfg.sliding_window, use_sliding_window=any(sliding))
            if cfg.family == "qwen3":
                out.update(attention_bias=cfg.qkv_bias, head_dim=cfg.dim_per_head)
            elif cfg.dim_per_head * cfg.n_heads != cfg.d_model:
                out["head_dim"] = cfg.dim_per_head  # Qwen2 reads it when present
    out.update(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
               pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_embeddings,
               dtype=cfg.param_dtype, torch_dtype=cfg.param_dtype, use_cache=True,
               vocab_size=cfg.vocab_size)
    if head == "score":
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return dict(sorted(out.items()))


def _gemma_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    """The Gemma 2 / Gemma 3 (text) config.json keys of `cfg`."""
    scaling = dict(cfg.rope_scaling or ())
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **scaling}
    out = dict(
        attention_bias=cfg.qkv_bias, attention_dropout=0.0,
        attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
        head_dim=cfg.dim_per_head, hidden_activation="gelu_pytorch_tanh",
        hidden_size=cfg.d_model, initializer_range=0.02, intermediate_size=cfg.mlp_dim,
        layer_types=_types_to_hf(cfg),
        max_position_embeddings=cfg.max_positions, num_attention_heads=cfg.n_heads,
        num_hidden_layers=cfg.n_layers, num_key_value_heads=cfg.n_kv_heads,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.dim_per_head),
        rms_norm_eps=cfg.norm_eps, sliding_window=cfg.sliding_window)
    if cfg.family == "gemma2":
        out.update(rope_parameters=rope, use_bidirectional_attention=None)
    else:
        local = {"rope_theta": cfg.rope_local_theta, "rope_type": "default"}
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                   use_bidirectional_attention=False, _sliding_window_pattern=6)
    return out


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else float(x)


# ----------------------------------------------------------------------------------------
# Tensor layout rules.

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Flax params `flax` <-> HF tensors `hf`; `layered` rules repeat per layer ({i})."""
    flax: Tuple[Path, ...]
    hf: Tuple[str, ...]
    load: Callable[..., Tuple[np.ndarray, ...]]
    save: Callable[..., Tuple[np.ndarray, ...]]
    layered: bool = False
    top_level: bool = False  # HF name carries no base-model prefix (lm_head, score)


def _one(flax: Path, hf: str, load=lambda a: a, save=lambda a: a, **kw) -> _Rule:
    return _Rule((flax,), (hf,), lambda a: (load(a),), lambda a: (save(a),), **kw)


def _linear(flax: Path, hf: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> _Rule:
    """HF Linear [out, in] <-> Flax [*in_shape, *out_shape] (in_shape: () or (H, Dh))."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return _one(flax, hf,
                load=lambda w: w.T.reshape(*in_shape, *out_shape),
                save=lambda p: p.reshape(n_in, n_out).T, layered=True)


def _reshaped(flax: Path, hf: str, shape: Sequence[int], **kw) -> _Rule:
    """A flat HF tensor (bias) <-> Flax `shape`."""
    return _one(flax, hf, load=lambda b: b.reshape(shape), save=lambda p: p.reshape(-1), **kw)


def _rules(cfg: ModelConfig, head: str) -> List[_Rule]:
    d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.mlp_dim
    rules: List[_Rule] = []
    if cfg.family == "gpt2":
        def split_qkv(a):  # Conv1D [..., 3*D] (q|k|v) -> 3 x [..., H, Dh]
            return tuple(x.reshape(*a.shape[:-1], h, dh) for x in np.split(a, 3, axis=-1))

        def fuse_qkv(*ps):
            return (np.concatenate([p.reshape(*p.shape[:-2], h * dh) for p in ps], axis=-1),)

        attn = [("layers", "attn", n) for n in ("wq", "wk", "wv")]
        battn = [("layers", "attn", n) for n in ("bq", "bk", "bv")]
        rules += [
            _one(("embed",), "wte.weight"),
            _one(("pos_embed",), "wpe.weight"),
            _one(("final_norm", "scale"), "ln_f.weight"),
            _one(("final_norm", "bias"), "ln_f.bias"),
            _Rule(tuple(attn), ("h.{i}.attn.c_attn.weight",), load=split_qkv, save=fuse_qkv,
                  layered=True),
            _Rule(tuple(battn), ("h.{i}.attn.c_attn.bias",), load=split_qkv, save=fuse_qkv,
                  layered=True),
            _one(("layers", "attn", "wo"), "h.{i}.attn.c_proj.weight",
                 load=lambda w: w.reshape(h, dh, d), save=lambda p: p.reshape(h * dh, d),
                 layered=True),
            _one(("layers", "attn", "bo"), "h.{i}.attn.c_proj.bias", layered=True),
            _one(("layers", "mlp", "w_fc"), "h.{i}.mlp.c_fc.weight", layered=True),
            _one(("layers", "mlp", "b_fc"), "h.{i}.mlp.c_fc.bias", layered=True),
            _one(("layers", "mlp", "w_proj"), "h.{i}.mlp.c_proj.weight", layered=True),
            _one(("layers", "mlp", "b_proj"), "h.{i}.mlp.c_proj.bias", layered=True),
        ]
        for flax_norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            rules += [_one(("layers", flax_norm, "scale"), f"h.{{i}}.{hf_norm}.weight",
                           layered=True),
                      _one(("layers", flax_norm, "bias"), f"h.{{i}}.{hf_norm}.bias",
                           layered=True)]
    else:
        a, m = "layers.{i}.self_attn.", "layers.{i}.mlp."
        rules += [
            _one(("embed",), "embed_tokens.weight"),
            _one(("final_norm", "scale"), "norm.weight"),
            _one(("layers", "attn_norm", "scale"), "layers.{i}.input_layernorm.weight",
                 layered=True),
            _one(("layers", "mlp_norm", "scale"),
                 "layers.{i}." + ("pre_feedforward_layernorm" if cfg.post_norms
                                  else "post_attention_layernorm") + ".weight", layered=True),
            _linear(("layers", "attn", "wq"), a + "q_proj.weight", (d,), (h, dh)),
            _linear(("layers", "attn", "wk"), a + "k_proj.weight", (d,), (k, dh)),
            _linear(("layers", "attn", "wv"), a + "v_proj.weight", (d,), (k, dh)),
            _linear(("layers", "attn", "wo"), a + "o_proj.weight", (h, dh), (d,)),
            _linear(("layers", "mlp", "w_gate"), m + "gate_proj.weight", (d,), (f,)),
            _linear(("layers", "mlp", "w_up"), m + "up_proj.weight", (d,), (f,)),
            _linear(("layers", "mlp", "w_down"), m + "down_proj.weight", (f,), (d,)),
        ]
        if cfg.qkv_bias:
            rules += [_reshaped(("layers", "attn", "b" + n), a + f"{n}_proj.bias", (heads, dh),
                                layered=True) for n, heads in (("q", h), ("k", k), ("v", k))]
        if cfg.out_bias:
            rules.append(_one(("layers", "attn", "bo"), a + "o_proj.bias", layered=True))
        if cfg.mlp_bias:
            rules += [_one(("layers", "mlp", "b_" + n), m + f"{n}_proj.bias", layered=True)
                      for n in ("gate", "up", "down")]
        if cfg.qk_norm:
            rules += [_one(("layers", "attn", n), a + f"{n}.weight", layered=True)
                      for n in ("q_norm", "k_norm")]
        if cfg.post_norms:   # Gemma: attention and MLP outputs normed before the residual
            rules += [_one(("layers", "post_attn_norm", "scale"),
                           "layers.{i}.post_attention_layernorm.weight", layered=True),
                      _one(("layers", "post_mlp_norm", "scale"),
                           "layers.{i}.post_feedforward_layernorm.weight", layered=True)]
    if head == "lm" and not cfg.tie_embeddings:
        rules.append(_one(("lm_head",), "lm_head.weight", load=lambda w: w.T,
                          save=lambda p: p.T, top_level=True))
    if head == "score":
        rules.append(_one(("score_w",), "score.weight", load=lambda w: w.reshape(d),
                          save=lambda p: p.reshape(1, d), top_level=True))
    return rules


def _hf_names(rule: _Rule, layer: Optional[int], prefix: str) -> Tuple[str, ...]:
    names = tuple(n.format(i=layer) for n in rule.hf) if rule.layered else rule.hf
    return names if rule.top_level else tuple(prefix + n for n in names)


# ----------------------------------------------------------------------------------------
# File reading with errors that name the file.

def read_json(path: str):
    """A JSON file's content; a malformed file raises ValueError naming it."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the directory is damaged: "
                         "re-export or re-download it.") from None


def open_safetensors(path: str):
    """safetensors' `safe_open` (NumPy); an unreadable file raises ValueError naming it."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError)
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{e}); it may be truncated or corrupt: re-export or re-download "
                         "it.") from None


# ----------------------------------------------------------------------------------------
# safetensors reading.

def read_safetensors_raw(path: str, name: str) -> np.ndarray:
    """One tensor straight from the file's header offsets (fallback for dtypes that the
    installed safetensors cannot hand to numpy, e.g. bf16 on old versions)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[name]
        begin, end = info["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    if sys.byteorder != "little":  # safetensors data is little-endian
        raise NotImplementedError("Reading safetensors on a big-endian host is not supported.")
    return np.frombuffer(data, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()


class _Checkpoint(contextlib.ExitStack):
    """The tensors of a local HF checkpoint directory (single file or sharded index)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json(index)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if "model.safetensors" in files:
                files = ["model.safetensors"]
            if not files:
                present = sorted(os.listdir(path))
                raise FileNotFoundError(
                    f"No *.safetensors weights in {path} (found {present}). Only safetensors "
                    "are read (never pickled .bin files); convert with transformers' "
                    "`save_pretrained(..., safe_serialization=True)`.")
            weight_map = {}
            for file in files:
                with open_safetensors(os.path.join(path, file)) as fh:
                    weight_map.update({k: file for k in fh.keys()})
        self.weight_map: Dict[str, str] = dict(weight_map)
        self.files = sorted(set(self.weight_map.values()))
        self._open: Dict[str, Any] = {}

    def get(self, name: str) -> np.ndarray:
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = self.enter_context(
                open_safetensors(os.path.join(self.path, file)))
        try:
            return self._open[file].get_tensor(name)
        except Exception:  # noqa: BLE001  (a dtype this safetensors cannot give to numpy)
            return read_safetensors_raw(os.path.join(self.path, file), name)


# ----------------------------------------------------------------------------------------
# Loading.

def _dtype_name(dtype, default: str) -> str:
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return default
    return jnp.dtype(dtype).name


def load_hf(path: str, head: str = "lm", dtype=None, *, param_dtype=None, mesh=None,
            rules=None) -> Transformer:
    """A ready `Transformer` from a local HF checkpoint directory (config.json + safetensors).

    Args:
        path: directory with config.json and model.safetensors or a sharded
            model.safetensors.index.json.
        head: "lm" (logits_BxTxV) or "score" (scores_BxT, a reward model).
        dtype: compute dtype (default "auto": bfloat16 on GPU / TPU, float32 on CPU).
            param_dtype: storage dtype (default float32).
        mesh, rules: place each parameter, straight from host memory, into its NamedSharding
            from `jaxrlhf.sharding.state_shardings` (no full copy on one device).

    A CausalLM checkpoint loaded with head="score" gets a freshly initialised score head (with
    a warning). A SequenceClassification checkpoint loaded with head="lm" needs tied
    embeddings. Missing tensors raise; unused tensors are reported with a warning.
    """
    if head not in ("lm", "score"):
        raise ValueError(f"head must be 'lm' or 'score', got {head!r}.")
    path = paths.local_copy(path)   # a gs:// export is downloaded once
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} does not exist. load_hf reads local checkpoint directories only "
            "(download a Hub model first, e.g. huggingface_hub.snapshot_download).")
    hf_config = read_json(config_file)
    cfg = config_from_hf(hf_config, dtype=_dtype_name(dtype, "auto"),
                         param_dtype=_dtype_name(param_dtype, "float32"))
    prefix = _ARCHITECTURES[_MODEL_TYPE.get(cfg.family, cfg.family)][2]
    graphdef, abstract = jax.eval_shape(
        lambda: nnx.split(Transformer(cfg, head=head, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(abstract))
    shardings = (dict(nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
                 if mesh is not None else None)
    np_dtype = cfg.jnp_param_dtype

    def place(path_: Path, value: np.ndarray):
        want = flat[path_].get_value()
        if value.shape != want.shape:
            raise ValueError(f"Parameter {'.'.join(path_)}: checkpoint gives shape {value.shape},"
                             f" the config implies {want.shape}.")
        value = value.astype(np_dtype, order="C")  # (ascontiguousarray would make 0-d 1-d)
        sharding = shardings[path_].get_value() if shardings is not None else None
        flat[path_] = flat[path_].replace(jax.device_put(value, sharding))

    with _Checkpoint(path) as ckpt:
        available = set(ckpt.weight_map)
        if not any(n.startswith(prefix) for n in available):
            prefix = ""  # a bare base model (e.g. the original gpt2 files)
        todo = _rules(cfg, head)
        fresh_score = head == "score" and "score.weight" not in available
        if fresh_score:
            todo = [r for r in todo if r.hf != ("score.weight",)]
            warnings.warn(f"{path} has no 'score.weight' (not a SequenceClassification "
                          "checkpoint): the score head is freshly initialised.", stacklevel=2)
        layers = range(cfg.n_layers)
        needed = [n for r in todo for i in (layers if r.layered else [None])
                  for n in _hf_names(r, i, prefix)]
        missing = [n for n in needed if n not in available]
        if missing:
            hint = ""
            if "lm_head.weight" in missing and "score.weight" in available:
                hint = (" This is a SequenceClassification checkpoint with untied embeddings: "
                        "it has no LM head; load it with head='score'.")
            raise ValueError(f"Checkpoint {path} lacks {len(missing)} tensor(s) the "
                             f"{cfg.family} config needs: {missing}. Searched files: "
                             f"{ckpt.files}.{hint}")
        for rule in todo:
            if not rule.layered:
                names = _hf_names(rule, None, prefix)
                for p, v in zip(rule.flax, _convert(rule.load, ckpt, names)):
                    place(p, v)
                continue
            per_layer = [_convert(rule.load, ckpt, _hf_names(rule, i, prefix)) for i in layers]
            for j, p in enumerate(rule.flax):
                place(p, np.stack([out[j] for out in per_layer]))
        ignorable = [n for n in available - set(needed)
                     if any(pat.search(n) for pat in _IGNORABLE)
                     or (n == "lm_head.weight" and cfg.tie_embeddings and head == "lm")]
        unused = sorted(available - set(needed) - set(ignorable))
        if unused:
            warnings.warn(f"{len(unused)} tensor(s) in {path} are not used by a {cfg.family} "
                          f"model with head={head!r} and were dropped: {unused}", stacklevel=2)

    if head == "score":
        if fresh_score:
            std = 1.0 / math.sqrt(cfg.d_model + 1)
            init = std * jax.random.normal(jax.random.key(0), (cfg.d_model,), jnp.float32)
            place(("score_w",), np.asarray(init))
        place(("score_b",), np.asarray(float(hf_config.get(SCORE_BIAS_KEY, 0.0)), np.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _convert(fn, ckpt: _Checkpoint, names: Sequence[str]) -> Tuple[np.ndarray, ...]:
    arrays = [ckpt.get(n) for n in names]
    try:
        return fn(*arrays)
    except ValueError as e:  # a reshape that does not fit: name the tensor
        shapes = {n: a.shape for n, a in zip(names, arrays)}
        raise ValueError(f"Tensor(s) {shapes} do not fit the config: {e}") from e


# ----------------------------------------------------------------------------------------
# Saving.

def score_pad_id(pad_id: int, stop_ids: Sequence[int], candidates: Sequence[int]) -> int:
    """The pad id to export with a reward model so that HF's "last token != pad" rule reads the
    score where jaxrlhf does: `pad_id` when it is not a stop id (a real row never ends with it),
    else the first of `candidates` (e.g. the tokenizer's unk, then its other special tokens)
    that is not a stop id. Raises ValueError when there is none."""
    stops = {int(i) for i in stop_ids}
    if int(pad_id) not in stops:
        return int(pad_id)
    for c in candidates:
        if c is not None and int(c) not in stops:
            return int(c)
    raise ValueError(f"pad id {pad_id} is a stop id {sorted(stops)} and no other special token "
                     "can serve as the exported reward model's pad token.")


def save_hf(model: Transformer, path: str, *, pad_token_id: Optional[int] = None,
            eos_token_ids: Optional[Sequence[int]] = None) -> None:
    """Writes `model` as an HF checkpoint directory that `transformers` loads directly.

    Files: config.json, model.safetensors (tensor names and layouts exactly as HF's
    `save_pretrained` writes them, in the model's param dtype) and, for an LM head,
    generation_config.json. Sharded weights of an earlier export in `path`
    (model.safetensors.index.json, model-0000k-of-0000n.safetensors) are removed, as they
    would shadow the new file. A score head loads as `AutoModelForSequenceClassification`
    (num_labels=1); its bias is kept in config.json as "jaxrlhf_score_bias".

    pad_token_id: written to config.json instead of the model config's (reward models: see
    `score_pad_id`). eos_token_ids: the generation stop ids (an LM's generation_config.json
    gets the list, e.g. EOS and a chat template's end-of-turn token).
    """
    from safetensors.numpy import save_file

    cfg, head = model.cfg, model.head
    hf_config = config_to_hf(cfg, head)
    if pad_token_id is not None:
        hf_config["pad_token_id"] = int(pad_token_id)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def get(p: Path) -> np.ndarray:
        return np.asarray(jax.device_get(state[p].get_value()))

    prefix = _ARCHITECTURES[_MODEL_TYPE.get(cfg.family, cfg.family)][2]
    tensors: Dict[str, np.ndarray] = {}
    for rule in _rules(cfg, head):
        params = [get(p) for p in rule.flax]
        for i in (range(cfg.n_layers) if rule.layered else [None]):
            args = [p[i] for p in params] if rule.layered else params
            for name, value in zip(_hf_names(rule, i, prefix), rule.save(*args)):
                tensors[name] = np.ascontiguousarray(value)
    if head == "score":
        bias = float(get(("score_b",)))
        hf_config[SCORE_BIAS_KEY] = bias
        if bias != 0.0:
            warnings.warn(f"The score head has bias {bias:g}, which Hugging Face's score layer "
                          f"cannot hold (it has no bias): it is stored in config.json as "
                          f"{SCORE_BIAS_KEY!r}, which load_hf reads back but transformers "
                          "ignores, so HF scores are shifted by -bias.", stacklevel=2)
    os.makedirs(path, exist_ok=True)
    for stale in os.listdir(path):  # an older sharded export here would shadow the new file
        if stale == "model.safetensors.index.json" or _SHARD_FILE.fullmatch(stale):
            os.remove(os.path.join(path, stale))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(path, "config.json"), hf_config)
    if head == "lm":
        gen = {"_from_model_config": True}
        gen.update({k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if getattr(cfg, k) is not None})
        if eos_token_ids:
            ids = sorted({int(i) for i in eos_token_ids})
            gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        _write_json(os.path.join(path, "generation_config.json"), gen)


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
