"""Typed options of each config block a stage reads: frozen dataclasses holding every default
once, checked once with errors that name the field.

    c.ppo = config_block(PPOOptions)          # a ConfigDict of the defaults (configs/, CLI)
    opts = parse(PPOOptions, config.ppo, "ppo")   # the stage: types and values checked

`parse` rejects unknown fields, converts ints given for float fields, checks every type, then
runs the class's `check()`; each error is one `ValueError` naming `<block>.<field>`. Blocks:
`train` (every stage), `lora` (every stage), `sft`, `rm` (the rm and rm_ensemble stages), `dpo`, `ppo`.
"""
from __future__ import annotations

import dataclasses
import math
import typing

SKIP = ("center_data",)   # nested data blocks inside an options block (read as data configs)


def _fail(block: str, field: str, message: str):
    raise ValueError(f"{block}.{field} {message}")


def _type_of(cls, name: str):
    return typing.get_type_hints(cls)[name]


def config_block(cls):
    """The defaults of `cls` as an `ml_collections.ConfigDict` (a config block)."""
    import ml_collections
    from ml_collections import config_dict

    block = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        t = _type_of(cls, f.name)
        if f.default is None:
            base = next((a for a in typing.get_args(t) if a is not type(None)), object)
            block[f.name] = config_dict.placeholder(base)
        else:
            block[f.name] = f.default
    return block


def parse(cls, block, name: str):
    """`cls` from a config block (ConfigDict or mapping): unknown fields, types and values
    checked; ValueError names `<name>.<field>`."""
    given = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    for k in SKIP:
        given.pop(k, None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        _fail(name, unknown[0], f"is not an option (valid: {', '.join(sorted(fields))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        v, t = given[f.name], _type_of(cls, f.name)
        optional = type(None) in typing.get_args(t)
        base = next((a for a in typing.get_args(t) if a is not type(None)), t)
        if v is None and optional:
            values[f.name] = None
            continue
        if base is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if base is tuple and isinstance(v, list):
            v = tuple(v)
        ok = isinstance(v, base) and not (base is int and isinstance(v, bool))
        if not ok:
            _fail(name, f.name, f"must be {base.__name__}, got {v!r}")
        values[f.name] = v
    opts = cls(**values)
    opts.check(name)
    return opts


def _one_of(block, field, value, choices):
    if value not in choices:
        _fail(block, field, f"must be one of {tuple(choices)}, got {value!r}")


def _at_least(block, field, value, low):
    if value < low:
        _fail(block, field, f"must be >= {low}, got {value!r}")


def _in_range(block, field, value, low, high):
    if not (low <= value <= high and math.isfinite(value)):
        _fail(block, field, f"must be in [{low}, {high}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Optimisation and the loop (`config.train`)."""

    batch_size: int = 32          # global batch (sequences, or prompts for ranking data)
    steps: int = 1000
    grad_accum: int = 1           # micro-batches per step (exact: losses are normalised by the
                                  # whole batch's token / prompt count)
    lr: float = 1e-3
    warmup_steps: int = 50        # linear warmup, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01    # AdamW; norm scales, biases and other 1-D params get none
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0        # global-norm clipping; 0 = off
    log_every: int = 50
    eval_every: int = 250         # 0 = evaluate at the start and the end only
    eval_at_start: bool = True    # evaluate a fresh run before its first step (eval step 0)
    eval_batches: int = 0         # 0 = the whole held-out set
    save_every: int = 500
    max_to_keep: int = 2
    on_nonfinite: str = "stop"    # "stop": raise naming the step and batch; "skip": leave the
                                  # state unchanged for that step and count it
    max_skipped_fraction: float = 0.1   # under "skip": stop (no export) once more than this
                                        # fraction of the steps (at least one) were dropped

    def check(self, b: str) -> None:
        _at_least(b, "batch_size", self.batch_size, 1)
        _at_least(b, "steps", self.steps, 0)
        _at_least(b, "grad_accum", self.grad_accum, 1)
        if self.batch_size % self.grad_accum:
            _fail(b, "grad_accum", f"({self.grad_accum}) must divide train.batch_size "
                                   f"({self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            _fail(b, "lr", f"must be a positive number, got {self.lr!r}")
        _at_least(b, "warmup_steps", self.warmup_steps, 0)
        _in_range(b, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _at_least(b, "grad_clip", self.grad_clip, 0.0)
        _at_least(b, "max_to_keep", self.max_to_keep, 1)
        for name in ("log_every", "eval_every", "eval_batches", "save_every"):
            _at_least(b, name, getattr(self, name), 0)
        _one_of(b, "on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _in_range(b, "max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    """Low-rank adapters on a frozen base model (`config.lora`, every stage but rm_ensemble;
    `jaxrlhf.models.lora`). rank 0 and no adapter = full fine-tuning."""

    rank: int = 0                 # r of every adapter; 0 = off
    alpha: float = 16.0           # the adapter output is scaled by alpha / r
    targets: str = "all"          # comma-separated projections (q,k,v,o,gate,up,down; fc,proj
                                  # for GPT-2) or "all"
    base_dtype: str = ""          # "" keeps the loaded dtype; "bfloat16" stores the frozen base
                                  # in bf16 (half its memory; compute stays in model.dtype)
    adapter: str = ""             # a PEFT adapter directory to continue training from (its
                                  # r, alpha and targets replace the three above)
    export_adapter: bool = True   # besides the merged hf/ export, write <stage_dir>/adapter in
                                  # PEFT's format (llama / qwen2 families)

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or bool(self.adapter)

    def target_list(self) -> tuple:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def check(self, b: str) -> None:
        _at_least(b, "rank", self.rank, 0)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            _fail(b, "alpha", f"must be > 0, got {self.alpha!r}")
        _one_of(b, "base_dtype", self.base_dtype, ("", "float32", "bfloat16"))
        from jaxrlhf.models.config import LORA_TARGETS
        names = self.target_list()
        bad = [t for t in names if t != "all" and t not in LORA_TARGETS]
        if bad or not names or ("all" in names and len(names) > 1):
            _fail(b, "targets", f"must be 'all' or a comma-separated subset of "
                                f"{tuple(LORA_TARGETS)}, got {self.targets!r}")


@dataclasses.dataclass(frozen=True)
class SFTOptions:
    """The sft stage (`config.sft`)."""

    export_hf: bool = True        # write the model to <stage_dir>/hf

    def check(self, b: str) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class RMOptions:
    """The rm and rm_ensemble stages (`config.rm`); the MOSS options are all off by default
    (see `jaxrlhf.trainers.reward`). `rm.center_data` is a data block (SFT demonstrations)."""

    tie_mode: str = "skip"        # ties give no pair ("skip") or a 0.5 soft label ("soft")
    margin: float = 0.0           # constant margin m in -log σ(r_w - r_l - m)
    label_smoothing: float = 0.0  # ε in -(1-ε) log σ(Δ) - ε log σ(-Δ)
    center_on_sft: bool = True    # shift the score bias so center_data scores 0 on average
    center_examples: int = 512    # at most this many demonstrations are scored for centring
    center_loss_coef: float = 0.0  # c > 0: + c * mean over prompts of (mean reward)^2: centring
                                   # in the weights (HF score heads have no bias); use it with
                                   # center_on_sft=False for exact HF scores
    export_hf: bool = True
    ensemble_size: int = 4        # rm_ensemble: M members (seeds and data orders seed + m)
    strength_file: str = ""       # strength.jsonl (rm_ensemble output): per-pair mu / sigma
    flip_fraction: float = 0.0    # reverse the labels of this fraction of lowest-mu pairs
    soft_labels: bool = False     # target P(chosen > rejected) = σ(mu / soft_label_temperature)
    soft_label_temperature: float = 1.0
    adaptive_margin: float = 0.0  # alpha > 0: margin += clip(alpha * mu, +-adaptive_margin_max)
    adaptive_margin_max: float = 5.0
    contrastive_coef: float = 0.0  # + coef * SimCSE InfoNCE on pair differences of hidden states
    contrastive_temperature: float = 0.05
    contrastive_dropout: float = 0.1  # feature dropout that makes the two SimCSE views
    meta_rm: bool = False         # MetaRM: ascent on the difference loss of policy samples first
    meta_data: str = ""           # file of {prompt, responses: [...]} policy samples, or
    meta_actor: str = ""          # a stage/HF dir to sample meta_k responses per prompt from
    meta_num_prompts: int = 256   # prompts sampled from meta_actor
    meta_k: int = 2
    meta_max_new_tokens: int = 16
    meta_temperature: float = 1.0
    meta_batch_size: int = 16     # meta rows per step
    meta_lr: float = 0.01         # eta of the inner ascent step theta' = theta + eta grad J
    meta_first_order: bool = False  # drop the second-order term of the MetaRM gradient

    def check(self, b: str) -> None:
        _one_of(b, "tie_mode", self.tie_mode, ("skip", "soft"))
        _in_range(b, "label_smoothing", self.label_smoothing, 0.0, 1.0)
        _at_least(b, "center_examples", self.center_examples, 1)
        _at_least(b, "ensemble_size", self.ensemble_size, 1)
        _in_range(b, "flip_fraction", self.flip_fraction, 0.0, 1.0)
        for name in ("soft_label_temperature", "contrastive_temperature", "meta_temperature"):
            if not getattr(self, name) > 0:
                _fail(b, name, f"must be > 0, got {getattr(self, name)!r}")
        _in_range(b, "contrastive_dropout", self.contrastive_dropout, 0.0, 0.99)
        _at_least(b, "meta_k", self.meta_k, 2)
        for name in ("meta_num_prompts", "meta_max_new_tokens", "meta_batch_size"):
            _at_least(b, name, getattr(self, name), 1)
        needs_strength = self.flip_fraction or self.soft_labels or self.adaptive_margin
        if needs_strength and not self.strength_file:
            _fail(b, "strength_file", "is needed by rm.flip_fraction / rm.soft_labels / "
                                      "rm.adaptive_margin (strength.jsonl of an rm_ensemble "
                                      "stage)")
        if self.meta_rm and not (self.meta_data or self.meta_actor):
            _fail(b, "meta_rm", "needs rm.meta_data (a file of {prompt, responses}) or "
                                "rm.meta_actor (a stage dir to sample responses from)")

    @property
    def moss(self) -> bool:
        """Any MOSS option on."""
        return bool(self.strength_file or self.contrastive_coef or self.meta_rm
                    or self.flip_fraction or self.soft_labels or self.adaptive_margin)


@dataclasses.dataclass(frozen=True)
class DPOOptions:
    """Direct preference optimisation (`config.dpo`; `jaxrlhf.trainers.dpo`). The policy starts
    from `init_from`; the MOSS fields mean what they mean in `config.rm`."""

    loss: str = "sigmoid"         # "sigmoid" (DPO; cDPO with label_smoothing), "robust",
                                  # "ipo", "simpo" (reference-free, length-normalised)
    ranking: str = "pairs"        # K-wise data: all ranked pairs ("pairs") or the whole
                                  # ranking's Plackett-Luce likelihood ("plackett_luce")
    beta: float = 0.1             # implicit reward beta * log(pi / pi_ref) (SimPO: beta * mean)
    label_smoothing: float = 0.0  # epsilon: cDPO / robust DPO's assumed flip rate / IPO soft label
    margin: float = 0.0           # m in z = beta * (s_w - s_l) - m
    simpo_gamma: float = 0.5      # SimPO's target reward margin gamma
    tie_mode: str = "skip"        # ties give nothing ("skip") or a target of 1/2 ("soft")
    ref_init: str = ""            # "" = init_from (the model the policy starts from)
    ref_logps: str = "cached"     # reference log-probs computed once per visited row before
                                  # training, kept in the stage dir ("cached"), or in every
                                  # step ("step")
    export_hf: bool = True
    strength_file: str = ""       # strength.jsonl of an rm_ensemble stage on the same data
    flip_fraction: float = 0.0
    soft_labels: bool = False
    soft_label_temperature: float = 1.0
    adaptive_margin: float = 0.0
    adaptive_margin_max: float = 5.0

    def check(self, b: str) -> None:
        _one_of(b, "loss", self.loss, ("sigmoid", "robust", "ipo", "simpo"))
        _one_of(b, "ranking", self.ranking, ("pairs", "plackett_luce"))
        _one_of(b, "tie_mode", self.tie_mode, ("skip", "soft"))
        _one_of(b, "ref_logps", self.ref_logps, ("cached", "step"))
        if not (self.beta > 0 and math.isfinite(self.beta)):
            _fail(b, "beta", f"must be > 0, got {self.beta!r}")
        high = 0.49 if self.loss == "robust" else 1.0
        _in_range(b, "label_smoothing", self.label_smoothing, 0.0, high)
        _in_range(b, "flip_fraction", self.flip_fraction, 0.0, 1.0)
        if not self.soft_label_temperature > 0:
            _fail(b, "soft_label_temperature", f"must be > 0, got {self.soft_label_temperature!r}")
        if self.ranking == "plackett_luce":
            if self.loss not in ("sigmoid", "simpo"):
                _fail(b, "ranking", f"'plackett_luce' is the sigmoid (or simpo) likelihood of a "
                                    f"ranking; it does not combine with dpo.loss={self.loss!r}")
            for name in ("label_smoothing", "margin", "strength_file"):
                if getattr(self, name):
                    _fail(b, name, "applies to pairs; set dpo.ranking='pairs' to use it")
            if self.loss == "simpo" and self.simpo_gamma:
                _fail(b, "simpo_gamma", "applies to pairs; set it to 0 with "
                                        "dpo.ranking='plackett_luce'")
        needs_strength = self.flip_fraction or self.soft_labels or self.adaptive_margin
        if needs_strength and not self.strength_file:
            _fail(b, "strength_file", "is needed by dpo.flip_fraction / dpo.soft_labels / "
                                      "dpo.adaptive_margin (strength.jsonl of an rm_ensemble "
                                      "stage)")

    @property
    def reference_free(self) -> bool:
        return self.loss == "simpo"


@dataclasses.dataclass(frozen=True)
class PPOOptions:
    """PPO-ptx (`config.ppo`)."""

    actor_init: str = ""          # SFT stage dir or HF dir: actor and frozen reference
    reward_init: str = ""         # RM stage dir or HF dir (score head): frozen reward model
    reward_ensemble: str = ""     # an rm_ensemble stage dir; score = mean - coef * std
    uncertainty_coef: float = 0.0  # lambda of the ensemble score (0 = the ensemble mean)
    critic_init: str = ""         # "" = reward_init (InstructGPT: critic starts from the RM)
    ref_init: str = ""            # "" = actor_init; iterated RLHF keeps the SFT model as reference
    critic: str = "auto"          # "separate" model, "shared" (a value head on the actor's
                                  # trunk), "none" (critic-free estimators); "auto": "separate"
                                  # for gae / monte_carlo, "none" for the critic-free ones
    iterations: int = 100         # PPO iterations (rollout + updates)
    rollout_batch: int = 32       # prompts per iteration (global)
    samples_per_prompt: int = 1   # K responses per prompt (rows = rollout_batch * K, prompt-
                                  # major; the prompt's prefill is shared by its K samples)
    minibatch_size: int = 16      # rollouts (rows) per update (global); divides
                                  # rollout_batch * samples_per_prompt
    ppo_epochs: int = 2           # passes over each rollout batch
    grad_accum: int = 1           # micro-batches per update (exact)
    fused_first_update: bool = True  # with one minibatch (minibatch_size == rollout_batch)
                                  # and grad_accum 1: the scoring pass's actor/critic forwards
                                  # are reused by the first update (two forwards fewer; same math)
    share_prompt_forward: bool = True  # fused first update with samples_per_prompt K > 1: the
                                  # actor's and reference's forwards run each prompt once for
                                  # its K samples (same math; ~29% less work at K 8, prompt 64,
                                  # 128 new tokens)
    max_new_tokens: int = 16
    temperature: float = 1.0      # sampling distribution of the rollout AND of pi_old / pi_theta
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.05         # beta (initial beta for the adaptive controller)
    kl_estimator: str = "k1"      # "k1" | "k2" | "k3" per-token KL in the reward
    kl_loss_coef: float = 0.0     # KL(pi || pi_ref) in the loss instead (GRPO: 0.04), weight
    kl_loss_estimator: str = "k3"  # its per-token estimator, aggregated like the policy loss
    kl_controller: str = "fixed"  # "fixed" | "adaptive" (Ziegler et al. 2019)
    kl_target: float = 6.0        # adaptive: target KL per sequence (nats)
    kl_horizon: float = 10000.0   # adaptive: horizon in samples
    advantage_estimator: str = "gae"  # with a critic: "gae" | "monte_carlo" (GAE, lambda = 1);
                                  # critic-free (one score per response): "grpo" | "dr_grpo" |
                                  # "rloo" | "reinforce_pp" | "reinforce_pp_baseline"
    advantage_eps: float = 1e-6   # epsilon of the grpo / reinforce_pp std division
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0    # 0 = clip_eps; else the upper clip 1 + clip_eps_high (DAPO)
    dual_clip: float = 0.0        # 0 = off; else the dual-clip constant c > 1 (Ye et al. 2020)
    vf_clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0     # entropy bonus
    ptx_coef: float = 0.0         # gamma_ptx; 0 = plain PPO
    ptx_batch_size: int = 16
    loss_agg: str = "token_mean"  # "token_mean" | "seq_mean" | "seq_sum"
    whiten_advantages: bool = True
    reward_clip: float = 0.0      # 0 = off; else clip the score to +-reward_clip
    reward_norm: str = "none"     # "none" | "running": divide scores by the running std (and
                                  # subtract the running mean) of all scores seen so far
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without EOS
    overlong_buffer: int = 0      # > 0: DAPO's soft overlong penalty over the last
                                  # overlong_buffer tokens before max_new_tokens
    overlong_penalty: float = 1.0  # its maximum (reached at max_new_tokens)
    filter_uniform_groups: bool = False  # DAPO dynamic sampling, masked: groups whose K scores
                                  # are equal are left out of the loss (shapes stay static)
    reward_fns: str = ""          # Python rewards "pkg.module:function[*weight]", comma-separated;
                                  # fn(prompts, responses, metadata) -> one score per response
    reward_model_coef: float = 1.0  # weight of the reward model's score when reward_fns are set
    reward_fn_errors: str = "raise"  # a reward function that raises or returns a non-finite
                                  # score: "raise" (stop, naming the row) or "penalty" (score
                                  # the row reward_fn_penalty; counted and logged)
    reward_fn_penalty: float = -1.0
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    warmup_iterations: int = 0
    sample_every: int = 10        # print / write sample generations every n iterations
    gold_reward: bool = True      # built-in task: log the gold reward of every rollout
    eval_batch: int = 64          # held-out prompts per generate call (at most eval_prompts):
                                  # fixed, so runs with different rollout batches evaluate on
                                  # the same samples
    eval_greedy: bool = False     # held-out evaluation decodes greedily (accuracy) instead
                                  # of sampling from the training distribution
    eval_prompts: int = 256       # held-out prompts scored before PPO (the SFT policy), every
                                  # train.eval_every iterations, and at the end (the first
                                  # eval_prompts of eval_data, rounded up to whole eval batches)

    @property
    def rows(self) -> int:
        """Rollout rows per iteration: rollout_batch prompts x samples_per_prompt."""
        return self.rollout_batch * self.samples_per_prompt

    @property
    def critic_free(self) -> bool:
        from jaxrlhf.objectives import registry
        return self.advantage_estimator in registry.names("outcome_advantage")

    @property
    def critic_kind(self) -> str:
        """"separate" | "shared" | "none", with "auto" resolved by the estimator."""
        if self.critic != "auto":
            return self.critic
        return "none" if self.critic_free else "separate"

    def check(self, b: str) -> None:
        from jaxrlhf.objectives import registry
        _one_of(b, "critic", self.critic, ("auto", "separate", "shared", "none"))
        _one_of(b, "reward_fn_errors", self.reward_fn_errors, ("raise", "penalty"))
        _one_of(b, "kl_loss_estimator", self.kl_loss_estimator, registry.names("kl"))
        _one_of(b, "reward_norm", self.reward_norm, ("none", "running"))
        _one_of(b, "kl_controller", self.kl_controller, ("fixed", "adaptive"))
        _one_of(b, "kl_estimator", self.kl_estimator, registry.names("kl"))
        _one_of(b, "loss_agg", self.loss_agg, registry.names("loss_agg"))
        _one_of(b, "advantage_estimator", self.advantage_estimator,
                registry.names("advantage") + registry.names("outcome_advantage"))
        if self.critic_free and self.critic not in ("auto", "none"):
            _fail(b, "critic", f"must be 'auto' or 'none' with the critic-free estimator "
                               f"{self.advantage_estimator!r}, got {self.critic!r}")
        if not self.critic_free and self.critic == "none":
            _fail(b, "critic", f"'none' needs a critic-free advantage_estimator, got "
                               f"{self.advantage_estimator!r}")
        from jaxrlhf.objectives import GROUP_ESTIMATORS
        if self.advantage_estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            _fail(b, "samples_per_prompt", f"must be >= 2 for {self.advantage_estimator!r} "
                                           f"(it compares the samples of a prompt), got "
                                           f"{self.samples_per_prompt}")
        if self.filter_uniform_groups and self.samples_per_prompt < 2:
            _fail(b, "filter_uniform_groups", "needs samples_per_prompt >= 2")
        for name in ("clip_eps_high", "kl_loss_coef", "overlong_penalty", "reward_model_coef",
                     "advantage_eps"):
            if getattr(self, name) < 0:
                _fail(b, name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.overlong_buffer < 0 or self.overlong_buffer > self.max_new_tokens:
            _fail(b, "overlong_buffer", f"must be in [0, max_new_tokens={self.max_new_tokens}],"
                                        f" got {self.overlong_buffer}")
        if self.reward_fns:
            from jaxrlhf.rewards import parse_reward_fns
            try:
                parse_reward_fns(self.reward_fns, load=False)
            except ValueError as e:
                _fail(b, "reward_fns", str(e))
        for name in ("iterations", "warmup_iterations", "top_k", "sample_every",
                     "eval_prompts"):
            _at_least(b, name, getattr(self, name), 0)
        for name in ("rollout_batch", "minibatch_size", "ppo_epochs", "grad_accum",
                     "max_new_tokens", "ptx_batch_size", "samples_per_prompt", "eval_batch"):
            _at_least(b, name, getattr(self, name), 1)
        if self.rows % self.minibatch_size:
            _fail(b, "minibatch_size", f"({self.minibatch_size}) must divide the rollout rows "
                                       f"ppo.rollout_batch * ppo.samples_per_prompt "
                                       f"({self.rows})")
        if not self.temperature > 0:
            _fail(b, "temperature", f"must be > 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            _fail(b, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.dual_clip and self.dual_clip <= 1.0:
            _fail(b, "dual_clip", f"must be 0 (off) or > 1, got {self.dual_clip!r}")
        for name in ("actor_lr", "critic_lr"):
            if not getattr(self, name) > 0:
                _fail(b, name, f"must be > 0, got {getattr(self, name)!r}")
        _in_range(b, "gamma", self.gamma, 0.0, 1.0)
        _in_range(b, "lam", self.lam, 0.0, 1.0)
        if self.reward_ensemble and self.uncertainty_coef < 0:
            _fail(b, "uncertainty_coef", f"must be >= 0, got {self.uncertainty_coef!r}")


# ------------------------------------------------------------------------------------------
# Named algorithms: each paper's choice of the orthogonal `ppo.*` options above. Apply one with
# `apply_algorithm(config.ppo, name)` and override fields after it; the fields stay the truth
# (the stage never reads the name).

ALGORITHMS = {
    # Critic + GAE (a value head on the actor's trunk: no reward model or critic checkpoint).
    "ppo": dict(advantage_estimator="gae", critic="shared", loss_agg="token_mean",
                kl_coef=0.05, kl_loss_coef=0.0, whiten_advantages=True),
    # Shao et al. 2024: group-normalised advantages, per-sequence mean loss, k3 KL in the loss.
    "grpo": dict(advantage_estimator="grpo", critic="none", loss_agg="seq_mean",
                 kl_coef=0.0, kl_loss_coef=0.04, kl_loss_estimator="k3"),
    # Liu et al. 2025: no std division, no length normalisation, no KL.
    "dr_grpo": dict(advantage_estimator="dr_grpo", critic="none", loss_agg="seq_sum_norm",
                    kl_coef=0.0, kl_loss_coef=0.0),
    # Yu et al. 2025: token-level loss, clip-higher, dynamic sampling (masked), overlong
    # shaping (set ppo.overlong_buffer for the response length), no KL.
    "dapo": dict(advantage_estimator="grpo", critic="none", loss_agg="token_mean",
                 clip_eps=0.2, clip_eps_high=0.28, filter_uniform_groups=True,
                 kl_coef=0.0, kl_loss_coef=0.0),
    # Ahmadian et al. 2024: leave-one-out baseline, KL in the reward.
    "rloo": dict(advantage_estimator="rloo", critic="none", loss_agg="token_mean",
                 kl_coef=0.05, kl_estimator="k1", kl_loss_coef=0.0),
    # Hu 2025: per-token KL in the reward, advantages normalised over the batch.
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", critic="none",
                         loss_agg="token_mean", kl_coef=0.05, kl_estimator="k1",
                         kl_loss_coef=0.0),
    "reinforce_pp_baseline": dict(advantage_estimator="reinforce_pp_baseline", critic="none",
                                  loss_agg="token_mean", kl_coef=0.05, kl_estimator="k1",
                                  kl_loss_coef=0.0),
}


def apply_algorithm(ppo_block, name: str) -> None:
    """Sets the `ppo.*` fields of a named algorithm (see ALGORITHMS) on a config block."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(ALGORITHMS))}")
    for k, v in ALGORITHMS[name].items():
        ppo_block[k] = v
