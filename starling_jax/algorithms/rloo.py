"""RLOO (Ahmadian et al. 2024): G replies per prompt, leave-one-out baseline, the KL as a sequence-level penalty in
the reward by default; no critic."""

from starling_jax.algorithms import _group
from starling_jax.algorithms.registry import register

register(_group.algorithm("rloo", "RLOO: leave-one-out baseline over G replies per prompt (no critic)"))
