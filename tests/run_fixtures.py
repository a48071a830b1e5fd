"""A finished run of the main job's shape without training it: WORKDIR/config.json (experiments/tiny_starling.py)
and the sft, rm and policy stage exports, each with randomly initialised weights (distinct seeds). What
`starling-jax run` leaves behind, in a second instead of minutes; for tests of convert and eval."""

import json
import os

import jax

from starling_jax import models
from starling_jax.stages.experiment import load_experiment, stages_of, to_dict
from starling_jax.step.checkpoint import save_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(workdir: str, stages=("sft", "rm", "policy")) -> str:
    exp = load_experiment(os.path.join(ROOT, "experiments", "tiny_starling.py"))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(to_dict(exp), f)
    for seed, (name, stage) in enumerate(stages_of(exp)):
        if name not in stages:
            continue
        config = stage.model.config
        params = models.init_params(config, jax.random.key(seed))
        save_export(os.path.join(workdir, name, "export"), config, params, {"stage": name, "fixture": True})
    return workdir
