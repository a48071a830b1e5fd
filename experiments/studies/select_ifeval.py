"""Selection for ifeval_lora_vs_full.py: each arm's APA learning rate, chosen on the TUNING split alone.

    starling-jax study experiments/studies/select_ifeval.py --workdir runs/select_ifeval [--jobs 2]

The full-layer arm (hydra top 2 trained in full) at learning rates {1e-5, 2e-5, 5e-5} and the LoRA arm (rank 8
adapters on the same layers) at {1e-4, 2e-4, 5e-4} (adapters start at B = 0 and move the policy less per step, so
their usual rates are about ten times higher), each from the seed's shared feedback rows and reward model
(experiments/smol_ifeval.py). Measured on the tuning split only (prompts of the training instructions and
combinations that no stage trains on; data.reporting = false, so no held-out row is generated or looked at): the
fraction of constraints met by the policy's sampled replies (and its gain over SmolLM2 itself, the study's reference
"base"); the reward model, shared by every arm of a seed, is not measured here. Per arm, the rate with the highest
mean over the selection seeds (100, 101) is written to selected/ifeval.json, which ifeval_lora_vs_full.py and
experiments/smol_ifeval.py read.

Budget (2-core CPU, --jobs 2, measured 2026-12-07 on an AMD EPYC): per seed one shared feedback + RM stage (the two
seeds' at once: feedback 10 min, RM 34 min), then 6 policy runs of ~32 min each, two at a time (a run: 24 min of APA,
whose time is ~70% sampling, then ~8 min of measurement); about 2 hours of both cores per seed, 4.5 in all. A machine
that may not last that long exports the finished cells and continues with --reuse results/select_ifeval
(docs/REPRODUCTION.md).
"""

from starling_jax.commands.study import Arm, Selection, Study

from _base import SELECTION_SEEDS  # experiments/studies/_base.py
from ifeval_lora_vs_full import QUICK, smol_ifeval, variant  # experiments/studies/ifeval_lora_vs_full.py

RATES = {"full": (1e-5, 2e-5, 5e-5), "lora": (1e-4, 2e-4, 5e-4)}


def get_study() -> Study:
    base = smol_ifeval()
    names = {arm: tuple(f"{arm}_lr{lr:g}" for lr in rates) for arm, rates in RATES.items()}
    settings = {f"{arm}_lr{lr:g}": {"stages.policy.optim.learning_rate": lr}
                for arm, rates in RATES.items() for lr in rates}
    arms = tuple(Arm(f"{arm}_lr{lr:g}", variant(base, arm, lr)) for arm, rates in RATES.items() for lr in rates)
    return Study(
        name="select_ifeval",
        description="The APA learning rate of each arm of ifeval_lora_vs_full (full-layer, LoRA), chosen by "
                    "tuning-split true reward (selection seeds; the held-out rows are never generated).",
        arms=arms, seeds=SELECTION_SEEDS, baseline="full_lr2e-05", shared_stages=("feedback", "rm"),
        reference_stage="base", reward_model_splits=(), splits=("tuning",), eval_prompts=100, max_new_tokens=48,
        quick=QUICK,
        selection=Selection(group="policy/tuning", metric="true_reward", path="selected/ifeval.json",
                            settings=settings, families=names),
        budget="2 seeds x (shared feedback + RM ~45 min, then 6 policy runs of ~32 min, two at a time): ~4.5 h "
               "on 2 cores")
