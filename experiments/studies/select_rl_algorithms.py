"""Selection, step 3 of 3: each rl_algorithms arm's own learning rate, chosen on the TUNING split alone.

    starling-jax study experiments/studies/select_rl_algorithms.py --workdir runs/select_rl [--jobs 2]

PPO, GRPO and RLOO at learning rates {1e-4, 3e-4} and DPO at {3e-5, 1e-4, 3e-4} (DPO's offline loss moves the policy
faster per step), each from the main job's SFT policy and RM (its selected RM steps and KL coefficient); APA's rate
is the main job's own (select_main_job.py). Measured on the tuning split only: the true reward of the policy's
sampled replies. Per algorithm, the rate with the highest mean over the selection seeds (100, 101) is written to
selected/rl_algorithms.json, which rl_algorithms.py reads.

Budget (2-core CPU, alone): per seed one shared SFT + RM, then 9 policy runs.
"""

from starling_jax.commands.study import Arm, Selection, Study

from _base import QUICK, SELECTION_SEEDS, main_job  # experiments/studies/_base.py
from rl_algorithms import variant  # experiments/studies/rl_algorithms.py

RATES = {"ppo": (1e-4, 3e-4), "grpo": (1e-4, 3e-4), "rloo": (1e-4, 3e-4), "dpo": (3e-5, 1e-4, 3e-4)}


def get_study() -> Study:
    apa = main_job()
    settings = {f"{name}_lr{lr:g}": {"stages.policy.optim.learning_rate": lr}
                for name, rates in RATES.items() for lr in rates}
    arms = tuple(Arm(f"{name}_lr{lr:g}", variant(apa, name, lr)) for name, rates in RATES.items() for lr in rates)
    families = {name: tuple(f"{name}_lr{lr:g}" for lr in rates) for name, rates in RATES.items()}
    return Study(
        name="select_rl_algorithms",
        description="Each rl_algorithms arm's learning rate, chosen by tuning-split true reward (selection seeds; "
                    "the reporting rows are never measured).",
        arms=arms, seeds=SELECTION_SEEDS, baseline=arms[0].name, shared_stages=("sft", "rm"), splits=("tuning",),
        quick=QUICK,
        selection=Selection(group="policy/tuning", metric="true_reward", path="selected/rl_algorithms.json",
                            settings=settings, families=families),
        budget="2 seeds x (shared SFT + RM, then 9 policy runs)")
