"""The options every rl algorithm shares (the rl stage kind reads them: the KL penalty and its controller, the reward
model's score scaling, advantage whitening), and those of the algorithms with a critic (GAE and the value loss). An
rl algorithm's options type derives from RLOptions, or from CriticOptions when it registers critic=True."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from pydantic import Field

from starling_jax.config import ObjectiveConfig


@dataclasses.dataclass(frozen=True)
class RLOptions(ObjectiveConfig):
    kl_coef: Annotated[float, Field(ge=0, description=(
        "beta of the KL penalty to the reference policy (the starting value when kl_target is set)"))] = 0.01
    kl_target: Annotated[Optional[float], Field(gt=0, description=(
        "target KL per reply of the adaptive controller (Ziegler et al. 2019, as trlx); None = a fixed kl_coef"))] = None
    kl_horizon: Annotated[int, Field(ge=1, description="horizon of the adaptive KL controller, in rollouts")] = 10000
    reward_clip: Annotated[float, Field(gt=0, description=(
        "the reward model's score (after scaling) is clipped to +-reward_clip"))] = 10.0
    scale_reward: Annotated[bool, Field(description="divide the reward model's score by its running std")] = True
    whiten_advantages: Annotated[bool, Field(description=(
        "normalise the advantages over each rollout chunk (trlx's PPO); APA uses raw ones"))] = False


@dataclasses.dataclass(frozen=True)
class CriticOptions(RLOptions):
    gamma: Annotated[float, Field(ge=0, le=1, description="GAE discount")] = 1.0
    gae_lambda: Annotated[float, Field(ge=0, le=1, description="GAE lambda")] = 0.95
    value_clip: Annotated[Optional[float], Field(gt=0, description=(
        "PPO's clipped value loss, V clipped to old +- value_clip; None = the unclipped 0.5 (V - R)^2 (APA)"))] = 0.2
    vf_coef: Annotated[float, Field(ge=0, description="weight of the value loss in the loss")] = 1.0
    critic_only_above: Annotated[Optional[float], Field(ge=0, description=(
        "the Starling fork's rule: a minibatch whose value loss exceeds this trains the critic only; None = off"))] = None
    value_head: Annotated[Literal["mlp", "linear", "layers"], Field(description=(
        "the critic: 'mlp' (trlx make_head: Linear(D, 2D)-ReLU-Linear(2D, 1)) or 'linear' on the policy's last hidden "
        "state, or 'layers': a trainable copy of the model's top value_head_layers layers + final norm + Linear(D, 1), "
        "initialised from the policy (the Starling fork's critic; step/hydra.py)"))] = "mlp"
    value_head_layers: Annotated[int, Field(ge=0, description=(
        "with value_head='layers': how many top layers the critic copies (1..num_layers); else 0"))] = 0


def check_critic(c) -> list[tuple[str, str]]:
    """The critic's checks that need the model: its layer count."""
    o, layers = c.objective, c.model.config.num_layers
    if o.value_head == "layers" and not 1 <= o.value_head_layers <= layers:
        return [("objective.value_head_layers", f"{o.value_head_layers} is not in [1, {layers}] (the critic "
                 f"value_head='layers' copies that many top layers)")]
    if o.value_head != "layers" and o.value_head_layers != 0:
        return [("objective.value_head_layers", f"{o.value_head_layers} is only read with value_head='layers' (got "
                 f"value_head={o.value_head!r}); leave it 0")]
    return []
