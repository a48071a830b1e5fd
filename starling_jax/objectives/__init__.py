"""Training objectives as pure, jittable array functions (no models, no data, no I/O); float32 math.

Shapes: B batch, K responses per prompt, T tokens, V vocab. Masks select valid entries; means are over valid entries.
Scalar losses: sft_loss, plackett_luce_loss, bradley_terry_loss. (loss, metrics) pairs: dpo_loss, apa_loss,
ppo_policy_loss, value_loss.
"""

from starling_jax.objectives.common import masked_mean, masked_sum, masked_var, masked_whiten
from starling_jax.objectives.dpo import dpo_loss, sequence_logps
from starling_jax.objectives.kl import (
    adaptive_kl_coef, fixed_kl_coef, kl_k1, kl_k3, running_moments_init, running_moments_update, running_std,
    update_kl_coef,
)
from starling_jax.objectives.policy import apa_loss, gae, ppo_policy_loss, value_loss
from starling_jax.objectives.reward import (RM_METRIC_COUNTS, bradley_terry_loss, check_ranks, plackett_luce_loss,
                                            rm_metrics)
from starling_jax.objectives.sft import sft_loss, token_count, token_logprobs, token_nll

__all__ = [
    "RM_METRIC_COUNTS", "adaptive_kl_coef", "apa_loss", "bradley_terry_loss", "check_ranks", "dpo_loss",
    "fixed_kl_coef", "gae", "kl_k1", "kl_k3", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "plackett_luce_loss", "ppo_policy_loss", "rm_metrics", "running_moments_init", "running_moments_update",
    "running_std", "sequence_logps", "sft_loss", "token_count", "token_logprobs", "token_nll", "update_kl_coef",
    "value_loss",
]
