"""Quantized storage of a frozen base (QLoRA): the decoder layers' matrices as int8 or 4-bit NormalFloat codes,
dequantized to the compute dtype where a layer reads them (transformer.weight), inside the scan over layers, so only
one layer's dense weights exist at a time.

A quantized matrix is a dict in place of the array, keyed by its scheme (plain arrays, so jit, lax.scan over the
stacked layer axis, shardings and orbax checkpoints treat it like any other params subtree):
  int8: {"int8": int8 codes, w's shape; "scale": float32, w's shape with the input axes 1} - per output channel
        absmax / 127, codes = round(w / scale) (LLM.int8()'s vector-wise weight quantization).
  nf4:  {"nf4": uint8, w's shape with the block axis halved (two 4-bit codes per byte, the first of each pair in the
        high nibble, as bitsandbytes packs them); "absmax": float32, w's shape with the block axis divided by the
        block size} - QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314): each block of `block`
        consecutive values along the matrix's last input axis (the same blocks as bitsandbytes' over a torch Linear's
        [out, in] weight) is divided by its absmax and each value stored as the index of the nearest NF4 level.

Only the layers' projections (MATRICES) are quantized: the embedding, the LM head, the score head and the norms stay
in their dtype (QLoRA, too, keeps the embedding and the head unquantized). A quantized array shards by its weight's
logical axes: the codes keep every axis (the packed axis halved), the nf4 absmax keeps every axis (the block axis
divided by the block size: a mesh axis that splits the weight's input dimension must also divide the block count,
which param_shardings checks by name), the int8 scale has no input axes (None: size 1, replicated along them).

Why not qwix (0.1.8) for the arrays: its QArray is a flax dataclass whose children are attributes (`.qvalue`,
`.scale`), not dict keys, so our parameter specs, logical-axis sharding and key-path names would each need a second
code path for it; and it stores nf4 codes as `uint4`, one code per element, which orbax cannot save (tensorstore:
'Unsupported data type: "uint4"') and which numpy and jax count as one byte per code on the host. The functions below
are the few that QLoRA needs; the NF4 levels are QLoRA's (tests derive them from the normal quantiles as the paper
does).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("none", "int8", "nf4")

# NF4 levels: QLoRA's Appendix E, bitsandbytes' functional.py get_4bit_type("nf4"): normalized quantiles of N(0, 1)
# with an exact 0, 8 levels for the positive half and 7 for the negative.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)

# The layer matrices a quantized base stores quantized, with their input axes counted from the end (a stacked
# [L, ...] array and one layer's slice read the same); the last input axis is the nf4 block axis.
INPUT_AXES = {"wq": (-3,), "wk": (-3,), "wv": (-3,), "wo": (-3, -2), "w_gate": (-2,), "w_up": (-2,),
              "w_down": (-2,)}
MATRICES = tuple(INPUT_AXES)
STORED_KEYS = ("int8", "scale", "nf4", "absmax")


def is_quantized(w) -> bool:
    """True for a quantized matrix (a dict keyed "int8" or "nf4"), False for a plain array."""
    return isinstance(w, Mapping) and ("int8" in w or "nf4" in w)


def num_weights(q: Mapping[str, jax.Array]) -> int:
    """How many weights a quantized matrix stores (nf4: two per byte)."""
    codes = q["int8"] if "int8" in q else q["nf4"]
    return int(np.prod(codes.shape)) * (1 if "int8" in q else 2)


def quantize_int8(w: jax.Array, input_axes: tuple[int, ...]) -> dict:
    """Per output channel: scale = absmax over the input axes / 127 (1 for an all-zero channel), codes in [-127, 127]."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=input_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return {"int8": jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), "scale": scale}


def quantize_nf4(w: jax.Array, axis: int, block: int) -> dict:
    """NF4 over blocks of `block` consecutive values along `axis` (negative, counted from the end): each value divided
    by its block's absmax goes to the nearest NF4 level (a value exactly between two levels to the lower one, as
    bitsandbytes' threshold comparisons do); codes packed two per byte along `axis`."""
    w = w.astype(jnp.float32)
    n = w.shape[axis]
    a = w.ndim + axis
    blocks = w.reshape(*w.shape[:a], n // block, block, *w.shape[a + 1:])
    absmax = jnp.max(jnp.abs(blocks), axis=a + 1, keepdims=True)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)
    midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normed, side="left").astype(jnp.uint8).reshape(w.shape)
    pairs = codes.reshape(*w.shape[:a], n // 2, 2, *w.shape[a + 1:])
    hi, lo = jnp.take(pairs, 0, axis=a + 1), jnp.take(pairs, 1, axis=a + 1)
    return {"nf4": (hi << 4) | lo, "absmax": jnp.squeeze(absmax, a + 1)}


@functools.partial(jax.jit, static_argnames=("name", "scheme", "block"))
def quantize(w: jax.Array, name: str, scheme: str, block: int) -> dict:
    """Matrix `name` (a key of INPUT_AXES; stacked or one layer) in `scheme` ("int8" or "nf4"). One compiled program
    per matrix shape (run op by op, its dozen operations compiled a dozen programs for every shape)."""
    axes = INPUT_AXES[name]
    if scheme == "int8":
        return quantize_int8(w, tuple(w.ndim + a for a in axes))
    if scheme == "nf4":
        return quantize_nf4(w, axes[-1], block)
    raise ValueError(f"quantize: scheme must be one of {', '.join(SCHEMES[1:])}, got {scheme!r}")


def dequantize(q: Mapping[str, jax.Array], dtype) -> jax.Array:
    """The dense matrix of a quantized one, in `dtype` (computed in float32, then cast once). The nf4 block axis is
    the one whose codes and absmax differ in size, so any slice over other axes (a scan's layer, a fused q/k/v)
    dequantizes alike."""
    # The barrier keeps the compiler from moving the unpacking out of the scan over layers: without it the TPU
    # compiler unpacked every layer's codes at once, before the loop (three uint8 copies of a 7B model's MLP stacks,
    # 0.9 GiB each, in the update step), where each layer should unpack its own inside the loop.
    if "int8" in q:
        codes, scale = jax.lax.optimization_barrier((q["int8"], q["scale"]))
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    packed, absmax = jax.lax.optimization_barrier((q["nf4"], q["absmax"]))
    a = next(i for i, (c, s) in enumerate(zip(packed.shape, absmax.shape)) if c != s)
    # Both codes of a byte are in the same block (blocks are even): scale each nibble's level by its block's absmax and
    # cast to `dtype` first, then interleave the two halves. The interleave merges axes, which on a TPU's tiled
    # layouts is a copy: made in `dtype`, that copy is the only dense matrix (in float32 it was three to five).
    blocks = packed.reshape(*packed.shape[:a], absmax.shape[a], -1, *packed.shape[a + 1:])  # [..., blocks, block/2, ...]
    scale = jnp.expand_dims(absmax, a + 1)
    hi, lo = ((nf4_levels(codes) * scale).astype(dtype) for codes in (blocks >> 4, blocks & 15))
    return jnp.stack([hi, lo], axis=a + 2).reshape(*packed.shape[:a], -1, *packed.shape[a + 1:])


def nf4_levels(codes: jax.Array) -> jax.Array:
    """NF4[codes] (float32) for uint8 codes in [0, 16), as a tree of selects on the code's four bits: elementwise, so
    XLA fuses it with the scaling and the cast. A table gather (jnp.take) does not fuse: on the TPU compiler it
    materialised each matrix's codes as int32 and their levels as float32 (224 MiB each for a 7B MLP matrix). The
    values are the table's, bit for bit."""
    levels = [jnp.float32(v) for v in NF4]
    for bit in range(4):  # halve the candidates by one bit at a time, lowest first
        on = (codes >> bit) & 1 == 1
        levels = [jnp.where(on, hi, lo) for lo, hi in zip(levels[0::2], levels[1::2])]
    return levels[0]


def quantize_layers(layers: Mapping[str, Any], scheme: str, block: int) -> dict:
    """A layer stack (params["layers"], any slice of it) with its MATRICES quantized; everything else (norms, LoRA
    adapters, matrices already quantized) as it was."""
    return {k: quantize(v, k, scheme, block) if k in INPUT_AXES and not is_quantized(v) else v
            for k, v in layers.items()}


def quantize_base(params: Mapping[str, Any], scheme: str, block: int) -> dict:
    """Params (full, or a frozen trunk) with their "layers" quantized; scheme "none" returns them as they are."""
    if scheme == "none" or "layers" not in params:
        return dict(params)
    return {**params, "layers": quantize_layers(params["layers"], scheme, block)}


def dequantize_tree(tree, dtype) -> Any:
    """Every quantized matrix of `tree` dense in `dtype`; other leaves as they are."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def storage_shapes(name: str, shape: tuple[int, ...], scheme: str, block: int) -> dict[str, tuple]:
    """{stored key: (shape, dtype, axes_map)} of matrix `name` of `shape` in `scheme`; axes_map(axes) gives the stored
    array's logical axes from the weight's."""
    axes_in = INPUT_AXES[name]
    nd = len(shape)
    if scheme == "int8":
        keep = lambda axes: tuple(None if i - nd in axes_in else ax for i, ax in enumerate(axes))
        return {"int8": (shape, "int8", lambda axes: tuple(axes)),
                "scale": (tuple(1 if i - nd in axes_in else d for i, d in enumerate(shape)), "float32", keep)}
    a = nd + axes_in[-1]
    with_dim = lambda d: tuple(d if i == a else s for i, s in enumerate(shape))
    return {"nf4": (with_dim(shape[a] // 2), "uint8", lambda axes: tuple(axes)),
            "absmax": (with_dim(shape[a] // block), "float32", lambda axes: tuple(axes))}
