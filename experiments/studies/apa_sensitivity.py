"""How sensitive is APA to its lambda and to the KL coefficient?

    starling-jax study experiments/studies/apa_sensitivity.py --workdir runs/study_apa [--jobs 2]

One factor at a time around the main job's policy stage (experiments/tiny_starling.py), sharing its SFT policy and
K-wise RM per seed: apa_lambda in {0.1 (the APA paper's default), 1.0 (the Starling fork and the main job), 3.0} at
kl_coef 0.2, and kl_coef in {0.05, 0.2 (the main job), 0.5} at lambda 1: five arms, the baseline (lambda 1, kl 0.2,
the main job) in both lines. A full 3 x 3 grid (27 APA runs for 3 seeds) did not fit the CPU budget beside the other
two studies; the design was fixed before any arm ran. Measured on held-out and unseen prompts: true reward, gain over
the SFT policy, KL, gain per unit KL, RM score, length, utility terms.

Budget (2-core CPU, alone, 2 cells at a time): per seed one shared SFT + RM (~9 min), then 5 APA cells (~5 min each
incl. evaluation); 5 seeds = 25 APA runs, ~75 min. docs/REPRODUCTION.md has the measured times. CI: one `--quick` cell.
"""

from starling_jax.stages.experiment import apply_overrides
from starling_jax.commands.study import Arm, Study, on_splits

from _base import QUICK, REPORT_SEEDS, main_job  # experiments/studies/_base.py (load_study puts it on the path)

LAMBDAS = (0.1, 1.0, 3.0)
KL_COEFS = (0.05, 0.2, 0.5)


def get_study() -> Study:
    base = main_job()
    grid = [(1.0, 0.2)] + [(lam, 0.2) for lam in LAMBDAS if lam != 1.0] + [(1.0, kl) for kl in KL_COEFS if kl != 0.2]
    arms = tuple(Arm(f"lam{lam:g}_kl{kl:g}", apply_overrides(base, [f"stages.policy.objective.apa_lambda={lam}",
                                                                    f"stages.policy.objective.kl_coef={kl}"]))
                 for lam, kl in grid)
    return Study(
        name="apa_sensitivity",
        description="APA lambda and KL coefficient, one at a time around the main job's policy stage (shared SFT "
                    "and RM per seed).",
        arms=arms, seeds=REPORT_SEEDS, baseline="lam1_kl0.2", shared_stages=("sft", "rm"), quick=QUICK,
        primary=(  # each comparison on both reporting splits (fixed before any cell of the study ran)
            *on_splits("policy", "gain", "lam0.1_kl0.2", "lam1_kl0.2", "two-sided",
                       why="the APA paper's default lambda (0.1) against the Starling fork's (1.0), the main job's"),
        ),
        budget="5 seeds x (shared SFT + RM, then 5 APA runs); see docs/REPRODUCTION.md")
