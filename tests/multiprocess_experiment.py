"""The smallest whole pipeline for the multi-process tests (tests/test_multiprocess.py): SFT, a Plackett-Luce reward
model and APA with an adaptive KL controller and reward scaling, one layer each, a few steps, checkpoints every step,
on a mesh of 4 devices split over the batch (2 processes x 2 simulated CPU devices, or 1 process x 4)."""

from starling_jax.algorithms.apa import APAOptions
from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, Stage, TrainConfig)
from starling_jax.models import PRESETS

POLICY = PRESETS["tiny"].replace(num_layers=1)
RM = POLICY.replace(head="score")
RL_STEPS = 6  # room for a SIGTERM stop, a SIGKILL after a later checkpoint, and steps after both


def get_config() -> Experiment:
    return Experiment(
        name="multiprocess",
        mesh=MeshConfig(data=4, fsdp=1, tensor=1),
        model=ModelSection(config=POLICY, tokenizer="openchat-3.5", template="openchat_3.5"),
        reward_model=RewardModelSection(config=RM, path="stage:rm", tokenizer="openchat-3.5",
                                        template="openchat_3.5", max_length=64),
        data=DataConfig(source="synthetic", synthetic_prompts=64, heldout_fraction=0.125, max_length=48,
                        max_prompt_length=32, max_responses=3),
        checkpoint=CheckpointConfig(every=1, keep=2),
        logging=LoggingConfig(every=1, tensorboard=False, progress=False),
        stages=(
            Stage(name="sft", objective=ObjectiveConfig(name="sft"),
                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"),
                  train=TrainConfig(steps=3, batch_size=8, seed=0)),
            Stage(name="rm", objective=PlackettLuceOptions(),
                  model=ModelSection(config=RM, path="stage:sft", tokenizer="openchat-3.5", template="openchat_3.5"),
                  optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant"),
                  train=TrainConfig(steps=3, batch_size=8, seed=0)),
            Stage(name="policy",
                  objective=APAOptions(kl_coef=0.1, kl_target=1.0, kl_horizon=100.0,
                                       value_head="linear", scale_reward=True),
                  model=ModelSection(config=POLICY, path="stage:sft", tokenizer="openchat-3.5",
                                     template="openchat_3.5", trainable_top_layers=1, train_lm_head=True),
                  optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant"),
                  rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=8, epochs=1, minibatch_size=4,
                                        eval_prompts=4),
                  train=TrainConfig(steps=RL_STEPS, batch_size=8, seed=0)),
        ),
    )
