"""Advantage-induced policy alignment (Zhu et al. 2023), Starling-7B-alpha's RL algorithm: the squared error between
the log-ratio to the sampling policy and A / lambda, with a GAE critic."""

from __future__ import annotations

from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.objectives import policy


def loss(out, batch, objective):
    return policy.apa_loss(out["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"],
                           objective.apa_lambda)


register(Algorithm(name="apa", kind="rl", head="lm", loss=loss, reference=True,
                   summary="APA: (log pi/pi_old - A/lambda)^2 with a GAE critic (Starling-7B-alpha)"))
