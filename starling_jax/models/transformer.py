"""A pure-functional Mistral/Llama decoder: parameters are a nested dict of arrays, layers are stacked on a leading
axis and run with one `lax.scan`.

Conventions (shape letters): B batch, T query tokens, S key slots, D hidden, H query heads, K kv heads,
G = H // K query heads per kv head, E head dim, F mlp dim, V vocab, L layers.

Masking is by *positions*, not indices: each token's position is derived from the attention mask (cumsum - 1 within
its segment), and query i sees key j iff j is a real token of the same segment, pos_j <= pos_i and
pos_i - pos_j < sliding_window (HF's rule i - window < j <= i). So a left-padded row gives the same values on its real
tokens as the unpadded sequence, packed rows (mask = segment ids 1, 2, ...) never see each other, and a KV cache (a
rolling buffer for windowed models) needs no special casing beyond storing each slot's position.

Why this file is long (~555 lines): it is the whole decoder (parameter declarations, embedding, the scanned layer,
the KV cache, the heads), one pure function calling the next, so a model family's change reads in one place
(docs/ARCHITECTURE.md "How to add a model family"); the attention kernels are already apart (attention_ops.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.models import attention_ops, quantize
from starling_jax.models.config import ModelConfig

Params = dict[str, Any]  # the one parameter-pytree type (nested dicts of arrays); every module imports this one
NEG_INF = attention_ops.NEG_INF


# ----------------------------------------------------------------------------------------------------------------------
# Parameter declarations: every weight once, with its shape, logical axes and initialiser.


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]  # logical axis names, mapped to mesh axes by starling_jax.parallel.sharding rules
    # "normal" (std = config.init_std), "ones", "zeros", "fan_in_uniform" (torch Linear's) or "lora_a" (a LoRA A
    # [L, *in, r]: peft's kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = prod(in))
    init: str
    dtype: str = "float32"


def param_specs(config: ModelConfig) -> Params:
    """The parameter tree of `config` as ParamSpecs (no arrays)."""
    c, dt = config, config.param_dtype
    L, D, H, K, E, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim,
                           c.vocab_size)
    specs: Params = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal", dt),
        "layers": {
            "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones", dt),
            "wq": ParamSpec((L, D, H, E), ("layers", "embed", "heads", "head_dim"), "normal", dt),
            "wk": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), "normal", dt),
            "wv": ParamSpec((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"), "normal", dt),
            "wo": ParamSpec((L, H, E, D), ("layers", "heads", "head_dim", "embed"), "normal", dt),
            "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones", dt),
            "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", dt),
            "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", dt),
            "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal", dt),
        },
        "final_norm": ParamSpec((D,), ("norm",), "ones", dt),
    }
    if c.head == "lm" and not c.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal", dt)
    elif c.head == "score":
        specs["score"] = ParamSpec((D, 1), ("embed", None), "normal", dt)
    return specs


VALUE_HEADS = ("mlp", "linear", "layers")


def value_head_specs(config: ModelConfig, kind: str = "mlp", layers: int = 0) -> Params:
    """A per-token critic. On the policy's last hidden state: "mlp", Linear(D, 2D)-ReLU-Linear(2D, 1) (trlx's
    make_head), or "linear", Linear(D, 1). Or "layers": its own stack of `layers` decoder layers (the shapes and
    logical axes of the model's, so they shard like them) + a final norm + Linear(D, 1) without bias (the Starling
    fork's OpenChat critic; step/hydra.py runs it)."""
    D, dt = config.hidden_size, config.param_dtype
    if kind == "mlp":
        return {"w1": ParamSpec((D, 2 * D), ("embed", "mlp"), "normal", dt), "b1": ParamSpec((2 * D,), ("mlp",), "zeros", dt),
                "w2": ParamSpec((2 * D, 1), ("mlp", None), "normal", dt), "b2": ParamSpec((1,), (None,), "zeros", dt)}
    if kind == "linear":
        return {"w": ParamSpec((D, 1), ("embed", None), "normal", dt), "b": ParamSpec((1,), (None,), "zeros", dt)}
    if kind == "layers":
        if not 1 <= layers <= config.num_layers:
            raise ValueError(f"a 'layers' value head copies 1..{config.num_layers} layers, got {layers}")
        model = param_specs(config)
        stack = jax.tree.map(lambda s: dataclasses.replace(s, shape=(layers, *s.shape[1:])), model["layers"],
                             is_leaf=is_spec)
        # torch nn.Linear's default init (uniform in +-1/sqrt(fan_in)), as the fork's freshly made Linear(4096, 1)
        return {"layers": stack, "final_norm": model["final_norm"],
                "w": ParamSpec((D, 1), ("embed", None), "fan_in_uniform", dt)}
    raise ValueError(f"value head kind must be one of {', '.join(VALUE_HEADS)}, got {kind!r}")


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_from_specs(specs: Params, key: jax.Array, std: float) -> Params:
    """Materialise a ParamSpec tree. Jittable: wrap in jax.jit(out_shardings=...) to create it already sharded."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k):
        dtype = jnp.dtype(spec.dtype)
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        if spec.init in ("fan_in_uniform", "lora_a"):  # torch.nn.Linear's default: U(-1/sqrt(fan_in), +)
            bound = 1.0 / np.sqrt(spec.shape[0] if spec.init == "fan_in_uniform" else np.prod(spec.shape[1:-1]))
            return jax.random.uniform(k, spec.shape, jnp.float32, -bound, bound).astype(dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def init_params(config: ModelConfig, key: jax.Array) -> Params:
    """Random parameters for `config` (normal(0, init_std) weights, unit norms)."""
    return init_from_specs(param_specs(config), key, config.init_std)


def init_value_head(config: ModelConfig, key: jax.Array, kind: str = "mlp", layers: int = 0,
                    source: Optional[Params] = None) -> Params:
    """A fresh critic (value_head_specs). kind "layers" copies the top `layers` layers and the final norm of `source`
    (the policy's full params; new arrays, never aliases) and draws only its Linear(D, 1)."""
    specs = value_head_specs(config, kind, layers)
    if kind != "layers":
        return init_from_specs(specs, key, config.init_std)
    if source is None:
        raise ValueError("a 'layers' value head is initialised from the policy: pass its full params as source")
    n = num_stacked(source["layers"])
    return {"layers": jax.tree.map(lambda a: jnp.copy(a[n - layers:]), source["layers"]),
            "final_norm": jnp.copy(source["final_norm"]),
            "w": init_from_specs(specs["w"], key, config.init_std)}


def abstract_params(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of the parameters: for counting and planning without allocating."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), param_specs(config),
                                  is_leaf=is_spec)


def num_stacked(layers: Params) -> int:
    """How many layers a stacked layers subtree holds (its leading axis; quantized matrices included)."""
    return jax.tree.leaves(layers)[0].shape[0]


def count_params(tree) -> int:
    """Parameters in a tree of arrays or shapes; a quantized matrix (models/quantize.py) counts the weights it stores,
    not its codes and scales."""
    return int(sum(quantize.num_weights(x) if quantize.is_quantized(x) else np.prod(x.shape)
                   for x in jax.tree.leaves(tree, is_leaf=quantize.is_quantized)))


# ----------------------------------------------------------------------------------------------------------------------
# Positions, masks, RoPE.


def positions_and_segments(attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions [B, T] (-1 on padding) and segment ids [B, T] (0 on padding) from a mask.

    The mask is 0 on padding and nonzero on real tokens; packed rows number their sequences 1, 2, ... (increasing),
    and positions restart at 0 in each. For a 0/1 mask, positions are cumsum(mask) - 1 on real tokens.
    """
    seg = attention_mask.astype(jnp.int32)
    real = seg > 0
    count = jnp.cumsum(real, axis=1, dtype=jnp.int32)
    prev_max = jnp.pad(jax.lax.cummax(seg, axis=1), ((0, 0), (1, 0)))[:, :-1]
    is_new = real & (seg > prev_max)
    offset = jax.lax.cummax(jnp.where(is_new, count - 1, 0), axis=1)
    return jnp.where(real, count - 1 - offset, -1), seg


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, E/2] in float32 for the rotate-half RoPE of HF Llama/Mistral."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, E]; rotate-half convention, computed in float32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, window: Optional[int] = None, **options):
    """Grouped-query attention without repeating K/V (models.attention_ops: implementations and masking rule).

    q [B, T, H, E]; k, v [B, S, K, E]; q_pos [B, T]; k_pos [B, S] with -1 marking an empty or padded slot.
    options: implementation ("dense" by default; see attention_ops.IMPLEMENTATIONS), block_size, self_attention.
    """
    return attention_ops.attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window, **options)


# ----------------------------------------------------------------------------------------------------------------------
# KV cache: per-layer K/V slots plus each slot's position (-1 = empty). Slot of the n-th token written = n % S, so a
# cache of S = sliding_window slots is a rolling buffer; S = total length is a plain cache.


def init_cache(config: ModelConfig, batch: int, slots: int) -> Params:
    shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
    dt = jnp.dtype(config.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "pos": jnp.full((batch, slots), -1, jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def cache_slots(config: ModelConfig, total_len: int) -> int:
    """Slots needed to generate up to `total_len` tokens: the window when it is shorter (rolling buffer)."""
    return min(total_len, config.sliding_window) if config.sliding_window else total_len


def _write_slots(index, T: int, S: int):
    """Slot of each of T new tokens; tokens that a later one in the same write overwrites are sent out of range."""
    t = jnp.arange(T)
    return jnp.where(t >= T - S, (index + t) % S, S)


# ----------------------------------------------------------------------------------------------------------------------
# The decoder.


def _dense(x, w, dtype, n_in: int = 1, out_dtype=None):
    """x [..., *w.shape[:n_in]] @ w [*in, *out] -> [..., *out], computed as ONE 2-D matmul [N, In] @ [In, Out].

    Why 2-D: XLA:CPU's matmul kernels want plain row-major 2-D operands. With batched einsums ("btd,dhe->bthe") the
    weight gradients contract over two axes (b, t), and XLA materialised transposed copies of the activations for
    them in the backward pass; flattening the tokens to one axis removed those copies (-13% CPU time per layer
    forward + backward, -10% for the LM head + loss; benchmarks/RESULTS.md). Numerics are unchanged (same fp32 dots).
    """
    lead, w_in, w_out = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    y = jnp.dot(x.reshape(-1, int(np.prod(w_in))), w.reshape(int(np.prod(w_in)), -1).astype(dtype),
                preferred_element_type=out_dtype)
    return y.reshape(*lead, *w_out)


def weight(layer: Params, name: str, dtype) -> jax.Array:
    """Matrix `name` of one layer as the layer's matmuls read it: the stored array (which _dense casts to the compute
    dtype), or, for a quantized base (models/quantize.py), its codes dequantized to `dtype` here, inside the scan over
    layers, so only this layer's dense weights exist at a time."""
    w = layer[name]
    return quantize.dequantize(w, dtype) if quantize.is_quantized(w) else w


LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the weights an adapter can target


def _lora_delta(config: ModelConfig, adapter: Params, name: str, x, dt, key):
    """scale * (dropout(x) @ a) @ b: a LoRA adapter's addition to projection `name` (models/lora.py has the layout).
    Dropout (rate config.lora_dropout, one mask per projection as peft's per-module dropout) only with a key."""
    if config.lora_scale is None:
        raise ValueError("params carry LoRA adapters (params['layers']['lora']) but config.lora_scale is None; set "
                         "it with models.lora.configure(config, options)")
    if key is not None and config.lora_dropout > 0:
        keep = 1.0 - config.lora_dropout
        mask = jax.random.bernoulli(jax.random.fold_in(key, LORA_PROJECTIONS.index(name)), keep, x.shape)
        x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    n_in = adapter["a"].ndim - 1
    return (_dense(_dense(x, adapter["a"], dt, n_in), adapter["b"], dt) * config.lora_scale).astype(dt)


def decoder_layer(config: ModelConfig, x, layer, cos, sin, q_pos, seg, kv=None, shard=None, key=None):
    """One pre-norm block. kv = (cache_k [B,S,K,E], cache_v, old_pos [B,S], slots [T], start) or None (attend to
    self); old_pos: each slot's position before this write; start: None, or the first slot when the T slots are
    start..start+T-1 (then one dynamic_update_slice writes them instead of a scatter). shard: the mesh's
    sharding.ActivationConstraint or None, for attention (attention_ops.attention).
    LoRA: a layer with a "lora" entry ({projection: {"a", "b"}}, models/lora.py) adds each adapter's
    scale * (x @ a) @ b to its projection's output, in either projection form; key: this layer's LoRA dropout key or
    None (no dropout). A layer without "lora" computes exactly what it did without adapters."""
    dt = jnp.dtype(config.dtype)
    lora = layer.get("lora") or {}

    def adapt(y, x_in, name):
        return y + _lora_delta(config, lora[name], name, x_in, dt, key) if name in lora else y

    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    if "wqkv" in layer:  # the decode layout (fuse_projections): q, k and v from one matmul
        q, k, v = jnp.split(_dense(h, weight(layer, "wqkv", dt), dt),
                            [config.num_heads, config.num_heads + config.num_kv_heads], axis=2)
    else:
        q, k, v = (_dense(h, weight(layer, name, dt), dt) for name in ("wq", "wk", "wv"))
    q, k, v = adapt(q, h, "wq"), adapt(k, h, "wk"), adapt(v, h, "wv")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_kv = None
    T = x.shape[1]
    opts = dict(implementation=config.attention, block_size=config.attention_block, shard=shard)
    if kv is None:
        k_pos = jnp.where(seg > 0, q_pos, -1)
        a = attention(q, k, v, q_pos, k_pos, seg, seg, config.sliding_window, self_attention=True, **opts)
    else:
        cache_k, cache_v, old_pos, slots, start = kv
        if start is None:
            new_kv = (cache_k.at[:, slots].set(k, mode="drop"), cache_v.at[:, slots].set(v, mode="drop"))
        else:  # in place, without the scatter's index arrays (or, on CPU, a bf16 -> f32 round trip of the cache)
            new_kv = tuple(jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), start, axis=1)
                           for c, new in ((cache_k, k), (cache_v, v)))
        # Attend over the cache as it was plus the new keys: a write may overwrite slots that the earlier of several
        # new tokens still see (rolling buffer; also covers a write longer than the buffer). For a decode step this
        # is also the fast form: attending over the updated cache instead, XLA:CPU fuses the write into the
        # transposes feeding the attention matmuls and copies the cache twice more per layer and step.
        k_pos = jnp.where(seg > 0, q_pos, -1)
        a = attention(q, jnp.concatenate([cache_k, k], 1), jnp.concatenate([cache_v, v], 1), q_pos,
                      jnp.concatenate([old_pos, k_pos], 1), window=config.sliding_window, **opts)
    x = x + adapt(_dense(a, weight(layer, "wo", dt), dt, n_in=2), a, "wo")
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    if "w_gate_up" in layer:  # [D, 2, F]: gate and up from one matmul
        gate, up = jnp.moveaxis(_dense(h, weight(layer, "w_gate_up", dt), dt), -2, 0)
    else:
        gate, up = _dense(h, weight(layer, "w_gate", dt), dt), _dense(h, weight(layer, "w_up", dt), dt)
    gate, up = adapt(gate, h, "w_gate"), adapt(up, h, "w_up")
    m = jax.nn.silu(gate) * up
    x = x + adapt(_dense(m, weight(layer, "w_down", dt), dt), m, "w_down")
    return x, new_kv


def fuse_projections(layer: Params) -> Params:
    """A layer's weights (any leading axes) with q/k/v as one matrix "wqkv" [..., D, H + 2K, E] and gate/up as one
    "w_gate_up" [..., D, 2, F]; decoder_layer reads either form (the same numbers: the fused matmul's columns are the
    separate ones'). For decoding, where each step reads every weight once: fewer, larger matrix-vector products
    (7 -> 4 per layer) run closer to the memory bandwidth on CPU (benchmarks/RESULTS.md). A copy of the weights:
    made once per generation, outside the decode loop. Quantized matrices fuse as their codes and scales (their
    output axes are the weights') and stay quantized; LoRA adapters ("lora") stay as they are, per projection."""
    out = {k: v for k, v in layer.items() if k not in ("wq", "wk", "wv", "w_gate", "w_up")}
    out["wqkv"] = jax.tree.map(lambda *w: jnp.concatenate(w, axis=-2), layer["wq"], layer["wk"], layer["wv"])
    out["w_gate_up"] = jax.tree.map(lambda *w: jnp.stack(w, axis=-2), layer["w_gate"], layer["w_up"])
    return out


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def run_layers(layers: Params, config: ModelConfig, x: jax.Array, attention_mask: jax.Array,
               cache: Optional[Params] = None, constrain: Optional[Callable[[jax.Array], jax.Array]] = None,
               write_start: Optional[jax.Array] = None, dropout_key: Optional[jax.Array] = None):
    """Run a stack of layers (any slice of params["layers"]) over x [B, T, D] with one lax.scan.

    With a cache (see init_cache; its k/v must hold exactly these layers), the new tokens' K/V are written and
    attention runs over the cache; positions continue from the cache's. Returns (x, cache or None).
    constrain: optional x -> x applied to the residual stream at every layer boundary, e.g. a sharding constraint
    (starling_jax.parallel.sharding.activation_constraint); None leaves the layout to XLA.
    write_start: with a cache, the caller's promise that the new tokens go to the contiguous slots
    write_start..write_start+T-1 (no wrap, e.g. 0 for a prompt into a fresh cache of >= T slots): they are then written
    in place. A single token (T = 1) is always written that way.
    dropout_key: LoRA dropout (config.lora_dropout > 0 and adapters in `layers`; without a cache): one key per layer
    is split from it. None: no dropout.
    """
    pin = constrain if constrain is not None else (lambda h: h)
    x = x.astype(jnp.dtype(config.dtype))
    if cache is None:
        q_pos, seg = positions_and_segments(attention_mask)
        cos, sin = rope_tables(q_pos, config.head_dim, config.rope_theta)

        def body(h, xs_l):
            layer, key = xs_l if dropout else (xs_l, None)
            return pin(decoder_layer(config, pin(h), layer, cos, sin, q_pos, seg, shard=constrain, key=key)[0]), None
        dropout = dropout_key is not None and config.lora_dropout > 0 and "lora" in layers
        xs = (layers, jax.random.split(dropout_key, jax.tree.leaves(layers)[0].shape[0])) if dropout else layers
    else:
        q_pos, seg, cos, sin, slot_pos, slots, start = _cache_write(config, cache, attention_mask, write_start)

        def body(h, xs_l):
            layer, ck, cv = xs_l
            kv = (ck, cv, cache["pos"], slots, start)
            h, (ck, cv) = decoder_layer(config, pin(h), layer, cos, sin, q_pos, seg, kv, shard=constrain)
            return pin(h), (ck, cv)
        xs = (layers, cache["k"], cache["v"])
    if config.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[config.remat], prevent_cse=False)
    x, ys = jax.lax.scan(body, x, xs, unroll=min(config.scan_unroll, jax.tree.leaves(xs)[0].shape[0]))
    if cache is None:
        return x, None
    return x, {"k": ys[0], "v": ys[1], "pos": slot_pos, "index": cache["index"] + x.shape[1]}


def _cache_write(config: ModelConfig, cache: Params, attention_mask: jax.Array, write_start):
    """The new tokens' (attention_mask [B, T]) positions after the cache's and where they go: (q_pos, seg, cos, sin,
    slot_pos: each slot's position after the write, slots [T], start: see run_layers' write_start)."""
    real = attention_mask > 0
    last = jnp.max(cache["pos"], axis=1, keepdims=True)  # -1 for an empty cache
    q_pos = jnp.where(real, last + jnp.cumsum(real, axis=1, dtype=jnp.int32), -1)
    seg = real.astype(jnp.int32)
    T, S = attention_mask.shape[1], cache["pos"].shape[1]
    slots = _write_slots(cache["index"], T, S)
    start = cache["index"] % S if T == 1 else write_start
    slot_pos = cache["pos"].at[:, slots].set(jnp.where(seg > 0, q_pos, -1), mode="drop")
    return (q_pos, seg, *rope_tables(q_pos, config.head_dim, config.rope_theta), slot_pos, slots, start)


def decode_layers(layers: Sequence[Params], config: ModelConfig, x: jax.Array, attention_mask: jax.Array,
                  cache: Params, constrain: Optional[Callable[[jax.Array], jax.Array]] = None):
    """run_layers with a cache, for a decode step: `layers` one dict per layer (no leading layer axis, either
    projection form, see fuse_projections) and the cache's k and v tuples of one [1, B, S, K, E] array per layer.
    No scan: each layer reads its own weights in place and writes its own cache array in place (a scan over a stack
    would copy each step's slice of the weights and of the cache). Returns (x, cache in the same form)."""
    pin = constrain if constrain is not None else (lambda h: h)
    x = x.astype(jnp.dtype(config.dtype))
    q_pos, seg, cos, sin, slot_pos, slots, start = _cache_write(config, cache, attention_mask, None)
    ks, vs = [], []
    for layer, ck, cv in zip(layers, cache["k"], cache["v"]):
        kv = (ck[0], cv[0], cache["pos"], slots, start)
        x, (ck, cv) = decoder_layer(config, pin(x), layer, cos, sin, q_pos, seg, kv, shard=constrain)
        x = pin(x)
        ks.append(ck[None])
        vs.append(cv[None])
    return x, {"k": tuple(ks), "v": tuple(vs), "pos": slot_pos, "index": cache["index"] + x.shape[1]}


def embed_tokens(params: Params, config: ModelConfig, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(jnp.dtype(config.dtype))


def final_norm(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def hidden_states(params: Params, config: ModelConfig, tokens: jax.Array, attention_mask=None,
                  constrain=None, dropout_key=None) -> jax.Array:
    """The final-norm hidden states [B, T, D] (compute dtype). constrain: None, or a mesh's
    sharding.ActivationConstraint (the embedding table pinned for the lookup, the residual stream split over the batch
    axes at every layer boundary). dropout_key: LoRA dropout, see run_layers."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    if constrain is None:
        x = embed_tokens(params, config, tokens)
    else:
        x = constrain(embed_tokens({"embed": constrain.embedding(params["embed"])}, config, tokens))
    x, _ = run_layers(params["layers"], config, x, attention_mask, constrain=constrain, dropout_key=dropout_key)
    return final_norm(params, config, x)


def lm_logits(params: Params, config: ModelConfig, h: jax.Array) -> jax.Array:
    """Vocabulary logits [..., V] in float32 from final hidden states."""
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]
    return _dense(h, w, h.dtype, out_dtype=jnp.float32)


def forward(params: Params, config: ModelConfig, tokens: jax.Array, attention_mask=None,
            dropout_key=None) -> jax.Array:
    """Logits [B, T, V] in float32. attention_mask: 0 on padding (left or right), see positions_and_segments.
    dropout_key: LoRA dropout, see run_layers."""
    return lm_logits(params, config, hidden_states(params, config, tokens, attention_mask, dropout_key=dropout_key))


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index [B] of each row's last non-pad token."""
    idx = jnp.arange(attention_mask.shape[-1])
    return jnp.argmax(jnp.where(attention_mask > 0, idx, -1), axis=-1)


def reward_values(params: Params, config: ModelConfig, h: jax.Array) -> jax.Array:
    """The scalar head at every token [B, T] (float32)."""
    return jnp.einsum("btd,do->bto", h, params["score"].astype(h.dtype), preferred_element_type=jnp.float32)[..., 0]


def score(params: Params, config: ModelConfig, tokens: jax.Array, attention_mask: jax.Array,
          constrain=None) -> jax.Array:
    """Reward [B] (float32): the score head read at each row's last non-pad token. constrain: see hidden_states."""
    if "score" not in params:
        raise ValueError("score() needs a reward model: params have no 'score' head (build it with head='score')")
    h = hidden_states(params, config, tokens, attention_mask, constrain)
    last = last_token_index(attention_mask)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
    return reward_values(params, config, h_last)[:, 0]


def value_head(head: Params, h: jax.Array) -> jax.Array:
    """Per-token values [B, T] (float32) from hidden states [B, T, D]: the "mlp" or "linear" head, or the scalar
    Linear (no bias) of a "layers" critic (whose stack step/hydra.py runs first)."""
    h = h.astype(jnp.float32)
    if "w1" in head:
        h = jax.nn.relu(h @ head["w1"].astype(jnp.float32) + head["b1"].astype(jnp.float32))
        return (h @ head["w2"].astype(jnp.float32) + head["b2"].astype(jnp.float32))[..., 0]
    out = h @ head["w"].astype(jnp.float32)
    return (out + head["b"].astype(jnp.float32) if "b" in head else out)[..., 0]


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets], float32, same leading shape as targets."""
    logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return picked - logz


def check_token_ids(tokens, vocab_size: int, where: str = "tokens") -> None:
    """Host-side check that every id is in [0, vocab_size): an out-of-range id would gather garbage (or crash a GPU)."""
    arr = np.asarray(tokens)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{where}: token id {int(arr[pos])} at index {pos} is outside the vocabulary "
                         f"[0, {vocab_size}) ({int(bad.sum())} bad ids in all); the tokenizer and the model disagree "
                         f"(e.g. an added token such as <sep> = 32002 that the 32002-row embedding lacks)")


# ----------------------------------------------------------------------------------------------------------------------
# Train only the top N layers: split the tree so the frozen part has no gradient and no optimizer state.

HEAD_KEYS = ("lm_head", "score")


def split_params(params: Params, top_layers: int, train_head: bool = True) -> tuple[Params, Params]:
    """(trainable, frozen). trainable = the top `top_layers` layers + final norm (+ the output head if train_head);
    frozen = embeddings + the layers below (+ the head otherwise). top_layers = 0 means all layers train (as
    num_layers does); frozen then has no "layers" (and is {} when the head trains too)."""
    n_layers = num_stacked(params["layers"])
    if not 0 <= top_layers <= n_layers:
        raise ValueError(f"trainable top layers must be in [0, {n_layers}], got {top_layers}")
    top_layers = top_layers or n_layers
    if top_layers == n_layers and train_head:
        return dict(params), {}
    cut = n_layers - top_layers
    trainable = {"layers": jax.tree.map(lambda a: a[cut:], params["layers"]), "final_norm": params["final_norm"]}
    frozen = {"embed": params["embed"]}
    if cut:
        frozen["layers"] = jax.tree.map(lambda a: a[:cut], params["layers"])
    for k in HEAD_KEYS:
        if k in params:
            (trainable if train_head else frozen)[k] = params[k]
    return trainable, frozen


def frozen_storage(params: Params, config: ModelConfig) -> Params:
    """Weights that never train, stored in the compute dtype (config.dtype) instead of param_dtype.

    Every matrix is cast to the compute dtype where it is used (_dense, the embedding lookup, the score head), so
    storing a frozen matrix already cast gives bit-identical forwards and halves its memory when the model computes
    in bf16 over fp32 master weights (fp32 copies matter only for weights that receive updates; DeepSpeed's bf16 mode
    likewise keeps fp32 masters for the optimised parameters alone). Norm weights (used in fp32) keep param_dtype.
    A no-op when dtype == param_dtype (every fp32 model)."""
    dt = jnp.dtype(config.dtype)
    return params if dt == jnp.dtype(config.param_dtype) else cast_matrices(params, dt)


def quantized_base(params: Params, config: ModelConfig) -> Params:
    """params (full, or a frozen trunk) with their layers' matrices stored as config.quantize says (models/quantize.py:
    int8 or nf4; "none" returns them as they are). Only for weights that never train: weight() reads them dense."""
    return quantize.quantize_base(params, config.quantize, config.quantize_block)


def quantized_specs(specs: Params, config: ModelConfig) -> Params:
    """The ParamSpec tree of quantized_base(params) for `specs` (param_specs or a subtree holding "layers"): each
    quantized matrix a dict of the specs of its stored arrays, with the logical axes they shard by (quantize.py)."""
    if config.quantize == "none" or "layers" not in specs:
        return specs

    def one(name, spec):
        if name not in quantize.INPUT_AXES or not is_spec(spec):
            return spec
        stored = quantize.storage_shapes(name, spec.shape, config.quantize, config.quantize_block)
        return {k: ParamSpec(shape, axes(spec.axes), "zeros", dtype) for k, (shape, dtype, axes) in stored.items()}
    return {**specs, "layers": {k: one(k, v) for k, v in specs["layers"].items()}}


def cast_matrices(params: Params, dtype) -> Params:
    """params with every weight but the norms cast to `dtype` (the compute dtype): the matrices are only ever used
    cast to it (_dense, the embedding lookup, the score head), the norm weights are used in fp32 and keep theirs, and
    a quantized matrix's codes and scales stay as they are (weight() dequantizes them to the compute dtype)."""
    def one(path, a):
        key = str(getattr(path[-1], "key", ""))
        return a if key.endswith("norm") or key in quantize.STORED_KEYS else a.astype(dtype)
    return jax.tree.map_with_path(one, params)


def merge_params(trainable: Params, frozen: Params) -> Params:
    """Inverse of split_params. Frozen leaves stored narrower (frozen_storage) come back in the trainable part's
    dtype, so the merged model (an export) has one parameter dtype; widening bf16 to fp32 is exact. A quantized
    frozen base (quantized_base) comes back dequantized: the weights the stage computed with, not the originals."""
    if not frozen:
        return dict(trainable)
    dtypes = {a.dtype for a in jax.tree.leaves(trainable)}
    dt = dtypes.pop() if len(dtypes) == 1 else None
    frozen = quantize.dequantize_tree(frozen, jnp.float32 if dt is None else dt)
    if dt is not None:
        frozen = jax.tree.map(lambda a: a if a.dtype == dt else a.astype(dt), frozen)
    out = {**frozen, **{k: v for k, v in trainable.items() if k != "layers"}}
    out["layers"] = trainable["layers"] if "layers" not in frozen else jax.tree.map(
        lambda a, b: jnp.concatenate([a, b], axis=0), frozen["layers"], trainable["layers"])
    return out
