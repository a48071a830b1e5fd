"""A K-wise (Plackett-Luce) reward model on the embedded synthetic Nectar: the tiny 2-layer model, CPU, about a minute.

The synthetic rows carry a hidden true utility (starling_jax/data/synthetic.py); the held-out pairwise accuracy of the
trained RM against the observed rankings is the number to watch (chance = 0.5).

    starling-jax train tiny_rm --workdir runs/tiny_rm
    starling-jax eval runs/tiny_rm/rm
"""

from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, ModelSection,
                                 OptimConfig, TrainConfig)
from starling_jax.models import PRESETS


def get_config() -> Experiment:
    return Experiment(
        name="tiny_rm",
        model=ModelSection(config=PRESETS["tiny"].replace(head="score")),
        data=DataConfig(source="synthetic", synthetic_prompts=2000, max_length=80, max_prompt_length=64,
                        max_responses=7, heldout_fraction=0.1),
        objective=PlackettLuceOptions(),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(steps=200, batch_size=8, eval_every=100, eval_batches=4, seed=0),
        checkpoint=CheckpointConfig(every=100, keep=2),
        logging=LoggingConfig(every=20),
    )
