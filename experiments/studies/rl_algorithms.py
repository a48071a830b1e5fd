"""Which policy optimiser gives the most true reward per unit of KL: APA, PPO, GRPO, RLOO or DPO?

    starling-jax study experiments/studies/rl_algorithms.py --workdir runs/study_rl [--jobs 2]

Every arm starts from the same SFT policy and optimises against the same K-wise reward model (both trained once per
seed and shared by all arms: experiments/tiny_starling.py's sft and rm stages), on the same training prompts:
  apa    the main job's policy stage (APA, lambda 1, MLP critic, its selected KL coefficient in the reward)
  ppo    the same stage with PPO's clipped surrogate, clipped value loss and whitened advantages (trlx's PPO), at the
         same fixed KL coefficient (no adaptive controller, so the KL pressure matches)
  grpo   critic-free: prompts x 4 samples per step (the same number of replies), advantages normalised within each
         group (mean/std), PPO's clipped surrogate, the KL as a per-token k3 term in the loss (the same coefficient)
  rloo   critic-free: the same groups, leave-one-out baseline, the KL as a sequence-level k1 penalty in the reward
         (the same coefficient), PPO's clipped surrogate
  dpo    offline: DPO (beta 0.1) on the same training rows' rankings (best vs each other answer), the same trainable
         layers, from the same SFT policy, 120 steps
The KL *coefficient* is matched, not the KL reached: the table reports the KL to the SFT policy of each arm's
replies and the true-reward gain per unit of it; the figure places each arm on the true reward vs KL plane.
Each arm's learning rate is its own, chosen on the tuning split by select_rl_algorithms.py (APA's by
select_main_job.py), so no arm runs at a rate tuned for another. Measured on held-out and unseen prompts: true reward
and its terms (relevance vs formatting), RM score, KL, length.

Budget (2-core CPU, alone): per seed one SFT + one RM (shared), then per arm one policy stage plus evaluation;
5 seeds. docs/REPRODUCTION.md has the measured times. CI: one `--quick` cell.
"""

import dataclasses

from starling_jax import algorithms
from starling_jax.algorithms.dpo import DPOOptions
from starling_jax.config import OptimConfig, Stage, TrainConfig
from starling_jax.commands.study import Arm, Study, on_splits

from _base import QUICK, REPORT_SEEDS, main_job, selected  # experiments/studies/_base.py

ALGORITHMS = ("apa", "ppo", "grpo", "rloo", "dpo")


def _with_policy(exp, stage_fn):
    return dataclasses.replace(exp, stages=tuple(stage_fn(s) if s.name == "policy" else s for s in exp.stages))


def variant(apa, name: str, learning_rate: float):
    """The main job with its policy stage trained by algorithm `name` at `learning_rate` (apa: only the rate)."""
    def stage(s):
        optim = dataclasses.replace(s.optim, learning_rate=learning_rate)
        if name == "apa":
            return dataclasses.replace(s, optim=optim)
        if name == "ppo":
            # the APA stage's settings both take (KL, reward scaling, the critic's), PPO's own on top
            o = algorithms.switch(s.objective, "ppo", ppo_clip=0.2, value_clip=0.2, whiten_advantages=True,
                                  kl_target=None)
            return dataclasses.replace(s, objective=o, optim=optim)
        if name in ("grpo", "rloo"):
            o = algorithms.switch(s.objective, name, group_size=4, ppo_clip=0.2, kl_target=None)
            return dataclasses.replace(s, objective=o, optim=optim)
        if name == "dpo":
            return Stage(name="policy", objective=DPOOptions(dpo_beta=0.1),
                         model=dataclasses.replace(s.model),  # same init (stage:sft), same trainable top layers
                         optim=OptimConfig(learning_rate=learning_rate, warmup_steps=5, schedule="constant",
                                           weight_decay=0.0, grad_clip=1.0),
                         train=TrainConfig(steps=120, batch_size=16, seed=0))
        raise ValueError(f"unknown algorithm {name!r}")
    return _with_policy(apa, stage)


def arms():
    apa = main_job()
    rates = {name: selected("rl_algorithms", name)["stages.policy.optim.learning_rate"] for name in ALGORITHMS[1:]}
    return [Arm("apa", apa)] + [Arm(name, variant(apa, name, rates[name])) for name in ALGORITHMS[1:]]


def get_study() -> Study:
    return Study(
        name="rl_algorithms",
        description="APA vs PPO vs GRPO vs RLOO vs DPO from the same SFT policy and K-wise RM, at the same KL "
                    "coefficient, each at its own tuning-selected learning rate.",
        arms=tuple(arms()), seeds=REPORT_SEEDS, baseline="apa", shared_stages=("sft", "rm"), quick=QUICK,
        primary=(  # each comparison on both reporting splits (fixed before any cell of the study ran)
            *on_splits("policy", "gain", "ppo", "apa", "two-sided",
                       why="Starling-LM-7B-beta's optimiser (PPO) against -alpha's (APA): does the choice matter at "
                           "the same KL coefficient, each at its own tuning-selected learning rate?"),
            *on_splits("policy", "gain", "dpo", "apa", "less",
                       why="the paper's case for online RL against a reward model over offline preference optimisation"
                           " on the same rankings: DPO gains less true reward than APA"),
        ),
        budget="5 seeds x (shared SFT + RM, then one policy stage per arm); see docs/REPRODUCTION.md")
