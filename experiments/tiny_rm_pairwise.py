"""The pairwise (Bradley-Terry over all C(K,2) pairs of each ranking) reward model: tiny_rm with the other loss, to
compare with the K-wise Plackett-Luce estimator the Starling RM used.

    starling-jax train tiny_rm_pairwise
"""

import dataclasses
from pathlib import Path

from starling_jax.config import Experiment, ObjectiveConfig
from starling_jax.stages.experiment import load_experiment


def get_config() -> Experiment:
    kwise = load_experiment(str(Path(__file__).with_name("tiny_rm.py")))
    return dataclasses.replace(kwise, name="tiny_rm_pairwise", objective=ObjectiveConfig(name="rm_bradley_terry"))
