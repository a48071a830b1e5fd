"""RLOO (Ahmadian et al. 2024): G replies per prompt, leave-one-out baseline, the KL as a sequence-level penalty in
the reward by default; no critic."""

from __future__ import annotations

import dataclasses

from starling_jax.algorithms import _group
from starling_jax.algorithms.registry import register


@dataclasses.dataclass(frozen=True)
class RLOOOptions(_group.GroupOptions):
    name: str = "rloo"  # Ahmadian et al.'s KL (GroupOptions' defaults): a sequence-level k1 penalty in the reward


register(_group.algorithm("rloo", "RLOO: leave-one-out baseline over G replies per prompt (no critic)",
                          baseline="leave_one_out", options=RLOOOptions))
