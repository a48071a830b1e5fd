"""LoRA adapters as pure functions over the parameter tree (Hu et al. 2021, as peft implements them).

Layout: the adapters live inside the scanned layer stack, so `lax.scan` (and every slice of the stack: the hydra's
split_params, sampling's per-layer split) takes each layer's adapters with its weights:

    params["layers"]["lora"][proj] = {"a": [L, *in, r], "b": [L, r, *out]}

for each targeted projection proj (wq, wk, wv, wo, w_gate, w_up, w_down), where in / out are the base weight's
input / output axes (wq [L, D, H, E]: a [L, D, r], b [L, r, H, E]; wo [L, H, E, D]: a [L, H, E, r], b [L, r, D]).
A projection y = x @ W becomes y = x @ W + scale * (dropout(x) @ a) @ b (models.transformer.decoder_layer), with the
static scale alpha / r (alpha / sqrt(r) with rsLoRA) and dropout rate carried by ModelConfig.lora_scale /
lora_dropout (`configure`): a static, hashable config, so jit caches key on them; dropout runs only where a caller
passes a dropout key (run_layers / hidden_states / forward).

Init as peft: a = kaiming_uniform(a=sqrt(5)) on the [r, in] matrix (U(-1/sqrt(in), 1/sqrt(in))), b = 0, so the
adapted model at step 0 computes exactly the base model's numbers. The reference policy is the same params without
the "lora" key (`strip`: no copy of the base).

Layers: every layer of the stack holds an adapter (one array per projection, as the scan needs). A layer left out
by `options.layers` has a = b = 0: its addition is exactly zero and so are both gradients (d/da = x^T g b^T * s,
d/db = (x a)^T g * s), so any gradient-based update (Adam, weight decay, clipping) keeps it at zero; peft export
writes only the chosen layers (layers_to_transform).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.errors import InputError, did_you_mean
from starling_jax.models.config import ModelConfig
from starling_jax.models.transformer import (LORA_PROJECTIONS, Params, ParamSpec, init_from_specs, is_spec,
                                             param_specs)

# Target names -> our projection names: the short names, peft's Llama module names and our own.
SHORT_NAMES = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w_gate": "gate_proj",
            "w_up": "up_proj", "w_down": "down_proj"}
_ALIASES = {**SHORT_NAMES, **{hf: ours for ours, hf in HF_NAMES.items()}, **{p: p for p in LORA_PROJECTIONS}}
IN_AXES = {"wo": 2}  # how many leading (per-layer) axes of the base weight are its input; 1 for the others
RANK_AXIS = "lora_rank"  # the adapters' own axis: never sharded (parallel/sharding.py)


class LoraError(InputError):
    """Bad LoRA options or adapters: one line naming the option (or file and tensor) and what to do."""


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """What to adapt and how. targets: projection names (q k v o gate up down, or peft's q_proj ... down_proj);
    layers: the layer indices that get adapters (None: all); rslora: scale alpha / sqrt(rank) instead of alpha / rank.
    dropout: the rate on each adapter's input while training (peft's lora_dropout)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    layers: Optional[tuple[int, ...]] = None
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def projections(options: LoraOptions) -> tuple[str, ...]:
    """The targeted projections as our parameter names, in the layer's order; unknown names are a LoraError."""
    targets = (options.targets,) if isinstance(options.targets, str) else tuple(options.targets)
    if not targets:
        raise LoraError(f"lora.targets is empty: name at least one projection ({', '.join(SHORT_NAMES)})")
    unknown = [t for t in targets if t not in _ALIASES]
    if unknown:
        raise LoraError(f"lora.targets: {unknown[0]!r} matches no projection; "
                        f"{did_you_mean(str(unknown[0]), list(SHORT_NAMES) + list(HF_NAMES.values()))}")
    chosen = {_ALIASES[t] for t in targets}
    return tuple(p for p in LORA_PROJECTIONS if p in chosen)


def _in_out(config: ModelConfig, proj: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]:
    """(in shape, out shape, in axes, out axes) of a projection's per-layer weight."""
    spec = param_specs(config)["layers"][proj]
    n_in = 1 + IN_AXES.get(proj, 1)
    return spec.shape[1:n_in], spec.shape[n_in:], spec.axes[1:n_in], spec.axes[n_in:]


def validate(config: ModelConfig, options: LoraOptions) -> tuple[str, ...]:
    """Check `options` against the model; returns the targeted projections (our names). Each problem is one-line
    LoraError naming the option."""
    if isinstance(options.rank, bool) or not isinstance(options.rank, int) or options.rank < 1:
        raise LoraError(f"lora.rank={options.rank!r} must be a positive integer")
    if not (isinstance(options.alpha, (int, float)) and math.isfinite(options.alpha) and options.alpha > 0):
        raise LoraError(f"lora.alpha={options.alpha!r} must be a finite number > 0")
    if not (isinstance(options.dropout, (int, float)) and 0 <= options.dropout < 1):
        raise LoraError(f"lora.dropout={options.dropout!r} must be in [0, 1)")
    projs = projections(options)
    for p in projs:
        n_in, n_out = (math.prod(s) for s in _in_out(config, p)[:2])
        if options.rank > min(n_in, n_out):
            raise LoraError(f"lora.rank={options.rank} is larger than {HF_NAMES[p]}'s width ({n_in} in, {n_out} out): "
                            f"choose a rank <= {min(n_in, n_out)} or leave {HF_NAMES[p]} out of lora.targets")
    if options.layers is not None:
        layers = tuple(options.layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < config.num_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise LoraError(f"lora.layers={list(layers)} must be distinct layer indices in [0, {config.num_layers}) "
                            f"(or None for every layer)")
    return projs


def configure(config: ModelConfig, options: LoraOptions) -> ModelConfig:
    """The model config that runs adapters made with `options`: lora_scale and lora_dropout set."""
    validate(config, options)
    return config.replace(lora_scale=float(options.scale), lora_dropout=float(options.dropout))


def specs(config: ModelConfig, options: LoraOptions) -> Params:
    """The adapters' ParamSpecs {proj: {"a", "b"}} (the subtree under params["layers"]["lora"]). Logical axes: the
    base weight's input axes (a) and output axes (b) plus "lora_rank", so each adapter shards like its base weight
    (a over the base's in-axes, b over its out-axes) and the rank axis stays whole."""
    projs = validate(config, options)
    L, r, dt = config.num_layers, options.rank, config.param_dtype
    out = {}
    for p in projs:
        in_shape, out_shape, in_axes, out_axes = _in_out(config, p)
        out[p] = {"a": ParamSpec((L, *in_shape, r), ("layers", *in_axes, RANK_AXIS), "lora_a", dt),
                  "b": ParamSpec((L, r, *out_shape), ("layers", RANK_AXIS, *out_axes), "zeros", dt)}
    return out


def full_specs(config: ModelConfig, options: LoraOptions) -> Params:
    """models.param_specs(config) with the adapters' specs under ["layers"]["lora"]."""
    base = param_specs(config)
    return {**base, "layers": {**base["layers"], "lora": specs(config, options)}}


def layer_mask(config: ModelConfig, options: LoraOptions) -> np.ndarray:
    """[L] bool: the layers that hold a (nonzero) adapter."""
    mask = np.zeros(config.num_layers, bool)
    mask[list(range(config.num_layers)) if options.layers is None else list(options.layers)] = True
    return mask


def init(config: ModelConfig, options: LoraOptions, key: jax.Array) -> Params:
    """Fresh adapters {proj: {"a", "b"}} (jittable; wrap in jit(out_shardings=...) to create them sharded): a drawn
    as peft draws it, b = 0; layers outside options.layers get a = 0 as well (see the module docstring)."""
    adapters = init_from_specs(specs(config, options), key, config.init_std)
    if options.layers is None:
        return adapters
    keep = jnp.asarray(layer_mask(config, options))
    return {p: {"a": ab["a"] * keep.reshape(-1, *[1] * (ab["a"].ndim - 1)).astype(ab["a"].dtype), "b": ab["b"]}
            for p, ab in adapters.items()}


def attach(base: Params, adapters: Params) -> Params:
    """params = base with `adapters` under ["layers"]["lora"] (a new outer dict; no array is copied)."""
    return {**base, "layers": {**base["layers"], "lora": adapters}}


def adapters_of(params: Params) -> Params:
    """The adapters {proj: {"a", "b"}} of adapted params."""
    if "lora" not in params.get("layers", {}):
        raise LoraError("params carry no LoRA adapters (no params['layers']['lora'])")
    return params["layers"]["lora"]


def strip(params: Params) -> Params:
    """The base (the reference policy): params without the adapters. No array is copied."""
    if "lora" not in params.get("layers", {}):
        return params
    return {**params, "layers": {k: v for k, v in params["layers"].items() if k != "lora"}}


def split(params: Params) -> tuple[Params, Params]:
    """(adapters, base): the trainable and the frozen part of adapted params; attach(base, adapters) inverts it."""
    return adapters_of(params), strip(params)


def delta(adapter: Params, scale: float) -> jax.Array:
    """scale * a @ b as a weight update [L, *in, *out] in float32 (the base weight's layout)."""
    a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
    L, r = a.shape[0], a.shape[-1]
    d = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1)) * scale
    return d.reshape(*a.shape[:-1], *b.shape[2:])


def merge(params: Params, config: ModelConfig) -> Params:
    """Base + adapters folded in: each targeted weight W + scale * a @ b (computed in float32, stored in W's dtype),
    no "lora" key. Its forward equals the adapted forward up to rounding; HF export (io/hf.save) writes it."""
    adapters = adapters_of(params)
    if config.lora_scale is None:
        raise LoraError("merge: config.lora_scale is None; configure the model with models.lora.configure first")
    out = strip(params)
    layers = dict(out["layers"])
    for p, ab in adapters.items():
        w = layers[p]
        layers[p] = (w.astype(jnp.float32) + delta(ab, config.lora_scale)).astype(w.dtype)
    return {**out, "layers": layers}


def count(tree: Params) -> int:
    """Number of adapter parameters in adapted params or in an adapter tree (layers left out by options.layers,
    stored as zeros, included)."""
    if "layers" in tree:
        tree = tree["layers"].get("lora", {})
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract(config: ModelConfig, options: LoraOptions) -> Params:
    """ShapeDtypeStructs of the adapters (planning without allocating)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), specs(config, options),
                        is_leaf=is_spec)
