"""Model architecture configs: one frozen dataclass for Mistral/Llama-family decoders, plus named presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
HEADS = ("lm", "score")
QUANTIZE = ("none", "int8", "nf4")  # models/quantize.py
ATTENTION = ("auto", "dense", "blockwise", "cudnn", "splash")  # models/attention_ops.py
# How a model runs and is stored, as opposed to what it is. A model section that loads weights (model.path: a Hugging
# Face directory, "hf:ORG/NAME" or "stage:NAME") takes the architecture (every other field) from the checkpoint and
# these from its own config (stages/program.py load_model; docs/TRAINING.md "Loading weights"). init_std is here
# because a loaded model only draws new parts with it (an rm stage's score head, LoRA's A, a critic); max_seq_len
# because it is only a limit on the run's lengths (RoPE has no learned positions): Mistral-7B-v0.1's config.json says
# 32768 where the OpenChat recipes run 8192.
# lora_scale / lora_dropout are neither: a stage sets them from model.lora (step/adapters.configure).
RUN_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attention", "attention_block", "quantize",
              "quantize_block", "init_std", "max_seq_len")
# The architecture a stated config must share with the checkpoint it loads (architecture_conflicts). The head is the
# objective's (an rm stage turns an LM into a reward model, dropping its LM head), so tie_embeddings is compared only
# between configs with the same head. The token ids are the checkpoint's but not compared: the tokenizer and chat
# template decide stop and pad tokens, and a config.json may leave pad_token_id unset where a preset names one.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                       "rms_norm_eps", "rope_theta", "sliding_window", "architecture")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama/Mistral family.

    `head` picks the output head stored in the params: "lm" (vocabulary logits) or "score" (a scalar reward read at
    each row's last non-pad token, HF's *ForSequenceClassification with num_labels=1).
    `dtype` is the compute dtype (activations, matmuls); `param_dtype` the storage dtype of the weights.
    `attention` picks the attention implementation (models/attention_ops.py): "auto" = the cuDNN flash kernel on GPU
    (bf16/fp16), Pallas splash attention on TPU, else blockwise flash attention in pure JAX for long sequences
    (T x S >= 2^20 query-key pairs) and dense scores for short ones and decode steps; `attention_block` is the
    blockwise tile size (queries and keys). `scan_unroll` > 1 unrolls the scan over layers by that many (a full
    unroll removes the stacked per-layer residual and gradient buffers: ~6-10% less CPU time for a 30-layer training
    step on XLA:CPU, at ~3x the compile time; benchmarks/RESULTS.md); the values are the same.
    Loaded weights: the checkpoint decides the architecture, a stated config how it runs (RUN_FIELDS, run_as).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    architecture: str = "mistral"  # "mistral" | "llama": only changes the HF class names on export
    head: str = "lm"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1  # layers per iteration of the scan over layers; >= num_layers unrolls it fully
    attention: str = "auto"
    attention_block: int = 512
    pad_token_id: Optional[int] = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    init_std: float = 0.02
    # Storage of a frozen base's layer matrices (models/quantize.py): "none", "int8" (per output channel) or "nf4"
    # (QLoRA's 4-bit NormalFloat over blocks of quantize_block values along each matrix's input axis). Applies only
    # to weights that never train (a stage's frozen trunk, the reward model of an RL stage); off by default.
    quantize: str = "none"
    quantize_block: int = 64
    # LoRA (models/lora.py): the static scale (alpha / r, or alpha / sqrt(r) with rsLoRA) of the adapters in
    # params["layers"]["lora"] and the dropout rate on their inputs (used when a dropout key is passed). None: the
    # model has no adapters (params carrying some are then an error). lora.configure(config, options) sets both.
    lora_scale: Optional[float] = None
    lora_dropout: float = 0.0

    def __post_init__(self):
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION:
            problems.append(f"attention={self.attention!r} is not one of {ATTENTION}")
        if self.scan_unroll < 1:
            problems.append(f"scan_unroll={self.scan_unroll} must be >= 1")
        if self.attention_block < 1:
            problems.append(f"attention_block={self.attention_block} must be >= 1")
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} is not one of {HEADS}")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding_window={self.sliding_window} must be >= 1 or None")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                problems.append(f"{name}={getattr(self, name)!r} must be float32, bfloat16 or float16")
        if self.lora_scale is not None and not (math.isfinite(self.lora_scale) and self.lora_scale != 0):
            problems.append(f"lora_scale={self.lora_scale} must be finite and nonzero (or None: no adapters)")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        problems += self._quantize_problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def _quantize_problems(self) -> list[str]:
        """Why the layer matrices cannot be stored as `quantize` says (empty when they can)."""
        if self.quantize not in QUANTIZE:
            return [f"quantize={self.quantize!r} is not a quantization the base can take: use one of "
                    f"{', '.join(QUANTIZE)}"]
        if self.quantize != "nf4":
            return []
        if self.quantize_block < 4 or self.quantize_block % 2:
            return [f"quantize_block={self.quantize_block} must be an even number >= 4 (nf4 packs two codes a byte)"]
        # the nf4 blocks run along each matrix's last input axis: hidden_size (q/k/v, gate/up), head_dim (o), mlp_dim
        # (down)
        bad = [f"{name}={getattr(self, name)}" for name in ("hidden_size", "head_dim", "mlp_dim")
               if getattr(self, name) % self.quantize_block]
        return [f"quantize='nf4' with quantize_block={self.quantize_block}: {', '.join(bad)} not divisible by the "
                f"block size (blocks run along each matrix's input axis); choose a quantize_block that divides "
                f"hidden_size, head_dim and mlp_dim, or quantize='int8'"] if bad else []

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def run_as(self, other: "ModelConfig") -> "ModelConfig":
        """This architecture, run and stored as `other` says (its RUN_FIELDS: dtype, param_dtype, remat, ...)."""
        return self.replace(**{f: getattr(other, f) for f in RUN_FIELDS})


def architecture_conflicts(stated: ModelConfig, actual: ModelConfig) -> list[str]:
    """"field=stated (checkpoint: actual)" for each architecture field (ARCHITECTURE_FIELDS; tie_embeddings too when
    both have the same head) where `stated` is not `actual`: empty when `stated` describes the same model. The norm
    epsilon and RoPE theta compare to a relative 1e-6 (a config.json may hold 1e-5 rounded through float32)."""
    fields = ARCHITECTURE_FIELDS + (("tie_embeddings",) if stated.head == actual.head else ())
    out = []
    for f in fields:
        a, b = getattr(stated, f), getattr(actual, f)
        same = math.isclose(a, b, rel_tol=1e-6) if f in ("rms_norm_eps", "rope_theta") else a == b
        if not same:
            out.append(f"{f}={a!r} (checkpoint: {b!r})")
    return out


_MISTRAL_7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
    rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_seq_len=32768, architecture="mistral",
)

PRESETS: dict[str, ModelConfig] = {
    # Mistral-7B-v0.1 (config.json of mistralai/Mistral-7B-v0.1).
    "mistral-7b-v0.1": _MISTRAL_7B,
    # OpenChat-3.5 (openchat/openchat_3.5): Mistral-7B + <|end_of_turn|> (32000) and <|pad_0|> (32001), 8192 context.
    "openchat-3.5": _MISTRAL_7B.replace(vocab_size=32002, max_seq_len=8192, eos_token_id=32000, pad_token_id=32000),
    # Llama-2-7B (meta-llama/Llama-2-7b-hf): MHA, no window; the Starling-RM-7B-alpha trunk.
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
        mlp_dim=11008, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None, max_seq_len=4096,
        architecture="llama", pad_token_id=0,
    ),
    # Yi-34B (01-ai/Yi-34B): Llama architecture with GQA; the Starling-RM-34B trunk.
    "yi-34b": ModelConfig(
        vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56, num_kv_heads=8, head_dim=128,
        mlp_dim=20480, rms_norm_eps=1e-5, rope_theta=5_000_000.0, sliding_window=None, max_seq_len=4096,
        architecture="llama", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    # A Mistral-shaped model small enough for a CPU: GQA and a short sliding window so tests exercise both.
    "tiny": ModelConfig(
        vocab_size=32002, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
        sliding_window=32, max_seq_len=512, eos_token_id=32000, pad_token_id=32000,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
