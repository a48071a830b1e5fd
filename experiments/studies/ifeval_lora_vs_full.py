"""LoRA adapters against full-layer training, on the same budget: does SmolLM2-135M-Instruct gain as much held-out
instruction-following reward with adapters as with its top layers trained in full?

    starling-jax study experiments/studies/ifeval_lora_vs_full.py --workdir runs/ifeval_lora_vs_full [--jobs 2]

Both arms are experiments/smol_ifeval.py (task:ifeval; feedback -> K-wise RM -> APA from SmolLM2) and share each
seed's feedback rows and reward model (trained once per seed); they differ only in how the policy stage trains:
  full   the hydra's top 2 layers train in full (every weight of them; the 28 below are the frozen trunk)
  lora   LoRA adapters (rank 8, alpha 16, on q, k, v, o, gate, up and down) on the same top 2 layers, the base
         weights frozen; the reference is the base with the adapters switched off
The same prompts, rollouts (20 steps x 16 of 48 tokens), critic, KL coefficient and steps; each arm at its own
learning rate, chosen on the tuning split by select_ifeval.py (selected/ifeval.json), so neither runs at a rate tuned
for the other. Measured on the 128 held-out prompts of each seed (instructions and constraint combinations no
training or tuning row has; docs/DATA.md): the fraction of constraints met by one sampled reply (temperature 1, 48
new tokens) per prompt, its gain over SmolLM2's own reply, the KL to SmolLM2, the RM score and length; and the RM's
ranking of each held-out row's reference and broken variants against the checker's order.

Budget (2-core CPU, --jobs 2): each seed's shared feedback + RM stages ~45 min beside another seed's (select_ifeval's
runs of the same stages; up to 1.7 h on a machine busy with other work), then two policy cells of ~68 min, two at a
time (seed 0: 32 min of APA, then ~35 min of measurement, of which the RM's ranking and SmolLM2's own replies are
now measured once per seed and shared); about 1.5 hours of both cores per seed, ~7.5 hours for the 5 seeds: a study
that outlives several machines, finished with --export-raw and --reuse results/ifeval_lora_vs_full
(docs/REPRODUCTION.md). The shortened chain runs in the suite as colab/real_model_rlaif.ipynb
(tests/test_colab.py); the study's own cell machinery with a "base" reference as smol_starling's --quick cell.
"""

import dataclasses
import os

from starling_jax.commands.study import Arm, Comparison, Study
from starling_jax.stages.experiment import load_experiment

from _base import EXPERIMENTS, REPORT_SEEDS, selected  # experiments/studies/_base.py

ARMS = ("full", "lora")
# `--quick` (CI): one cell, every stage cut to a step or two with short replies; checks the machinery only.
QUICK = ("stages.feedback.train.steps=1", "stages.feedback.feedback.prompts_per_step=8",
         "stages.feedback.feedback.max_new_tokens=8", "stages.rm.train.steps=2", "stages.policy.train.steps=1",
         "stages.policy.train.batch_size=8", "stages.policy.rollout.prompts_per_step=8",
         "stages.policy.rollout.minibatch_size=8", "stages.policy.rollout.max_new_tokens=8",
         "logging.progress=false")


def smol_ifeval():
    return load_experiment(os.path.join(EXPERIMENTS, "smol_ifeval.py"))


def variant(exp, arm: str, learning_rate: float):
    """experiments/smol_ifeval.py with its policy stage trained as `arm` at `learning_rate`: "lora" is the recipe's
    own (adapters on the top 2 layers), "full" the same stage without adapters (the top 2 layers train in full). The
    stage samples no evaluation prompts of its own (rollout.eval_prompts = 0): the study measures every cell itself,
    so the stage's before/after report would only repeat that measurement on fewer prompts."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")

    def stage(s):
        if s.name != "policy":
            return s
        model = s.model if arm == "lora" else dataclasses.replace(s.model, lora=None)
        return dataclasses.replace(s, model=model, optim=dataclasses.replace(s.optim, learning_rate=learning_rate),
                                   rollout=dataclasses.replace(s.rollout, eval_prompts=0))
    return dataclasses.replace(exp, stages=tuple(stage(s) for s in exp.stages))


def get_study() -> Study:
    base = smol_ifeval()
    rates = {arm: selected("ifeval", arm)["stages.policy.optim.learning_rate"] for arm in ARMS}
    return Study(
        name="ifeval_lora_vs_full",
        description="LoRA adapters vs full-layer (hydra top-2) training of SmolLM2's APA policy on task:ifeval, the "
                    "same budget, each at its own tuning-selected learning rate.",
        arms=tuple(Arm(arm, variant(base, arm, rates[arm])) for arm in ARMS), seeds=REPORT_SEEDS, baseline="full",
        shared_stages=("feedback", "rm"), reference_stage="base", splits=("heldout",), eval_prompts=128,
        max_new_tokens=48, quick=QUICK,
        primary=(Comparison(group="policy/heldout", metric="gain", arm="lora", baseline="full", direction="two-sided",
                            why="the issue's question: on the same budget (prompts, rollouts, steps, layers), do LoRA "
                                "adapters gain as much held-out instruction-following reward (fraction of constraints "
                                "met) as training the same layers in full, or more, or less?"),),
        budget="5 seeds x (shared feedback + RM, then one policy stage per arm): ~7.5 h on 2 cores")
