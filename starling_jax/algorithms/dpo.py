"""Direct preference optimisation (Rafailov et al. 2023) against a frozen copy of the starting policy."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp
from pydantic import Field

from starling_jax import models, objectives
from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.config import ObjectiveConfig
from starling_jax.step import losses
from starling_jax.step.hydra import top_forward, trunk_forward


@dataclasses.dataclass(frozen=True)
class DPOOptions(ObjectiveConfig):
    name: str = "dpo"
    dpo_beta: Annotated[float, Field(gt=0, description=(
        "beta of the sigmoid loss: the strength of the implicit KL to the reference"))] = 0.1


def build_loss(objective, config, constrain=None) -> losses.LossFn:
    def loss_fn(params, frozen, batch, rng):
        """chosen_* / rejected_* tokens, attention_mask, loss_mask [B, T]; frozen["reference"] is the reference.
        The mean (and "weight") is over the pairs whose chosen and rejected replies each have a loss token."""
        losses.check_batch("dpo", batch, losses.pair_batch(1, 1))
        if "reference" not in frozen:
            raise KeyError("dpo loss: frozen has no 'reference' (build the trees with losses.stage_params(..., "
                           "reference=True))")
        # chosen and rejected rows in one [2B, T] pass: one trunk run feeds policy and reference
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
        mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
        trunk, reference = frozen["trunk"], frozen["reference"]
        shared = trunk_forward(trunk, config, tokens, mask, constrain)

        def logps(top):
            h = top_forward(top, trunk, shared, config, tokens, mask, constrain)
            logits = models.lm_logits({**trunk, **top}, config, h[:, :-1])
            return objectives.sequence_logps(logits, tokens[:, 1:], loss_mask[:, 1:])

        B = batch["chosen_tokens"].shape[0]
        policy = logps(params)
        ref = jax.lax.stop_gradient(logps(reference))
        # A pair counts when both its replies have a loss token: one without has no log-probability to compare (a
        # padding row of an evaluation batch has none on either side, data.formats.padding_example).
        has_tokens = jnp.sum(loss_mask[:, 1:] != 0, axis=-1) > 0
        pair = has_tokens[:B] & has_tokens[B:]
        loss, metrics = objectives.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], objective.dpo_beta, mask=pair)
        return loss, {**metrics, "weight": jnp.sum(pair.astype(jnp.float32))}
    return loss_fn


register(Algorithm(name="dpo", kind="dpo", head="lm", loss=build_loss, batch=losses.pair_batch, reference=True,
                   options=DPOOptions,
                   summary="direct preference optimisation on (chosen, rejected) pairs against a frozen reference"))
