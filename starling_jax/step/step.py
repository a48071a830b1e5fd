"""One optimiser step: gradients of a stage loss (accumulated over micro-batches), an optax update, metrics.

A stage loss is loss_fn(params, frozen, batch, rng) -> (loss, metrics). If metrics holds "weight" (the number of units
the loss averages over: tokens, prompts, pairs), micro-batches are combined by that weight, so a step with
grad_accum = A gives the same update as one step on the whole batch even when micro-batches hold different numbers
of tokens. Metrics named "weight" or "num_*" are counts and are summed; every other metric is a weighted mean.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from starling_jax.parallel.sharding import replicated
from starling_jax.step.state import TrainState, learning_rate

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def _is_count(name: str) -> bool:
    return name == "weight" or name.startswith("num_")


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] -> [A, B / A, ...] with micro-batch i = rows i, i + A, i + 2A, ... Strided rather than contiguous, so
    when the batch is sharded over its leading axis every device already holds its rows of every micro-batch."""
    def one(name, x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch[{name!r}] has leading size {x.shape[0]} (shape {tuple(x.shape)}), not divisible "
                             f"by grad_accum={grad_accum}")
        return jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]), 0, 1)
    return {k: one(k, v) for k, v in batch.items()}


def apply_gradients(optimizer, params, opt_state, grads) -> tuple[Any, Any, dict]:
    """The one optimiser update every stage kind makes: (params, opt_state, metrics) after applying `grads`; metrics
    are grad_norm (before clipping) and lr (the rate of this update, from the optimiser state of
    train.state.make_optimizer)."""
    metrics = {"grad_norm": optax.tree.norm(grads)}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    lr = learning_rate(opt_state)
    if lr is not None:
        metrics["lr"] = jnp.asarray(lr, jnp.float32)
    return optax.apply_updates(params, updates), opt_state, metrics


def make_train_step(loss_fn: LossFn, optimizer, grad_accum: int = 1) -> Callable[[TrainState, dict],
                                                                                 tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics). Metrics: the loss's metrics plus loss, grad_norm (before clipping)
    and lr (the rate of this update, from the optimiser state of train.state.make_optimizer). Pure and jittable; no
    host syncs."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(params, frozen, batch, rng):
        (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
        return grads, {**metrics, "loss": loss}

    def accumulate(params, frozen, batch, rng):
        micro = split_micro_batches(batch, grad_accum)
        keys = jax.random.split(rng, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grads_and_metrics, params, frozen, first, keys[0])
        # float32 accumulators: summing bf16 gradients over micro-batches would lose their low bits.
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

        def body(carry, xs):
            g_sum, m_sum, w_sum = carry
            mb, key = xs
            g, m = grads_and_metrics(params, frozen, mb, key)
            w = jnp.asarray(m.get("weight", 1.0), jnp.float32)
            g_sum = jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), g_sum, g)
            m_sum = {k: m_sum[k] + (m[k] if _is_count(k) else w * m[k]).astype(jnp.float32) for k in m_sum}
            return (g_sum, m_sum, w_sum + w), None

        (g_sum, m_sum, w_sum), _ = jax.lax.scan(body, (zeros[0], zeros[1], jnp.zeros((), jnp.float32)), (micro, keys))
        inv = jnp.where(w_sum > 0, 1.0 / jnp.where(w_sum > 0, w_sum, 1.0), 0.0)  # all-empty batch: zero update
        grads = jax.tree.map(lambda g, p: (g * inv).astype(p.dtype), g_sum, params)
        metrics = {k: v if _is_count(k) else v * inv for k, v in m_sum.items()}
        return grads, metrics

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        if grad_accum == 1:
            grads, metrics = grads_and_metrics(state.params, state.frozen, batch, step_rng)
        else:
            grads, metrics = accumulate(state.params, state.frozen, batch, step_rng)
        params, opt_state, update_metrics = apply_gradients(optimizer, state.params, state.opt_state, grads)
        metrics.update(update_metrics)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return step


def jit_step(step: Callable, mesh: Optional[Mesh] = None, state_shardings: Optional[TrainState] = None,
             batch_shardings: Optional[dict] = None) -> Callable:
    """jax.jit of a train step with the state donated (its buffers are reused for the new state, so params and
    optimiser state exist once in memory) and, on a mesh, explicit in/out shardings: the state keeps its layout
    step after step, the batch is split over its leading axis and the metrics come back replicated."""
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
