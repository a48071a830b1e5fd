"""Advantage-induced policy alignment (Zhu et al. 2023), Starling-7B-alpha's RL algorithm: the squared error between
the log-ratio to the sampling policy and A / lambda, with a GAE critic."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from pydantic import Field

from starling_jax.algorithms._rl import CriticOptions, check_critic
from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.objectives import policy


@dataclasses.dataclass(frozen=True)
class APAOptions(CriticOptions):
    name: str = "apa"
    apa_lambda: Annotated[float, Field(gt=0, description=(
        "lambda of (log pi/pi_old - A/lambda)^2; the APA paper's 0.1, Starling's fork used 1.0"))] = 0.1


def loss(out, batch, objective):
    return policy.apa_loss(out["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"],
                           objective.apa_lambda)


register(Algorithm(name="apa", kind="rl", head="lm", loss=loss, reference=True, options=APAOptions, check=check_critic,
                   summary="APA: (log pi/pi_old - A/lambda)^2 with a GAE critic (Starling-7B-alpha)"))
