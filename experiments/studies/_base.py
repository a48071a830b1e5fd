"""Shared pieces of the study files: the main job as every study's base, and the CI shortening."""

import os

from starling_jax.config import Experiment
from starling_jax.stages.experiment import load_experiment

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_job() -> Experiment:
    """experiments/tiny_starling.py: SFT -> K-wise RM -> APA (seed 0 of every study is exactly the main job)."""
    return load_experiment(os.path.join(EXPERIMENTS, "tiny_starling.py"))


# `--quick` (CI): one cell, every stage cut to a few steps on 400 synthetic prompts; checks the machinery only.
QUICK = ("data.synthetic_prompts=400", "stages.sft.train.steps=8", "stages.rm.train.steps=8",
         "stages.policy.train.steps=2", "stages.policy.train.batch_size=16",
         "stages.policy.rollout.prompts_per_step=16", "stages.policy.rollout.minibatch_size=8")
