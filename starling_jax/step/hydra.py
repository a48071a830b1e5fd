"""The hydra layout of an RL stage: policy, reference and critic sharing one frozen trunk.

Starling-alpha trains only the top N transformer layers (trlx's num_layers_unfrozen=4). The layers below are frozen,
so they run once per batch, without gradient, and their output feeds both the trainable top layers (the policy) and a
frozen copy of those same top layers taken at the start of RL (the reference). With N = all layers (or 0, "train
everything"), the trunk is empty and the reference is a full frozen copy of the initial policy.

The critic (objective.value_head) is either a head on the policy's last hidden state ("mlp", "linear"), or ("layers")
a network of its own: a trainable copy of the model's top M layers (M = objective.value_head_layers) + final norm +
Linear(D, 1), initialised from the policy at the start of RL and run over the hidden state entering those M layers
(the branch), taken without gradient. This is the Starling fork's OpenChat critic (thwu1/trlx 0fb4e1e,
trlx/models/modeling_ppo.py MistralModelWithHydraValueHead: its v_head deep-copies the top num_layers_unfrozen layers
and the norm, replaces the LM head by Linear(4096, 1, bias=False), and reads hidden_states[-(num_layers_unfrozen+1)]
of the frozen base). With M = N the branch is the trunk's output, computed once for all three; with M != N the branch
is another layer of the trunk (the trunk's scan is split there) or of the current policy (those policy layers run
once more without gradient), so the critic's value loss never reaches the policy or the trunk.

Trees (nested dicts of arrays):
  trainable = {"policy": the top layers + final norm (+ lm head), "critic": value-head params ("layers": {"layers":
               M stacked layers, "final_norm", "w" [D, 1]})}
  frozen    = {"trunk": embeddings + lower layers (+ lm head when it is not trained; {} when every layer trains),
               "reference": a copy of the initial "policy" subtree}
Only `trainable` gets gradients and optimizer state.

With model.lora the trees are step/adapters.py's (trainable = {"lora": adapters, "critic"}, frozen = {"trunk", "base"}:
the reference is the base itself); hydra_forward, policy_parts and reference_parts read them through adapters.views.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from starling_jax import models
from starling_jax.config import LoraConfig
from starling_jax.models import ModelConfig, Params
from starling_jax.parallel.sharding import ActivationConstraint
from starling_jax.step import adapters



def init_rl_params(params: Params, config: ModelConfig, critic_key: jax.Array, top_layers: int = 0,
                   train_head: bool = True, value_head_kind: str = "mlp",
                   value_head_layers: int = 0, lora: Optional[LoraConfig] = None) -> tuple[Params, Params]:
    """Split full policy params into (trainable, frozen) for an RL stage (see the module docstring).

    top_layers = 0 or num_layers trains every layer (the reference is then a full frozen copy).
    value_head_kind "layers": the critic copies the top value_head_layers layers and the final norm of `params`.
    lora: adapters on the top layers instead (step/adapters.py trees: the reference is the base, no copy; `config`
    must run them, adapters.configure); the critic is made as without them and trains in full.
    """
    if "lm_head" not in params and not config.tie_embeddings:
        raise ValueError("the RL policy needs a language-model head: params have no 'lm_head' "
                         f"(keys: {sorted(params)}); is model.path pointing at a reward model?")
    if lora is not None:
        critic_key, lora_key = jax.random.split(critic_key)
        critic = models.init_value_head(config, critic_key, value_head_kind, value_head_layers, source=params)
        return adapters.init_trees(params, config, lora, lora_key, top_layers, heads={"critic": critic})
    policy, trunk = models.split_params(params, top_layers, train_head)
    # The reference must not alias the trainable arrays: a donated train state would otherwise invalidate it.
    reference = jax.tree.map(jnp.copy, policy)
    critic = models.init_value_head(config, critic_key, value_head_kind, value_head_layers, source=params)
    # frozen weights in the compute dtype (models.frozen_storage: the same forwards, half the memory under bf16); the
    # trunk's layers quantized when config.quantize says so (models.quantized_base). Not the reference: it must equal
    # the trainable layers it was copied from, so that the KL starts at 0.
    trunk = models.quantized_base(trunk, config)
    return {"policy": policy, "critic": critic}, models.frozen_storage({"trunk": trunk, "reference": reference}, config)


def policy_params(trainable: Params, frozen: Params) -> Params:
    """The full current policy params (for sampling and for exporting the stage's result)."""
    return models.merge_params(trainable["policy"], frozen["trunk"])


def reference_params(frozen: Params) -> Params:
    """The full reference (initial policy) params."""
    return models.merge_params(frozen["reference"], frozen["trunk"])


def policy_parts(trainable: Params, frozen: Params) -> tuple[Params, Params]:
    """The current policy as the pair (top, trunk) that sampling.generate merges inside its compiled call: sampling
    from it makes no merged copy of the weights outside that call (policy_params would: a new stack of every layer).
    With adapters (step/adapters.py) the top is the base with them attached (the model's config must run them)."""
    trainable, frozen = adapters.views(trainable, frozen)
    return trainable["policy"], frozen["trunk"]


def reference_parts(frozen: Params) -> tuple[Params, Params]:
    """The reference as the pair (top, trunk) for sampling.generate (see policy_parts); with adapters the base."""
    return frozen["reference"] if "reference" in frozen else frozen["base"], frozen["trunk"]


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
                window: Optional[tuple[int, int]] = None, dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Final-norm hidden states of the trainable-shaped stack `top` (a policy, a reference copy, a reward model's top
    layers) run over the trunk's output `shared` (trunk_forward), or over its own embeddings when that is None.
    window = (start, length): keep only those positions before the final norm (static ints), [B, length, D];
    otherwise all positions, [B, T, D]. dropout_key: LoRA dropout on the adapters of `top` (models.run_layers), or
    None."""
    x = _embed({**trunk, **top}, config, tokens, constrain) if shared is None else shared
    x, _ = models.run_layers(top["layers"], config, x, attention_mask, constrain=constrain, dropout_key=dropout_key)
    if window is not None:
        x = jax.lax.dynamic_slice_in_dim(x, window[0], window[1], axis=1)
    return models.final_norm({**trunk, **top}, config, x)


def _layers(tree: Params) -> int:
    """How many stacked layers a params subtree holds (0 without "layers")."""
    return models.num_stacked(tree["layers"]) if "layers" in tree else 0


def _slice_layers(layers: Params, start: int, stop: int) -> Params:
    return jax.tree.map(lambda a: a[start:stop], layers)


def trunk_and_branch(trunk: Params, policy: Params, config: ModelConfig, tokens: jax.Array,
                     attention_mask: jax.Array, branch_at: int,
                     constrain: Optional[ActivationConstraint] = None) -> tuple[Optional[jax.Array], jax.Array]:
    """(trunk_forward's output, the hidden state entering layer `branch_at` of the model), both without gradient.

    branch_at <= the trunk's layer count: the trunk's scan is split there (no extra compute; equal to the trunk's
    output when it is the cut). Above it: the current policy's layers below branch_at run once more, without
    gradient (the branch is a value, not a path for gradients into the policy)."""
    cut = _layers(trunk)
    if "embed" in trunk and branch_at <= cut:
        x = _embed(trunk, config, tokens, constrain)
        if 0 < branch_at < cut:
            x, _ = models.run_layers(_slice_layers(trunk["layers"], 0, branch_at), config, x, attention_mask,
                                     constrain=constrain)
            branch = jax.lax.stop_gradient(x)
            x, _ = models.run_layers(_slice_layers(trunk["layers"], branch_at, cut), config, x, attention_mask,
                                     constrain=constrain)
        else:
            branch = jax.lax.stop_gradient(x) if branch_at == 0 else None
            if cut:
                x, _ = models.run_layers(trunk["layers"], config, x, attention_mask, constrain=constrain)
        shared = jax.lax.stop_gradient(x)
        return shared, shared if branch is None else branch
    shared = trunk_forward(trunk, config, tokens, attention_mask, constrain)
    x = _embed({**trunk, **policy}, config, tokens, constrain) if shared is None else shared
    if branch_at > cut:
        x, _ = models.run_layers(_slice_layers(policy["layers"], 0, branch_at - cut), config, x, attention_mask,
                                 constrain=constrain)
    return shared, jax.lax.stop_gradient(x)


def critic_values(critic: Params, config: ModelConfig, branch: jax.Array, attention_mask: jax.Array,
                  window: Optional[tuple[int, int]] = None,
                  constrain: Optional[ActivationConstraint] = None) -> jax.Array:
    """Values [B, T] (or [B, length] with window = (start, length), float32) of a "layers" critic: its copied layers
    over the branch hidden state [B, T, D] (trunk_and_branch), its final norm, its Linear(D, 1)."""
    x, _ = models.run_layers(critic["layers"], config, branch, attention_mask, constrain=constrain)
    if window is not None:
        x = jax.lax.dynamic_slice_in_dim(x, window[0], window[1], axis=1)
    return models.value_head({"w": critic["w"]}, models.final_norm(critic, config, x))


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
    "hidden" [B, N, D], the policy's final hidden states at those positions (a head critic's input; a "layers"
    critic reads the branch hidden state instead, see trunk_and_branch).
    constrain: the activation sharding constraint on a mesh (sharding.activation_constraint), else None.
    trainable/frozen may be a LoRA stage's trees (step/adapters.py: read through adapters.views).
    temperature: the rollout temperature; the policy's and the reference's logits are divided by it (as TRL does in
    both passes), so log pi_old, log pi_ref, the KL penalty and the ratios are those of the distribution the tokens
    were sampled from. (top-k / top-p filtering is rejected for RL stages by config validation.)
    """
    trainable, frozen = adapters.views(trainable, frozen)
    trunk, policy, reference = frozen["trunk"], trainable["policy"], frozen["reference"]
    if tokens.shape != attention_mask.shape:
        raise ValueError(f"hydra_forward: tokens {tokens.shape} and attention_mask {attention_mask.shape} differ")
    targets = tokens[:, prompt_len:]
    window = (prompt_len - 1, targets.shape[1])  # only the predicting positions go through the vocabulary projection
    critic = trainable["critic"]
    if "layers" in critic:  # once; the trunk's output feeds the policy and the reference, the branch the critic
        shared, branch = trunk_and_branch(trunk, policy, config, tokens, attention_mask,
                                          config.num_layers - _layers(critic), constrain)
    else:  # once; it feeds the policy and the reference
        shared = trunk_forward(trunk, config, tokens, attention_mask, constrain)

    def logprobs(p: Params, h: jax.Array) -> jax.Array:
        logits = models.lm_logits({**trunk, **p}, config, h)
        if temperature != 1.0:
            logits = logits.astype(jnp.float32) / temperature
        return models.token_logprobs(logits, targets)

    h = top_forward(policy, trunk, shared, config, tokens, attention_mask, constrain, window)
    values = (critic_values(critic, config, branch, attention_mask, window, constrain) if "layers" in critic
              else models.value_head(critic, h))
    out = {"logprobs": logprobs(policy, h), "values": values, "hidden": h}
    if with_reference:
        h_ref = top_forward(reference, trunk, shared, config, tokens, attention_mask, constrain, window)
        ref = logprobs(reference, h_ref)
        out["ref_logprobs"] = jax.lax.stop_gradient(ref)
    return out
