"""The base config every `configs/<name>.py` starts from, with every default documented.

    config = base_config("sft")       # an ml_collections.ConfigDict
    config.train.steps = 500

Fields (`--config.<field>=value` overrides any of them from the command line; unknown fields
are an error):

  stage        "sft" | "rm" | "ppo" | "pipeline" | "rm_ensemble" (M reward models in one
               vmapped step + preference strength; `jaxrlhf.trainers.rm_ensemble`)
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
               `dtype` / `param_dtype` / `remat` / `scan_unroll` also apply to a model loaded from init_from
  data         the training data block (`jaxrlhf.data.default_data_config`); `eval_data` the
               held-out block (path "" = hold out `eval_fraction` of the training rows; the
               built-in task's test split takes every processing option of `data`; an unset
               eval_data.on_bad_row follows data.on_bad_row)
  train        optimisation: batch_size (global), steps, grad_accum (micro-batches per step,
               exact: losses are normalised by the whole batch's token/prompt count), lr,
               warmup_steps, min_lr_ratio (cosine floor), weight_decay, b1, b2, eps,
               grad_clip (global norm; 0 = off), log_every, eval_every, eval_at_start
               (evaluate a fresh run before its first step, logged as step 0), eval_batches
               (0 = the whole held-out set), save_every, max_to_keep,
               on_nonfinite ("stop": raise naming the step and batch | "skip": leave the
               state unchanged for that step and count it), max_skipped_fraction (under
               "skip", stop with an error once more than this fraction of the steps, at
               least one, were dropped)
  mesh         device mesh axis sizes {data, fsdp, tensor}; one may be -1 (= the rest)
  distributed  call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is
               set in the environment)
  sft / rm     stage-specific options (see `jaxrlhf.trainers.sft` / `.reward`)
"""
from __future__ import annotations

import dataclasses
import glob
import os
import typing

import ml_collections
from ml_collections import config_dict

from jaxrlhf.models.config import ModelConfig

STAGES = ("sft", "rm", "ppo", "pipeline", "rm_ensemble")
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
    c.init_from = ""
    c.tokenizer = "byte"
    c.model = _model_block()

    c.data = default_data_config()
    c.data.format = {"sft": "sft", "rm": "ranking", "rm_ensemble": "ranking"}.get(stage,
                                                                                "prompt")
    c.eval_data = default_data_config()
    c.eval_data.path = ""
    c.eval_data.format = c.data.format
    c.eval_data.on_bad_row = config_dict.placeholder(str)   # None: data.on_bad_row
    c.eval_fraction = 0.05

    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 32
    t.steps = 1000
    t.grad_accum = 1
    t.lr = 1e-3
    t.warmup_steps = 50
    t.min_lr_ratio = 0.1
    t.weight_decay = 0.01
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.grad_clip = 1.0
    t.log_every = 50
    t.eval_every = 250
    t.eval_at_start = True
    t.eval_batches = 0
    t.save_every = 500
    t.max_to_keep = 2
    t.on_nonfinite = "stop"
    t.max_skipped_fraction = 0.1

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = False

    c.sft = ml_collections.ConfigDict()
    c.sft.export_hf = True

    r = c.rm = ml_collections.ConfigDict()
    r.tie_mode = "skip"          # ties give no pair ("skip") or a 0.5 soft label ("soft")
    r.margin = 0.0               # constant margin m in -log σ(r_w - r_l - m)
    r.label_smoothing = 0.0      # ε in -(1-ε) log σ(Δ) - ε log σ(-Δ)
    r.center_on_sft = True       # set the score bias so SFT demonstrations score 0 on average
    r.center_data = default_data_config()   # SFT demonstrations used for centring
    r.center_data.format = "sft"
    r.center_examples = 512      # at most this many demonstrations are scored for centring
    r.center_loss_coef = 0.0     # c > 0: + c * mean over prompts of (mean reward)^2 in the loss,
                                 # centring that lives in the weights (HF score heads have no
                                 # bias); use it with center_on_sft=False for exact HF scores
    r.export_hf = True
    # MOSS options (jaxrlhf.trainers.reward / rm_ensemble). Defaults: all off.
    r.ensemble_size = 4          # rm_ensemble stage: M members (seeds and data orders seed + m)
    r.strength_file = ""         # strength.jsonl (rm_ensemble output): per-pair mean mu / std
    r.flip_fraction = 0.0        # reverse the labels of this fraction of lowest-mu pairs
    r.soft_labels = False        # target P(chosen > rejected) = sigmoid(mu / soft_label_temperature)
    r.soft_label_temperature = 1.0
    r.adaptive_margin = 0.0      # alpha > 0: margin += clip(alpha * mu, +-adaptive_margin_max)
    r.adaptive_margin_max = 5.0
    r.contrastive_coef = 0.0     # + coef * SimCSE InfoNCE on pair differences of hidden states
    r.contrastive_temperature = 0.05
    r.contrastive_dropout = 0.1  # feature dropout that makes the two SimCSE views
    r.meta_rm = False            # MetaRM: ascent on the difference loss of policy samples first
    r.meta_data = ""             # file of {prompt, responses: [...]} policy samples, or
    r.meta_actor = ""            # a stage/HF dir to sample rm.meta_k responses per prompt from
    r.meta_num_prompts = 256     # prompts sampled from meta_actor
    r.meta_k = 2
    r.meta_max_new_tokens = 16
    r.meta_temperature = 1.0
    r.meta_batch_size = 16       # meta rows per step
    r.meta_lr = 0.01             # eta of the inner ascent step theta' = theta + eta grad J
    r.meta_first_order = False   # drop the second-order term of the MetaRM gradient

    c.ppo = ppo_block()
    c.ptx_data = default_data_config()      # pretraining text for the ptx term (ppo.ptx_coef)
    c.ptx_data.format = "ptx"
    return c


def ppo_block() -> ml_collections.ConfigDict:
    """PPO-ptx options; every default documented here."""
    p = ml_collections.ConfigDict()
    p.actor_init = ""          # SFT stage dir or HF dir: actor and frozen reference
    p.reward_init = ""         # RM stage dir or HF dir (score head): frozen reward model
    p.reward_ensemble = ""     # an rm_ensemble stage dir; score = mean - coef * std
    p.uncertainty_coef = 0.0   # lambda of the ensemble score (0 = the ensemble mean)
    p.critic_init = ""         # "" = reward_init (InstructGPT: critic starts from the RM)
    p.ref_init = ""            # "" = actor_init; iterated RLHF keeps the SFT model as reference
    p.critic = "separate"      # "separate" model, or "shared": value head on the actor's trunk
    p.iterations = 100         # PPO iterations (rollout + updates)
    p.rollout_batch = 32       # prompts per iteration (global)
    p.minibatch_size = 16      # rollouts per update (global); rollout_batch % minibatch_size == 0
    p.ppo_epochs = 2           # passes over each rollout batch
    p.grad_accum = 1           # micro-batches per update (exact)
    p.fused_first_update = True  # with one minibatch (minibatch_size == rollout_batch) and
                               # grad_accum 1: the scoring pass's actor/critic forwards are
                               # reused by the first update (two forwards fewer; same math)
    p.max_new_tokens = 16
    p.temperature = 1.0        # sampling distribution of the rollout AND of pi_old / pi_theta
    p.top_k = 0
    p.top_p = 1.0
    p.kl_coef = 0.05           # beta (initial beta for the adaptive controller)
    p.kl_estimator = "k1"      # "k1" | "k2" | "k3" per-token KL in the reward
    p.kl_controller = "fixed"  # "fixed" | "adaptive" (Ziegler et al. 2019)
    p.kl_target = 6.0          # adaptive: target KL per sequence (nats)
    p.kl_horizon = 10000       # adaptive: horizon in samples
    p.gamma = 1.0
    p.lam = 0.95
    p.clip_eps = 0.2
    p.dual_clip = 0.0          # 0 = off; else the dual-clip constant c > 1 (Ye et al. 2020)
    p.vf_clip_eps = 0.2
    p.vf_coef = 0.5
    p.entropy_coef = 0.0       # entropy bonus
    p.ptx_coef = 0.0           # gamma_ptx; 0 = plain PPO
    p.ptx_batch_size = 16
    p.loss_agg = "token_mean"  # "token_mean" | "seq_mean" | "seq_sum"
    p.whiten_advantages = True
    p.reward_clip = 0.0        # 0 = off; else clip the score to +-reward_clip
    p.reward_norm = "none"     # "none" | "running": divide scores by the running std (and
                               # subtract the running mean) of all scores seen so far
    p.missing_eos_penalty = 1.0  # subtracted from the score of a response without EOS
    p.actor_lr = 1e-4
    p.critic_lr = 1e-4
    p.warmup_iterations = 0
    p.sample_every = 10        # print / write sample generations every n iterations
    p.gold_reward = True       # built-in task: log the gold reward of every rollout
    p.eval_prompts = 256       # held-out prompts scored before PPO (the SFT policy), every
                               # train.eval_every iterations, and at the end (the first
                               # eval_prompts of eval_data, rounded up to whole rollout batches)
    return p


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
    """Stage `pipeline`: full configs of the three stages under `pipeline.{sft,rm,ppo}`.

    Top-level seed / mesh / distributed are copied into every stage. Iterated RLHF:
      pipeline.iterations            rounds of (new comparisons -> RM -> PPO); 1 = plain pipeline
      pipeline.comparisons_k         responses sampled per prompt for new comparisons
      pipeline.comparisons_per_round prompts per round (built-in task)
      pipeline.comparisons           user ranking files, one per round after the first
      pipeline.rm_round_steps        RM steps per retraining round
    Override a stage field with e.g. --config.pipeline.ppo.ppo.kl_coef=0.
    """
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.seed = 0
    c.data_root = default_data_root()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = False
    p = c.pipeline = ml_collections.ConfigDict()
    p.sft, p.rm, p.ppo = sft_cfg, rm_cfg, ppo_cfg
    p.iterations = 1
    p.comparisons_k = 4
    p.comparisons_per_round = 512
    p.comparisons = ()
    p.rm_round_steps = 100
    return c
