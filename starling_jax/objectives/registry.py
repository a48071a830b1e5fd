"""Objectives by name, so a stage (and a new algorithm) is chosen by ObjectiveConfig.name."""

from __future__ import annotations

from typing import Callable

from starling_jax.objectives.dpo import dpo_loss
from starling_jax.objectives.group import group_policy_loss
from starling_jax.objectives.policy import apa_loss, ppo_policy_loss
from starling_jax.objectives.reward import bradley_terry_loss, plackett_luce_loss
from starling_jax.objectives.sft import sft_loss

_REGISTRY: dict[str, Callable] = {}


def register(name: str, fn: Callable | None = None):
    """Register `fn` under `name` (usable as a decorator: @register("name")). Re-registering a name is an error."""
    def add(f):
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"objective {name!r} is already registered (to {_REGISTRY[name].__name__})")
        _REGISTRY[name] = f
        return f
    return add if fn is None else add(fn)


def get(name: str) -> Callable:
    """The objective function registered as `name`; a ValueError lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


register("sft", sft_loss)
register("rm_plackett_luce", plackett_luce_loss)
register("rm_bradley_terry", bradley_terry_loss)
register("dpo", dpo_loss)
register("apa", apa_loss)
register("ppo", ppo_policy_loss)
register("grpo", group_policy_loss)  # group-normalised advantages (objectives.group.group_advantages "grpo")
register("rloo", group_policy_loss)  # leave-one-out advantages (objectives.group.group_advantages "rloo")
