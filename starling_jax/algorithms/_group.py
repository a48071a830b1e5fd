"""What GRPO and RLOO share as registrations (each registers in its own module, grpo.py / rloo.py): critic-free,
objective.group_size replies per prompt, advantages relative to the group (objectives/group.py), the clipped
surrogate with an optional per-token KL term."""

from __future__ import annotations

import jax.numpy as jnp

from starling_jax.algorithms.registry import Algorithm
from starling_jax.objectives import common
from starling_jax.objectives import group as obj_group


KL_DEFAULTS: dict[str, tuple[str, str]] = {}  # algorithm name -> its own (kl_in, kl_estimator)


def kl_settings(kind: str, kl_in=None, kl_estimator=None) -> tuple[str, str]:
    """(kl_in, kl_estimator) of group algorithm `kind`, its own defaults filling what the config leaves None."""
    default_in, default_est = KL_DEFAULTS[kind]
    return kl_in or default_in, kl_estimator or default_est


def algorithm(kind: str, summary: str, baseline: str, kl_in: str, kl_estimator: str) -> Algorithm:
    """The registration of group algorithm `kind`: its baseline (objectives.group.BASELINES) and its own KL placement
    and estimator, used where the config leaves objective.kl_in / kl_estimator None."""
    KL_DEFAULTS[kind] = (kl_in, kl_estimator)

    def advantages(*, mask, objective, group_size, scores, logprobs, ref_logprobs, kl_coef, **_):
        kl_in, estimator = kl_settings(kind, objective.kl_in, objective.kl_estimator)
        g = obj_group.group_experience(scores, logprobs, ref_logprobs, mask, group_size, baseline, kl_coef, kl_in,
                                       estimator)
        return g["advantages"], jnp.zeros_like(logprobs)

    def loss(out, batch, objective):
        kl_in, estimator = kl_settings(kind, objective.kl_in, objective.kl_estimator)
        mask = batch["response_mask"]
        w = common.as_weights(mask)
        per_reply = common.safe_div(jnp.sum(batch["advantages"] * w, axis=1), jnp.sum(w, axis=1))  # constant per reply
        loss_value, metrics = obj_group.group_policy_loss(
            out["logprobs"], batch["old_logprobs"], batch["ref_logprobs"], per_reply, mask, objective.ppo_clip,
            objective.kl_coef if kl_in == "loss" else 0.0, estimator, objective.loss_aggregation)
        return loss_value, metrics

    def check(c) -> list:
        o, r, out = c.objective, c.rollout, []
        if o.group_size < 2:
            out.append(("objective.group_size", f"{kind} needs at least 2 samples per prompt, got {o.group_size}"))
        if o.kl_target is not None and kl_settings(kind, o.kl_in, o.kl_estimator)[0] == "loss":
            out.append(("objective.kl_target", "the adaptive KL controller acts on a KL penalty in the reward; with "
                        "kl_in='loss' set kl_target=None"))
        return out

    return Algorithm(name=kind, kind="rl", head="lm", loss=loss, reference=True, advantages=advantages, critic=False,
                     group_size=lambda objective: objective.group_size, check=check, summary=summary)
