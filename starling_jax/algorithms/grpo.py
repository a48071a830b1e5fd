"""GRPO (Shao et al. 2024, DeepSeekMath): G replies per prompt, advantages normalised within the group, the clipped
surrogate with a per-token k3 KL term by default; no critic."""

from starling_jax.algorithms import _group
from starling_jax.algorithms.registry import register

# DeepSeekMath's KL: a per-token k3 term in the loss
register(_group.algorithm("grpo", "GRPO: group-normalised advantages, clipped surrogate, per-token KL (no critic)",
                          baseline="normalised", kl_in="loss", kl_estimator="k3"))
