"""What GRPO and RLOO share (each registers in its own module, grpo.py / rloo.py, with its own options type and
defaults): critic-free, group_size replies per prompt, advantages relative to the group (objectives/group.py), the
clipped surrogate with an optional per-token KL term."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import jax.numpy as jnp
from pydantic import Field

from starling_jax.algorithms._rl import RLOptions
from starling_jax.algorithms.registry import Algorithm
from starling_jax.objectives import common
from starling_jax.objectives import group as obj_group


KLIn = Annotated[Literal["reward", "loss"], Field(description=(
    "where the KL to the reference enters: 'reward' (a sequence-level penalty on the reply's reward) or 'loss' (a "
    "per-token term)"))]
KLEstimator = Annotated[Literal["k1", "k3"], Field(description=(
    "the per-token KL estimate: k1 = logp - logp_ref, k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1"))]


@dataclasses.dataclass(frozen=True)
class GroupOptions(RLOptions):
    """The options of a critic-free group algorithm; kl_in and kl_estimator default to each algorithm's own."""
    ppo_clip: Annotated[float, Field(gt=0, lt=1, description="the ratio is clipped to 1 +- ppo_clip")] = 0.2
    group_size: Annotated[int, Field(ge=2, description=(
        "replies sampled per prompt (consecutive rows): rollout.prompts_per_step replies = prompts_per_step / "
        "group_size prompts x group_size"))] = 4
    kl_in: KLIn = "reward"
    kl_estimator: KLEstimator = "k1"
    loss_aggregation: Annotated[Literal["sequence", "token"], Field(description=(
        "the loss's mean: 'sequence' = of each reply's token mean (GRPO), 'token' = of all tokens"))] = "sequence"


def algorithm(kind: str, summary: str, baseline: str, options: type) -> Algorithm:
    """The registration of group algorithm `kind`: its baseline (objectives.group.BASELINES) and its options type
    (a GroupOptions with its own KL placement and estimator as defaults)."""

    def advantages(*, mask, objective, group_size, scores, logprobs, ref_logprobs, kl_coef, **_):
        g = obj_group.group_experience(scores, logprobs, ref_logprobs, mask, group_size, baseline, kl_coef,
                                       objective.kl_in, objective.kl_estimator)
        return g["advantages"], jnp.zeros_like(logprobs)

    def loss(out, batch, objective):
        mask = batch["response_mask"]
        w = common.as_weights(mask)
        per_reply = common.safe_div(jnp.sum(batch["advantages"] * w, axis=1), jnp.sum(w, axis=1))  # constant per reply
        loss_value, metrics = obj_group.group_policy_loss(
            out["logprobs"], batch["old_logprobs"], batch["ref_logprobs"], per_reply, mask, objective.ppo_clip,
            objective.kl_coef if objective.kl_in == "loss" else 0.0, objective.kl_estimator,
            objective.loss_aggregation)
        return loss_value, metrics

    def check(c) -> list:
        if c.objective.kl_target is not None and c.objective.kl_in == "loss":
            return [("objective.kl_target", "the adaptive KL controller acts on a KL penalty in the reward; with "
                     "kl_in='loss' set kl_target=None")]
        return []

    return Algorithm(name=kind, kind="rl", head="lm", loss=loss, reference=True, advantages=advantages, critic=False,
                     group_size=lambda objective: objective.group_size, check=check, options=options, summary=summary)
