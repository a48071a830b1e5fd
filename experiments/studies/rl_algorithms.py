"""Which policy optimiser gives the most true reward per unit of KL: APA, PPO, GRPO, RLOO or DPO?

    starling-jax study experiments/studies/rl_algorithms.py --workdir runs/study_rl [--jobs 2]

Every arm starts from the same SFT policy and optimises against the same K-wise reward model (both trained once per
seed and shared by all arms: experiments/tiny_starling.py's sft and rm stages), on the same training prompts:
  apa    the main job's policy stage (APA, lambda 1, MLP critic, fixed KL coefficient 0.2 in the reward)
  ppo    the same stage with PPO's clipped surrogate, clipped value loss and whitened advantages (trlx's PPO), at the
         same fixed KL coefficient (no adaptive controller, so the KL pressure matches)
  grpo   critic-free: 16 prompts x 4 samples per step (the same 64 replies), advantages normalised within each group
         (mean/std), PPO's clipped surrogate, the KL as a per-token k3 term in the loss (coefficient 0.2)
  rloo   critic-free: the same groups, leave-one-out baseline, the KL as a sequence-level k1 penalty in the reward
         (coefficient 0.2), PPO's clipped surrogate
  dpo    offline: DPO (beta 0.1) on the same training rows' rankings (best vs each other answer), the same trainable
         layers, from the same SFT policy
The KL *coefficient* is matched, not the KL reached: the table reports the KL to the SFT policy of each arm's
replies and the true-reward gain per unit of it; the figure places each arm on the true reward vs KL plane.
Measured on held-out and unseen prompts: true reward and its terms (relevance vs formatting), RM score, KL, length.

Budget (2-core CPU, alone): per seed one SFT + one RM (shared), then per arm one policy stage (40 RL steps x 64
rollouts, or 120 DPO steps) plus evaluation; 3 seeds. docs/REPRODUCTION.md has the measured times. CI: one `--quick`
cell.
"""

import dataclasses

from starling_jax.config import ObjectiveConfig, OptimConfig, Stage, TrainConfig
from starling_jax.commands.study import Arm, Study

from _base import QUICK, main_job  # experiments/studies/_base.py (load_study puts this folder on the path)


def _with_policy(exp, stage_fn):
    return dataclasses.replace(exp, stages=tuple(stage_fn(s) if s.name == "policy" else s for s in exp.stages))


def arms():
    apa = main_job()

    def ppo_stage(s):
        o = dataclasses.replace(s.objective, name="ppo", ppo_clip=0.2, value_clip=0.2, whiten_advantages=True,
                                kl_target=None)
        return dataclasses.replace(s, objective=o)

    def group_stage(name):
        def make(s):
            o = dataclasses.replace(s.objective, name=name, group_size=4, ppo_clip=0.2, kl_target=None)
            return dataclasses.replace(s, objective=o)
        return make

    def dpo_stage(s):
        return Stage(name="policy", objective=ObjectiveConfig(name="dpo", dpo_beta=0.1),
                     model=dataclasses.replace(s.model),  # same init (stage:sft), same trainable top layers
                     optim=OptimConfig(learning_rate=3e-4, warmup_steps=5, schedule="constant", weight_decay=0.0,
                                       grad_clip=1.0),
                     train=TrainConfig(steps=120, batch_size=16, seed=0))

    return [Arm("apa", apa), Arm("ppo", _with_policy(apa, ppo_stage)),
            Arm("grpo", _with_policy(apa, group_stage("grpo"))), Arm("rloo", _with_policy(apa, group_stage("rloo"))),
            Arm("dpo", _with_policy(apa, dpo_stage))]


def get_study() -> Study:
    return Study(
        name="rl_algorithms",
        description="APA vs PPO vs GRPO vs RLOO vs DPO from the same SFT policy and K-wise RM, at the same KL "
                    "coefficient.",
        arms=tuple(arms()), seeds=(0, 1, 2), baseline="apa", shared_stages=("sft", "rm"), quick=QUICK,
        budget="3 seeds x (shared SFT + RM, then one policy stage per arm); see docs/REPRODUCTION.md")
