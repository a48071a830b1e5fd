"""RL objectives over response tokens: GAE, APA, PPO's clipped policy loss and the (clipped) value loss.

Shapes: [B, T] over the generated tokens of B rollouts; mask [B, T] marks each row's valid tokens (normally a prefix:
right padding after the stop token). Means are over valid tokens of the whole batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from starling_jax.objectives.common import as_weights, check_rank, check_same_shape, masked_mean


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages [B, T], returns [B, T]), float32.

    Over each row's valid tokens t_1 < t_2 < ... < t_n (masked positions are skipped as if absent):
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   returns_t = A_t + V_t
    where "next" is the row's next valid token, and V_next = A_next = 0 after the last one (the episode ends there:
    values past a row's last valid token count as 0). Masked positions get 0 advantages and 0 returns; their rewards
    and values are ignored. gamma and lam may be Python floats or traced scalars.
    """
    check_rank("gae", "rewards", rewards, 2, "B, T")
    check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    valid = as_weights(mask) > 0
    r = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
    v = jnp.where(valid, values.astype(jnp.float32), 0.0)

    def step(carry, xs):  # one time step, backwards; carry = (value, advantage) of the next valid token
        next_value, next_adv = carry
        r_t, v_t, valid_t = xs
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        carry = (jnp.where(valid_t, v_t, next_value), jnp.where(valid_t, adv, next_adv))
        return carry, jnp.where(valid_t, adv, 0.0)

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
    advantages = adv_tb.T
    returns = jnp.where(valid, advantages + v, 0.0)
    return advantages, returns


def apa_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
             lam: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Advantage-induced policy alignment (Zhu et al. 2023, arXiv 2306.02231) -> (scalar loss, metrics).

    loss = mean over valid tokens of (logprobs - old_logprobs - advantages / lam)^2, all [B, T]. old_logprobs and
    advantages are treated as constants (stop_gradient). The APA paper's lam is 0.1 (its ADV_COEFF_SQ = 1 / lam = 10);
    the Starling fork used 1. Metrics: approx_kl = mean k3 estimate of KL(old || new) on the tokens, the mean log-ratio
    and weight = the number of valid tokens (what the loss averages over: micro-batches of a minibatch combine by it).
    """
    check_same_shape("apa_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    logprobs = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs - old
    loss = masked_mean(jnp.square(log_ratio - adv / lam), mask)
    return loss, {"approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
                  "log_ratio": masked_mean(log_ratio, mask), "weight": jnp.sum(as_weights(mask))}


def ppo_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                    clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017) -> (scalar loss, metrics); inputs [B, T].

    ratio = exp(logprobs - old_logprobs);  loss = mean over valid tokens of max(-A ratio, -A clip(ratio, 1-eps, 1+eps)).
    Metrics: clip_fraction = share of valid tokens where the clipped term is the larger (its gradient is zero there),
    approx_kl = mean (ratio - 1) - log ratio (the k3 estimate of KL(old || new), as trlx), the mean ratio and weight =
    the number of valid tokens (what the loss averages over).
    """
    check_same_shape("ppo_policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                     mask=mask)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    log_ratio = logprobs.astype(jnp.float32) - old
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
                  "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
                  "ratio": masked_mean(ratio, mask), "weight": jnp.sum(as_weights(mask))}


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip: Optional[float]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Critic loss -> (scalar loss, metrics); inputs [B, T].

    loss = 0.5 * mean over valid tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clip(V - old, -c, c).
    clip=None gives the unclipped 0.5 * (V - R)^2 (APA). old_values and returns are constants (stop_gradient).
    Metrics: value_clip_fraction (share of valid tokens where the clipped error is the larger) and
    value_error = mean (V - R)^2.
    """
    check_same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    v = values.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    ret = jax.lax.stop_gradient(returns.astype(jnp.float32))
    err = jnp.square(v - ret)
    if clip is None:
        clipped_err, clip_fraction = err, jnp.zeros((), jnp.float32)
    else:
        clipped_err = jnp.square(old + jnp.clip(v - old, -clip, clip) - ret)
        clip_fraction = masked_mean((clipped_err > err).astype(jnp.float32), mask)
    loss = 0.5 * masked_mean(jnp.maximum(err, clipped_err), mask)
    return loss, {"value_clip_fraction": clip_fraction, "value_error": masked_mean(err, mask)}
