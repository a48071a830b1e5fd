"""Proximal policy optimisation (Schulman et al. 2017): the clipped surrogate with a GAE critic."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from pydantic import Field

from starling_jax.algorithms._rl import CriticOptions, check_critic
from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.objectives import policy


@dataclasses.dataclass(frozen=True)
class PPOOptions(CriticOptions):
    name: str = "ppo"
    ppo_clip: Annotated[float, Field(gt=0, lt=1, description="the ratio is clipped to 1 +- ppo_clip")] = 0.2


def loss(out, batch, objective):
    return policy.ppo_policy_loss(out["logprobs"], batch["old_logprobs"], batch["advantages"],
                                  batch["response_mask"], objective.ppo_clip)


register(Algorithm(name="ppo", kind="rl", head="lm", loss=loss, reference=True, options=PPOOptions, check=check_critic,
                   summary="PPO: the clipped surrogate with a GAE critic"))
