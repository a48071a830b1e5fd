"""Selection for the real-model experiment: the APA learning rate of experiments/smol_starling.py, chosen on the
TUNING problems alone.

    starling-jax study experiments/studies/select_smol.py --workdir runs/select_smol [--jobs 2]

SmolLM2-135M-Instruct, feedback -> K-wise RM -> APA on task:arithmetic; arms differ only in the APA learning rate
{1e-5, 2e-5, 5e-5} (the two rates the recipe has used, and a larger one) and share each seed's feedback rows and reward
model. Measured on the tuning split only (15% of the problems, by prompt string): exact-answer accuracy of one reply
per problem (temperature 1, 24 new tokens), and its gain over SmolLM2 itself. The arm with the highest mean tuning
accuracy over the selection seeds (100, 101) is written to selected/smol_starling.json, which the recipe reads. No
held-out problem is sampled, scored or looked at.

Budget: per seed one shared feedback + RM, then 3 APA runs; about 20 minutes per full seed on a 2-core CPU, a minute
and a half on one H100.
"""

from starling_jax.commands.study import Arm, Selection, Study
from starling_jax.stages.experiment import apply_overrides

from _base import SELECTION_SEEDS
from smol_starling import QUICK, smol  # experiments/studies/smol_starling.py

RATES = (1e-5, 2e-5, 5e-5)


def get_study() -> Study:
    settings = {f"lr{lr:g}": {"stages.policy.optim.learning_rate": lr} for lr in RATES}
    arms = tuple(Arm(name, apply_overrides(smol(), [f"{k}={v}" for k, v in s.items()])) for name, s in settings.items())
    return Study(
        name="select_smol",
        description="smol_starling's APA learning rate, chosen by tuning-split accuracy (selection seeds; the "
                    "held-out problems are never measured).",
        arms=arms, seeds=SELECTION_SEEDS, baseline="lr2e-05", shared_stages=("feedback", "rm"),
        reference_stage="base", reward_model_splits=(), splits=("tuning",), eval_prompts=64, max_new_tokens=24,
        quick=QUICK,
        selection=Selection(group="policy/tuning", metric="true_reward", path="selected/smol_starling.json",
                            settings=settings),
        budget="2 seeds x (shared feedback + RM, then 3 APA runs)")
