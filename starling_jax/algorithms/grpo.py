"""GRPO (Shao et al. 2024, DeepSeekMath): G replies per prompt, advantages normalised within the group, the clipped
surrogate with a per-token k3 KL term by default; no critic."""

from __future__ import annotations

import dataclasses

from starling_jax.algorithms import _group
from starling_jax.algorithms.registry import register


@dataclasses.dataclass(frozen=True)
class GRPOOptions(_group.GroupOptions):
    name: str = "grpo"
    kl_in: _group.KLIn = "loss"  # DeepSeekMath's KL: a per-token k3 term in the loss
    kl_estimator: _group.KLEstimator = "k3"


register(_group.algorithm("grpo", "GRPO: group-normalised advantages, clipped surrogate, per-token KL (no critic)",
                          baseline="normalised", options=GRPOOptions))
