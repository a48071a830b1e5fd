"""Stage losses: loss_fn(params, frozen, batch, rng) -> (loss, metrics), one per objective name, built from
starling_jax.objectives and the model functions.

Trees (the same layout as the RL stage's hydra, train/hydra.py):
  params = the trainable part of the model: models.split_params(full, top_layers, train_head)[0] (the whole model
           when every layer trains)
  frozen = {"trunk": the rest of split_params ({} when everything trains)}, plus for DPO
           {"reference": a copy of the trainable part taken at the start of the stage}
The frozen trunk (embeddings + the layers below the top N) runs once per batch without gradient; its output feeds the
trainable top layers and, for DPO, the reference's frozen copy of them, so the reference costs only N layers. With
every layer trained the reference is a full frozen copy. DPO's reference log-probs are always computed in the step from
frozen["reference"] (nothing has to be precomputed in the batch).

metrics["weight"] is what the loss averages over (tokens for SFT, prompts for Plackett-Luce, pairs for Bradley-Terry
and DPO); the train step uses it to combine gradient-accumulation micro-batches exactly (train/step.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax import models, objectives
from starling_jax.config import ObjectiveConfig
from starling_jax.models import ModelConfig
from starling_jax.sharding import respec
from starling_jax.models import Params

LossFn = Callable[[Params, Params, dict, jax.Array], tuple[jax.Array, dict]]
Constrain = Optional[Callable[[jax.Array], jax.Array]]

LOSSES: dict[str, Callable[[ObjectiveConfig, ModelConfig, Constrain], LossFn]] = {}

# Keys each objective's batch must hold (see batch_spec for shapes).
BATCH_KEYS = {
    "sft": ("tokens", "attention_mask", "loss_mask"),
    "rm_plackett_luce": ("tokens", "attention_mask", "ranks", "response_mask"),
    "rm_bradley_terry": ("tokens", "attention_mask", "ranks", "response_mask"),
    "dpo": ("chosen_tokens", "chosen_attention_mask", "chosen_loss_mask", "rejected_tokens",
            "rejected_attention_mask", "rejected_loss_mask"),
}
HEAD_OF = {"sft": "lm", "rm_plackett_luce": "score", "rm_bradley_terry": "score", "dpo": "lm"}


def register_loss(name: str):
    def deco(builder):
        LOSSES[name] = builder
        return builder
    return deco


def build_loss(objective: ObjectiveConfig, model: ModelConfig, constrain: Constrain = None) -> LossFn:
    """The loss of objective.name for a model of `model`'s architecture. `constrain` (sharding.activation_constraint)
    pins activations at layer boundaries on a mesh."""
    if objective.name not in LOSSES:
        raise KeyError(f"no stage loss for objective {objective.name!r}; known: {', '.join(sorted(LOSSES))} "
                       f"(apa/ppo are built by train/rlaif.py)")
    return LOSSES[objective.name](objective, model, constrain)


# ----------------------------------------------------------------------------------------------------------------------
# Trees.


def stage_params(objective_name: str, params: Params, top_layers: int = 0, train_head: bool = True
                 ) -> tuple[Params, Params]:
    """(params, frozen) of a stage from full model params (see the module docstring)."""
    trainable, trunk = models.split_params(params, top_layers, train_head)
    frozen = {"trunk": trunk}
    if objective_name == "dpo":
        # a real copy: the train state is donated, so the reference must not share buffers with the trainable params
        frozen["reference"] = jax.tree.map(jnp.copy, trainable)
    return trainable, frozen


def stage_specs(objective_name: str, config: ModelConfig, top_layers: int = 0, train_head: bool = True
                ) -> tuple[Params, Params]:
    """ParamSpec trees of stage_params(...) for `config` (for shardings and planning; nothing is allocated)."""
    specs = models.param_specs(config)
    abstract = jax.eval_shape(lambda p: stage_params(objective_name, p, top_layers, train_head),
                              models.abstract_params(config))
    trainable = respec(abstract[0], specs)
    frozen = {"trunk": respec(abstract[1]["trunk"], specs)}
    if "reference" in abstract[1]:
        frozen["reference"] = respec(abstract[1]["reference"], specs)
    return trainable, frozen


def _embed(src: Params, config: ModelConfig, tokens, constrain: Constrain):
    """Token embeddings [B, T, D]; on a mesh the table is pinned for the lookup (sharding.ActivationConstraint)."""
    pin_table = getattr(constrain, "embedding", None)
    if pin_table is not None:
        src = {"embed": pin_table(src["embed"])}
    x = models.embed_tokens(src, config, tokens)
    return x if constrain is None else constrain(x)


def _shared_trunk(trunk: Params, config: ModelConfig, tokens, mask, constrain: Constrain):
    """Output [B, T, D] of the frozen embeddings + lower layers, or None when the embeddings are trained."""
    if "embed" not in trunk:
        return None
    x = _embed(trunk, config, tokens, constrain)
    if trunk.get("layers") and trunk["layers"]["wq"].shape[0] > 0:
        x, _ = models.run_layers(trunk["layers"], config, x, mask, constrain=constrain)
    return jax.lax.stop_gradient(x)


def _top_hidden(top: Params, trunk: Params, trunk_out, config: ModelConfig, tokens, mask, constrain: Constrain):
    """Final-norm hidden states [B, T, D] of the `top` stack run over the trunk output (or over its own embeddings)."""
    x = _embed(top, config, tokens, constrain) if trunk_out is None else trunk_out
    x, _ = models.run_layers(top["layers"], config, x, mask, constrain=constrain)
    return models.final_norm({**trunk, **top}, config, x)


def _check_batch(name: str, batch: dict) -> None:
    missing = [k for k in BATCH_KEYS[name] if k not in batch]
    if missing:
        raise KeyError(f"{name} loss: batch lacks {missing}; it has {sorted(batch)}")


# ----------------------------------------------------------------------------------------------------------------------
# Losses.


@register_loss("sft")
def _sft(objective: ObjectiveConfig, config: ModelConfig, constrain: Constrain) -> LossFn:
    def loss_fn(params, frozen, batch, rng):
        """tokens, attention_mask [B, T]; loss_mask [B, T] float: predicts tokens[:, 1:] where loss_mask[:, 1:]."""
        _check_batch("sft", batch)
        tokens, mask = batch["tokens"], batch["attention_mask"]
        trunk = frozen.get("trunk", {})
        h = _top_hidden(params, trunk, _shared_trunk(trunk, config, tokens, mask, constrain), config, tokens, mask,
                        constrain)
        logits = models.lm_logits({**trunk, **params}, config, h[:, :-1])
        targets, loss_mask = tokens[:, 1:], batch["loss_mask"][:, 1:]
        loss = objectives.sft_loss(logits, targets, loss_mask)
        return loss, {"weight": objectives.token_count(loss_mask)}
    return loss_fn


def _rewards(params, trunk, config, tokens, mask, constrain):
    """Scalar rewards [B, K] of tokens/attention_mask [B, K, T] (score head at each row's last non-pad token)."""
    B, K, T = tokens.shape
    flat_t, flat_m = tokens.reshape(B * K, T), mask.reshape(B * K, T)
    h = _top_hidden(params, trunk, _shared_trunk(trunk, config, flat_t, flat_m, constrain), config, flat_t, flat_m,
                    constrain)
    last = models.last_token_index(flat_m)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
    return models.reward_values({**trunk, **params}, config, h_last)[:, 0].reshape(B, K)


def _rm(kind: str):
    def build(objective: ObjectiveConfig, config: ModelConfig, constrain: Constrain) -> LossFn:
        if config.head != "score":
            raise ValueError(f"objective rm_{kind} needs a reward model (model config head='score'), got "
                             f"head={config.head!r}")

        def loss_fn(params, frozen, batch, rng):
            """tokens, attention_mask [B, K, T] (right padded); ranks [B, K] (1 = best); response_mask [B, K]."""
            _check_batch(f"rm_{kind}", batch)
            rewards = _rewards(params, frozen.get("trunk", {}), config, batch["tokens"], batch["attention_mask"],
                               constrain)
            ranks, rmask = batch["ranks"], batch["response_mask"]
            metrics = objectives.rm_metrics(rewards, ranks, rmask)
            if kind == "plackett_luce":
                loss = objectives.plackett_luce_loss(rewards, ranks, rmask, objective.pl_normalize)
                weight = metrics["num_prompts"]
            else:
                loss, weight = objectives.bradley_terry_loss(rewards, ranks, rmask), metrics["num_pairs"]
            valid = (rmask != 0).astype(jnp.float32)
            metrics["reward_mean"] = jnp.sum(rewards * valid) / jnp.maximum(jnp.sum(valid), 1.0)
            return loss, {**metrics, "weight": weight}
        return loss_fn
    return build


register_loss("rm_plackett_luce")(_rm("plackett_luce"))
register_loss("rm_bradley_terry")(_rm("bradley_terry"))


@register_loss("dpo")
def _dpo(objective: ObjectiveConfig, config: ModelConfig, constrain: Constrain) -> LossFn:
    def loss_fn(params, frozen, batch, rng):
        """chosen_* / rejected_* tokens, attention_mask, loss_mask [B, T]; frozen["reference"] is the reference."""
        _check_batch("dpo", batch)
        if "reference" not in frozen:
            raise KeyError("dpo loss: frozen has no 'reference' (build the trees with train.losses.stage_params)")
        # chosen and rejected rows in one [2B, T] pass: one trunk run feeds policy and reference
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
        mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
        trunk, reference = frozen["trunk"], frozen["reference"]
        shared = _shared_trunk(trunk, config, tokens, mask, constrain)

        def logps(top):
            h = _top_hidden(top, trunk, shared, config, tokens, mask, constrain)
            logits = models.lm_logits({**trunk, **top}, config, h[:, :-1])
            return objectives.sequence_logps(logits, tokens[:, 1:], loss_mask[:, 1:])

        B = batch["chosen_tokens"].shape[0]
        policy = logps(params)
        ref = jax.lax.stop_gradient(logps(reference))
        loss, metrics = objectives.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], objective.dpo_beta)
        return loss, {**metrics, "weight": jnp.asarray(B, jnp.float32)}
    return loss_fn


# ----------------------------------------------------------------------------------------------------------------------
# Abstract batches (planning).


def batch_spec(name: str, batch_size: int, seq_len: int, num_responses: int = 2) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch of objective `name` (see the shared batch layouts)."""
    i32, f32 = jnp.int32, jnp.float32
    S = jax.ShapeDtypeStruct
    B, T, K = batch_size, seq_len, num_responses
    if name == "sft":
        return {"tokens": S((B, T), i32), "attention_mask": S((B, T), i32), "loss_mask": S((B, T), f32)}
    if name in ("rm_plackett_luce", "rm_bradley_terry"):
        return {"tokens": S((B, K, T), i32), "attention_mask": S((B, K, T), i32), "ranks": S((B, K), i32),
                "response_mask": S((B, K), i32)}
    if name == "dpo":
        out = {}
        for side in ("chosen", "rejected"):
            out.update({f"{side}_tokens": S((B, T), i32), f"{side}_attention_mask": S((B, T), i32),
                        f"{side}_loss_mask": S((B, T), f32)})
        return out
    raise KeyError(f"no batch layout for objective {name!r}; known: {', '.join(BATCH_KEYS)}")


def zeros_batch(spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
    """A host batch of zeros with the shapes of batch_spec (for warm-up compiles)."""
    return {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
