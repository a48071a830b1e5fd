"""Masked reductions and shape checks shared by every objective.

Means are over valid entries only (mask != 0); an all-masked input gives 0, not NaN, so a padded batch never poisons
a step. Masks may be bool, int or float; they are used as 0/1 weights.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def check_same_shape(where: str, **arrays) -> tuple[int, ...]:
    """Trace-time check that all `arrays` share one shape; the error names the function, both tensors and shapes."""
    items = list(arrays.items())
    name0, a0 = items[0]
    for name, a in items[1:]:
        if jnp.shape(a) != jnp.shape(a0):
            raise ValueError(f"{where}: {name} has shape {jnp.shape(a)} but {name0} has shape {jnp.shape(a0)}; "
                             f"they must match")
    return tuple(jnp.shape(a0))


def check_rank(where: str, name: str, x, ndim: int, axes: str) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{where}: {name} must be [{axes}] ({ndim} dims), got shape {jnp.shape(x)}")


def as_weights(mask) -> jax.Array:
    """A mask as float32 0/1 weights."""
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum of x over valid entries; masked entries are dropped with `where` so a NaN/inf there cannot leak in."""
    return jnp.sum(jnp.where(as_weights(mask) > 0, x.astype(jnp.float32), 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of x over entries where mask != 0 (along `axis`, or all); 0 where nothing is valid."""
    count = jnp.sum(as_weights(mask), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance (divide by the count, not count - 1) of x over all valid entries."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over all valid entries (population statistics, as trlx's `whiten`); masked entries -> 0.

    shift_mean=False keeps the mean (only rescales), as trlx does when whitening rewards.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(as_weights(mask) > 0, out, 0.0)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0."""
    return jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))


def maybe_mask(mask: Optional[jax.Array], like: jax.Array) -> jax.Array:
    return jnp.ones(jnp.shape(like), jnp.float32) if mask is None else as_weights(mask)
