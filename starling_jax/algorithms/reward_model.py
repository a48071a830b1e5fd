"""Reward models from rankings of K responses per prompt: the K-wise Plackett-Luce loss (Starling-RM) and the
pairwise Bradley-Terry loss over every ordered pair of the ranking."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import jax.numpy as jnp
from pydantic import Field

from starling_jax import objectives
from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.config import ObjectiveConfig
from starling_jax.step import losses


@dataclasses.dataclass(frozen=True)
class PlackettLuceOptions(ObjectiveConfig):
    name: str = "rm_plackett_luce"
    pl_normalize: Annotated[bool, Field(description=(
        "divide each prompt's NLL by its K-1 choice terms (the Starling authors' pl_loss)"))] = False
    ties: Annotated[Literal["break", "breslow"], Field(description=(
        "tied ranks: 'break' orders them by answer position (the earlier ranks better; the authors' loss needs a "
        "strict order), 'breslow' lets tied answers share one choice set (no order between them; for judges whose "
        "verdicts tie, such as a task's checker)"))] = "break"


def _build(name: str, loss):
    def build_loss(objective, config, constrain=None) -> losses.LossFn:
        if config.head != "score":
            raise ValueError(f"objective {name} needs a reward model (model config head='score'), got "
                             f"head={config.head!r}")

        def loss_fn(params, frozen, batch, rng):
            """tokens, attention_mask [B, K, T] (right padded); ranks [B, K] (1 = best); response_mask [B, K]."""
            losses.check_batch(name, batch, losses.ranking_batch(1, 1))
            rewards = losses.sequence_rewards(params, frozen.get("trunk", {}), config, batch["tokens"],
                                              batch["attention_mask"], constrain, dropout_key=rng)
            ranks, rmask = batch["ranks"], batch["response_mask"]
            metrics = objectives.rm_metrics(rewards, ranks, rmask)
            value, weight = loss(rewards, ranks, rmask, metrics, objective)
            valid = (rmask != 0).astype(jnp.float32)
            metrics["num_responses"] = jnp.sum(valid)
            metrics["reward_mean"] = jnp.sum(rewards * valid) / jnp.maximum(metrics["num_responses"], 1.0)
            return value, {**metrics, "weight": weight}
        return loss_fn
    return build_loss


# The count each metric is a mean over, whatever the loss averages over: under train.grad_accum the micro-batches'
# metrics pool as one batch's would.
_COUNTS = {**objectives.RM_METRIC_COUNTS, "reward_mean": "num_responses"}


def _weight_of(name: str) -> str:
    return _COUNTS.get(name, "weight")


register(Algorithm(
    name="rm_plackett_luce", kind="rm", head="score", batch=losses.ranking_batch, options=PlackettLuceOptions,
    loss=_build("rm_plackett_luce", lambda r, ranks, m, metrics, o: (
        objectives.plackett_luce_loss(r, ranks, m, o.pl_normalize, o.ties), metrics["num_prompts"])),
    weight_of=_weight_of,
    summary="reward model, K-wise Plackett-Luce likelihood of each prompt's ranking (Starling-RM)"))
register(Algorithm(
    name="rm_bradley_terry", kind="rm", head="score", batch=losses.ranking_batch,
    loss=_build("rm_bradley_terry", lambda r, ranks, m, metrics, o: (objectives.bradley_terry_loss(r, ranks, m),
                                                                     metrics["num_pairs"])), weight_of=_weight_of,
    summary="reward model, pairwise Bradley-Terry over every ordered pair of each ranking"))
