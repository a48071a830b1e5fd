"""KL helpers for RLHF: per-token KL estimates, the KL-coefficient controllers of Ziegler et al. (2019) as in trlx,
and running moments for scaling rewards, all as pure functions (state in, state out)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from starling_jax.objectives.common import check_same_shape, maybe_mask, safe_div


def kl_k1(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """logp - ref_logp per token (the unbiased, high-variance estimate of KL(pi || ref) for tokens sampled from pi);
    this is what the per-token reward penalises: reward_t = -beta * kl_k1_t. Any shape -> same shape, float32."""
    check_same_shape("kl_k1", logprobs=logprobs, ref_logprobs=ref_logprobs)
    return logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)


def kl_k3(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """Schulman's k3 = (rho - 1) - log rho with rho = ref_p / p per token: unbiased for KL(pi || ref) under samples from
    pi and never negative. Any shape -> same shape, float32."""
    check_same_shape("kl_k3", logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_rho = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)
    return jnp.expm1(log_rho) - log_rho


def fixed_kl_coef(coef, observed_kl, n_steps):
    """The fixed controller: the coefficient never changes (same signature as adaptive_kl_coef)."""
    del observed_kl, n_steps
    return jnp.asarray(coef, jnp.float32)


def adaptive_kl_coef(coef, observed_kl, n_steps, target: float, horizon: float):
    """Ziegler et al.'s proportional controller (trlx AdaptiveKLController.update):
        error = clip(observed_kl / target - 1, -0.2, 0.2);  coef' = coef * (1 + error * n_steps / horizon)
    observed_kl is the mean KL (per sequence, as trlx measures it) of the batch just seen; n_steps is the number of
    samples (trlx passes the batch size) since the last update."""
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(coef, jnp.float32) * (1.0 + error * n_steps / horizon)


def update_kl_coef(coef, observed_kl, n_steps, target: Optional[float] = None, horizon: float = 10000.0):
    """Adaptive when a target is given, else fixed: the rl options' (kl_coef, kl_target, kl_horizon)."""
    if target is None:
        return fixed_kl_coef(coef, observed_kl, n_steps)
    return adaptive_kl_coef(coef, observed_kl, n_steps, target, horizon)


# ----------------------------------------------------------------------------------------------------------------------
# Running moments (Chan et al.'s parallel update) for reward scaling: state = {"mean", "var", "count"} float32 scalars.


def running_moments_init() -> dict[str, jax.Array]:
    return {"mean": jnp.zeros((), jnp.float32), "var": jnp.ones((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def running_moments_update(state: dict[str, jax.Array], xs: jax.Array,
                           mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Fold the valid entries of xs (any shape; mask the same shape or None) into the running mean and population
    variance. An all-masked xs leaves the state unchanged."""
    w = maybe_mask(mask, xs)
    x = jnp.where(w > 0, jnp.asarray(xs, jnp.float32), 0.0)
    n = jnp.sum(w)
    x_mean = safe_div(jnp.sum(x), n)
    x_var = safe_div(jnp.sum(jnp.where(w > 0, jnp.square(x - x_mean), 0.0)), n)
    total = state["count"] + n
    delta = x_mean - state["mean"]
    mean = state["mean"] + safe_div(delta * n, total)
    m2 = state["var"] * state["count"] + x_var * n + safe_div(jnp.square(delta) * state["count"] * n, total)
    var = jnp.where(total > 0, safe_div(m2, total), state["var"])
    return {"mean": mean, "var": var, "count": total}


def running_std(state: dict[str, jax.Array]) -> jax.Array:
    """The sample standard deviation (Bessel-corrected, as trlx's RunningMoments.std) of everything seen; 1 until
    two values have been seen."""
    count = state["count"]
    return jnp.where(count > 1, jnp.sqrt(state["var"] * count / jnp.maximum(count - 1, 1.0)), 1.0)
