"""K-wise (Plackett-Luce) vs pairwise (Bradley-Terry) reward models at a scale a busy 2-core CPU finishes in minutes.

    starling-jax study experiments/studies/rm_small.py --workdir runs/study_rm_small [--jobs 3]

The reward-model half of rm_kwise_vs_pairwise.py, shrunk: experiments/tiny_rm.py's 2-layer reward model trained FROM
SCRATCH (no SFT initialisation, no downstream APA) for 300 steps of 8 seven-way rankings, on the main job's data
(2,000 synthetic prompts, label noise 0.5, a prompt-disjoint tuning split, and the generated reporting splits:
held-out rows about topics no stage trains on, unseen rows in untrained templates; docs/DATA.md) and the main job's
sequence lengths. Arms, identical but for the loss:
  plackett_luce   the K-wise Plackett-Luce NLL of each 7-way ranking
  bradley_terry   Bradley-Terry over all C(7, 2) = 21 pairs of the same rankings (same rows, batches, steps, init)
Measured: ranking of held-out and unseen groups against the TRUE utility order (pair accuracy over untied pairs,
top-1, Kendall tau), 5 seeds (data generation, order, init), 95% paired bootstrap over seeds and prompt clusters.

Budget: 10 cells of 300 RM steps of a 2-layer model; docs/REPRODUCTION.md has the measured wall time.
"""

from starling_jax.stages.experiment import apply_overrides, load_experiment
from starling_jax.commands.study import Arm, Study, on_splits

from _base import EXPERIMENTS, REPORT_SEEDS  # experiments/studies/_base.py (load_study puts this folder on the path)

SETTINGS = ("data.synthetic_noise=0.5", "data.heldout_fraction=0", "data.tuning_fraction=0.1", "data.report_rows=256",
            "data.max_length=64",
            "data.max_prompt_length=40", "train.steps=300", "train.eval_every=0", "checkpoint.every=0",
            "logging.every=50", "logging.tensorboard=false")


def get_study() -> Study:
    import os
    kwise = apply_overrides(load_experiment(os.path.join(EXPERIMENTS, "tiny_rm.py")), SETTINGS)
    pairwise = apply_overrides(kwise, ["objective.name=rm_bradley_terry"])
    return Study(
        name="rm_small",
        description="K-wise Plackett-Luce vs pairwise Bradley-Terry on the same 7-wise rankings: a 2-layer reward "
                    "model from scratch, 300 steps (the RM half of rm_kwise_vs_pairwise, shrunk to fit a busy CPU).",
        arms=(Arm("plackett_luce", kwise, policy_stage=None), Arm("bradley_terry", pairwise, policy_stage=None)),
        seeds=REPORT_SEEDS, baseline="plackett_luce", reference_stage=None, reward_stage="rm",
        primary=(  # each comparison on both reporting splits (fixed before any cell of the study ran)
            *on_splits("rm", "pair_accuracy", "bradley_terry", "plackett_luce", "less",
                       why="the paper's K-wise loss against the pairwise one, reward model only"),
        ),
        quick=("train.steps=4", "data.synthetic_prompts=300"),
        budget="10 cells x 300 steps of a 2-layer RM (no SFT, no RL); see docs/REPRODUCTION.md")
