"""Rollout generation: one prefill, then a KV-cached decode loop in `lax.while_loop`.

    result = generate(model, prompt_tokens_BxP, prompt_mask_BxP, rng, max_new_tokens=64,
                      temperature=1.0, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)

Everything between the prompt and the `GenerateResult` is one compiled function, cached per
(model structure, batch B, prompt length P, max_new_tokens N, num_samples K, sampling
options): a rollout bucket compiles once. The model crosses the jit boundary as plain pytrees
(`nnx.split` outside, `nnx.merge` inside).

Several samples per prompt (`num_samples=K`, GRPO-style groups): the prefill runs once on the
B prompts; their keys and values stay one copy per prompt, the cache's shared prefix
(`KVCache.prefix_k`), and the decode loop runs on the B·K rows (row i·K + j is sample j of
prompt i, prompt-major), each with a cache of its own N response slots. The decode step's
attention reads a prompt's keys / values once for its K rows, as the rows of one batched
matmul (`Attention._attend_cached`). The prefill costs B rows instead of B·K, the cache holds
B·P + B·K·N slots instead of B·K·(P + N), and the result is that of `generate` on the
repeated prompts with the same rng (the loop draws per row of the B·K): log-probs equal to
float rounding, and tokens equal unless a draw lands within that rounding of a boundary of
the inverse CDF (`tools/bench_prompt_sharing.py` counts such rows on a real model).

Padding. Prompts should be left-padded (the project convention), but any padding layout is
handled: the cache is sized exactly P + N, padding slots are excluded through the cache mask,
the first new token is sampled from the hidden state of each row's LAST REAL token, and
positions continue from the row's real length (`positions_from_mask`). A row therefore gives
the same tokens and logprobs alone or inside any padded batch. Every row needs at least one
real prompt token.

The sampling distribution (one definition, shared with the trainers). For raw logits z,

    z' = z / temperature                                   (temperature > 0)
    top-k:  keep tokens whose z' >= the k-th largest z'     (top_k = 0: off; ties kept)
    top-p:  sort by z' descending; keep a token when the probability mass of the tokens
            strictly before it is < top_p (the smallest head with mass >= top_p; the most
            likely token is always kept; ties with the last kept token are kept)
    π(y)  = softmax(z' with removed tokens set to -1e30)(y)

`processed_logits` computes z' with removals, `sampling_logprobs` gives log π(y), and the
sampler draws from exactly this π (inverse CDF, see `_sample`) and records log π of the
drawn token. The PPO trainer computes π_old and π_θ with the same
`sampling_logprobs` (same temperature/top-k/top-p) on a full forward over `result.tokens`,
so the behaviour policy that produced the samples is the one the importance ratio is taken
against, and the first PPO minibatch has ratio 1 (exactly, when π_old comes from the scoring
pass; within float rounding, ~1e-6, when it is taken from `result.logprobs`, since KV-cached
and full-forward logits differ by rounding).

Why truncation is inside π: TRL and most PPO code score π_old with logits / T only and ignore
top-k/top-p; then the recorded log π_old is not the distribution the tokens were drawn from
(the importance weights and the KL estimate are biased whenever truncation is on). Here the
truncated distribution is the policy. The price: under π_θ a sampled token can fall outside
the (moved) truncation set and get log π ≈ -1e30 — finite, never NaN: its clamped ratio is
~0 and its PPO term carries no gradient; likewise a KL term against a truncated π_ref hits
the log-ratio clamp. With the recommended RLHF setting (top_k=0, top_p=1) both conventions
coincide: π = softmax(z / T), and nothing is ever out of the set.

Greedy decoding takes argmax z (which every truncation keeps); its logprobs are still
log π under the options given, so `sampling_logprobs` reproduces them.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxrlhf import sharding as shd
from jaxrlhf.models.transformer import KVCache, Transformer, positions_from_mask

# Logit of a token removed by top-k/top-p: finite, so log-ratios stay finite (no inf - inf).
_REMOVED = -1e30


class GenerateResult(NamedTuple):
    """Output of `generate`. B rows (prompts × num_samples, prompt-major), P prompt length,
    N = max_new_tokens, L = P + N.

    tokens:          [B, L] int32, the prompt (as given) followed by `response_tokens`.
    mask:            [B, L] int32, `prompt_mask` followed by `response_mask`: the attention
                     mask with which a full forward over `tokens` reproduces the rollout.
    response_tokens: [B, N] int32, the sampled tokens; `pad_id` after the first EOS and in
                     steps skipped once every row had finished.
    response_mask:   [B, N] int32, 1 for response tokens up to and including the first EOS,
                     0 after it.
    logprobs:        [B, N] float32, log π(token) under the sampling distribution (module
                     docstring) where `response_mask` is 1, exactly 0 elsewhere.
    finished:        [B] bool, the row produced EOS within N tokens.
    lengths:         [B] int32, response length = response_mask.sum(-1) (EOS included).
    num_steps:       [] int32, tokens generated per row before the loop stopped (N unless
                     every row finished earlier); rows are padded beyond it.
    """
    tokens: jax.Array
    mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    finished: jax.Array
    lengths: jax.Array
    num_steps: jax.Array


# ---------------------------------------------------------------------------------------
# The sampling distribution.

def processed_logits(logits_xV, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0):
    """z / T with the tokens removed by top-k then top-p set to -1e30; float32, any rank.

    See the module docstring for the exact rule. `temperature`, `top_k`, `top_p` are Python
    numbers (static): each truncation costs ops only when it is on.
    """
    x = logits_xV.astype(jnp.float32)
    vocab = x.shape[-1]
    if temperature != 1.0:
        x = x * (1.0 / temperature)
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, _REMOVED)
    if top_p < 1.0:
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest kept logit; the first sorted entry always has mass_before = 0 < top_p.
        cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1,
                         keepdims=True)
        x = jnp.where(x >= cutoff, x, _REMOVED)
    return x


def sampling_logprobs(logits_BxTxV, tokens_BxT, *, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0):
    """log π(tokens) [B, T] float32 under the sampling distribution of the module docstring.

    π = softmax(processed_logits(z; T, top_k, top_p)). Used by the sampler for the drawn
    token and by the PPO trainer for π_old / π_θ / π_ref, so rollout and training agree.
    Works for any leading shape: logits [..., V], tokens [...].
    """
    logp = jax.nn.log_softmax(
        processed_logits(logits_BxTxV, temperature=temperature, top_k=top_k, top_p=top_p),
        axis=-1)
    return jnp.take_along_axis(logp, tokens_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _argmax(x_BxV):
    """argmax over the last axis (first index on ties) as two plain reductions; XLA's CPU
    variadic (value, index) reduce behind `jnp.argmax` is ~4x slower at decode sizes."""
    v = x_BxV.shape[-1]
    top = jnp.max(x_BxV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_BxV == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def _sample(logits_BxV, uniform_B, *, temperature, top_k, top_p, greedy):
    """(tokens [B], log π [B]): inverse-CDF draws from π with one uniform per row in [0, 1),
    or the argmax when greedy.

    Inverse CDF, not Gumbel-max: it needs B random numbers per step instead of B x V, which
    on CPU is the difference between ~8 us and ~80 us per step at V = 259 (0.6 ms and
    4.6 ms at V = 32k; measured with 2 threads). Token t is drawn when
    cdf[t-1] <= u * cdf[V-1] < cdf[t], so a removed token (probability exactly 0, a flat
    step of the cdf) is never drawn; probabilities are resolved to float32 rounding (~1e-7).
    """
    x = processed_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
    if greedy:
        tokens = _argmax(x)
    else:
        # associative_scan: log2(V) fused adds; jnp.cumsum is a reduce-window on CPU (~5x).
        cdf = jax.lax.associative_scan(
            jnp.add, jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), axis=-1)
        below = cdf <= uniform_B[:, None] * cdf[:, -1:]
        tokens = jnp.minimum(jnp.sum(below, axis=-1, dtype=jnp.int32), x.shape[-1] - 1)
    logp = jax.nn.log_softmax(x, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def sample_tokens(logits_BxV, rng, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, greedy: bool = False):
    """Draws one token per row from π (or its argmax) -> (tokens [B] int32, log π [B])."""
    uniform = None if greedy else jax.random.uniform(rng, logits_BxV.shape[:1], jnp.float32)
    return _sample(logits_BxV, uniform, temperature=temperature, top_k=top_k, top_p=top_p,
                   greedy=greedy)


def _noise_state(rng):
    """Initial state of the rollout's random number generator, drawn from `rng`."""
    return jax.random.bits(rng, (4,), jnp.uint32)


def _uniform_step(state_4, shape):
    """(next state, uniforms in [0, 1) of `shape`) from XLA's RngBitGenerator.

    Why not `jax.random.uniform(fold_in(rng, step))`: on CPU threefry is lowered as a rolled
    loop costing ~100 us per decode step, and the philox key type does not lower under a
    sharded jit in this JAX. The generator state is carried through the loop; the draws do
    not depend on the mesh (tested).
    """
    state_4, bits = jax.lax.rng_bit_generator(state_4, shape, dtype=jnp.uint32)
    # 23 random mantissa bits -> [1, 2) -> [0, 1).
    u = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    return state_4, u - 1.0


# ---------------------------------------------------------------------------------------
# The compiled rollout.

@dataclasses.dataclass(frozen=True)
class _Options:
    """Static (compile-time) options of one rollout bucket."""
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_ids: Tuple[int, ...]
    pad_id: int
    greedy: bool
    num_samples: int
    mesh: Optional[Mesh]
    rules: Optional[tuple]


def stop_ids(eos_id: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """One stop id or several -> a sorted tuple of distinct ints (a static jit option)."""
    ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
    if not ids:
        raise ValueError("eos_id must name at least one stop token id.")
    return tuple(sorted({int(i) for i in ids}))


def _is_stop(tok_B, eos_ids: Tuple[int, ...]):
    """[B] bool: the token is one of the stop ids."""
    hit_B = tok_B == eos_ids[0]
    for i in eos_ids[1:]:
        hit_B = hit_B | (tok_B == i)
    return hit_B


# Number of times `_generate_impl` was traced (compiled); tests assert one per bucket.
trace_count = 0


def _constrain(x, axes, opts: _Options):
    """Pins `x` to the mesh by logical axes (no-op without a mesh)."""
    if opts.mesh is None:
        return x
    spec = shd.logical_to_spec(axes, x.shape, opts.mesh, opts.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(opts.mesh, spec))


# The slot axis of a cache buffer: keys [rows, kv heads, Dh, slots], values [rows, kv heads,
# slots, Dh] (`KVCache`).
_SLOT_AXIS = {"k": 3, "v": 2}


def _pad_slots(x, extra: int, kind: str):
    """`extra` empty slots appended to a key ("k") or value ("v") cache buffer."""
    pad = [(0, 0)] * x.ndim
    pad[_SLOT_AXIS[kind]] = (0, extra)
    return jnp.pad(x, pad)


def _generate_impl(graphdef, state, prompt_BxP, prompt_mask_BxP, rng, opts: _Options):
    global trace_count
    trace_count += 1
    model = nnx.merge(graphdef, state)
    if getattr(model, "head", None) != "lm":
        raise ValueError("generate needs a Transformer with the 'lm' head.")
    num_prompts, p = prompt_BxP.shape
    n, k = opts.max_new_tokens, opts.num_samples
    b = num_prompts * k  # rows of the decode loop (the _B arrays after the prefill)
    sample = dict(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                  greedy=opts.greedy)

    # The whole prompt is prefilled at once by the layer scan (`Transformer.prefill`). One
    # sample per prompt: its keys and values padded into a cache sized exactly P + N. K
    # samples: they stay one copy per prompt, the cache's shared prefix (`KVCache.prefix_k`),
    # which the decode step's attention reads once per prompt for its K rows; the B·K rows'
    # own buffers hold the N response slots.
    layers = model.unstacked_layers()
    place = lambda x, kind: _constrain(
        x, ("batch", "kv_heads") + (("head_dim", "length") if kind == "k" else
                                    ("length", "head_dim")), opts)
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
    # The first token comes from each row's last real token (any padding layout).
    last = jnp.max(jnp.where(prompt_mask_BxP > 0, jnp.arange(p, dtype=jnp.int32), 0), axis=-1)
    h_Bx1xD, ks, vs = model.prefill(prompt_BxP, prompt_mask_BxP,
                                    positions_from_mask(prompt_mask_BxP), last[:, None])
    if k == 1:
        cache = KVCache(k=tuple(place(_pad_slots(x, n, "k"), "k") for x in ks),
                        v=tuple(place(_pad_slots(x, n, "v"), "v") for x in vs),
                        mask=jnp.pad(prompt_mask_BxP, ((0, 0), (0, n))),
                        index=jnp.asarray(p, jnp.int32))
    else:
        def empty(x, kind):   # a prompt's buffer shape -> zeros for K rows' N slots
            shape = list(x.shape)
            shape[0], shape[_SLOT_AXIS[kind]] = shape[0] * k, n
            return place(jnp.zeros(shape, x.dtype), kind)

        cache = KVCache(k=tuple(empty(x, "k") for x in ks), v=tuple(empty(x, "v") for x in vs),
                        mask=jnp.zeros((b, n), jnp.int32), index=jnp.asarray(0, jnp.int32),
                        prefix_k=tuple(place(x, "k") for x in ks),
                        prefix_v=tuple(place(x, "v") for x in vs), prefix_mask=prompt_mask_BxP)
        h_Bx1xD, prompt_BxP, prompt_mask_BxP = (
            _constrain(jnp.repeat(x, k, axis=0), ("batch",) + (None,) * (x.ndim - 1), opts)
            for x in (h_Bx1xD, prompt_BxP, prompt_mask_BxP))

    # The LM head's weight in the layout the decode matmul reads, made once per rollout (a
    # tied head is the embedding's transpose: left inside the loop, XLA may transpose it
    # again at every step).
    head_DxV = jax.lax.optimization_barrier(model.lm_head_weight())

    def sample_next(h_Bx1xD, noise_state):
        logits_BxV = model.logits(h_Bx1xD, head_DxV)[:, 0]
        uniform_B = None
        if not opts.greedy:
            noise_state, uniform_B = _uniform_step(noise_state, (b,))
        tok_B, logp_B = _sample(logits_BxV, uniform_B, **sample)
        return tok_B, logp_B, noise_state

    tok_B, logp_B, noise_state = sample_next(h_Bx1xD, _noise_state(rng))

    pad = jnp.int32(opts.pad_id)
    tokens_BxN = _constrain(jnp.full((b, n), pad, jnp.int32), ("batch", None), opts)
    logps_BxN = _constrain(jnp.zeros((b, n), jnp.float32), ("batch", None), opts)
    tokens_BxN = tokens_BxN.at[:, 0].set(tok_B)
    logps_BxN = logps_BxN.at[:, 0].set(logp_B)
    done_B = _is_stop(tok_B, opts.eos_ids)
    lengths_B = jnp.ones((b,), jnp.int32)
    # Position of the next token fed to the model: the row's real prompt length.
    pos_B = jnp.sum(prompt_mask_BxP, axis=-1)
    ones_Bx1 = jnp.ones((b, 1), jnp.int32)

    def cond(carry):
        i, _, _, _, done_B, *_ = carry
        return (i < n) & ~jnp.all(done_B)

    def body(carry):
        i, cache, tok_B, pos_B, done_B, lengths_B, tokens_BxN, logps_BxN, noise_state = carry
        # Finished rows keep decoding their own (valid) last token; outputs are masked below.
        h_Bx1xD, cache = model.hidden_cached(tok_B[:, None], ones_Bx1, pos_B[:, None], cache,
                                             layers=layers)
        new_B, logp_B, noise_state = sample_next(h_Bx1xD, noise_state)
        live_B = ~done_B
        zero = jnp.zeros((), jnp.int32)
        tokens_BxN = jax.lax.dynamic_update_slice(
            tokens_BxN, jnp.where(live_B, new_B, pad)[:, None], (zero, i))
        logps_BxN = jax.lax.dynamic_update_slice(
            logps_BxN, jnp.where(live_B, logp_B, 0.0)[:, None], (zero, i))
        lengths_B = lengths_B + live_B.astype(jnp.int32)
        done_B = done_B | _is_stop(new_B, opts.eos_ids)
        return (i + 1, cache, new_B, pos_B + 1, done_B, lengths_B, tokens_BxN, logps_BxN,
                noise_state)

    carry = (jnp.int32(1), cache, tok_B, pos_B, done_B, lengths_B, tokens_BxN, logps_BxN,
             noise_state)
    steps, _, _, _, done_B, lengths_B, tokens_BxN, logps_BxN, _ = jax.lax.while_loop(
        cond, body, carry)

    response_mask_BxN = (jnp.arange(n, dtype=jnp.int32)[None, :] < lengths_B[:, None]
                         ).astype(jnp.int32)
    return GenerateResult(
        tokens=jnp.concatenate([prompt_BxP.astype(jnp.int32), tokens_BxN], axis=1),
        mask=jnp.concatenate([prompt_mask_BxP, response_mask_BxN], axis=1),
        response_tokens=tokens_BxN,
        response_mask=response_mask_BxN,
        logprobs=logps_BxN,
        finished=done_B,
        lengths=lengths_B,
        num_steps=steps,
    )


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 5))


def _model_mesh(state) -> Optional[Mesh]:
    """The mesh the model's parameters live on, if they are sharded over more than 1 device."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def generate(model: Union[Transformer, Tuple[nnx.GraphDef, nnx.State]], prompt_tokens_BxP,
             prompt_mask_BxP, rng, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Union[int, Sequence[int]], pad_id: int,
             greedy: bool = False, num_samples: int = 1,
             mesh: Optional[Mesh] = None, rules: Optional[shd.Rules] = None) -> GenerateResult:
    """Samples up to `max_new_tokens` tokens, `num_samples` times per prompt; returns a
    `GenerateResult`.

    Args:
      model: a `Transformer` with the "lm" head (unsharded, or sharded per `jaxrlhf.sharding`),
        or its `nnx.split` pair (graphdef, state): a trainer that keeps the parameters as a
        pytree passes that and skips the split (~1-3 ms of Python per call).
      prompt_tokens_BxP, prompt_mask_BxP: int prompts and their 1/0 mask (left-padded by
        convention; any layout works, see module docstring). Each row needs >= 1 real token.
      rng: a PRNG key; the same key gives the same result, on any mesh. It seeds the
        loop's random number generator (XLA RngBitGenerator, see `_uniform_step`).
      max_new_tokens: N >= 1. The loop stops early once every row has produced a stop id.
      temperature, top_k, top_p: the sampling distribution (module docstring). top_k = 0
        and top_p = 1 turn truncation off. All are compile-time constants.
      eos_id: the end-of-sequence id, or several (a chat template's end-of-turn tokens, e.g.
        `generation_config.eos_token_id` as a list; `Tokenizer.stop_ids`): a row ends at the
        first of them it samples. An id outside [0, V) never matches (rows always run N).
      pad_id: written to `response_tokens` after EOS.
      greedy: take the argmax instead of sampling; logprobs are still log π under the
        options (temperature=0 is accepted with greedy and then stands for T = 1).
      num_samples: K >= 1 samples per prompt: the result has B·K rows, row i·K + j sample
        j of prompt i, and equals `generate` on `jnp.repeat(prompts, K, axis=0)` with the
        same rng (to float rounding: module docstring), but the prompts are prefilled and
        cached once each.
      mesh, rules: run under this mesh (batch over the "batch" rule, default data x fsdp;
        cache kv heads over "tensor"; the decode loop's batch is the B·K rows). Defaults to
        the mesh of the model's parameters.

    Compiled once per (model structure, B, P, N, K, options).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), "
                         f"got {temperature}.")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"Need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if prompt_tokens_BxP.shape != prompt_mask_BxP.shape or len(prompt_tokens_BxP.shape) != 2:
        raise ValueError(f"prompt tokens {prompt_tokens_BxP.shape} and mask "
                         f"{prompt_mask_BxP.shape} must be equal [B, P] shapes.")
    graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
    mesh = mesh if mesh is not None else _model_mesh(state)
    if rules is not None:  # hashable (a static jit argument)
        items = rules.items() if hasattr(rules, "items") else rules
        rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items)
    opts = _Options(max_new_tokens=int(max_new_tokens),
                    temperature=float(1.0 if greedy and temperature == 0 else temperature),
                    top_k=int(top_k), top_p=float(top_p), eos_ids=stop_ids(eos_id),
                    pad_id=int(pad_id), greedy=bool(greedy), num_samples=int(num_samples),
                    mesh=mesh, rules=rules)
    prompt_tokens_BxP = jnp.asarray(prompt_tokens_BxP, jnp.int32)
    prompt_mask_BxP = jnp.asarray(prompt_mask_BxP, jnp.int32)
    if mesh is not None:
        spec = shd.logical_to_spec(("batch", None), prompt_tokens_BxP.shape, mesh, rules)
        prompt_tokens_BxP, prompt_mask_BxP = jax.device_put(
            (prompt_tokens_BxP, prompt_mask_BxP), NamedSharding(mesh, spec))
    return _generate_jit(graphdef, state, prompt_tokens_BxP, prompt_mask_BxP, rng, opts)
