"""Training algorithms, one module each, registered once (see registry.py for what a registration holds).

Importing this package imports every module in it, so adding an algorithm is adding a file here (and its tests):

    # starling_jax/algorithms/my_algo.py
    @dataclasses.dataclass(frozen=True)
    class MyOptions(RLOptions):                  # its options, typed, constrained and described
        name: str = "my_algo"
        temperature: Annotated[float, Field(gt=0, description="...")] = 1.0

    register(Algorithm(name="my_algo", kind="rl", head="lm", loss=my_loss, reference=True, options=MyOptions))

`MyOptions(...)` (or `options("my_algo", ...)`) then selects it everywhere: config validation, overrides, the loop,
the planner.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

from pydantic.fields import FieldInfo

from starling_jax.algorithms._rl import CriticOptions, RLOptions
from starling_jax.config import ObjectiveConfig
from starling_jax.algorithms.registry import (
    ALGORITHMS, Algorithm, get, names, of_kind, options, options_error, register, switch,
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
    if options_error(objective):
        raise TypeError(options_error(objective))
    return algorithm.loss(objective, model_config, constrain)


def options_table() -> str:
    """A markdown table of the registered algorithms' options, one row per option where it is declared (the shared
    bases once: RLOptions, CriticOptions, GroupOptions), with the objectives that take it, its type, default,
    constraints and description; docs/TRAINING.md shows it (a test keeps the two equal)."""
    def type_text(tp) -> str:
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Literal:
            return " \\| ".join(repr(a) for a in args)
        if len(args) == 1:  # Optional[X]
            return f"{args[0].__name__} or None"
        return tp.__name__

    def constraints(info: FieldInfo) -> str:
        ops = {"Gt": ">", "Ge": ">=", "Lt": "<", "Le": "<="}
        return ", ".join(f"{ops[type(m).__name__]} {getattr(m, dataclasses.fields(m)[0].name)}"
                         for m in info.metadata if type(m).__name__ in ops)

    types = {get(n).options for n in names()}
    declaring = sorted({c for t in types for c in t.__mro__ if c is not object and vars(c).get("__annotations__")},
                       key=lambda c: (len(c.__mro__), c.__name__))
    rows = ["| options | objectives | option | type | default | constraint | what it is |",
            "|---|---|---|---|---|---|---|"]
    for cls in declaring:
        takers = ", ".join(f"`{n}`" for n in names() if issubclass(get(n).options, cls))
        hints = typing.get_type_hints(cls, include_extras=True)
        for field in dataclasses.fields(cls):
            if field.name not in vars(cls)["__annotations__"] or (field.name == "name" and cls is not ObjectiveConfig):
                continue
            info = next((m for m in typing.get_args(hints[field.name])[1:] if isinstance(m, FieldInfo)), None)
            what = info.description if info else "selects the algorithm (an options type defaults it to its own)"
            rows.append(f"| `{cls.__name__}` | {takers} | `{field.name}` | {type_text(hints[field.name])} | "
                        f"`{field.default!r}` | {constraints(info) if info else ''} | {what} |")
    return "\n".join(rows)


def abstract_batch(name: str, batch_size: int, seq_len: int, num_responses: int = 2) -> dict:
    """ShapeDtypeStructs of one global batch of the data-driven algorithm `name` (its registered layout)."""
    algorithm = get(name)
    if algorithm.batch is None:
        raise KeyError(f"objective {name!r} ({algorithm.kind!r} stage kind) has no registered data batch layout")
    return algorithm.batch(batch_size, seq_len, num_responses)


__all__ = ["ALGORITHMS", "Algorithm", "CriticOptions", "RLOptions", "abstract_batch", "build_loss", "get", "names",
           "of_kind", "options", "options_error", "options_table", "register", "switch"]
