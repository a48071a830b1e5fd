"""Supervised fine-tuning: mean next-token negative log-likelihood over the selected (assistant) tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starling_jax.objectives.common import as_weights, check_rank, check_same_shape, masked_mean


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[..., targets] in float32.

    logits [..., V], targets [...] int -> [...]. Computed as picked - logsumexp so the [.., V] log-softmax is never
    materialised (the vocabulary is 32k wide).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def sft_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token NLL: -mean over {mask != 0} of log softmax(logits[b, t])[targets[b, t]].

    logits [B, T, V] (any float dtype; the math is float32), targets [B, T] int, mask [B, T] -> scalar float32.
    Targets and mask are already aligned with the logits: for a batch with `tokens` and `loss_mask` the caller passes
    logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:]. The token count is `(mask != 0).sum()`; an all-masked batch gives
    loss 0. Use `token_nll` for per-token values (e.g. to sum across accumulation steps).
    """
    check_rank("sft_loss", "logits", logits, 3, "B, T, V")
    check_same_shape("sft_loss", targets=targets, mask=mask)
    if jnp.shape(targets) != jnp.shape(logits)[:2]:
        raise ValueError(f"sft_loss: targets has shape {jnp.shape(targets)} but logits has shape {jnp.shape(logits)}; "
                         f"targets must be logits.shape[:2] (pass logits[:, :-1] with tokens[:, 1:])")
    return masked_mean(token_nll(logits, targets), mask)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token NLL, logits [B, T, V], targets [B, T] -> [B, T] float32."""
    return -token_logprobs(logits, targets)


def token_count(mask: jax.Array) -> jax.Array:
    """Number of valid tokens (float32 scalar), the weight of this batch's mean when averaging over batches."""
    return jnp.sum(as_weights(mask))
