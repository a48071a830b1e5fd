"""Training algorithms, one module each, registered once (see registry.py for what a registration holds).

Importing this package imports every module in it, so adding an algorithm is adding a file here (and its tests):

    # starling_jax/algorithms/my_algo.py
    from starling_jax.algorithms.registry import Algorithm, register
    register(Algorithm(name="my_algo", kind="rl", head="lm", loss=my_loss, reference=True))

`ObjectiveConfig(name="my_algo")` then selects it everywhere: config validation, the loop, the planner.
"""

from __future__ import annotations

import importlib
import pkgutil

from starling_jax.algorithms.registry import (
    ALGORITHMS, Algorithm, get, names, of_kind, register,
)


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "registry" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


def build_loss(objective, model_config, constrain=None):
    """The loss of a data-driven algorithm (sft, rm_*, dpo) for `objective` (an ObjectiveConfig) and a model of
    `model_config`'s architecture: loss_fn(params, frozen, batch, rng) -> (loss, metrics). `constrain`: the
    activation sharding constraint on a mesh (sharding.activation_constraint), or None."""
    algorithm = get(objective.name)
    if algorithm.batch is None:
        raise KeyError(f"objective {objective.name!r} is trained by the {algorithm.kind!r} stage kind, which builds "
                       f"its own loss; build_loss covers the data-driven algorithms: "
                       f"{', '.join(n for n in names() if get(n).batch is not None)}")
    return algorithm.loss(objective, model_config, constrain)


def abstract_batch(name: str, batch_size: int, seq_len: int, num_responses: int = 2) -> dict:
    """ShapeDtypeStructs of one global batch of the data-driven algorithm `name` (its registered layout)."""
    algorithm = get(name)
    if algorithm.batch is None:
        raise KeyError(f"objective {name!r} ({algorithm.kind!r} stage kind) has no registered data batch layout")
    return algorithm.batch(batch_size, seq_len, num_responses)


__all__ = ["ALGORITHMS", "Algorithm", "abstract_batch", "build_loss", "get", "names", "of_kind", "register"]
