"""Is the K-wise (Plackett-Luce) reward model better than a pairwise (Bradley-Terry) one trained on the same rankings?

    starling-jax study experiments/studies/rm_kwise_vs_pairwise.py --workdir runs/study_rm [--jobs 2]

Arms (everything else is the main job, experiments/tiny_starling.py, at each seed):
  plackett_luce   the RM stage's loss is the K-wise Plackett-Luce NLL of each 7-way ranking (the main job)
  bradley_terry   the same RM stage (same rows, batches, steps, optimiser, init from the same SFT policy) with the
                  Bradley-Terry loss over all C(7, 2) = 21 pairs each ranking implies
Both read the same 7-wise rankings; only the loss differs. The SFT stage is trained once per seed and shared.
Measured per arm: the RM's ranking of held-out and unseen groups against the TRUE utility order (pair accuracy,
top-1, Kendall tau), and the true reward, KL and RM score of the APA policy trained against that RM.

Budget (2-core CPU, this machine alone): per seed one SFT (400 steps) and, per arm, one RM (1200 steps) and one APA
run (40 steps x 64 rollouts) plus evaluation: 5 seeds x (1 SFT + 2 x (RM + APA)). Each arm-cell costs about as much
as the main job minus its SFT (docs/REPRODUCTION.md has the measured wall times). CI runs one `--quick` cell.
"""

from starling_jax.stages.experiment import apply_overrides
from starling_jax.commands.study import Arm, Study, on_splits

from _base import QUICK, REPORT_SEEDS, main_job  # experiments/studies/_base.py (load_study puts it on the path)


def get_study() -> Study:
    kwise = main_job()
    pairwise = apply_overrides(kwise, ["stages.rm.objective.name=rm_bradley_terry"])
    return Study(
        name="rm_kwise_vs_pairwise",
        description="K-wise Plackett-Luce vs pairwise Bradley-Terry reward model on the same 7-wise rankings, and "
                    "APA against each.",
        arms=(Arm("plackett_luce", kwise), Arm("bradley_terry", pairwise)),
        seeds=REPORT_SEEDS, baseline="plackett_luce", shared_stages=("sft",), quick=QUICK,
        primary=(  # each comparison on both reporting splits (fixed before any cell of the study ran)
            *on_splits("rm", "pair_accuracy", "bradley_terry", "plackett_luce", "less",
                       why="the paper trains its reward model with the K-wise Plackett-Luce loss on 7-wise rankings: a"
                           " pairwise loss on the same rankings ranks worse"),
            *on_splits("policy", "gain", "bradley_terry", "plackett_luce", "two-sided",
                       why="does the RM's loss change what APA gains against it?"),
        ),
        budget="5 seeds x (1 SFT + 2 arms x (RM 1200 steps + APA 40 steps)); see docs/REPRODUCTION.md")
