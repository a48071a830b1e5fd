"""How sensitive is APA to its lambda and to the KL coefficient?

    starling-jax study experiments/studies/apa_sensitivity.py --workdir runs/study_apa [--jobs 2]

A 3 x 3 grid over the main job's policy stage (experiments/tiny_starling.py), sharing its SFT policy and K-wise RM
per seed: apa_lambda in {0.1 (the APA paper's default), 1.0 (the Starling fork and the main job), 3.0} x kl_coef in
{0.05, 0.2 (the main job), 0.5}. Baseline: lambda 1, kl 0.2 (the main job). Measured on held-out and unseen prompts:
true reward, gain over the SFT policy, KL, gain per unit KL, RM score, length, utility terms.

Budget (2-core CPU, alone): per seed one shared SFT + RM, then 9 APA runs (40 steps x 64 rollouts) plus
evaluation; 3 seeds = 27 APA runs. docs/REPRODUCTION.md has the measured times. CI: one `--quick` cell.
"""

from starling_jax.config_loading import apply_overrides
from starling_jax.study import Arm, Study

from _base import QUICK, main_job  # experiments/studies/_base.py (load_study puts this folder on the path)

LAMBDAS = (0.1, 1.0, 3.0)
KL_COEFS = (0.05, 0.2, 0.5)


def get_study() -> Study:
    base = main_job()
    arms = tuple(Arm(f"lam{lam:g}_kl{kl:g}", apply_overrides(base, [f"stages.policy.objective.apa_lambda={lam}",
                                                                    f"stages.policy.objective.kl_coef={kl}"]))
                 for lam in LAMBDAS for kl in KL_COEFS)
    return Study(
        name="apa_sensitivity",
        description="APA lambda x KL coefficient grid on the main job's policy stage (shared SFT and RM per seed).",
        arms=arms, seeds=(0, 1, 2), baseline="lam1_kl0.2", shared_stages=("sft", "rm"), quick=QUICK,
        budget="3 seeds x (shared SFT + RM, then 9 APA runs); see docs/REPRODUCTION.md")
