"""Shared pieces of the study files: the main job as every study's base, the seeds, and the CI shortening."""

import os

from starling_jax.config import Experiment
from starling_jax.commands.study import read_selection
from starling_jax.stages.experiment import load_experiment

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTED = os.path.join(EXPERIMENTS, "studies", "selected")

# Reporting studies run at REPORT_SEEDS and measure the held-out and unseen splits; selection studies (select_*.py)
# run at SELECTION_SEEDS (their data, order and sampling differ from every reporting seed's) and measure the tuning
# split only.
REPORT_SEEDS = (0, 1, 2, 3, 4)
SELECTION_SEEDS = (100, 101)


def main_job() -> Experiment:
    """experiments/tiny_starling.py: SFT -> K-wise RM -> APA (seed 0 of every study is exactly the main job)."""
    return load_experiment(os.path.join(EXPERIMENTS, "tiny_starling.py"))


def selected(name: str, family: str = "all") -> dict:
    """The settings a selection study chose (selected/NAME.json), as {dotted field: value}."""
    return read_selection(os.path.join(SELECTED, f"{name}.json"), family)


# `--quick` (CI): one cell, every stage cut to a few steps on 400 synthetic prompts (4 SFT and 4 RM steps, 2 APA steps
# of 8 rollouts), the stages' own reports on 16 rows and the policy stage's own before/after evaluation on 4 prompts
# per split (the study measures its 16 quick_eval_prompts apart); checks the machinery only.
QUICK = ("data.synthetic_prompts=400", "data.report_rows=16", "stages.sft.train.steps=4", "stages.rm.train.steps=4",
         "stages.policy.train.steps=2", "stages.policy.train.batch_size=8",
         "stages.policy.rollout.prompts_per_step=8", "stages.policy.rollout.minibatch_size=8",
         "stages.policy.rollout.eval_prompts=4")
