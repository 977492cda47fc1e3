"""Model configuration: one dataclass covers the Llama, Qwen2, Qwen3, Mistral and GPT-2
families.

The family only fixes defaults; every architectural switch is an explicit field so an
unusual checkpoint (Llama with biases, GPT-2 with RoPE, ...) is one config away.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2")

# Remat policies selectable by name (see `jaxrlhf.models.transformer.remat_policy`).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# scan_unroll=None (auto) unrolls the layer scan of models up to this depth.
AUTO_UNROLL_MAX_LAYERS = 8
# logits_chunk=None (auto): chunk the target log-probs of vocabularies at least this large.
LARGE_VOCAB = 32768
LOGITS_CHUNK = 128
# ... with at most this many rows x positions per chunk ([LOGITS_CHUNK_ROWS, V] fp32 logits).
LOGITS_CHUNK_ROWS = 1024
# Projections a low-rank adapter can target: name -> (module, weight). "o" reads the
# attention output [H, Dh]; "fc" / "proj" are the GELU MLP's (GPT-2).
LORA_TARGETS = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"),
                "o": ("attn", "wo"), "gate": ("mlp", "w_gate"), "up": ("mlp", "w_up"),
                "down": ("mlp", "w_down"), "fc": ("mlp", "w_fc"), "proj": ("mlp", "w_proj")}


ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


def resolve_dtype(name: str, backend: Optional[str] = None) -> str:
    """A compute dtype name with "auto" resolved: bfloat16 on GPU / TPU (fp32 master weights
    stay in param_dtype), float32 on CPU (where bf16 matmuls are slower, not faster)."""
    if name != "auto":
        return name
    if backend is None:
        import jax
        backend = jax.default_backend()
    return "bfloat16" if backend in ACCELERATORS else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Attributes:
        family: "llama" | "qwen2" | "qwen3" | "mistral" | "gemma2" | "gemma3" | "gpt2"; used
            for HF export only.
        vocab_size: V.
        d_model: hidden size D.
        n_layers: L, stacked and scanned.
        n_heads: query heads H.
        n_kv_heads: key/value heads (grouped-query attention when < n_heads).
        head_dim: per-head size; defaults to d_model // n_heads.
        mlp_dim: F, the MLP hidden size.
        norm: "rms" (RMSNorm) or "layer" (LayerNorm with bias).
        norm_eps: epsilon of the norm.
        mlp: "swiglu" (down(silu(gate(x)) * up(x))), "geglu" (down(gelu_tanh(gate(x)) * up(x)),
            Gemma) or "gelu" (fc -> gelu_tanh -> proj).
        positions: "rope" or "learned" (absolute position embeddings, GPT-2).
        max_positions: size of the learned position table (and a documented bound for RoPE).
        rope_theta: RoPE base.
        rope_scaling: None or an HF-style dict; `{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}` is supported.
        qkv_bias / out_bias / mlp_bias: bias on q,k,v projections / attention output / MLP.
        qk_norm: RMSNorm over each head's dimension on queries and keys, before RoPE (Qwen3,
            Gemma 3).
        norm_offset: RMSNorm scales by (norm_offset + w): 1.0 for Gemma (w starts at 0).
        post_norms: a norm also after attention and after the MLP, before each residual add
            (Gemma 2 / 3).
        embed_scale: token embeddings are multiplied by this (Gemma: sqrt(d_model)).
        query_pre_attn_scalar: attention logits are scaled by its -1/2 power (None: head_dim).
        attn_softcap / final_softcap: c · tanh(x / c) on the attention logits / the LM logits
            (Gemma 2; None = off).
        rope_local_theta: RoPE base of the sliding layers (Gemma 3; None = rope_theta, the
            global layers keep rope_theta and rope_scaling).
        sliding_window: W: a query at position i of a sliding layer attends keys at positions
            i - W < j <= i (None = no sliding layers).
        layer_types: per layer "full" or "sliding" (None = every layer "sliding" when
            sliding_window is set, e.g. Mistral; else every layer "full").
        tie_embeddings: LM head shares the token embedding matrix.
        param_dtype: storage dtype of parameters ("float32" or "bfloat16").
        dtype: compute dtype of activations and matmuls (params are cast at use); "auto" (the
            default) = bfloat16 on a GPU or TPU backend, float32 on CPU (`resolve_dtype`),
            fixed when the config is made.
        remat: remat policy name applied to each scanned layer: "none", "full" (save nothing),
            "dots" (save matmul outputs), "dots_no_batch" (save matmuls without batch dims).
        attention: how attention is computed: "einsum" (`Attention.attend`: grouped-query
            einsums laid out for XLA's CPU dots, float32 softmax; the only path with
            attention-logit soft-capping), "xla" (`jax.nn.dot_product_attention`, its XLA
            implementation), "cudnn" (its cuDNN fused / flash kernel: GPU, bf16 / fp16,
            head_dim a multiple of 8), or "auto" (the default, resolved at trace time by
            `resolve_attention`: cudnn on a GPU where the kernel applies, xla on TPU,
            einsum on CPU and for soft-capped models). All take the same boolean mask, so
            left padding, grouped-query heads, sliding windows and the KV cache are the same.
        attention_block: query positions per block of the einsum path's causal attention in
            a full forward (`transformer.attention_blocks`): a block attends only the keys up
            to its last query, skipping the masked upper triangle; None (the default) = auto:
            max(64, T / 8) for T >= 128, one block below; 0 = off. SmolLM2 fwd+bwd with remat
            at 8 x 512: 13.8 -> 11.1 s; 4 x 1024: 24.1 -> 12.9 s (README, real-model
            benchmarks).
        scan_unroll: layers per iteration of the layer scan (`lax.scan(unroll=...)`); 1 keeps
            compile time independent of depth; <= 0 unrolls all layers; None (the default)
            = auto: all layers when n_layers <= AUTO_UNROLL_MAX_LAYERS (8), else 1. Shallow
            models (the tiny / small / base presets, and HF checkpoints of up to 8 layers)
            unroll: on 2 CPU cores the rolled scan spends ~10% of a train step stacking and
            slicing per-layer residuals (dynamic-update-slice / dynamic-slice copies), and at
            4-8 layers compiling the unrolled step is no slower. Deep models (the 1b preset)
            keep compile time flat with a rolled scan. With remat set, auto = 1 at any depth:
            with every layer unrolled, XLA's schedule on CPU kept all activations alive
            anyway (`tools/device_budget.py`: 8 layers x 8 x 256 tokens, temporaries 369 MB
            with remat "full" or without; rolled, 68 MB).
        logits_chunk: positions per chunk when a trainer needs log-probabilities of target
            tokens over the whole vocabulary (`Transformer.target_logprobs`): 0 computes the
            [B, T, V] logits at once; c > 0 computes them c positions at a time and again in
            the backward pass, so at most [B, c, V] float32 logits are alive (a large
            vocabulary: SmolLM2's 49,152 x 512 positions x 8 rows is 805 MB per copy);
            None (the default) = auto: for vocabularies of at least LARGE_VOCAB (32,768)
            tokens, LOGITS_CHUNK (128) positions, fewer for batches of more than 8 rows so
            that a chunk holds at most LOGITS_CHUNK_ROWS (1,024) rows x positions (at least
            8 positions); else 0 (the README's real-model benchmarks measure the memory it
            saves).
        pad_token_id / eos_token_id / bos_token_id: ids written to the HF config on export.
        lora_rank / lora_alpha / lora_targets: low-rank adapters (`jaxrlhf.models.lora`):
            with lora_rank r > 0 every projection named in lora_targets (keys of
            LORA_TARGETS) computes x W + (alpha / r) (x A) B, A [in, r], B [r, out] (B starts
            at zero); 0 = no adapters.
    """

    family: str = "llama"
    vocab_size: int = 259
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None
    mlp_dim: int = 344
    norm: str = "rms"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    positions: str = "rope"
    max_positions: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # stored as a sorted tuple of (key, value) pairs
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    post_norms: bool = False
    embed_scale: float = 1.0
    query_pre_attn_scalar: Optional[float] = None
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    rope_local_theta: Optional[float] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None
    param_dtype: str = "float32"
    dtype: str = "auto"
    remat: str = "none"
    attention: str = "auto"
    attention_block: Optional[int] = None
    scan_unroll: Optional[int] = None
    logits_chunk: Optional[int] = None
    pad_token_id: Optional[int] = 256
    eos_token_id: Optional[int] = 258
    bos_token_id: Optional[int] = 257
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ()

    def __post_init__(self):
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", resolve_dtype("auto"))
        if self.family not in FAMILIES:
            raise ValueError(f"Unknown model family {self.family!r}; expected one of {FAMILIES}.")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}.")
        if self.mlp not in ("swiglu", "geglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu', 'geglu' or 'gelu', got {self.mlp!r}.")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {self.positions!r}.")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}.")
        if self.attention in ("xla", "cudnn") and self.attn_softcap is not None:
            raise ValueError(f"attention={self.attention!r} (jax.nn.dot_product_attention) has no "
                             "attention-logit soft-capping; this model sets attn_softcap, use "
                             "attention='einsum' or 'auto'.")
        if self.attention_block is not None and int(self.attention_block) < 0:
            raise ValueError(f"attention_block must be >= 0 (0 = off), got {self.attention_block}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                    f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                                              "set head_dim explicitly.")
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or any(
                    t not in ("full", "sliding") for t in self.layer_types):
                raise ValueError(f"layer_types must hold 'full' or 'sliding' for each of the "
                                 f"{self.n_layers} layers, got {self.layer_types!r}.")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding layers but sliding_window is not set.")
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}.")
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank:
            have = self.lora_target_names()
            bad = [t for t in self.lora_targets if t not in have]
            if bad or not self.lora_targets:
                raise ValueError(f"lora targets {list(self.lora_targets)}: a {self.mlp} model "
                                 f"has the projections {list(have)}.")
        if isinstance(self.rope_scaling, dict):  # keep the dataclass hashable (jit static arg)
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))

    def sliding_layers(self) -> tuple:
        """Per layer: True when it attends through the sliding window."""
        if not self.sliding_window:
            return (False,) * self.n_layers
        if self.layer_types is None:
            return (True,) * self.n_layers
        return tuple(t == "sliding" for t in self.layer_types)

    def lora_target_names(self) -> tuple:
        """The projections of this architecture an adapter can target."""
        mlp = ("fc", "proj") if self.mlp == "gelu" else ("gate", "up", "down")
        return ("q", "k", "v", "o") + mlp

    @property
    def attn_scale(self) -> float:
        """The factor of the attention logits: query_pre_attn_scalar ** -1/2 (default
        head_dim ** -1/2)."""
        return float(self.query_pre_attn_scalar or self.dim_per_head) ** -0.5

    def lora_scale(self) -> float:
        return float(self.lora_alpha) / self.lora_rank if self.lora_rank else 0.0

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def logits_chunk_size(self, rows: int = 1) -> int:
        """`logits_chunk` resolved for a batch of `rows` rows (None = auto: LOGITS_CHUNK
        positions for a large vocabulary, at most LOGITS_CHUNK_ROWS rows x positions)."""
        if self.logits_chunk is None:
            if self.vocab_size < LARGE_VOCAB:
                return 0
            return max(8, min(LOGITS_CHUNK, LOGITS_CHUNK_ROWS // max(int(rows), 1)))
        return max(int(self.logits_chunk), 0)

    def layer_scan_unroll(self) -> int:
        """The `unroll` of the layer scan: `scan_unroll` resolved (None = auto, <= 0 = all)."""
        u = self.scan_unroll
        if u is None:
            u = 0 if self.n_layers <= AUTO_UNROLL_MAX_LAYERS and self.remat == "none" else 1
        return self.n_layers if u <= 0 else min(u, self.n_layers)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, head: str = "lm") -> int:
        """Parameter count (embeddings included), computed from the config alone."""
        d, f, hd = self.d_model, self.mlp_dim, self.dim_per_head
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        if self.out_bias:
            attn += d
        gated = self.mlp != "gelu"
        mlp = (3 if gated else 2) * d * f
        if self.mlp_bias:
            mlp += (2 * f if gated else f) + d
        norm = d * (2 if self.norm == "layer" else 1)
        layer = attn + mlp + (4 if self.post_norms else 2) * norm
        total = self.n_layers * layer + norm + self.vocab_size * d
        if self.positions == "learned":
            total += self.max_positions * d
        if head == "lm" and not self.tie_embeddings:
            total += self.vocab_size * d
        if head == "score":
            total += d + 1
        return total


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Named Llama-style presets used by benchmarks, tests and the built-in task.

    tiny  d=128 L=4 heads 4 kv 2 mlp 344   (~0.9M params with vocab 259)
    small d=256 L=4 heads 8 kv 4 mlp 688
    base  d=512 L=8 heads 8 kv 4 mlp 1376
    1b    d=2048 L=16 heads 16 kv 8 mlp 5632 vocab 32000 (GPU benchmarks, bf16)
    """
    presets = {
            "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=344),
            "small": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, mlp_dim=688),
            "base": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, mlp_dim=1376),
            "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, mlp_dim=5632,
                                  vocab_size=32000, param_dtype="float32", dtype="bfloat16", remat="dots"),
    }
    if name not in presets:
        raise ValueError(f"Unknown model preset {name!r}; expected one of {sorted(presets)}.")
    kw = dict(family="llama", vocab_size=259)
    kw.update(presets[name])
    kw.update(overrides)
    return ModelConfig(**kw)
