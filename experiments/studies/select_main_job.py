"""Selection, step 2 of 3: the main job's APA settings (KL coefficient, learning rate, RL steps), chosen on the
TUNING split alone.

    starling-jax study experiments/studies/select_main_job.py --workdir runs/select_main_job [--jobs 2]

A full grid around the main job's policy stage (experiments/tiny_starling.py, with the RM steps of step 1): KL
coefficient {0.1, 0.2, 0.5} x learning rate {1e-4, 3e-4} x RL steps {20, 40} (constant schedule after 5 warm-up steps;
64 rollouts per step), 12 arms sharing each seed's SFT policy and reward model. Measured on the tuning split only:
the true reward of the policy's sampled replies. The arm with the highest mean over the selection seeds (100, 101) is
written to selected/main_job_policy.json, which the main job reads. No held-out or unseen reporting row is sampled,
scored or looked at. Step 3 is select_rl_algorithms.py.

Budget (2-core CPU, alone): per seed one shared SFT + RM, then 12 APA runs (6 of 20 steps, 6 of 40 steps).
"""

import itertools

from starling_jax.stages.experiment import apply_overrides
from starling_jax.commands.study import Arm, Selection, Study

from _base import QUICK, SELECTION_SEEDS, main_job  # experiments/studies/_base.py

KL_COEFS = (0.1, 0.2, 0.5)
LEARNING_RATES = (1e-4, 3e-4)
RL_STEPS = (20, 40)


def get_study() -> Study:
    base = main_job()
    settings = {f"kl{kl:g}_lr{lr:g}_steps{n}": {"stages.policy.objective.kl_coef": kl,
                                                "stages.policy.optim.learning_rate": lr,
                                                "stages.policy.train.steps": n}
                for kl, lr, n in itertools.product(KL_COEFS, LEARNING_RATES, RL_STEPS)}
    arms = tuple(Arm(name, apply_overrides(base, [f"{k}={v}" for k, v in s.items()])) for name, s in settings.items())
    return Study(
        name="select_main_job",
        description="The main job's APA KL coefficient, learning rate and RL steps, chosen by tuning-split true "
                    "reward (selection seeds; the reporting rows are never measured).",
        arms=arms, seeds=SELECTION_SEEDS, baseline="kl0.2_lr0.0003_steps40", shared_stages=("sft", "rm"),
        splits=("tuning",), quick=QUICK,
        selection=Selection(group="policy/tuning", metric="true_reward", path="selected/main_job_policy.json",
                            settings=settings),
        budget="2 seeds x (shared SFT + RM, then 12 APA runs)")
