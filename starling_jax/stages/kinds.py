"""Every stage kind, registered: importing this module imports each module that implements a kind (and, through
them, every algorithm of starling_jax/algorithms/). The loop, the planner and config validation import it.

A new stage kind is a module that calls `@register_stage_kind("name")` (stages/program.py) plus one line here.
"""

from starling_jax import algorithms  # noqa: F401  (registers every algorithm)
from starling_jax.algorithms.registry import STAGE_KINDS
from starling_jax.stages import data_stage, feedback_stage, rlaif  # noqa: F401  (the kinds sft, rm, dpo, rl, feedback)


def names() -> list[str]:
    """The registered stage kinds."""
    return sorted(STAGE_KINDS)
