"""Every stage kind, registered: importing this package imports every module in it, as starling_jax.algorithms does
for the algorithms (and, through them, every algorithm). A stage kind is a module here that calls
`@register_stage_kind("name", setup=...)` (stages/program.py): adding a kind is adding a file (and its tests).

The built-in kinds: data.py (sft, rm, dpo), rlaif.py (rl), feedback.py (feedback).
"""

from __future__ import annotations

import importlib
import pkgutil

from starling_jax import algorithms  # noqa: F401  (registers every algorithm)
from starling_jax.stages.program import STAGE_KINDS


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


def names() -> list[str]:
    """The registered stage kinds."""
    return sorted(STAGE_KINDS)
