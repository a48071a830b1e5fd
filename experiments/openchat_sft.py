"""Supervised fine-tuning of Mistral-7B-v0.1 into a chat model in the OpenChat-3.5 format, on Nectar's best-ranked
responses: the SFT step of the pipeline Starling started from (its policy init was OpenChat-3.5).

    starling-jax plan experiments/openchat_sft.py --target v5e-64
    starling-jax train experiments/openchat_sft.py --workdir runs/openchat_sft

Needs local copies (nothing is downloaded at run time):
  checkpoints/Mistral-7B-v0.1   mistralai/Mistral-7B-v0.1 (HF safetensors directory), with its embedding and LM head
                                grown to 32002 rows for <|end_of_turn|> (32000) and <|pad_0|> (32001), as
                                OpenChat-3.5 did (`starling-jax convert` writes such a directory)
  data/nectar                   berkeley-nest/Nectar parquet/JSONL files

Sources:
  - OpenChat (Wang et al. 2023, "OpenChat: Advancing Open-source Language Models with Mixed-Quality Data",
    arXiv 2309.11235) and the openchat/openchat_3.5 model card: Mistral-7B-v0.1 base, the "GPT4 Correct User: ...
    <|end_of_turn|>GPT4 Correct Assistant:" template, <|end_of_turn|> = 32000 as one token, 8192 context.
    OpenChat trained with C-RLFT on mixed-quality ShareGPT data, conditioning the template on the data source;
    we do plain SFT on the GPT-4-preferred (rank 1) Nectar response of each prompt, with the "GPT4 Correct" template,
    which is the C-RLFT class of the best data. The loss covers every assistant turn (starling_jax.data pipelines).
  - Mistral-7B-v0.1 architecture: mistralai/Mistral-7B-v0.1 config.json (STARLING.md).

Not published for this data (our choices, labelled as such): AdamW lr 2e-5, 3% warmup, cosine to 10%, weight
decay 0.1, clipping 1.0, 128 packed sequences of 4096 tokens per step, 3 epochs (a common setting for full
fine-tunes of 7B chat models; tune it on the held-out loss).

Mesh: 64 TPU chips, fully sharded (fsdp = all devices), 2 packed sequences per chip, full rematerialisation.
"""

from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, TrainConfig)
from starling_jax.models import PRESETS

MODEL = PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full")
STEPS_PER_EPOCH = 1415  # 181,124 training prompts / 128 per step (packing lets several short prompts share a row)


def get_config() -> Experiment:
    return Experiment(
        name="openchat_sft",
        model=ModelSection(config=MODEL, path="checkpoints/Mistral-7B-v0.1", tokenizer="openchat-3.5",
                           template="openchat_3.5"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed=True),
        data=DataConfig(source="data/nectar", heldout_fraction=0.01, max_length=4096, max_prompt_length=3072,
                        pack=True, on_bad_row="skip"),
        objective=ObjectiveConfig(name="sft"),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=127, schedule="cosine", end_lr_fraction=0.1,
                          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(steps=3 * STEPS_PER_EPOCH, batch_size=128, grad_accum=1, eval_every=500, eval_batches=8),
        checkpoint=CheckpointConfig(every=500, keep=3),
        logging=LoggingConfig(every=10, peak_flops=459e12),  # v5p bf16 peak per chip
    )
