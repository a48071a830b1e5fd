"""What the data-driven algorithms (starling_jax/algorithms/: sft, rm_*, dpo) share: the stage's trees, the model's
hidden states and rewards through the one hydra forward (step/hydra.py), and the batch layouts. Each algorithm's
loss_fn(params, frozen, batch, rng) -> (loss, metrics) lives in its own module there.

Trees (the same layout as the RL stage's hydra, step/hydra.py):
  params = the trainable part of the model: models.split_params(full, top_layers, train_head)[0] (the whole model
           when every layer trains)
  frozen = {"trunk": the rest of split_params ({} when everything trains)}, plus for DPO
           {"reference": a copy of the trainable part taken at the start of the stage}
The frozen trunk (embeddings + the layers below the top N) runs once per batch without gradient; its output feeds the
trainable top layers and, for DPO, the reference's frozen copy of them, so the reference costs only N layers. With
every layer trained the reference is a full frozen copy. DPO's reference log-probs are always computed in the step from
frozen["reference"] (nothing has to be precomputed in the batch).

With model.lora a stage's trees are step/adapters.py's; the loss sees them through adapters.data_loss in this layout
(params = the base's top with the adapters attached, frozen = {"trunk", "reference": the base}).

metrics["weight"] is what the loss averages over (tokens for SFT, prompts for Plackett-Luce, pairs for Bradley-Terry
and DPO); the train step uses it to combine gradient-accumulation micro-batches exactly (step/step.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax import models
from starling_jax.models import ModelConfig, Params
from starling_jax.parallel.sharding import ActivationConstraint, respec
from starling_jax.step.hydra import top_forward, trunk_forward

LossFn = Callable[[Params, Params, dict, jax.Array], tuple[jax.Array, dict]]
Constrain = Optional[ActivationConstraint]  # the activation sharding constraint on a mesh, None without one


# ----------------------------------------------------------------------------------------------------------------------
# Trees.


def stage_params(params: Params, top_layers: int = 0, train_head: bool = True, reference: bool = False,
                 config: Optional[ModelConfig] = None) -> tuple[Params, Params]:
    """(params, frozen) of a stage from full model params (see the module docstring); `reference` adds
    frozen["reference"], a copy of the trainable part (Algorithm.reference). With the model's `config`, the frozen
    trees are stored in its compute dtype (models.frozen_storage: same forwards, half the memory for bf16 over fp32),
    and the trunk's layers quantized as config.quantize says (models.quantized_base; not the reference, a copy of the
    trainable layers that must equal them at the start)."""
    trainable, trunk = models.split_params(params, top_layers, train_head)
    frozen = {"trunk": trunk if config is None else models.quantized_base(trunk, config)}
    if reference:
        # a real copy: the train state is donated, so the reference must not share buffers with the trainable params
        frozen["reference"] = jax.tree.map(jnp.copy, trainable)
    if config is not None:
        frozen = models.frozen_storage(frozen, config)
    return trainable, frozen


def stage_specs(config: ModelConfig, top_layers: int = 0, train_head: bool = True, reference: bool = False
                ) -> tuple[Params, Params]:
    """ParamSpec trees of stage_params(...) for `config` (for shardings and planning; nothing is allocated)."""
    specs = models.param_specs(config)
    abstract = jax.eval_shape(lambda p: stage_params(p, top_layers, train_head, reference, config),
                              models.abstract_params(config))
    trainable = respec(abstract[0], specs)
    frozen = {"trunk": respec(abstract[1]["trunk"], models.quantized_specs(specs, config))}
    if "reference" in abstract[1]:
        frozen["reference"] = respec(abstract[1]["reference"], specs)
    return trainable, frozen


def check_batch(name: str, batch: dict, keys) -> None:
    """A KeyError naming what a loss's batch lacks (keys: the algorithm's batch layout)."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{name} loss: batch lacks {missing}; it has {sorted(batch)}")


def hidden(params: Params, trunk: Params, config: ModelConfig, tokens, mask, constrain: Constrain = None,
           dropout_key=None):
    """Final-norm hidden states [..., T, D] of the stage's model (trainable `params` over the frozen `trunk`) for
    tokens/mask [B, T]: the hydra forward of step/hydra.py, trunk once, then the trainable top stack. dropout_key:
    LoRA dropout on the adapters in `params` (step/adapters.py), or None; without adapters it changes nothing."""
    return top_forward(params, trunk, trunk_forward(trunk, config, tokens, mask, constrain), config, tokens, mask,
                       constrain, dropout_key=dropout_key)


def sequence_rewards(params: Params, trunk: Params, config: ModelConfig, tokens, mask, constrain: Constrain = None,
                     dropout_key=None):
    """Scalar rewards [B, K] of tokens/attention_mask [B, K, T] (score head at each row's last non-pad token)."""
    B, K, T = tokens.shape
    flat_t, flat_m = tokens.reshape(B * K, T), mask.reshape(B * K, T)
    h = hidden(params, trunk, config, flat_t, flat_m, constrain, dropout_key)
    last = models.last_token_index(flat_m)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
    return models.reward_values({**trunk, **params}, config, h_last)[:, 0].reshape(B, K)


# ----------------------------------------------------------------------------------------------------------------------
# Batch layouts (ShapeDtypeStructs of one global batch; the planner compiles against them).

_S, _I32, _F32 = jax.ShapeDtypeStruct, jnp.int32, jnp.float32


def lm_batch(batch_size: int, seq_len: int, num_responses: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """Next-token batches: tokens, attention_mask [B, T] int32; loss_mask [B, T] float32."""
    B, T = batch_size, seq_len
    return {"tokens": _S((B, T), _I32), "attention_mask": _S((B, T), _I32), "loss_mask": _S((B, T), _F32)}


def ranking_batch(batch_size: int, seq_len: int, num_responses: int = 2) -> dict[str, jax.ShapeDtypeStruct]:
    """K ranked responses per prompt: tokens, attention_mask [B, K, T]; ranks, response_mask [B, K] int32."""
    B, T, K = batch_size, seq_len, num_responses
    return {"tokens": _S((B, K, T), _I32), "attention_mask": _S((B, K, T), _I32), "ranks": _S((B, K), _I32),
            "response_mask": _S((B, K), _I32)}


def pair_batch(batch_size: int, seq_len: int, num_responses: int = 2) -> dict[str, jax.ShapeDtypeStruct]:
    """Preference pairs: chosen_* and rejected_* tokens, attention_mask [B, T] int32, loss_mask [B, T] float32."""
    out = {}
    for side in ("chosen", "rejected"):
        out.update({f"{side}_{k}": v for k, v in lm_batch(batch_size, seq_len).items()})
    return out


def zeros_batch(spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
    """A host batch of zeros with the shapes of a batch layout (for warm-up compiles)."""
    return {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
