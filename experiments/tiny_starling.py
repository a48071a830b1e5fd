"""THE MAIN JOB: Starling's whole RLAIF pipeline, in miniature, on a CPU in about 13 minutes (2 cores).

    starling-jax run experiments/tiny_starling.py --workdir runs/tiny_starling

Three stages on the embedded synthetic Nectar (starling_jax/data/synthetic.py: chats whose 7 responses are ranked by
a hidden true utility, so we can measure whether RL really makes the policy better, not just the reward model happier):

  sft     the tiny 4-layer Mistral-shaped policy learns the chats' best responses (OpenChat-3.5 template/tokenizer)
  rm      a reward model initialised from the SFT policy, reading its OWN tokenizer and template like
          Starling-RM-7B-alpha (the Llama SentencePiece vocabulary, "<s>[INST] ... </s> [/INST] ...</s>"), trained
          with the K-wise Plackett-Luce loss on 7-way rankings
  policy  APA against the frozen RM from the SFT policy: rollouts are decoded, re-rendered in the RM's template and
          re-tokenized for it; KL penalty to the initial policy; MLP critic; hydra (the top 2 of the 4 layers and
          the LM head train, the trunk below runs once for policy and reference)

Values checked against this text by tests/test_recipes.py. The tiny reward model uses the Plackett-Luce sum over
the K-1 choice terms (objective.pl_normalize=False); the 7B recipe uses the authors' per-choice mean.

WORKDIR/summary.json holds each stage's summary: rm.heldout_pair_accuracy, and policy.true_reward_before/after (the
hidden utility of the policy's sampled replies to held-out prompts before and after RL), policy.kl_to_reference,
policy.rm_score_before/after, policy.rm_win_rate_vs_initial (the reward model's verdict, prompt by prompt, on
the final policy's reply vs the SFT policy's: win rate with a 95% bootstrap interval, ties, length-controlled win
rate); WORKDIR/policy/curves.png plots reward, true reward, KL and losses per RL step.
"""

import os

from starling_jax.algorithms.apa import APAOptions
from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, Stage, TrainConfig)
from starling_jax.models import PRESETS
from starling_jax.commands.study import read_selection

# The settings chosen on the tuning split by the selection studies (experiments/studies/select_rm.py and
# select_main_job.py), never by looking at a reporting row; the files say how, or that the choice is provisional.
SELECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "studies", "selected")

POLICY = PRESETS["tiny"].replace(num_layers=4)  # 4 layers x 64 hidden, GQA, sliding window 32, OpenChat vocab (32002)
# The reward model starts from the SFT policy's weights (InstructGPT's recipe: Starling started its RM from
# Llama-2-7B-chat, a pretrained chat model; here the SFT policy is the only pretrained model we have), with the LM head
# swapped for a scalar score head. It keeps its own tokenizer and template: the Mistral/Llama SentencePiece vocabulary
# (ids 0..31999, no <|end_of_turn|>, pad = <unk> = 0) and the Llama-2 chat format.
RM = POLICY.replace(head="score")
RM_TOKENIZER, RM_TEMPLATE = "mistral-7b-v0.1", "llama2"


def get_config() -> Experiment:
    rm = read_selection(os.path.join(SELECTED, "main_job_rm.json"))
    rl = read_selection(os.path.join(SELECTED, "main_job_policy.json"))
    # Splits (data.pipelines.Splits, docs/DATA.md): 10% of the 2,000 training-distribution rows (whole prompt groups)
    # are the tuning split; the reporting splits are generated apart (data.report_rows): 256 held-out rows about
    # topics no stage trains on and 256 unseen rows whose every user turn uses an untrained template.
    data = DataConfig(source="synthetic", synthetic_prompts=2000, synthetic_seed=0, synthetic_noise=0.5,
                      heldout_fraction=0.0, tuning_fraction=0.1, report_rows=256, max_length=64,
                      max_prompt_length=40, max_responses=7)
    return Experiment(
        name="tiny_starling",
        model=ModelSection(config=POLICY, tokenizer="openchat-3.5", template="openchat_3.5"),
        reward_model=RewardModelSection(config=RM, path="stage:rm", tokenizer=RM_TOKENIZER, template=RM_TEMPLATE,
                                        max_length=128),
        data=data,
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=5, tensorboard=False),
        stages=(
            Stage(name="sft", objective=ObjectiveConfig(name="sft"),
                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.01),
                  train=TrainConfig(steps=400, batch_size=16, seed=0)),
            Stage(name="rm", objective=PlackettLuceOptions(),
                  model=ModelSection(config=RM, path="stage:sft", tokenizer=RM_TOKENIZER, template=RM_TEMPLATE),
                  optim=OptimConfig(learning_rate=1e-3, warmup_steps=20, schedule="cosine", grad_clip=1.0),
                  train=TrainConfig(steps=rm["stages.rm.train.steps"], batch_size=8, seed=0)),
            Stage(name="policy",
                  objective=APAOptions(apa_lambda=1.0, kl_coef=rl["stages.policy.objective.kl_coef"],
                                       value_clip=None, vf_coef=0.5,
                                       gamma=1.0, gae_lambda=0.95, value_head="mlp", reward_clip=10.0),
                  model=ModelSection(config=POLICY, path="stage:sft", tokenizer="openchat-3.5",
                                     template="openchat_3.5", trainable_top_layers=2, train_lm_head=True),
                  optim=OptimConfig(learning_rate=rl["stages.policy.optim.learning_rate"], warmup_steps=5,
                                    schedule="constant", weight_decay=0.0, grad_clip=1.0),
                  rollout=RolloutConfig(prompts_per_step=64, max_new_tokens=24, temperature=1.0, epochs=2,
                                        minibatch_size=16, eval_prompts=256),
                  train=TrainConfig(steps=rl["stages.policy.train.steps"], batch_size=64, seed=0)),
        ),
    )
