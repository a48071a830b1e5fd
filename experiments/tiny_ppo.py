"""The main job's pipeline with PPO instead of APA (Starling-beta's optimiser), on a CPU in about the main job's time.

    starling-jax run experiments/tiny_ppo.py --workdir runs/tiny_ppo

Same SFT and reward-model stages as experiments/tiny_starling.py; the policy stage uses PPO's clipped surrogate,
a clipped value loss, whitened advantages and the adaptive KL controller (trlx's PPO defaults).
"""

import dataclasses
import importlib.util
import os

from starling_jax.algorithms.ppo import PPOOptions
from starling_jax.config import Experiment


def _main_job() -> Experiment:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_starling.py")
    spec = importlib.util.spec_from_file_location("_tiny_starling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> Experiment:
    exp = _main_job()
    stages = []
    for stage in exp.stages:
        if stage.name == "policy":
            objective = PPOOptions(ppo_clip=0.2, value_clip=0.2, vf_coef=0.5,
                                   kl_coef=stage.objective.kl_coef, kl_target=2.0, kl_horizon=1000,
                                   gamma=1.0, gae_lambda=0.95, value_head="mlp", reward_clip=10.0,
                                   whiten_advantages=True)
            stage = dataclasses.replace(stage, objective=objective)
        stages.append(stage)
    return dataclasses.replace(exp, name="tiny_ppo", stages=tuple(stages))
