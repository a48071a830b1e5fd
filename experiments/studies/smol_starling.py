"""The real-model result: does Starling's recipe (feedback -> K-wise RM -> APA) raise SmolLM2-135M-Instruct's
accuracy on held-out sums?

    starling-jax study experiments/studies/smol_starling.py --workdir runs/smol_study [--jobs 2]

One arm: experiments/smol_starling.py at the APA learning rate chosen on the tuning problems
(select_smol.py -> selected/smol_starling.json), at REPORT_SEEDS (0-4). Each seed varies the data order, the new heads'
init and every sampling key; the 210 problems and their split are fixed. Measured on the 63 held-out problems (30%,
by prompt string: no stage samples, ranks or trains on them, and no setting was chosen by them): exact-answer accuracy
of one reply per problem (temperature 1, 24 new tokens) for the trained policy and for SmolLM2 itself (the reference,
sampled with the same key), their paired gain, the KL to SmolLM2, the RM's score and the reply length.

Primary comparison (stated before the runs): the held-out accuracy gain of APA over SmolLM2 itself, expected > 0.

Budget: 5 seeds x one full run (feedback + RM + APA); about 20 minutes per seed on a 2-core CPU, a minute and a half
on one H100.
"""

import os

from starling_jax.commands.study import REFERENCE, Arm, Comparison, Study
from starling_jax.stages.experiment import load_experiment

from _base import EXPERIMENTS, REPORT_SEEDS

# `--quick` (CI): one cell with every stage cut to one step (4 problems x 3 replies of 8 tokens ranked, one RM step of
# 2 rankings, one APA step of 4 rollouts) and 4 measured held-out problems; checks the machinery only (the rows the
# 135M model runs on cost time, prove nothing).
QUICK = ("stages.feedback.train.steps=1", "stages.feedback.feedback.prompts_per_step=4", "stages.feedback.feedback.k=3",
         "stages.feedback.feedback.generation_batch=12", "stages.feedback.feedback.max_new_tokens=8",
         "stages.rm.data.heldout_fraction=0.25", "stages.rm.train.steps=1", "stages.rm.train.batch_size=2",
         "stages.rm.optim.warmup_steps=0", "stages.policy.train.steps=1", "stages.policy.train.batch_size=4",
         "stages.policy.optim.warmup_steps=0", "stages.policy.rollout.prompts_per_step=4",
         "stages.policy.rollout.minibatch_size=4", "stages.policy.rollout.epochs=1",
         "stages.policy.rollout.max_new_tokens=8", "stages.policy.rollout.eval_prompts=4", "logging.progress=false")


def smol():
    """experiments/smol_starling.py (its APA learning rate from selected/smol_starling.json)."""
    return load_experiment(os.path.join(EXPERIMENTS, "smol_starling.py"))


def get_study() -> Study:
    return Study(
        name="smol_starling",
        description="SmolLM2-135M-Instruct through feedback -> K-wise RM -> APA on task:arithmetic; held-out "
                    "exact-answer accuracy against SmolLM2 itself.",
        arms=(Arm("apa", smol()),), seeds=REPORT_SEEDS, reference_stage="base", reward_model_splits=(),
        splits=("heldout",), eval_prompts=64, max_new_tokens=24, quick=QUICK, quick_eval_prompts=4,
        primary=(Comparison(group="policy/heldout", metric="gain", arm="apa", baseline=REFERENCE,
                            direction="greater",
                            why="the recipe's claim: RLAIF against a learned K-wise RM makes the model more accurate "
                                "on problems no stage saw"),),
        budget="5 seeds x (feedback + RM + APA)")
