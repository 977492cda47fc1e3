"""Pure RLHF math: every function is jit/vmap/sharding friendly and side-effect free.

  stats.py          token_logprobs, entropy, masked_mean / masked_var / masked_whiten
  ranking.py        pairwise / K-wise ranking losses (+ MOSS options),
                    contrastive_loss, pair_contrastive_loss
  dpo.py            DPO family on pairs and rankings: preference_loss (sigmoid / cDPO, robust,
                    IPO, SimPO over all ranked pairs), plackett_luce_loss (K-wise DPO)
  preference_strength.py  ensemble strength statistics (μ, σ) and per-pair labels (MOSS)
  metarm.py         MetaRM difference loss and the adapted parameters θ' (MOSS)
  uncertainty.py    uncertainty-aware ensemble reward mean − λ·std (MOSS)
  kl.py             kl_estimate (k1/k2/k3), kl_penalized_rewards
  advantages.py     gae (reverse lax.scan), monte_carlo_advantages
  critic_free.py    outcome advantages: grpo, dr_grpo, rloo, reinforce_pp(_baseline);
                    group statistics, uniform_groups (dynamic sampling), overlong_penalty
  aggregation.py    token_mean / seq_mean / seq_sum loss aggregation (micro-batch invariant)
  ppo.py            ppo_policy_loss, value_loss, ptx_loss, ppo_ptx_objective
  controllers.py    fixed / adaptive KL controllers (pytree state + pure update)
  normalization.py  RunningMoments (Chan merge), reward_bias
  registry.py       name -> function for "advantage", "outcome_advantage", "kl", "loss_agg"
"""
from jaxrlhf.objectives import registry
from jaxrlhf.objectives.advantages import gae, monte_carlo_advantages
from jaxrlhf.objectives.aggregation import (DEFAULT_LOSS_AGG, aggregate, aggregation_denominators,
                                            seq_mean, seq_sum, seq_sum_norm, token_mean)
from jaxrlhf.objectives.critic_free import (GROUP_ESTIMATORS, dr_grpo_advantages, group_mean,
                                            group_std, grpo_advantages, overlong_penalty,
                                            reinforce_pp_advantages,
                                            reinforce_pp_baseline_advantages, rloo_advantages,
                                            uniform_groups)
from jaxrlhf.objectives.controllers import (AdaptiveKLController, FixedKLController,
                                            KLControllerState, init_adaptive_kl_controller,
                                            init_fixed_kl_controller, kl_controller_init,
                                            kl_controller_update)
from jaxrlhf.objectives.dpo import (DPO_LOSSES, RANKING_LOSSES, plackett_luce_loss,
                                    preference_loss, ranking_ends)
from jaxrlhf.objectives.kl import (LOG_RATIO_CLAMP, clamped_log_ratio, kl_estimate, kl_k1, kl_k2,
                                   kl_k3, kl_penalized_rewards, last_token_index)
from jaxrlhf.objectives.normalization import (RunningMoments, normalize_with_moments,
                                              reward_bias, running_moments_init,
                                              running_moments_merge, running_moments_std,
                                              running_moments_update)
from jaxrlhf.objectives.ppo import ppo_policy_loss, ppo_ptx_objective, ptx_loss, value_loss
from jaxrlhf.objectives.metarm import adapted_params, difference_loss
from jaxrlhf.objectives.preference_strength import pair_labels, strength_stats
from jaxrlhf.objectives.ranking import (contrastive_loss, kwise_ranking_loss,
                                        pair_contrastive_loss, pairwise_ranking_loss)
from jaxrlhf.objectives.uncertainty import uncertainty_reward
from jaxrlhf.objectives.registry import get, names, register
from jaxrlhf.objectives.stats import (entropy, masked_count, masked_mean, masked_sum, masked_var,
                                      masked_whiten, token_logprobs)

__all__ = [
    "adapted_params", "AdaptiveKLController", "aggregate", "aggregation_denominators",
    "clamped_log_ratio", "contrastive_loss", "DEFAULT_LOSS_AGG", "difference_loss",
    "dr_grpo_advantages", "DPO_LOSSES", "entropy", "GROUP_ESTIMATORS", "group_mean", "group_std",
    "grpo_advantages", "overlong_penalty", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "rloo_advantages", "uniform_groups",
    "FixedKLController", "gae", "get", "init_adaptive_kl_controller",
    "init_fixed_kl_controller", "kl_controller_init", "kl_controller_update", "kl_estimate",
    "kl_k1", "kl_k2", "kl_k3", "kl_penalized_rewards", "KLControllerState",
    "kwise_ranking_loss", "last_token_index", "LOG_RATIO_CLAMP", "masked_count", "masked_mean",
    "masked_sum", "masked_var", "masked_whiten", "monte_carlo_advantages", "names",
    "normalize_with_moments", "pair_contrastive_loss", "pair_labels", "pairwise_ranking_loss",
    "plackett_luce_loss", "preference_loss", "RANKING_LOSSES", "ranking_ends",
    "ppo_policy_loss", "ppo_ptx_objective", "ptx_loss", "register", "registry", "reward_bias",
    "running_moments_init", "running_moments_merge", "running_moments_std",
    "running_moments_update", "RunningMoments", "seq_mean", "seq_sum", "seq_sum_norm", "strength_stats",
    "token_logprobs", "token_mean", "uncertainty_reward", "value_loss",
]
