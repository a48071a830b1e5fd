"""Supervised fine-tuning of the tiny 2-layer model on the synthetic conversations (the loss covers assistant tokens
only, rendered in the OpenChat-3.5 template), CPU, about a minute.

The 32002-token LM head dominates the compute of this 64-wide model, so the batch is small.

    starling-jax train tiny_sft --workdir runs/tiny_sft
"""

from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, TrainConfig)
from starling_jax.models import PRESETS


def get_config() -> Experiment:
    return Experiment(
        name="tiny_sft",
        model=ModelSection(config=PRESETS["tiny"], template="openchat_3.5", tokenizer="openchat-3.5"),
        data=DataConfig(source="synthetic", synthetic_prompts=2000, max_length=72, max_prompt_length=56),
        objective=ObjectiveConfig(name="sft"),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.01),
        train=TrainConfig(steps=120, batch_size=8, eval_every=60, eval_batches=4, seed=0),
        checkpoint=CheckpointConfig(every=60, keep=2),
        logging=LoggingConfig(every=20),
    )
