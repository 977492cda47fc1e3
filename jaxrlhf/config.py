"""The base config every `configs/<name>.py` starts from, with every default documented.

    config = base_config("sft")       # an ml_collections.ConfigDict
    config.train.steps = 500

Fields (`--config.<field>=value` overrides any of them from the command line; unknown fields
are an error):

  stage        "sft" | "rm" | "ppo" | "pipeline" | "rm_ensemble" (M reward models in one
               vmapped step + preference strength; `jaxrlhf.trainers.rm_ensemble`) | "dpo"
               (direct preference optimisation; `jaxrlhf.trainers.dpo`)
  seed         seeds init, data order and sampling; the same seed gives the same run
  data_root    where relative data paths are looked up (e.g. "hh-rlhf-harmless/train.jsonl.gz"
               in the configs): the environment variable JAXRLHF_DATA_ROOT, else the shared
               data folder beside this checkout (<checkout>/../shared/data). A relative path
               that exists from the working directory is used as it is.
  init_from    "" (fresh init from `model`), a local HF directory (config.json + safetensors),
               or a jaxrlhf stage directory (its exported `hf/` is used)
  tokenizer    "byte" (built-in), a local HF tokenizer directory, or "auto" (the init_from
               directory's tokenizer when it has one, else the tokenizer recorded there, else
               "byte")
  model        architecture when init_from is empty: `preset` ("tiny"|"small"|"base"|"1b")
               plus any `ModelConfig` field to override (None = the preset's value);
               `dtype` / `param_dtype` / `remat` / `attention` / `scan_unroll` / `logits_chunk`
               also apply to a model loaded from init_from
  data         the training data block (`jaxrlhf.data.default_data_config`); `eval_data` the
               held-out block (path "" = hold out `eval_fraction` of the training rows; the
               built-in task's test split takes every processing option of `data`; an unset
               eval_data.on_bad_row follows data.on_bad_row)
  train        optimisation and the loop (`jaxrlhf.options.TrainOptions`: every field, its
               default and its meaning)
  lora         low-rank adapters on a frozen base (`jaxrlhf.options.LoRAOptions`; rank 0 =
               full fine-tuning): what is trained, checkpointed and exported
  mesh         device mesh axis sizes {data, fsdp, tensor}; one may be -1 (= the rest)
  distributed  call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is
               set in the environment; JAX_NUM_PROCESSES / JAX_PROCESS_ID are passed on for a
               launch by hand)
  sft | rm | dpo | ppo (+ ptx_data)   the stage's own block, only in configs of that stage
               (`jaxrlhf.options`: SFTOptions, RMOptions for rm and rm_ensemble with the
               rm.center_data data block, DPOOptions, PPOOptions)

Each stage checks its blocks once at start-up (`jaxrlhf.options.parse`): a wrong type or value
is one error naming the field.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import typing

import ml_collections
from ml_collections import config_dict

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.options import (DPOOptions, LoRAOptions, PPOOptions, RMOptions, SFTOptions,
                             TrainOptions, config_block)

STAGES = ("sft", "rm", "ppo", "pipeline", "rm_ensemble", "dpo")
DATA_ROOT_ENV = "JAXRLHF_DATA_ROOT"


def default_data_root() -> str:
    """$JAXRLHF_DATA_ROOT, else <checkout>/../shared/data (the project's shared data)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))


def resolve_data_paths(config, root: str | None = None) -> None:
    """Rewrites, in place, every relative data `path` in `config` (any nested block with
    `path` and `format`) that does not exist from the working directory but does under
    `root` (default `config.data_root`) to the absolute path there."""
    root = root if root is not None else config.get("data_root") or default_data_root()
    for key in list(config.keys()):
        block = config[key]
        if not isinstance(block, ml_collections.ConfigDict):
            continue
        if "path" in block and "format" in block:
            path = block.path
            if (path and path != "synthetic" and not os.path.isabs(path)
                    and not os.path.exists(path)):
                under = os.path.join(root, path)
                if os.path.exists(under) or glob.glob(under):
                    block.path = os.path.abspath(under)
        resolve_data_paths(block, root)


def _model_block() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.preset = "tiny"
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name.startswith("lora_"):   # adapters are the `lora` block's
            continue
        t = hints[f.name]
        base = {int: int, float: float, str: str, bool: bool}.get(t)
        if base is None:  # Optional[...] / tuples: accept any object
            args = [a for a in typing.get_args(t) if a is not type(None)]
            base = args[0] if args and args[0] in (int, float, str, bool) else object
        m[f.name] = config_dict.placeholder(base)
    return m


def model_config_from(block, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a `config.model` block: preset (or `base`) + non-None overrides."""
    from jaxrlhf.models.config import preset
    d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    name = d.pop("preset", "tiny")
    overrides = {k: v for k, v in d.items() if v is not None}
    if base is not None:
        return base.replace(**overrides)
    return preset(name, **overrides)


def base_config(stage: str = "sft") -> ml_collections.ConfigDict:
    from jaxrlhf.data import default_data_config
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.data_root = default_data_root()
    if stage != "ppo":   # PPO starts from ppo.actor_init / reward_init
        c.init_from = ""
    c.tokenizer = "byte"
    c.model = _model_block()

    c.data = default_data_config()
    c.data.format = {"sft": "sft", "rm": "ranking", "rm_ensemble": "ranking",
                     "dpo": "ranking"}.get(stage,
                                                                                "prompt")
    c.eval_data = default_data_config()
    c.eval_data.path = ""
    c.eval_data.format = c.data.format
    c.eval_data.on_bad_row = config_dict.placeholder(str)   # None: data.on_bad_row
    if stage != "ppo":   # PPO's held-out prompts are eval_data's (or the built-in test split)
        c.eval_fraction = 0.05

    c.train = config_block(TrainOptions)
    c.lora = config_block(LoRAOptions)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = False

    # Only the blocks the stage reads.
    if stage == "sft":
        c.sft = config_block(SFTOptions)
    if stage in ("rm", "rm_ensemble"):
        c.rm = config_block(RMOptions)
        c.rm.center_data = default_data_config()   # SFT demonstrations used for centring
        c.rm.center_data.format = "sft"
    if stage == "dpo":
        c.dpo = config_block(DPOOptions)
    if stage == "ppo":
        c.ppo = config_block(PPOOptions)
        c.ptx_data = default_data_config()      # pretraining text for the ptx term (ppo.ptx_coef)
        c.ptx_data.format = "ptx"
    return c


LORA_LR_FACTOR = 10.0
LORA_VARIANT_ALPHA = 32.0


def lora_variant(c, rank) -> None:
    """The `lora=r` variant of the stage configs: adapters of rank r (alpha 32) on every
    projection, and the stage's learning rates (train.lr; ppo.actor_lr / critic_lr) times
    LORA_LR_FACTOR (10): a low-rank update needs a larger step than full fine-tuning for the
    same progress (the usual rule of thumb, a starting point to tune). r = 0: no change."""
    if not int(rank):
        return
    c.lora.rank = int(rank)
    c.lora.alpha = LORA_VARIANT_ALPHA
    c.train.lr = float(c.train.lr) * LORA_LR_FACTOR
    if "ppo" in c:
        c.ppo.actor_lr = float(c.ppo.actor_lr) * LORA_LR_FACTOR
        c.ppo.critic_lr = float(c.ppo.critic_lr) * LORA_LR_FACTOR


def sibling_config(config_file: str, name: str):
    """The module `<dir of config_file>/<name>.py` (a config file composing others, e.g. a
    pipeline from sft.py, rm.py and ppo.py), loaded by path."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_jaxrlhf_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_arg(arg: str | None, **defaults):
    """'a=1,b=x' -> ConfigDict(a=1, b='x') over `defaults` (big_vision's variant syntax)."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for kv in arg.split(","):
        if "=" not in kv:
            raise ValueError(f"Config variant {kv!r} must look like key=value.")
        k, v = kv.split("=", 1)
        if k not in out:
            raise ValueError(f"Unknown config variant key {k!r}; valid keys: {sorted(out)}.")
        cur = out[k]
        if isinstance(cur, bool):
            v = v.lower() in ("1", "true", "yes")
        elif isinstance(cur, int):
            v = int(v)
        elif isinstance(cur, float):
            v = float(v)
        out[k] = v
    return out


def pipeline_config(sft_cfg, rm_cfg, ppo_cfg) -> ml_collections.ConfigDict:
    """Stage `pipeline`: full configs of the three stages under `pipeline.{sft,rm,ppo}`
    (rm_cfg None: SFT -> RL only, the RL stage scored by its `ppo.reward_fns`).

    Top-level seed / mesh / distributed are copied into every stage. Iterated RLHF:
      pipeline.iterations            rounds of (new comparisons -> RM -> PPO); 1 = plain pipeline
      pipeline.comparisons_k         responses sampled per prompt for new comparisons
      pipeline.comparisons_per_round prompts per round (built-in task)
      pipeline.comparisons           user ranking files, one per round after the first
      pipeline.rm_round_steps        RM steps per retraining round
    SFT -> DPO (ppo_cfg a "dpo" stage config, kept as pipeline.dpo), online DPO rounds:
      pipeline.dpo_round_steps       DPO steps per round; pipeline.sample_max_new_tokens /
                                     sample_temperature: how the policy samples
      pipeline.label_rm              a reward model that ranks the samples ("" = the built-in
                                     labeller or pipeline.comparisons)
    Override a stage field with e.g. --config.pipeline.ppo.ppo.kl_coef=0.
    """
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.seed = 0
    c.data_root = default_data_root()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = False
    p = c.pipeline = ml_collections.ConfigDict()
    p.sft = sft_cfg
    if ppo_cfg.stage == "dpo":   # SFT -> DPO: the policy stage is direct preference optimisation
        p.dpo = ppo_cfg
    else:
        p.ppo = ppo_cfg
    if rm_cfg is not None:   # None: the RL stage's reward is Python functions only
        p.rm = rm_cfg
    p.rl_dir = ppo_cfg.stage  # directory name of the policy stage
    p.iterations = 1
    p.comparisons_k = 4
    p.comparisons_per_round = 512
    p.comparisons = ()
    p.rm_round_steps = 100
    if ppo_cfg.stage == "dpo":     # online DPO rounds
        p.dpo_round_steps = 100
        p.sample_max_new_tokens = 16
        p.sample_temperature = 1.0
        p.label_rm = ""              # a reward-model dir ranks the samples (else the built-in
                                     # labeller, or pipeline.comparisons files)
    return c
