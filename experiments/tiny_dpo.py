"""DPO on the synthetic rankings (best response vs each of the others), starting from a freshly SFT-ed tiny model:
two stages, sft -> dpo, the reference being the SFT model. CPU, about two minutes.

    starling-jax run tiny_dpo --workdir runs/tiny_dpo
"""

from starling_jax.algorithms.dpo import DPOOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, Stage, TrainConfig)
from starling_jax.models import PRESETS


def get_config() -> Experiment:
    return Experiment(
        name="tiny_dpo",
        model=ModelSection(config=PRESETS["tiny"]),
        data=DataConfig(source="synthetic", synthetic_prompts=2000, max_length=72, max_prompt_length=56,
                        pairs="best_vs_rest"),
        checkpoint=CheckpointConfig(every=20, keep=2),
        logging=LoggingConfig(every=20),
        stages=(
            Stage("sft", ObjectiveConfig(name="sft"),
                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=20),
                  train=TrainConfig(steps=100, batch_size=8, eval_every=0, seed=0)),
            # the DPO paper (Rafailov et al. 2023) used beta = 0.1 and a small constant learning rate
            Stage("dpo", DPOOptions(dpo_beta=0.1),
                  model=ModelSection(config=PRESETS["tiny"], path="stage:sft"),
                  optim=OptimConfig(learning_rate=3e-4, warmup_steps=5, schedule="constant"),
                  train=TrainConfig(steps=40, batch_size=8, eval_every=20, eval_batches=4, seed=1)),
        ),
    )
