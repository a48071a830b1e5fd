"""One optimiser step: gradients of a stage loss (accumulated over micro-batches), an optax update, metrics.

A stage loss is loss_fn(params, frozen, batch, rng) -> (loss, metrics). If metrics holds "weight" (the number of units
the loss averages over: tokens, prompts, pairs), micro-batches are combined by that weight, so a step with
grad_accum = A gives the same update as one step on the whole batch even when micro-batches hold different numbers
of tokens. Metrics named "weight" or "num_*" are counts and are summed; every other metric is a weighted mean (by
"weight", or by the count accumulate_gradients' weight_of names). The rl kind (stages/kinds/rlaif.py) accumulates its
minibatches with the same accumulate_gradients.
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


def accumulate_gradients(grads_and_metrics: Callable, params, frozen, batch: dict, rng: Optional[jax.Array],
                         grad_accum: int, weight_of: Optional[Callable[[str], str]] = None) -> tuple[Any, dict]:
    """(grads, metrics) of `batch` taken as `grad_accum` micro-batches (split_micro_batches) in a lax.scan, equal to
    grads_and_metrics(params, frozen, batch, rng) on the whole batch when the loss is a mean: each micro-batch's
    gradient and loss are weighted by its metrics["weight"] (the units its loss averages over; 1 when absent) and
    the sums divided by the total weight, in float32 accumulators. grad_accum = 1 is one call on the whole batch.

    grads_and_metrics(params, frozen, micro_batch, key) -> (grads, metrics with the loss); key is one of
    `grad_accum` keys split from rng (None when rng is None). Metrics named "weight" or "num_*" are counts and are
    summed; every other metric is a mean weighted by the count weight_of(name) names (default "weight" for all), so
    a loss whose metrics average over other units than its loss (tokens vs replies) reports those counts too."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if grad_accum == 1:
        return grads_and_metrics(params, frozen, batch, rng)
    weight_of = weight_of or (lambda name: "weight")
    micro = split_micro_batches(batch, grad_accum)
    keys = None if rng is None else jax.random.split(rng, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grads_and_metrics, params, frozen, first, None if keys is None else keys[0])

    def count(m, name):
        if name in m:
            return jnp.asarray(m[name], jnp.float32)
        if name == "weight":  # a loss without a weight: micro-batches count equally
            return jnp.ones((), jnp.float32)
        raise KeyError(f"gradient accumulation: a metric is a mean weighted by {name!r}, which the loss does not "
                       f"report (its metrics: {sorted(m)})")

    weights = {k: weight_of(k) for k in shapes[1] if not _is_count(k)}
    totals = sorted(set(weights.values()) | {"weight"})
    # float32 accumulators: summing bf16 gradients over micro-batches would lose their low bits.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    no_totals = {name: jnp.zeros((), jnp.float32) for name in totals}

    def body(carry, xs):
        g_sum, m_sum, w_sum = carry
        mb, key = xs
        g, m = grads_and_metrics(params, frozen, mb, key)
        w = count(m, "weight")
        g_sum = jax.tree.map(lambda a, b: a + w * b.astype(jnp.float32), g_sum, g)
        m_sum = {k: m_sum[k] + (m[k] if _is_count(k) else count(m, weights[k]) * m[k]).astype(jnp.float32)
                 for k in m_sum}
        w_sum = {name: w_sum[name] + count(m, name) for name in totals}
        return (g_sum, m_sum, w_sum), None

    (g_sum, m_sum, w_sum), _ = jax.lax.scan(body, (zeros[0], zeros[1], no_totals), (micro, keys))
    inv = {name: jnp.where(t > 0, 1.0 / jnp.where(t > 0, t, 1.0), 0.0) for name, t in w_sum.items()}  # all empty: 0
    grads = jax.tree.map(lambda g, p: (g * inv["weight"]).astype(p.dtype), g_sum, params)
    metrics = {k: v if _is_count(k) else v * inv[weights[k]] for k, v in m_sum.items()}
    return grads, metrics


def make_train_step(loss_fn: LossFn, optimizer, grad_accum: int = 1,
                    weight_of: Optional[Callable[[str], str]] = None) -> Callable[[TrainState, dict],
                                                                                  tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics). Metrics: the loss's metrics plus loss, grad_norm (before clipping)
    and lr (the rate of this update, from the optimiser state of train.state.make_optimizer). Pure and jittable; no
    host syncs. grad_accum > 1: accumulate_gradients over that many micro-batches (weight_of: as there), one update."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(params, frozen, batch, rng):
        (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
        return grads, {**metrics, "loss": loss}

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        grads, metrics = accumulate_gradients(grads_and_metrics, state.params, state.frozen, batch, step_rng,
                                              grad_accum, weight_of)
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
