"""Selection, step 1 of 3: how many steps the main job's K-wise reward model trains, chosen on the TUNING split alone.

    starling-jax study experiments/studies/select_rm.py --workdir runs/select_rm [--jobs 2]

Arms: the main job's RM stage (experiments/tiny_starling.py) at 600 or 1200 steps (cosine schedule over each length),
from the same SFT policy per seed. Measured on the tuning split only (prompt groups of the training data that no stage
trains on; never the held-out or unseen reporting rows): the RM's pair accuracy against the true-utility order. The
arm with the higher mean over the selection seeds (100, 101: seeds no reporting study uses) is written to
selected/main_job_rm.json, which the main job reads. Step 2 is select_main_job.py.

Budget (2-core CPU, alone): per seed one SFT (400 steps) and two RMs (600 + 1200 steps); no RL.
"""

import dataclasses

from starling_jax.stages.experiment import apply_overrides
from starling_jax.commands.study import Arm, Selection, Study

from _base import QUICK, SELECTION_SEEDS, main_job  # experiments/studies/_base.py

RM_STEPS = (600, 1200)


def get_study() -> Study:
    base = main_job()
    base = dataclasses.replace(base, stages=tuple(s for s in base.stages if s.name in ("sft", "rm")))  # no RL
    settings = {f"rm{n}": {"stages.rm.train.steps": n} for n in RM_STEPS}
    arms = tuple(Arm(name, apply_overrides(base, [f"{k}={v}" for k, v in s.items()]), policy_stage=None)
                 for name, s in settings.items())
    return Study(
        name="select_rm",
        description="The main job's RM steps, chosen by tuning-split pair accuracy (selection seeds; the reporting "
                    "rows are never measured).",
        arms=arms, seeds=SELECTION_SEEDS, baseline=arms[-1].name, shared_stages=("sft",), reference_stage=None,
        splits=("tuning",), quick=tuple(o for o in QUICK if not o.startswith("stages.policy.")),
        selection=Selection(group="rm/tuning", metric="pair_accuracy", path="selected/main_job_rm.json",
                            settings=settings),
        budget="2 seeds x (1 SFT + RM 600 + RM 1200 steps)")
