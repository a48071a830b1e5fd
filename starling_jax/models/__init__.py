"""Mistral/Llama decoders as pure functions over parameter pytrees."""

from starling_jax.models.config import PRESETS, ModelConfig, get_preset
from starling_jax.models.transformer import (
    Params, ParamSpec, abstract_params, attention, cache_slots, check_token_ids, count_params, decode_layers,
    embed_tokens, final_norm, fuse_projections,
    cast_matrices, forward, frozen_storage, hidden_states, init_cache, merge_params, split_params, init_from_specs,
    init_params, init_value_head, last_token_index, lm_logits, param_specs, positions_and_segments, reward_values,
    run_layers, score, token_logprobs, value_head, value_head_specs, num_stacked, quantized_base, quantized_specs, weight,
)
from starling_jax.models import lora  # LoRA adapters (models/lora.py)

__all__ = [
    "PRESETS", "ModelConfig", "get_preset", "Params", "ParamSpec", "abstract_params", "attention", "cache_slots",
    "check_token_ids", "count_params", "embed_tokens", "final_norm", "forward", "hidden_states", "init_cache",
    "init_from_specs", "init_params", "init_value_head", "last_token_index", "lm_logits", "param_specs",
    "positions_and_segments", "reward_values", "run_layers", "score", "token_logprobs", "value_head",
    "value_head_specs", "merge_params", "split_params", "frozen_storage", "cast_matrices",
    "decode_layers", "fuse_projections", "lora", "num_stacked", "quantized_base", "quantized_specs", "weight",
]
