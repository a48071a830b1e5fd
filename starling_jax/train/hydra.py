"""The hydra layout of an RL stage: policy, reference and critic sharing one frozen trunk.

Starling-alpha trains only the top N transformer layers (trlx's num_layers_unfrozen=4). The layers below are frozen,
so they run once per batch, without gradient, and their output feeds both the trainable top layers (the policy) and a
frozen copy of those same top layers taken at the start of RL (the reference). The critic is a head on the policy's
last hidden state. With N = all layers (or 0, "train everything"), the trunk is empty and the reference is a full
frozen copy of the initial policy.

Trees (nested dicts of arrays):
  trainable = {"policy": the top layers + final norm (+ lm head), "critic": value-head params}
  frozen    = {"trunk": embeddings + lower layers (+ lm head when it is not trained; {} when every layer trains),
               "reference": a copy of the initial "policy" subtree}
Only `trainable` gets gradients and optimizer state.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from starling_jax import models
from starling_jax.models import ModelConfig
from starling_jax.models import Params
from starling_jax.sharding import ActivationConstraint



def init_rl_params(params: Params, config: ModelConfig, critic_key: jax.Array, top_layers: int = 0,
                   train_head: bool = True, value_head_kind: str = "mlp") -> tuple[Params, Params]:
    """Split full policy params into (trainable, frozen) for an RL stage (see the module docstring).

    top_layers = 0 or num_layers trains every layer (the reference is then a full frozen copy).
    """
    if "lm_head" not in params and not config.tie_embeddings:
        raise ValueError("the RL policy needs a language-model head: params have no 'lm_head' "
                         f"(keys: {sorted(params)}); is model.path pointing at a reward model?")
    policy, trunk = models.split_params(params, top_layers, train_head)
    # The reference must not alias the trainable arrays: a donated train state would otherwise invalidate it.
    reference = jax.tree.map(jnp.copy, policy)
    critic = models.init_value_head(config, critic_key, value_head_kind)
    return {"policy": policy, "critic": critic}, {"trunk": trunk, "reference": reference}


def policy_params(trainable: Params, frozen: Params) -> Params:
    """The full current policy params (for sampling and for exporting the stage's result)."""
    return models.merge_params(trainable["policy"], frozen["trunk"])


def reference_params(frozen: Params) -> Params:
    """The full reference (initial policy) params."""
    return models.merge_params(frozen["reference"], frozen["trunk"])


def trunk_forward(trunk: Params, config: ModelConfig, tokens: jax.Array, attention_mask: jax.Array,
                  constrain: Optional[ActivationConstraint] = None) -> Optional[jax.Array]:
    """The frozen trunk's output [B, T, D] without gradient (its embeddings, then its layers if it has any), or None
    when the trunk holds no embeddings (every layer and the embeddings train: each top stack embeds for itself)."""
    if "embed" not in trunk:
        return None
    x = _embed(trunk, config, tokens, constrain)
    if "layers" in trunk:
        x, _ = models.run_layers(trunk["layers"], config, x, attention_mask, constrain=constrain)
    return jax.lax.stop_gradient(x)


def top_forward(top: Params, trunk: Params, shared: Optional[jax.Array], config: ModelConfig, tokens: jax.Array,
                attention_mask: jax.Array, constrain: Optional[ActivationConstraint] = None,
                window: Optional[tuple[int, int]] = None) -> jax.Array:
    """Final-norm hidden states of the trainable-shaped stack `top` (a policy, a reference copy, a reward model's top
    layers) run over the trunk's output `shared` (trunk_forward), or over its own embeddings when that is None.
    window = (start, length): keep only those positions before the final norm (static ints), [B, length, D];
    otherwise all positions, [B, T, D]."""
    x = _embed({**trunk, **top}, config, tokens, constrain) if shared is None else shared
    x, _ = models.run_layers(top["layers"], config, x, attention_mask, constrain=constrain)
    if window is not None:
        x = jax.lax.dynamic_slice_in_dim(x, window[0], window[1], axis=1)
    return models.final_norm({**trunk, **top}, config, x)


def _embed(src: Params, config: ModelConfig, tokens: jax.Array, constrain: Optional[ActivationConstraint]):
    """Token embeddings; on a mesh the table is pinned for the lookup and the output to the activation layout (see
    sharding.ActivationConstraint)."""
    if constrain is None:
        return models.embed_tokens(src, config, tokens)
    return constrain(models.embed_tokens({"embed": constrain.embedding(src["embed"])}, config, tokens))


def hydra_forward(trainable: Params, frozen: Params, config: ModelConfig, tokens: jax.Array,
                  attention_mask: jax.Array, prompt_len: int, with_reference: bool = True,
                  constrain: Optional[ActivationConstraint] = None, temperature: float = 1.0) -> dict:
    """Log-probs of the response tokens under the policy (and the reference), the critic's values, hidden states.

    tokens, attention_mask: [B, P + N], a left-padded prompt of P tokens followed by N response tokens.
    prompt_len: P (static). The logits at position P - 1 + j predict response token j; the critic's value for
    response token j is read at the same position (the state before the token is chosen), as in trlx.
    Returns {"logprobs" [B, N], "ref_logprobs" [B, N] (if with_reference), "values" [B, N]} float32 and
    "hidden" [B, N, D], the policy's final hidden states at those positions (the critic's input).
    constrain: the activation sharding constraint on a mesh (sharding.activation_constraint), else None.
    temperature: the rollout temperature; the policy's and the reference's logits are divided by it (as TRL does in
    both passes), so log pi_old, log pi_ref, the KL penalty and the ratios are those of the distribution the tokens
    were sampled from. (top-k / top-p filtering is rejected for RL stages by config validation.)
    """
    trunk, policy, reference = frozen["trunk"], trainable["policy"], frozen["reference"]
    if tokens.shape != attention_mask.shape:
        raise ValueError(f"hydra_forward: tokens {tokens.shape} and attention_mask {attention_mask.shape} differ")
    targets = tokens[:, prompt_len:]
    window = (prompt_len - 1, targets.shape[1])  # only the predicting positions go through the vocabulary projection
    shared = trunk_forward(trunk, config, tokens, attention_mask, constrain)  # once; it feeds both heads

    def logprobs(p: Params, h: jax.Array) -> jax.Array:
        logits = models.lm_logits({**trunk, **p}, config, h)
        if temperature != 1.0:
            logits = logits.astype(jnp.float32) / temperature
        return models.token_logprobs(logits, targets)

    h = top_forward(policy, trunk, shared, config, tokens, attention_mask, constrain, window)
    out = {"logprobs": logprobs(policy, h), "values": models.value_head(trainable["critic"], h), "hidden": h}
    if with_reference:
        h_ref = top_forward(reference, trunk, shared, config, tokens, attention_mask, constrain, window)
        ref = logprobs(reference, h_ref)
        out["ref_logprobs"] = jax.lax.stop_gradient(ref)
    return out
