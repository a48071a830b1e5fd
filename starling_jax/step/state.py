"""The train state and the optimiser built from OptimConfig.

TrainState(step, params, frozen, opt_state, rng):
  params    the trainable tree: the only one that gets gradients and optimiser state
  frozen    parameters read by the loss but never updated (the trunk below the top N layers, a reference copy, a reward
            model); no gradient is taken with respect to them and no optimiser state is kept for them
  opt_state optax state of `params`
  rng       a key split once per step (losses get a fresh subkey)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from starling_jax.config import OptimConfig
from starling_jax.models import Params
from starling_jax.parallel.sharding import replicated


# Leaves never decayed: norms (RMSNorm gains, stored [L, D] when stacked, so the rank alone cannot tell) and biases.
NO_DECAY_NAMES = ("attn_norm", "mlp_norm", "final_norm", "norm", "b", "b1", "b2", "bias")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates done
    params: Params
    frozen: Params
    opt_state: Any
    rng: jax.Array


class Optimizer(NamedTuple):
    """An optax GradientTransformation (init, update) that also carries its learning-rate schedule for logging."""
    init: Callable
    update: Callable
    schedule: Callable[[jax.Array], jax.Array]


def make_schedule(config: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Learning rate by update count: linear warmup from 0 over warmup_steps, then cosine or linear decay to
    end_lr_fraction * learning_rate at total_steps, or constant (optax's schedules)."""
    lr, warmup = config.learning_rate, config.warmup_steps
    end = lr * config.end_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay_steps, end_value=end)
    if config.schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    elif config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule must be 'cosine', 'linear' or 'constant', got {config.schedule!r}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: Params) -> Params:
    """True where AdamW weight decay applies: every matrix except norms and biases."""
    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in NO_DECAY_NAMES and not name.endswith("_norm") and leaf.ndim >= 2
    return jax.tree.map_with_path(one, params)


def make_optimizer(config: OptimConfig, total_steps: int, params: Params,
                   frozen_mask: Optional[Params] = None) -> Optimizer:
    """AdamW (b1, b2, eps, weight decay on decay_mask(params)) on the schedule, after global-norm clipping.

    params: the trainable tree (arrays or ShapeDtypeStructs; only its structure, names and ranks are read).
    frozen_mask: optional tree like params of bools, True = keep this leaf fixed (its update is zero and it has no
    Adam moments), for parameters that must stay in the trainable tree but not move.
    """
    schedule = make_schedule(config, total_steps)
    parts = []
    if config.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    # inject_hyperparams keeps the learning rate of the latest update in the optimiser state (learning_rate(state)).
    # Only the learning rate: b1, b2, eps, eps_root and weight_decay stay Python constants, as in a plain optax.adamw
    # (the numbers of a plain adamw, bit for bit). Injected, they become f32 arrays XLA cannot fold: each element's
    # update then adds eps_root = 0 and applies the zero weight decay (two adds and a multiply more; ~9% more CPU time
    # for the 44.8M toy's step at batch 1 x 16) and computes 1 - b1 etc. in f32 (benchmarks/RESULTS.md).
    parts.append(optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay"))(
        learning_rate=schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
        mask=decay_mask(params)))
    tx = optax.chain(*parts)
    if frozen_mask is not None:
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return Optimizer(tx.init, tx.update, schedule)


def learning_rate(opt_state) -> Optional[jax.Array]:
    """The learning rate of the latest update, from an optimiser state made by make_optimizer (optax's
    inject_hyperparams state); None for an optimiser without one."""
    found = [node.hyperparams["learning_rate"] for node in jax.tree.leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")) if hasattr(node, "hyperparams")]
    return found[0] if found else None


def init_state(params: Params, optimizer, rng: jax.Array, frozen: Optional[Params] = None) -> TrainState:
    """A fresh TrainState at step 0 (on a mesh, create_state places the optimiser state in its shards)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={} if frozen is None else frozen,
                      opt_state=optimizer.init(params), rng=rng)


def abstract_state(params, optimizer, frozen=None) -> TrainState:
    """ShapeDtypeStructs of init_state(params, ...) for abstract params (nothing allocated)."""
    return jax.eval_shape(lambda p, f: init_state(p, optimizer, jax.random.key(0), f), params,
                          {} if frozen is None else frozen)


def state_shardings(optimizer, state: TrainState, params_shardings, frozen_shardings, mesh) -> TrainState:
    """A TrainState of NamedShardings: params/frozen as given, each optimiser moment like its parameter, scalars
    (step, counts, rng) replicated. `state` may be abstract (abstract_state)."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, sh: sh, state.opt_state, params_shardings,
                                transform_non_params=lambda _: rep,
                                is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=rep, params=params_shardings, frozen=frozen_shardings, opt_state=opt, rng=rep)


def _put_key(key: jax.Array, sharding) -> jax.Array:
    """device_put for a typed PRNG key: JAX cannot put one on devices of other processes directly, so its key data
    travels and is wrapped again (the same key, placed like `sharding`)."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.device_put(key, sharding)
    data = jax.device_put(jax.random.key_data(key), sharding)
    return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=jax.random.key_impl(key)), out_shardings=sharding)(data)


def create_state(params: Params, optimizer, rng: jax.Array, frozen: Optional[Params] = None,
                 shardings: Optional[TrainState] = None) -> TrainState:
    """A fresh TrainState around existing (already placed) params. With `shardings` (see state_shardings) the Adam
    moments are created directly in their shards; params and frozen are used as they are (never copied)."""
    init = jax.jit(optimizer.init, out_shardings=None if shardings is None else shardings.opt_state)
    step = jnp.zeros((), jnp.int32)
    if shardings is not None:
        step, rng = jax.device_put(step, shardings.step), _put_key(rng, shardings.rng)
    return TrainState(step=step, params=params, frozen={} if frozen is None else frozen, opt_state=init(params),
                      rng=rng)
