"""One typed experiment config: frozen dataclasses from mesh and model to data, objective, optimiser, rollouts,
checkpoints and logging. An experiment is a Python file under experiments/ with `get_config() -> Experiment`.

The types only: loading, `--set a.b=c` overrides, validation and JSON round trips are in stages/experiment.py, which
sits above the algorithm registry it checks objective names against.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from starling_jax.errors import InputError
from starling_jax.models.config import PRESETS, ModelConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 takes the remaining devices."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Logical axis -> mesh axes. A value is a mesh axis name, a tuple of them, or None (replicated).
    rules: tuple[tuple[str, object], ...] = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
        ("head_dim", None),
        ("norm", None),
    )
    distributed: bool = False  # call jax.distributed.initialize() (multi-host pods)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can sit on (models.lora)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (Hu et al. 2021) on the trained model's projections, trained in place of the weights beneath
    them (model.lora; docs/TRAINING.md "LoRA"). W x becomes W x + (alpha / rank) * B (A x), A ~ normal and B = 0 at the
    start, so step 0 is the base model exactly. Only the adapters (and a reward model's score head) train; the base
    weights stay frozen and serve as the reference policy with the adapters switched off (no copy).
    Which layers: the top N = model.trainable_top_layers (0 = every layer) carry adapters (or the indices `layers`
    among them); no layer trains in full. The layers below the top N form the frozen trunk, run once without gradient
    and shared by policy and reference (the hydra split)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input while training (PEFT's lora_dropout)
    targets: tuple[str, ...] = LORA_TARGETS  # q, k, v, o (attention) and gate, up, down (MLP)
    layers: Optional[tuple[int, ...]] = None  # indices of the layers with adapters, all in the top N; None: all of them


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The trained model. `config` is the architecture and how it runs; `path` loads weights from a local HF
    safetensors directory, a Hugging Face Hub id "hf:ORG/NAME[@REVISION]" (safetensors downloaded into the standard
    cache; HF_HUB_OFFLINE=1 reads only the cache), or "stage:NAME" from an earlier stage's final checkpoint.

    With a path the checkpoint decides the architecture and `config` how the model runs and is stored (its
    models.config.RUN_FIELDS: param_dtype, dtype, remat, scan_unroll, attention, attention_block, quantize,
    quantize_block, init_std), which is what `plan` assumes; a stated architecture must be the checkpoint's
    (validation compares it with a directory's config.json, loading with the weights' config). A `config` left at the
    section's default (stated_config() False) states nothing: the model then runs as the checkpoint is (its parameter
    dtype; compute in float32 for float32 weights, else bfloat16; a stage export's remat and attention), stored
    unquantized."""
    config: ModelConfig = PRESETS["tiny"]
    path: Optional[str] = None
    tokenizer: str = "openchat-3.5"  # name for data.load_tokenizer, or a path to a .model / tokenizer.json
    # "auto": the tokenizer's own chat template (a checkpoint's Jinja chat_template) when it has one, else
    # openchat_3.5; or a built-in name (openchat_3.5, llama2, llama2_trainer, chatml) to override it
    template: str = "auto"
    trainable_top_layers: int = 0  # 0 = all layers; N > 0 trains only the top N (the hydra trick)
    train_lm_head: bool = True  # full-layer training only: with lora the LM head stays frozen
    lora: Optional[LoraConfig] = None  # None: the layers train in full; a LoraConfig: adapters on them instead

    def stated_config(self) -> bool:
        """Whether `config` was set (differs from the section's default): with a path, its RUN_FIELDS then apply."""
        return self.config != type(self)().config


@dataclasses.dataclass(frozen=True)
class RewardModelSection:
    """The frozen reward model used by RL stages, with its own tokenizer and chat template. `config` and `path` as
    ModelSection's: with a path, the checkpoint's architecture run as a stated config says."""
    config: ModelConfig = PRESETS["tiny"].replace(head="score")
    path: Optional[str] = None  # HF dir (LlamaForSequenceClassification) or "stage:NAME"
    tokenizer: str = "openchat-3.5"
    template: str = "auto"  # as ModelSection.template
    max_length: int = 2048

    stated_config = ModelSection.stated_config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "synthetic" | "task:NAME" (data/tasks.py) | "stage:NAME" (a feedback stage's rows) | local Nectar parquet/jsonl
    # files | a tfds data_dir
    source: str = "synthetic"
    synthetic_prompts: int = 2000
    synthetic_seed: int = 0
    synthetic_noise: float = 1.0
    heldout_fraction: float = 0.1  # the reporting set: rows whose prompt strings no training row has
    tuning_fraction: float = 0.0  # a second set of unseen prompt strings, for tuning and periodic eval
    unseen_templates: int = 0  # synthetic: rows phrased with the last N of synthetic.PROMPTS form the "unseen" split
    # synthetic: > 0 generates the held-out and unseen splits apart from the training rows (N rows each,
    # synthetic.make_report_rows: topics no training row names / every user turn in an untrained template; they
    # share no prompt string with any row make_rows can draw); needs heldout_fraction = 0 and unseen_templates = 0.
    # A task with its own reporting split (task:ifeval: held-out instructions x held-out constraint combinations)
    # generates N rows of it the same way
    report_rows: int = 0
    # False for a selection run: the held-out and unseen (reporting) splits are neither generated nor evaluated, and
    # the stages' summaries report the tuning split instead; the training and tuning rows are the same either way
    reporting: bool = True
    max_length: int = 256
    max_prompt_length: int = 128
    max_responses: int = 7  # K for reward-model groups
    pairs: Literal["best_vs_rest", "all"] = "best_vs_rest"  # DPO pairs
    pack: bool = False
    on_bad_row: Literal["error", "skip"] = "error"
    shuffle_seed: int = 0
    worker_count: int = 0


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The objective: `name` selects a registered algorithm (starling_jax/algorithms/), and the algorithm's own options
    are the fields of the options type it registers, a frozen subclass of this one with typed, constrained and
    described fields (e.g. algorithms.apa.APAOptions(apa_lambda=1.0), dpo.DPOOptions(dpo_beta=0.1)). An algorithm
    without options of its own (sft, rm_bradley_terry, feedback) is selected by ObjectiveConfig(name=...).
    Validation checks that the type is the one `name` registered (stages/experiment.py check_types)."""
    name: str = "sft"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 0
    eval_batches: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 16  # rollouts per RL step (a chunk)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epochs: int = 2  # optimisation epochs over each rollout batch
    minibatch_size: int = 8
    # held-out prompts sampled at the start and the end of the stage (true reward, KL); 0: none (a study cell, which
    # measures its policy itself)
    eval_prompts: int = 64
    # rows per compiled call of the rollout phase: each sampling.generate call, reward-model scoring call and
    # experience forward (policy, reference, critic) over a chunk (0 = the whole chunk in one call). Memory only: the
    # KV cache and the activations scale with it; the chunk, the updates and the sampling distribution do not.
    generation_batch: int = 0


@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
    """The feedback stage kind (stages/kinds/feedback.py): K sampled replies per training prompt from model, ranked by a
    judge, written as Nectar rows (WORKDIR/<stage>/feedback.jsonl) that a later stage reads as data.source='stage:NAME'.
    The stage covers train.steps * prompts_per_step training prompts (data.shuffle_seed fixes which)."""
    k: int = 7  # replies per prompt (Nectar: 7)
    judge: str = "task"  # "task" (the data source's own judge) | "reward_model" | "llm" | "package.module:function"
    judge_model: Optional[str] = None  # judge="llm": the judging checkpoint (HF dir, "hf:ORG/NAME" or "stage:NAME")
    judge_template: str = "auto"  # judge="llm": its chat template
    judge_max_new_tokens: int = 48  # judge="llm": room for "[[B]] > [[A]] > ..."
    agreement_prompts: int = 8  # judge="llm": prompts ranked twice under independent shuffles (self-agreement)
    prompts_per_step: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch: int = 32  # rows per sampling.generate call (memory only)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # 0 = only at the end
    keep: int = 2
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = not reported


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of an experiment. Sections left None fall back to the experiment's."""
    name: str
    objective: ObjectiveConfig
    model: Optional[ModelSection] = None
    data: Optional[DataConfig] = None
    optim: Optional[OptimConfig] = None
    train: Optional[TrainConfig] = None
    rollout: Optional[RolloutConfig] = None
    feedback: Optional[FeedbackConfig] = None


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelSection = ModelSection()
    reward_model: Optional[RewardModelSection] = None
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    rollout: RolloutConfig = RolloutConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    stages: tuple[Stage, ...] = ()  # empty: one stage built from the top-level sections


class ConfigError(InputError):
    """A bad experiment config: the message lists every problem found, each naming its field."""
