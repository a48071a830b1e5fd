"""The "rl" stage kind: APA or PPO against a frozen reward model, with a KL penalty to the initial policy.

One RL step (one call of the loop's step) is one chunk of rollouts and its optimisation epochs:

  host (RolloutSource.next_batch, starling_jax.train.rollout):
    prompts -> sampling.generate with the current policy -> decode to text -> re-render the conversation in the
    reward model's template -> tokenize with the reward model's OWN tokenizer -> models.score with the frozen RM ->
    scale by a running std and clip -> make_experience (jitted: policy/reference log-probs and critic values in one
    hydra pass, per-token reward -kl_coef * (logp_old - logp_ref) with the score at the last response token, GAE)
  device (make_rl_step, jitted):
    `epochs` passes over the chunk in shuffled minibatches of apa_loss or ppo_policy_loss + vf_coef * value_loss.

Trees: see starling_jax.train.hydra (trainable = {"policy", "critic"}, frozen = {"trunk", "reference"}).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from starling_jax import models
from starling_jax.config import ObjectiveConfig
from starling_jax.models import ModelConfig
from starling_jax.objectives import common as obj_common
from starling_jax.objectives import policy as obj_policy
from starling_jax.train.hydra import hydra_forward

Params = dict[str, Any]
Batch = dict[str, Any]

# Keys of an RL training batch the update reads ([B, ...]); the rest ("stat_*", [B] each) are per-rollout statistics
# that the step only averages into its metrics.
TRAIN_KEYS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "old_values", "advantages", "returns")
RL_OBJECTIVES = ("apa", "ppo")


def last_valid_index(mask: jax.Array) -> jax.Array:
    """Index [B] of each row's last valid entry of a right-padded mask [B, N] (0 for an all-masked row)."""
    idx = jnp.arange(mask.shape[-1])
    return jnp.maximum(jnp.max(jnp.where(mask > 0, idx, -1), axis=-1), 0)


def shaped_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, response_mask: jax.Array,
                   kl_coef) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [B, N] = -kl_coef * (logp_old - logp_ref), plus the (scaled) RM score [B] at each row's last
    response token; and the per-row KL estimate sum_t (logp_old - logp_ref) [B]."""
    mask = obj_common.as_weights(response_mask)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = jnp.arange(scores.shape[0])
    rewards = rewards.at[rows, last_valid_index(response_mask)].add(scores.astype(jnp.float32))
    return rewards * mask, jnp.sum(kl, axis=-1)


def make_experience(trainable: Params, frozen: Params, tokens: jax.Array, attention_mask: jax.Array,
                    response_mask: jax.Array, scores: jax.Array, kl_coef, *, config: ModelConfig,
                    objective: ObjectiveConfig, prompt_len: int) -> dict:
    """Everything the update needs from one chunk of rollouts (jit with config/objective/prompt_len static).

    tokens, attention_mask [B, P + N] (prompt left padded, response right padded); response_mask [B, N];
    scores [B] the scaled and clipped RM scores. Returns old_logprobs, ref_logprobs, old_values, rewards, advantages,
    returns [B, N] and kl [B] (sum over each row's response tokens of logp_old - logp_ref).
    """
    out = jax.lax.stop_gradient(hydra_forward(trainable, frozen, config, tokens, attention_mask, prompt_len))
    mask = response_mask
    rewards, kl = shaped_rewards(scores, out["logprobs"], out["ref_logprobs"], mask, kl_coef)
    values = jnp.where(mask > 0, out["values"], 0.0)
    advantages, returns = obj_policy.gae(rewards, values, mask, objective.gamma, objective.gae_lambda)
    if objective.whiten_advantages:
        advantages = obj_common.masked_whiten(advantages, mask)
    return {"old_logprobs": out["logprobs"], "ref_logprobs": out["ref_logprobs"], "old_values": values,
            "rewards": rewards, "advantages": advantages, "returns": returns, "kl": kl}


def rl_loss(trainable: Params, frozen: Params, batch: Batch, *, config: ModelConfig, objective: ObjectiveConfig,
            prompt_len: int) -> tuple[jax.Array, dict]:
    """APA or PPO policy loss + vf_coef * value loss on a (mini)batch of experience -> (loss, metrics).

    With objective.critic_only_above = c (the Starling fork's rule), a minibatch whose value loss exceeds c trains
    only the critic: the policy term is dropped and the value loss reaches the critic head only, not the policy's
    layers beneath it.
    """
    out = hydra_forward(trainable, frozen, config, batch["tokens"], batch["attention_mask"], prompt_len,
                        with_reference=False)
    mask = batch["response_mask"]
    old, adv = batch["old_logprobs"], batch["advantages"]
    if objective.name == "apa":
        policy_loss, metrics = obj_policy.apa_loss(out["logprobs"], old, adv, mask, objective.apa_lambda)
    elif objective.name == "ppo":
        policy_loss, metrics = obj_policy.ppo_policy_loss(out["logprobs"], old, adv, mask, objective.ppo_clip)
    else:
        raise ValueError(f"rl_loss: objective.name must be one of {RL_OBJECTIVES}, got {objective.name!r}")
    v_loss, v_metrics = obj_policy.value_loss(out["values"], batch["old_values"], batch["returns"], mask,
                                              objective.value_clip)
    loss = policy_loss + objective.vf_coef * v_loss
    critic_only = jnp.zeros((), jnp.bool_)
    if objective.critic_only_above is not None:
        critic_only = jax.lax.stop_gradient(v_loss) > objective.critic_only_above
        detached = models.value_head(trainable["critic"], jax.lax.stop_gradient(out["hidden"]))
        v_loss_critic, _ = obj_policy.value_loss(detached, batch["old_values"], batch["returns"], mask,
                                                 objective.value_clip)
        loss = jnp.where(critic_only, objective.vf_coef * v_loss_critic, loss)
    metrics = {**metrics, **v_metrics, "policy_loss": policy_loss, "value_loss": v_loss,
               "critic_only": critic_only.astype(jnp.float32)}
    return loss, metrics


def make_rl_step(loss_fn: Callable[[Params, Params, Batch], tuple[jax.Array, dict]],
                 optimizer: optax.GradientTransformation, epochs: int, minibatch_size: int):
    """step(state, batch) -> (state, metrics): `epochs` shuffled passes over the chunk in minibatches, one optimizer
    update each (a lax.scan, so it jits to one program). state is a TrainState(step, params, frozen, opt_state, rng);
    its step counts chunks. Metrics are means over the updates, plus the means of the batch's "stat_*" rows."""

    def step(state, batch: Batch):
        data = {k: batch[k] for k in TRAIN_KEYS}
        B = data["tokens"].shape[0]
        if B % minibatch_size:
            raise ValueError(f"rl step: the chunk of {B} rollouts is not divisible by minibatch_size={minibatch_size}")
        rng, key = jax.random.split(state.rng)
        perms = jax.vmap(lambda k: jax.random.permutation(k, B))(jax.random.split(key, epochs))
        order = perms.reshape(epochs * (B // minibatch_size), minibatch_size)

        def update(carry, idx):
            params, opt_state = carry
            mb = jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data)
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state.frozen, mb)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}

        (params, opt_state), history = jax.lax.scan(update, (state.params, state.opt_state), order)
        metrics = {k: jnp.mean(v) for k, v in history.items()}
        metrics.update({k[len("stat_"):]: jnp.mean(v.astype(jnp.float32)) for k, v in batch.items()
                        if k.startswith("stat_")})
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return state, metrics

    return step


def build_rl_functions(config: ModelConfig, objective: ObjectiveConfig, prompt_len: int):
    """(experience_fn, loss_fn) with the static arguments bound; experience_fn is jitted."""
    if objective.name not in RL_OBJECTIVES:
        raise ValueError(f"the rl stage needs objective.name in {RL_OBJECTIVES}, got {objective.name!r}")
    experience = jax.jit(functools.partial(make_experience, config=config, objective=objective,
                                           prompt_len=prompt_len))
    loss = functools.partial(rl_loss, config=config, objective=objective, prompt_len=prompt_len)
    return experience, loss
