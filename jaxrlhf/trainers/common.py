"""What every stage shares: model, tokenizer and data set-up, optimizer, train state, exact
gradient accumulation, sharded jit, HF export, and the one loop.

A stage is a module with `build(config, stage_dir) -> Stage` (state and its shardings, the
jitted step, the batch iterator, evaluate, finish) and `run = run_stage(build, ...)`;
`run_stage` owns resume, SIGTERM, logging, evaluation cadence, checkpoints and the
non-finite policy for all of them.

Train state: a plain dict pytree {"step", "params", "opt_state", "rng"} (PPO adds more), so
it checkpoints with orbax as it is. `params` is the model's pure state dict
(`nnx.to_pure_dict`); the jitted step rebuilds the module with `nnx.merge(graphdef, params)`.
Randomness inside a step is `jax.random.fold_in(state["rng"], state["step"])`.

With low-rank adapters (`config.lora`, `Trainable`), `params` holds only what is trained (the
adapters, and a score head) and the frozen base weights are a separate argument of the jitted
step (`compile_step(..., base=...)`), never donated, differentiated or checkpointed; the step
rebuilds the full dict with `lora.join(base, params)` (`accumulate(..., base=base)`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrlhf import paths
from jaxrlhf import sharding as shd
from jaxrlhf.checkpoint import Checkpointer, abstract_like
from jaxrlhf.config import model_config_from
from jaxrlhf.data.formats import REJECTS_FILENAME
from jaxrlhf.metrics import MetricsLogger
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.options import TrainOptions, parse

META_FILE = "jaxrlhf.json"   # written next to an HF export: tokenizer and stage provenance


class Preempted(Exception):
    """Raised after a SIGTERM: the state was saved; re-running the command resumes."""


class NonFiniteLoss(FloatingPointError):
    pass


# ------------------------------------------------------------------------------------------
# Distributed set-up, mesh and tokenizer.

def distributed_args(environ=None) -> Dict[str, int]:
    """num_processes / process_id for jax.distributed.initialize from JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (a manual multi-host launch; JAX reads JAX_COORDINATOR_ADDRESS itself, and
    detects all three on Cloud TPU, SLURM, Open MPI and Kubernetes when they are unset)."""
    environ = os.environ if environ is None else environ
    out = {}
    for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = environ.get(key)
        if value not in (None, ""):
            try:
                out[arg] = int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} must be an integer.") from None
    return out


def maybe_initialize_distributed(config) -> None:
    """jax.distributed.initialize() when the config or the environment asks for it."""
    wanted = bool(config.distributed) or bool(
        os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not wanted:
        return
    try:
        if jax.distributed.is_initialized():
            return
    except AttributeError:  # older jax
        pass
    jax.distributed.initialize(**distributed_args())


def mesh_from_config(config) -> Mesh:
    return shd.make_mesh(dict(config.mesh))


def resolve_init_dir(init_from: str) -> str:
    """A stage directory means its HF export; anything else must be an HF directory."""
    if not init_from:
        return ""
    path = paths.absolute(init_from)
    if paths.isdir(paths.join(path, "hf")):
        path = paths.join(path, "hf")
    if not paths.isdir(path):
        raise FileNotFoundError(
            f"init_from={init_from!r} does not exist. Give a local Hugging Face directory "
            "(config.json + *.safetensors) or a jaxrlhf stage directory with an hf/ export.")
    if not paths.exists(paths.join(path, "config.json")):
        raise FileNotFoundError(
            f"init_from={init_from!r} has no config.json; it must be a local Hugging Face "
            "model directory or a finished jaxrlhf stage directory.")
    return paths.local_copy(path)


def read_meta(hf_dir: str) -> dict:
    p = os.path.join(hf_dir, META_FILE)
    if hf_dir and paths.exists(p):
        from jaxrlhf.models.hf_io import read_json
        return read_json(p)
    return {}


def tokenizer_spec(config, init_dir: str = "") -> str:
    """The tokenizer to use: explicit, or for "auto" the init_from directory's."""
    spec = config.tokenizer
    if spec != "auto":
        return spec
    if init_dir and any(paths.exists(os.path.join(init_dir, f))
                        for f in ("tokenizer.json", "tokenizer_config.json")):
        return init_dir
    return read_meta(init_dir).get("tokenizer", "byte")


def check_tokenizer(tokenizer, model_cfg: ModelConfig, init_dirs: Mapping[str, str]) -> None:
    """Start-up checks: vocabulary fits the model; all init_from models share the tokenizer."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; use the tokenizer the model was trained with "
            "(config.tokenizer) or a model with a larger vocabulary.")
    fp = tokenizer.fingerprint()
    for name, d in init_dirs.items():
        recorded = read_meta(d).get("tokenizer_fingerprint")
        if recorded and recorded != fp:
            raise ValueError(
                f"Tokenizer mismatch: {name} ({d}) was trained with tokenizer "
                f"{read_meta(d).get('tokenizer')!r} (fingerprint {recorded[:12]}), but this run "
                f"uses {fp[:12]}. Policy, reference, critic and reward model must share one "
                "tokenizer: set config.tokenizer to the one recorded in "
                f"{os.path.join(d, META_FILE)}.")


def with_run_options(model, model_block):
    """`config.model.remat` / `attention` / `attention_block` / `scan_unroll` /
    `logits_chunk` (how to run, not what the weights are) applied to a loaded model when
    set."""
    for field in ("remat", "attention", "attention_block", "scan_unroll", "logits_chunk"):
        if model_block.get(field) is not None and model_block[field] != getattr(model.cfg, field):
            model.cfg = model.cfg.replace(**{field: model_block[field]})
    return model


def build_model(config, head: str, mesh: Mesh, *, init_dir: str = "", seed: int = 0,
                rules=None):
    """Model from init_from (sharded HF load) or a fresh sharded init."""
    from jaxrlhf.models import load_hf
    m = config.model
    if init_dir:
        kw = {}
        if m.get("dtype") is not None:
            kw["dtype"] = m.dtype
        if m.get("param_dtype") is not None:
            kw["param_dtype"] = m.param_dtype
        return with_run_options(load_hf(init_dir, head=head, mesh=mesh, rules=rules, **kw), m)
    cfg = model_config_from(m)
    return shd.init_sharded(cfg, head, seed=seed, mesh=mesh, rules=rules)


def export_stage_model(model, out_dir: str, *, tokenizer, tokenizer_spec_: str,
                       stage: str, extra: Optional[dict] = None,
                       adapter_dir: Optional[str] = None, base_model: str = "") -> str:
    """save_hf + a jaxrlhf.json recording the tokenizer (and HF tokenizer files if any).

    A model with adapters is written merged (W + (alpha / r) A B: a plain HF checkpoint);
    with `adapter_dir` its adapters also go there in PEFT's format, for the HF model in
    `base_model` (with the same jaxrlhf.json and tokenizer files).

    A reward model (score head) is exported with a pad token that never ends a real row
    (`hf_io.score_pad_id`; the saved tokenizer gets the same pad token), so transformers'
    `AutoModelForSequenceClassification` scores single rows and padded batches at the token
    jaxrlhf scores. jaxrlhf.json then records `hf_pad_token_id` and `hf_score_offset` (the
    score bias HF cannot hold: HF logits + hf_score_offset = jaxrlhf's reward).
    """
    from jaxrlhf.models import lora, save_hf
    from jaxrlhf.models.hf_io import score_pad_id
    if jax.process_count() > 1:  # gather the sharded params on every host (collective)
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.tree.map(shd.host_array, state))
    adapted = model
    model = lora.merged(model)
    if jax.process_index() == 0:
        hf_tok = getattr(tokenizer, "hf", None)
        meta = {"stage": stage, "tokenizer": tokenizer_spec_,
                "tokenizer_fingerprint": tokenizer.fingerprint()}
        pad = None
        if model.head == "score":
            candidates = []
            if hf_tok is not None:
                candidates = [hf_tok.unk_token_id, *sorted(hf_tok.all_special_ids)]
                candidates = [c for c in candidates if c != tokenizer.bos_id]
            pad = score_pad_id(tokenizer.pad_id, tokenizer.stop_ids, candidates)
            bias = float(jax.device_get(nnx.state(model, nnx.Param)["score_b"].get_value()))
            meta.update(hf_pad_token_id=pad, hf_score_offset=bias,
                        hf_usage="AutoModelForSequenceClassification logits[:, 0] + "
                                 "hf_score_offset = the jaxrlhf reward, read at the last token "
                                 "that is not hf_pad_token_id (pad with the saved tokenizer)")
        with paths.staged_dir(out_dir) as local:
            save_hf(model, local, pad_token_id=pad, eos_token_ids=tokenizer.stop_ids)
            if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
                if pad is not None and pad != tokenizer.pad_id:
                    hf_tok = copy.deepcopy(hf_tok)
                    hf_tok.pad_token = hf_tok.convert_ids_to_tokens(pad)
                hf_tok.save_pretrained(local)
            meta.update(extra or {})
            with open(os.path.join(local, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
        if adapter_dir and adapted.cfg.lora_rank:
            with paths.staged_dir(adapter_dir) as local:
                lora.save_peft(adapted, local, base_model=base_model,
                               extra=dict(meta, lora_merged_export=out_dir))
                if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
                    hf_tok.save_pretrained(local)
    return out_dir


# ------------------------------------------------------------------------------------------
# Low-rank adapters.

def log_main(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def lora_options(config):
    """config.lora, checked (`jaxrlhf.options.LoRAOptions`)."""
    from jaxrlhf.options import LoRAOptions
    return parse(LoRAOptions, config.get("lora", {}), "lora")


@dataclasses.dataclass
class Trainable:
    """What a stage trains. Without adapters: the whole model (`base` None). With adapters:
    the model with adapters, `params` / `shardings` the adapters (and a score head), `base` /
    `base_sh` the frozen rest."""

    model: Any
    graphdef: Any
    params: Any
    shardings: Any
    base: Any = None
    base_sh: Any = None
    options: Any = None

    def full(self, params):
        """The full parameter dict of the model from its trainable part."""
        from jaxrlhf.models import lora
        return lora.join(self.base, params)

    def merged_model(self, params):
        """The trained model as a module (adapters still separate; `lora.merged` folds
        them)."""
        return nnx.merge(self.graphdef, self.full(params))

    def base_graphdef(self):
        """The graphdef of the base model (adapters off): `base` under it is the frozen
        starting model, the reference of DPO and PPO."""
        from jaxrlhf.models import lora
        return lora.graphdef_of(lora.without_adapters(self.model.cfg), self.model.head)

    def reference(self):
        """(graphdef, params) of the frozen starting model, for DPO's and PPO's reference,
        without a copy of the base: the base under the graph without adapters, or, when the
        adapters were loaded from lora.adapter (a trained starting policy), the base with a
        frozen copy of those starting adapters."""
        if self.options is not None and self.options.adapter:
            return self.graphdef, self.full(jax.tree.map(jnp.copy, self.params))
        return self.base_graphdef(), self.base

    @property
    def is_lora(self) -> bool:
        return self.base is not None

    def param_counts(self, params) -> Dict[str, int]:
        """summary.json's {"num_params", "trainable_params"} for the trained part `params`."""
        n = _size(params)
        return {"num_params": n + _size(self.base), "trainable_params": n}

    def describe(self) -> str:
        n = _size(self.params)
        if not self.is_lora:
            return f"{n:,} trainable parameters (full fine-tuning)"
        nb = _size(self.base)
        cfg = self.model.cfg
        return (f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on "
                f"{','.join(cfg.lora_targets)}: {n:,} trainable parameters, "
                f"{nb:,} frozen ({100.0 * n / max(n + nb, 1):.2f}% trained)")


def _size(tree) -> int:
    """Number of elements in the arrays of a pytree (0 for None)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def trainable(config, model, mesh: Mesh, *, seed: int = 0, rules=None,
              options=None) -> Trainable:
    """Applies `config.lora` to a built model: adapters added (or a PEFT adapter loaded), the
    parameters split into trained and frozen, the frozen base optionally cast to bfloat16."""
    from jaxrlhf.models import lora
    lo = options if options is not None else lora_options(config)
    if not lo.enabled:
        return Trainable(model, nnx.graphdef(model), params_of(model),
                         param_shardings(model, mesh, rules), options=lo)
    if lo.adapter:
        model = lora.load_peft(model, paths.local_copy(paths.absolute(lo.adapter)),
                               mesh=mesh, rules=rules)
    else:
        model = lora.add_adapters(model, lo.rank, lo.alpha, lo.target_list(), seed=seed,
                                  mesh=mesh, rules=rules)
    params, base = lora.split(params_of(model))
    sh, base_sh = lora.split(param_shardings(model, mesh, rules))
    if lo.base_dtype:
        dt = jnp.dtype(lo.base_dtype)
        base = jax.tree.map(lambda x: x.astype(dt), base)
        model = nnx.merge(nnx.graphdef(model), lora.join(base, params))
    return Trainable(model, nnx.graphdef(model), params, sh, base, base_sh, options=lo)


def lora_export_kw(tr: Trainable, stage_dir: str, base_model: str) -> dict:
    """export_stage_model's adapter arguments for a stage's trained model."""
    if (not tr.is_lora or not tr.options.export_adapter or not base_model
            or tr.model.cfg.family == "gpt2"):   # PEFT needs an HF base; GPT-2: merged only
        return {}
    return {"adapter_dir": os.path.join(stage_dir, "adapter"), "base_model": base_model}


# ------------------------------------------------------------------------------------------
# Optimizer and state.

def train_options(config) -> TrainOptions:
    """config.train, checked (`jaxrlhf.options.TrainOptions`)."""
    return parse(TrainOptions, config.train, "train")


def make_optimizer(train_cfg, *, lr: Optional[float] = None, steps: Optional[int] = None):
    """AdamW with linear warmup + cosine decay and global-norm clipping. Returns
    (optimizer, schedule). Norm scales, biases and other 1-D params get no weight decay."""
    lr = train_cfg.lr if lr is None else lr
    steps = max(int(train_cfg.steps if steps is None else steps), 1)
    warmup = min(int(train_cfg.warmup_steps), max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=steps, end_value=lr * float(train_cfg.min_lr_ratio))

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2 and p.shape[-1] != 1, params)

    chain = []
    if train_cfg.grad_clip:
        chain.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    chain.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                             weight_decay=train_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain), schedule


def params_of(model) -> Dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(model))


def param_shardings(model, mesh: Mesh, rules=None):
    return nnx.to_pure_dict(shd.state_shardings(nnx.state(model), mesh, rules))


def opt_state_shardings(optimizer, params, params_sh, mesh: Mesh):
    """Shardings of the optimizer state: a leaf whose key path ends with a parameter's path
    (and has its shape) follows that parameter; everything else is replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    rep = NamedSharding(mesh, P())

    def dict_keys(path):
        return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))

    by_path = {}
    for (path, sh), p in zip(jax.tree_util.tree_flatten_with_path(params_sh)[0],
                             jax.tree.leaves(params)):
        by_path[dict_keys(path)] = (sh, tuple(p.shape))

    def pick(path, leaf):
        keys = dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[1] == tuple(leaf.shape):
                return hit[0]
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract)


def init_train_state(params, optimizer, params_sh, mesh: Mesh, seed: int):
    """{"step", "params", "opt_state", "rng"} laid out on the mesh, plus its shardings."""
    rep = NamedSharding(mesh, P())
    os_sh = opt_state_shardings(optimizer, params, params_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=os_sh)(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": params,
             "opt_state": opt_state,
             "rng": jax.device_put(jax.random.PRNGKey(seed), rep)}
    shardings = {"step": rep, "params": params_sh, "opt_state": os_sh, "rng": rep}
    return state, shardings


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def apply_update(state, grads, optimizer, schedule, loss, on_nonfinite: str, *,
                 counter: str = "step"):
    """One optimizer update with norms logged; under "skip" a non-finite loss or gradient
    leaves params and optimizer state unchanged (the `counter` entry still advances; the
    schedule is read at its value before the update)."""
    updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    gnorm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    if on_nonfinite == "skip":
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_params = keep(new_params, state["params"])
        new_opt = keep(new_opt, state["opt_state"])
    new_state = dict(state, params=new_params, opt_state=new_opt)
    new_state[counter] = state[counter] + 1
    # No norm of the update tree: it makes XLA materialise `updates` (its reduction cannot
    # share the in-place parameter write); grad_norm and lr describe the step.
    metrics = {"grad_norm": gnorm, "param_norm": global_norm(new_params),
               "lr": schedule(state[counter]), "finite": finite.astype(jnp.float32)}
    return new_state, metrics


def accumulate(sum_fn: Callable, params, batch, n_micro: int, base=None):
    """Σ over micro-batches of (value_and_grad of `sum_fn`, aux sums), by `lax.scan`.

    With `base` (the frozen part of the parameters, see `Trainable`) the gradient is taken
    with respect to `params` only and `sum_fn` receives `lora.join(base, params)`.

    `sum_fn(params, micro_batch) -> (loss_contribution, aux_dict)`; contributions are already
    normalised by the WHOLE batch's count, so their sum equals the full-batch loss exactly
    whatever `n_micro` (gradient-accumulation invariance).
    """
    if base is not None:
        from jaxrlhf.models import lora
        inner = sum_fn
        sum_fn = lambda p, mb: inner(lora.join(base, p), mb)
    vg = jax.value_and_grad(sum_fn, has_aux=True)
    if n_micro == 1:
        (loss, aux), grads = vg(params, batch)
        return loss, aux, grads

    def split(x):
        if x.shape[0] % n_micro:
            raise ValueError(f"Batch of {x.shape[0]} rows does not split into "
                             f"grad_accum={n_micro} micro-batches.")
        return x.reshape((n_micro, x.shape[0] // n_micro) + x.shape[1:])

    micro = jax.tree.map(split, batch)
    (loss0, aux0), g0 = jax.eval_shape(vg, params, jax.tree.map(lambda x: x[0], micro))
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)

    def body(carry, mb):
        (loss, aux), grads = vg(params, mb)
        acc = jax.tree.map(jnp.add, carry, (loss, aux, grads))
        return acc, None

    (loss, aux, grads), _ = jax.lax.scan(body, zeros((loss0, aux0, g0)), micro)
    return loss, aux, grads


def compile_step(step_fn: Callable, state_sh, batch_sh=None, *, donate: bool = True,
                 base=None, base_sh=None):
    """jit with explicit in/out shardings; the state is donated (never frozen models).
    `batch_sh=None` takes the batch's own sharding (see `to_global`). With `base` (frozen
    parameters, `Trainable.base`) the step is `step_fn(state, batch, base=base)`, base passed
    to every call as an argument (not a constant of the program) and never donated."""
    donate_argnums = (0,) if donate else ()
    if base is None:
        return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, None), donate_argnums=donate_argnums)
    jitted = jax.jit(lambda state, batch, b: step_fn(state, batch, base=b),
                     in_shardings=(state_sh, batch_sh, base_sh),
                     out_shardings=(state_sh, None), donate_argnums=donate_argnums)
    return lambda state, batch: jitted(state, batch, base)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules=None):
    """This process's rows of the global batch -> global arrays sharded over (data, fsdp)."""
    sh = shd.batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
            for k, v in batch.items()}


# ------------------------------------------------------------------------------------------
# The one loop every stage runs.

@dataclasses.dataclass
class Stage:
    """What a stage's `build(config, stage_dir)` returns and `run_stage` runs.

    state / state_sh  the train state pytree (checkpointed whole) and its shardings; its "step"
                      entry counts the loop's steps
    step              (state, batch) -> (state, metrics); metrics are arrays the loop reads
                      one step late (or, with `read_metrics`, anything that reads)
    batches           iterator of host batches with state() / restore() (its position is
                      checkpointed with the state)
    total_steps       steps of the stage
    evaluate          state -> {name: float} on held-out data (before the first step, every
                      train.eval_every steps, at the end), or None
    finish            LoopResult -> summary dict (exports, summary.json, plots)
    put               host batch -> device batch (default: `to_global` on `mesh`)
    read_metrics      (step number, fetched metrics, logger) -> {name: float}, for stages whose
                      step returns more than a flat dict of scalars
    """

    name: str
    state: Any
    state_sh: Any
    step: Callable
    batches: Any
    total_steps: int
    mesh: Mesh
    evaluate: Optional[Callable] = None
    finish: Optional[Callable] = None
    put: Optional[Callable] = None
    read_metrics: Optional[Callable] = None
    echo_keys: Optional[Sequence[str]] = None
    start_eval_file: str = "eval_start.json"


@dataclasses.dataclass
class LoopResult:
    state: Any
    last_metrics: Dict[str, float]
    eval_metrics: Dict[str, float]
    wall_time: float
    skipped_steps: int
    start_eval_metrics: Dict[str, float] = dataclasses.field(default_factory=dict)


class SigtermFlag:
    """Context manager: `.set` becomes True when SIGTERM arrives (the loop then saves)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def skip_limit(train_cfg, total_steps: int) -> int:
    """Most non-finite steps a run under on_nonfinite="skip" may drop before it stops:
    train.max_skipped_fraction of its steps, at least one."""
    return max(1, int(math.floor(float(train_cfg.max_skipped_fraction) * total_steps)))


def _where(pos) -> str:
    if isinstance(pos, Mapping) and "epoch" in pos and "position" in pos:
        return f"batch epoch {pos['epoch']} position {pos['position']}"
    return f"batch {pos}"


def run_stage(build: Callable, config, stage_dir: str):
    """Builds a stage (`build(config, stage_dir) -> Stage`) and runs it: resume from the latest
    checkpoint (state and data position), evaluate a fresh run once before its first step
    (logged as eval step 0 and kept in `stage.start_eval_file` for resumes;
    train.eval_at_start=False skips it), step to `total_steps` with metrics of step N read
    after step N+1 is dispatched, evaluate every train.eval_every steps and at the end,
    checkpoint every train.save_every steps and at the end. A non-finite loss raises
    `NonFiniteLoss` naming the step and batch, or under train.on_nonfinite="skip" the update
    is dropped and counted, up to `skip_limit`. SIGTERM saves a checkpoint and raises
    `Preempted`. Returns `stage.finish(result)` (the LoopResult when there is no finish).
    The stage's rejected_rows.jsonl is rewritten by every run (a resumed or re-run stage
    lists each rejected row once)."""
    paths.makedirs(stage_dir)
    maybe_initialize_distributed(config)
    rejects = os.path.join(stage_dir, REJECTS_FILENAME)
    if jax.process_index() == 0 and paths.exists(rejects):
        paths.remove(rejects)   # every build re-reads the data and writes its rejects again
    stage = build(config, stage_dir)
    tc = train_options(config)
    name, total = stage.name, int(stage.total_steps)
    is_main = jax.process_index() == 0
    put = stage.put or (lambda b: to_global(b, stage.mesh))
    ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=tc.max_to_keep,
                        save_every=tc.save_every)
    state = stage.state
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_like(state, stage.state_sh))
        if "train_iter" in meta:
            stage.batches.restore(meta["train_iter"])
        if is_main:
            print(f"[{name}] resumed from checkpoint step {ckpt.latest_step()} in "
                  f"{ckpt.directory}")
    start = int(jax.device_get(state["step"]))
    logger = MetricsLogger(stage_dir, total_steps=total, start_step=start, desc=name,
                           log_every=tc.log_every, is_main=is_main, echo_keys=stage.echo_keys)
    limit = skip_limit(tc, total)
    t0 = time.time()
    skipped = 0
    last: Dict[str, float] = {}
    eval_metrics: Dict[str, float] = {}
    pending = None

    def flush(p):
        nonlocal skipped, last
        step_no, batch_pos, m = p
        if stage.read_metrics is not None:
            m = stage.read_metrics(step_no, m, logger)
        else:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
        finite = m.pop("finite", 1.0) > 0 and math.isfinite(m.get("loss", 0.0))
        if not finite:
            if tc.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"[{name}] non-finite loss or gradient at step {step_no} "
                    f"({_where(batch_pos)}): loss={m.get('loss')} grad_norm="
                    f"{m.get('grad_norm')}. Lower train.lr, check the data, or set "
                    "train.on_nonfinite=skip to drop such steps.")
            skipped += 1
            logger.print(f"[{name}] step {step_no}: non-finite loss, update skipped "
                         f"({skipped} so far)")
            if skipped > limit:
                logger.close()
                raise NonFiniteLoss(
                    f"[{name}] {skipped} of {step_no} steps had a non-finite loss or gradient "
                    f"(more than train.max_skipped_fraction={tc.max_skipped_fraction} of "
                    f"{total} steps); stopping without an export. Lower train.lr or check "
                    "the data.")
        m["skipped_steps"] = float(skipped)
        logger.write(step_no, m)
        last = m

    start_eval: Dict[str, float] = {}
    start_path = os.path.join(stage_dir, stage.start_eval_file)
    if paths.exists(start_path):
        with paths.open(start_path) as f:
            start_eval = json.load(f)
    elif stage.evaluate is not None and start == 0 and tc.eval_at_start and total:
        start_eval = stage.evaluate(state)   # the starting point (e.g. the model before SFT)
        if start_eval:
            logger.write(0, start_eval, split="eval")
        if is_main and start_eval:
            with paths.open(start_path, "w") as f:
                json.dump(start_eval, f, indent=2)

    def meta():
        return {"train_iter": stage.batches.state()}

    with SigtermFlag() as sigterm:
        for step in range(start, total):
            batch_pos = stage.batches.state()
            batch = put(next(stage.batches))
            state, metrics = stage.step(state, batch)
            if pending is not None:
                flush(pending)
            pending = (step + 1, batch_pos, metrics)
            logger.advance()
            done = step + 1
            want_eval = (stage.evaluate is not None and tc.eval_every
                         and done % tc.eval_every == 0)
            if want_eval or ckpt.should_save(done) or sigterm.set or done == total:
                flush(pending)
                pending = None
            if want_eval or (stage.evaluate is not None and done == total):
                eval_metrics = stage.evaluate(state)
                if eval_metrics:
                    logger.write(done, eval_metrics, split="eval")
            if ckpt.should_save(done) or done == total or sigterm.set:
                ckpt.save(done, state, meta())
                logger.sync()   # a gs:// workdir: its metrics up to the checkpoint
            if sigterm.set:
                logger.print(f"[{name}] SIGTERM: saved checkpoint at step {done}; re-run the "
                             "same command to resume.")
                logger.close()
                ckpt.close()
                raise Preempted(f"{name} preempted at step {done}")
        if pending is not None:
            flush(pending)
    if start >= total and stage.evaluate is not None:
        eval_metrics = stage.evaluate(state)
    logger.close()
    ckpt.close()
    result = LoopResult(state, last, eval_metrics, time.time() - t0, skipped, start_eval)
    return stage.finish(result) if stage.finish is not None else result


def loop_summary(result: LoopResult) -> Dict[str, Any]:
    """The summary.json entries every trained stage reports: wall time, skipped steps, the
    last train metrics (train_*), the final and starting held-out metrics (eval_*,
    eval_start_*)."""
    return {"wall_time_s": result.wall_time, "skipped_steps": result.skipped_steps,
            **{f"train_{k}": v for k, v in result.last_metrics.items()},
            **{f"eval_{k}": v for k, v in result.eval_metrics.items()},
            **{f"eval_start_{k}": v for k, v in result.start_eval_metrics.items()}}


# ------------------------------------------------------------------------------------------
# Data for a stage.

def prepare_data(config, tokenizer, stage_dir: str, *, block: str = "data",
                 eval_block: Optional[str] = "eval_data"):
    """(train PreparedDataset, eval PreparedDataset or None) for a stage.

    Held-out data: `eval_data.path` when set; for the built-in task its "test" split; for files
    without an eval path, a seeded `eval_fraction` of the training rows (never trained on).
    Only process 0 writes rejected rows.
    """
    from jaxrlhf.data import build_dataset
    workdir = stage_dir if jax.process_index() == 0 else None
    spec = tokenizer
    train = build_dataset(config[block], spec, workdir=workdir)
    if eval_block is None:
        return train, None
    ev = heldout_block(config, block, eval_block)
    if ev.path:
        return train, build_dataset(ev, spec, workdir=workdir)
    if config[block].path == "synthetic":
        ev.path, ev.split, ev.format = "synthetic", "test", config[block].format
        ev.synthetic = config[block].synthetic.copy_and_resolve_references()
        ev.synthetic.num_examples = max(64, config[block].synthetic.num_examples // 16)
        for k in ("buckets", "max_len", "max_k", "truncation", "max_prompt_len", "on_bad_row",
                  "min_prompt_tokens", "min_response_tokens", "add_bos", "chat_template"):
            ev[k] = config[block][k]
        return train, build_dataset(ev, spec, workdir=workdir)
    frac = float(config.eval_fraction)
    n = len(train.rows)
    n_eval = int(round(n * frac))
    if n_eval == 0:
        return train, None
    perm = np.random.default_rng((int(config.seed), 7919)).permutation(n)
    held = set(perm[:n_eval].tolist())
    eval_ds = dataclasses.replace(train, rows=[r for i, r in enumerate(train.rows) if i in held])
    train = dataclasses.replace(train, rows=[r for i, r in enumerate(train.rows) if i not in held])
    return train, eval_ds


def heldout_block(config, block: str = "data", eval_block: str = "eval_data"):
    """A copy of the held-out data block with its unset `on_bad_row` (None, the default)
    taken from the training block: held-out rows follow the training data's bad-row
    policy unless eval_data sets its own."""
    ev = config[eval_block].copy_and_resolve_references()
    if ev.get("on_bad_row") is None:
        ev.on_bad_row = config[block].on_bad_row
    return ev


def data_iterators(config, train_ds, eval_ds, *, batch_size: int):
    pi, pc = jax.process_index(), jax.process_count()
    train_iter = train_ds.iterator(batch_size, seed=int(config.seed), shuffle=True,
                                   process_index=pi, process_count=pc)

    def eval_batches():
        if eval_ds is None:
            return iter(())
        it = eval_ds.iterator(batch_size, shuffle=False, drop_remainder=False,
                              process_index=pi, process_count=pc, num_epochs=1)
        n = int(config.train.eval_batches or 0)
        return (b for i, b in enumerate(it) if not n or i < n)

    return train_iter, eval_batches
