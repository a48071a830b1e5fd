"""Proximal policy optimisation (Schulman et al. 2017): the clipped surrogate with a GAE critic."""

from __future__ import annotations

from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.objectives import policy


def loss(out, batch, objective):
    return policy.ppo_policy_loss(out["logprobs"], batch["old_logprobs"], batch["advantages"],
                                  batch["response_mask"], objective.ppo_clip)


register(Algorithm(name="ppo", kind="rl", head="lm", loss=loss, reference=True,
                   summary="PPO: the clipped surrogate with a GAE critic"))
