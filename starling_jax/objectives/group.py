"""Critic-free policy objectives over groups of G samples per prompt (the math of GRPO and RLOO, which
starling_jax/algorithms/grpo.py and rloo.py assemble; this module knows no algorithm names).

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): each prompt gets G sampled replies; a reply's advantage is
its reward normalised within its group (baseline "normalised"), A_i = (r_i - mean_g r) / (std_g r + eps), applied to
every token of the reply;
the policy loss is PPO's clipped surrogate; the KL to the reference is a token-level k3 penalty in the loss.
RLOO (Ahmadian et al. 2024, arXiv 2402.14740; Kool et al. 2019): the leave-one-out baseline ("leave_one_out"),
A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g r), with the KL as a sequence-level penalty in the reward.

Both are available with either KL placement (`kl_in`: "reward" = r_i - beta * sum_t k(t), "loss" = + beta * k(t) per
token) and either estimator (k1 = logp - logp_ref, k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1). Rows of a
batch are grouped consecutively: rows g*G .. g*G + G - 1 answer the same prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starling_jax.objectives.common import as_weights, check_same_shape, masked_mean, safe_div
from starling_jax.objectives.kl import kl_k1, kl_k3

BASELINES = ("normalised", "leave_one_out")
KL_ESTIMATORS = ("k1", "k3")
KL_PLACEMENTS = ("reward", "loss")
AGGREGATIONS = ("sequence", "token")


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str) -> jax.Array:
    """Per-token KL(pi || ref) estimate for tokens sampled from pi: k1 or k3 (objectives.kl)."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def group_advantages(rewards: jax.Array, group_size: int, baseline: str, eps: float = 1e-4) -> jax.Array:
    """Per-reply advantages [B] from per-reply rewards [B] (B = prompts x group_size, groups consecutive).

    normalised: (r - group mean) / (group std + eps), the std unbiased (n - 1), as TRL's GRPOTrainer;
    leave_one_out: r - mean of the OTHER G - 1 rewards of the group.
    """
    if baseline not in BASELINES:
        raise ValueError(f"group advantages: baseline must be one of {BASELINES}, got {baseline!r}")
    if group_size < 2:
        raise ValueError(f"group advantages need group_size >= 2, got {group_size}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group advantages: rewards must be [B] with B a multiple of group_size={group_size}, got "
                         f"shape {tuple(rewards.shape)}")
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    if baseline == "normalised":
        std = jnp.std(r, axis=1, keepdims=True, ddof=1)
        adv = (r - mean) / (std + eps)
    else:
        adv = (r - mean) * (group_size / (group_size - 1))
    return adv.reshape(-1)


def group_policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array, advantages: jax.Array,
                      mask: jax.Array, clip_eps: float, kl_coef: float = 0.0, kl_estimator: str = "k3",
                      aggregate: str = "sequence") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate with per-reply advantages [B] and an optional token-level KL penalty -> (loss, metrics).

    Per token t of reply i: l = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + kl_coef * k(t), rho =
    exp(logp - logp_old). aggregate "sequence": the mean over replies of each reply's token mean (TRL's
    loss_type="grpo", the GRPO paper); "token": the mean over all valid tokens of the batch. logprobs,
    old_logprobs, ref_logprobs, mask [B, T]; old and ref are constants. Metrics are means over the valid tokens, plus
    weight = what the loss averages over (B replies for "sequence", the valid tokens for "token"), by which the
    micro-batches of a minibatch combine.
    """
    check_same_shape("group_policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                     mask=mask)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"group_policy_loss: advantages must be [B] = {logprobs.shape[:1]}, got {advantages.shape}")
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"group_policy_loss: aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    logp = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    ref = jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
    log_ratio = logp - old
    ratio = jnp.exp(log_ratio)
    unclipped, clipped = ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    kl = kl_estimate(logp, ref, kl_estimator)
    if kl_coef:
        per_token = per_token + kl_coef * kl
    w = as_weights(mask)
    per_token = jnp.where(w > 0, per_token, 0.0)  # padded slots may hold anything (even NaN)
    if aggregate == "sequence":
        per_reply = safe_div(jnp.sum(per_token * w, axis=1), jnp.sum(w, axis=1))
        loss = jnp.mean(per_reply)
    else:
        loss = masked_mean(per_token, mask)
    weight = jnp.asarray(per_token.shape[0], jnp.float32) if aggregate == "sequence" else jnp.sum(w)
    return loss, {"clip_fraction": masked_mean((clipped < unclipped).astype(jnp.float32), mask),
                  "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
                  "ref_kl": masked_mean(kl, mask), "ratio": masked_mean(ratio, mask), "weight": weight}


def group_experience(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array,
                     group_size: int, baseline: str, kl_coef, kl_in: str = "reward", kl_estimator: str = "k1",
                     eps: float = 1e-4) -> dict[str, jax.Array]:
    """Rewards, advantages and KL of a chunk of grouped rollouts (no critic).

    scores [B] (the scaled RM scores), logprobs/ref_logprobs/mask [B, T] of the sampled replies under the rollout
    policy and the reference. kl_in="reward": the reply's reward is score - kl_coef * sum_t k(t) (a sequence-level
    penalty, RLOO's); "loss": the reward is the score alone and the KL enters the loss per token (GRPO's). Returns
    rewards [B], advantages [B, T] (the reply's group advantage on each of its tokens, 0 on padding) and kl [B]
    (sum_t k(t) with the chosen estimator).
    """
    if kl_in not in KL_PLACEMENTS:
        raise ValueError(f"kl_in must be one of {KL_PLACEMENTS}, got {kl_in!r}")
    w = as_weights(mask)
    k = jnp.where(w > 0, kl_estimate(logprobs, ref_logprobs, kl_estimator), 0.0)
    kl = jnp.sum(k, axis=1)
    rewards = scores.astype(jnp.float32) - (kl_coef * kl if kl_in == "reward" else 0.0)
    adv = group_advantages(rewards, group_size, baseline, eps)
    return {"rewards": rewards, "advantages": adv[:, None] * w, "kl": kl}
