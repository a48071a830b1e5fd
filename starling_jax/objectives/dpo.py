"""Direct Preference Optimisation (Rafailov et al. 2023), the sigmoid loss as in TRL's default."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from starling_jax.objectives.common import check_rank, check_same_shape, masked_mean, masked_sum, maybe_mask
from starling_jax.objectives.sft import token_logprobs


def sequence_logps(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of the selected tokens' log-probabilities per row: logits [B, T, V], targets [B, T], mask [B, T] -> [B].

    As for sft_loss, pass shifted tensors: logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:].
    """
    check_rank("sequence_logps", "logits", logits, 3, "B, T, V")
    check_same_shape("sequence_logps", targets=targets, mask=mask)
    return masked_sum(token_logprobs(logits, targets), mask, axis=-1)


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, beta: float, label_smoothing: float = 0.0,
             mask: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid DPO over sequence log-probabilities (all [B], float32 math) -> (scalar loss, metrics).

    h = beta * ((pi_c - ref_c) - (pi_r - ref_r));  loss = mean of -(1 - ls) log sigmoid(h) - ls log sigmoid(-h)
    (label_smoothing ls = 0 is the original DPO loss; ls > 0 is cDPO, as TRL's `label_smoothing`). `mask` [B]
    (optional) drops padded pairs from every mean. Metrics: the implicit rewards beta * (pi - ref) of the chosen and
    rejected responses (means), their margin, and reward accuracy = fraction of pairs with chosen reward > rejected.
    """
    check_same_shape("dpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                     ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    chosen_reward = beta * (f32(policy_chosen_logps) - f32(ref_chosen_logps))
    rejected_reward = beta * (f32(policy_rejected_logps) - f32(ref_rejected_logps))
    h = chosen_reward - rejected_reward
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    w = maybe_mask(mask, h)
    metrics = {
        "rewards_chosen": masked_mean(chosen_reward, w),
        "rewards_rejected": masked_mean(rejected_reward, w),
        "reward_margin": masked_mean(h, w),
        "reward_accuracy": masked_mean((h > 0).astype(jnp.float32), w),
        "logps_chosen": masked_mean(f32(policy_chosen_logps), w),
        "logps_rejected": masked_mean(f32(policy_rejected_logps), w),
    }
    return masked_mean(losses, w), metrics
