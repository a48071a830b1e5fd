"""Group objectives across processes (tests/test_multiprocess.py): GRPO (RLOO groups its rows the same way) with
G = 2 replies per prompt, from a fresh one-layer policy and a fresh reward model (no earlier stage: the run compares
processes, not learning), on a mesh of 4 devices split over the batch (2 processes x 2 simulated CPU devices, or 1
process x 4). A chunk of 8 rollouts is 4 prompts x 2: one prompt, both its samples, on each device."""

from starling_jax.algorithms.grpo import GRPOOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 OptimConfig, RewardModelSection, RolloutConfig, Stage, TrainConfig)
from starling_jax.models import PRESETS

POLICY = PRESETS["tiny"].replace(num_layers=1)
RM = POLICY.replace(head="score")
STEPS = 2


def get_config() -> Experiment:
    section = ModelSection(config=POLICY, tokenizer="openchat-3.5", template="openchat_3.5", trainable_top_layers=1,
                           train_lm_head=True)
    rollout = RolloutConfig(prompts_per_step=8, max_new_tokens=6, epochs=1, minibatch_size=4, eval_prompts=8)
    return Experiment(
        name="multiprocess_group",
        mesh=MeshConfig(data=4, fsdp=1, tensor=1),
        model=section,
        reward_model=RewardModelSection(config=RM, tokenizer="openchat-3.5", template="openchat_3.5", max_length=64),
        data=DataConfig(source="synthetic", synthetic_prompts=64, heldout_fraction=0.125, max_length=48,
                        max_prompt_length=32, max_responses=3),
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=1, tensorboard=False, progress=False),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant"),
        stages=(
            Stage(name="grpo", objective=GRPOOptions(group_size=2, kl_coef=0.05, kl_in="reward",
                                                     kl_target=1.0, kl_horizon=100.0),
                  rollout=rollout, train=TrainConfig(steps=STEPS, batch_size=8, seed=0)),
        ),
    )
