"""The one attention function and its implementations.

Semantics (every implementation): query i sees key j iff j is a real slot (k_pos >= 0), pos_j <= pos_i, the two are in
the same segment (packing) and, with a sliding window, pos_i - pos_j < window (transformers' rule i - window < j <= i).
Grouped-query attention: H query heads share K kv heads in groups of G = H // K, without repeating K/V.

Implementations (ModelConfig.attention):
- "dense": scores [B, K, G, T, S] in one einsum, masked softmax. Fastest for short sequences and decode; memory
  O(T * S).
- "blockwise": pure JAX flash attention: query blocks x key blocks with an online softmax, and a custom VJP that
  recomputes each block's probabilities from the saved log-sum-exp, so neither the forward nor the backward holds a
  [T, S] buffer (only [block_q, block_k] tiles). Runs on every backend, including the CPU planner.
- "cudnn": jax.nn.dot_product_attention(implementation="cudnn") (the cuDNN flash kernel; GPU only) with the mask as a
  boolean [B, 1, T, S] array (the kernel streams it; the [T, S] scores are never stored).
- "splash": Pallas splash attention (TPU only): segment ids for padding/packing, a causal mask and a local mask for
  the window, one MQA kernel per kv head. Valid only for self-attention over one contiguous run of tokens per segment
  (training forwards and prefill without a cache), where index order equals position order; other calls fall back to
  "blockwise".
- "auto": cudnn on GPU (bf16/fp16), splash on TPU, else blockwise when T * S >= AUTO_BLOCKWISE_MIN_SCORES, else dense.

Which platform: `target_platform(shard)`, the one place the choice reads it: the platform of the devices of the mesh
the call is sharded over (`shard`, a sharding.ActivationConstraint), else the platform set by `compiling_for`, else
jax.default_backend(). So `starling-jax plan --target v5e-8`, which compiles for TPU topology devices from a CPU host,
compiles exactly the kernels a TPU host runs. On a mesh, splash runs under jax.shard_map over the batch and head axes
(a Mosaic kernel cannot be partitioned automatically): each device runs the kernel on its rows and heads, as in
MaxText and the jax-llm-examples.

Queries that see no key (padding, or rows stopped during decoding) give an undefined row in "dense" (the mean of V);
the other implementations give zeros there. Nothing reads those rows.

Shape letters: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, E head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a row with no visible key gives a finite softmax instead of NaN
from starling_jax.models.config import ATTENTION as IMPLEMENTATIONS
AUTO_BLOCKWISE_MIN_SCORES = 1024 * 1024  # "auto" on CPU: dense below this many query x key pairs per row and head


def visible(q_pos, k_pos, q_seg=None, k_seg=None, window: Optional[int] = None):
    """[B, T, S] bool: which keys each query sees (see the module docstring)."""
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        allowed &= q_pos[:, :, None] - k_pos[:, None, :] < window
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    return allowed


def dense_attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, window: Optional[int] = None):
    """q [B, T, H, E]; k, v [B, S, K, E]; q_pos [B, T]; k_pos [B, S] (-1 = empty or padded slot) -> [B, T, H, E]."""
    B, T, H, E = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k, preferred_element_type=jnp.float32) * (E ** -0.5)
    scores = jnp.where(visible(q_pos, k_pos, q_seg, k_seg, window)[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v)
    return out.reshape(B, T, H, E)


# ----------------------------------------------------------------------------------------------------------------------
# Blockwise (flash) attention in pure JAX.


def _pad_to(x, n: int, axis: int, value):
    extra = -x.shape[axis] % n
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, n_blocks: int):
    """[B, N * b, ...] -> [N, B, b, ...] (the scan axis first)."""
    return jnp.moveaxis(x.reshape(x.shape[0], n_blocks, -1, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[N, B, b, ...] -> [B, N * b, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _block_scores(qb, kb, qp, kp, qs, ks, window, scale):
    """Masked scores of one tile: qb [B, bq, K, G, E], kb [B, bk, K, E] -> s [B, K, G, bq, bk] f32, allowed."""
    s = jnp.einsum("bqkge,bske->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    allowed = visible(qp, kp, qs, ks, window)[:, None, None]
    return jnp.where(allowed, s, NEG_INF), allowed


def _flash_forward(qg, k, v, q_pos, k_pos, q_seg, k_seg, window, block_q, block_k):
    """qg [B, T, K, G, E] (T a multiple of block_q), k, v [B, S, K, E] (S a multiple of block_k) ->
    out [B, T, K, G, E] (q's dtype), lse [nq, B, K, G, bq] f32."""
    B, T, K, G, E = qg.shape
    S = k.shape[1]
    nq, nk = T // block_q, S // block_k
    scale = E ** -0.5
    ks_blocks = (_blocks(k, nk), _blocks(v, nk), _blocks(k_pos, nk), _blocks(k_seg, nk))

    def one_query_block(args):
        qb, qp, qs = args

        def step(carry, kv):
            m, l, acc = carry
            kb, vb, kp, kss = kv
            s, _ = _block_scores(qb, kb, qp, kp, qs, kss, window, scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bske->bkgqe", p.astype(vb.dtype), vb,
                                                     preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        init = (jnp.full((B, K, G, block_q), NEG_INF, jnp.float32), jnp.zeros((B, K, G, block_q), jnp.float32),
                jnp.zeros((B, K, G, block_q, E), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, ks_blocks)
        out = jnp.einsum("bkgqe->bqkge", acc / l[..., None]).astype(qg.dtype)
        return out, m + jnp.log(l)

    out, lse = jax.lax.map(one_query_block, (_blocks(qg, nq), _blocks(q_pos, nq), _blocks(q_seg, nq)))
    return _unblocks(out), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(qg, k, v, q_pos, k_pos, q_seg, k_seg, window, block_q, block_k):
    return _flash_forward(qg, k, v, q_pos, k_pos, q_seg, k_seg, window, block_q, block_k)[0]


def _flash_fwd(qg, k, v, q_pos, k_pos, q_seg, k_seg, window, block_q, block_k):
    out, lse = _flash_forward(qg, k, v, q_pos, k_pos, q_seg, k_seg, window, block_q, block_k)
    return out, (qg, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(window, block_q, block_k, res, d_out):
    """The flash-attention backward: per tile, p = exp(s - lse), dv += p^T do, ds = p * (do v^T - D) with
    D = rowsum(do * out), dq += ds k, dk += ds^T q (scaled). Outer scan over key blocks, inner over query blocks."""
    qg, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = res
    B, T, K, G, E = qg.shape
    S = k.shape[1]
    nq, nk = T // block_q, S // block_k
    scale = E ** -0.5
    d_out = d_out.astype(jnp.float32)
    delta = jnp.einsum("bqkge,bqkge->bkgq", d_out, out.astype(jnp.float32))  # [B, K, G, T]
    q_blocks = (_blocks(qg, nq), _blocks(d_out, nq), _blocks(q_pos, nq), _blocks(q_seg, nq), lse,
                jnp.moveaxis(delta.reshape(B, K, G, nq, block_q), 3, 0))

    def one_key_block(dq, kv):
        kb, vb, kp, kss = kv

        def step(carry, qs_i):
            dk, dv = carry
            qb, dob, qp, qss, lse_i, delta_i = qs_i
            s, allowed = _block_scores(qb, kb, qp, kp, qss, kss, window, scale)
            p = jnp.where(allowed, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkge->bske", p, dob)
            dp = jnp.einsum("bqkge,bske->bkgqs", dob, vb.astype(jnp.float32))
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = jnp.einsum("bkgqs,bske->bqkge", ds, kb.astype(jnp.float32))
            dk = dk + jnp.einsum("bkgqs,bqkge->bske", ds, qb.astype(jnp.float32))
            return (dk, dv), dq_i

        zeros = jnp.zeros((B, block_k, K, E), jnp.float32)
        (dk, dv), dq_blocks = jax.lax.scan(step, (zeros, zeros), q_blocks)
        return dq + dq_blocks, (dk, dv)

    dq0 = jnp.zeros((nq, B, block_q, K, G, E), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0,
                                (_blocks(k, nk), _blocks(v, nk), _blocks(k_pos, nk), _blocks(k_seg, nk)))
    return (_unblocks(dq).astype(qg.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, window: Optional[int] = None,
                        block_q: int = 512, block_k: int = 512):
    """Same arguments and result as dense_attention, computed in [block_q, block_k] tiles (see the module docstring).
    T and S are padded up to multiples of the (clipped) block sizes with slots that no query sees."""
    B, T, H, E = q.shape
    K = k.shape[2]
    bq, bk = min(block_q, T), min(block_k, k.shape[1])
    if q_seg is None:
        q_seg, k_seg = jnp.zeros(q_pos.shape, jnp.int32), jnp.zeros(k_pos.shape, jnp.int32)
    qg = _pad_to(q.reshape(B, T, K, H // K, E), bq, 1, 0)
    k, v = _pad_to(k, bk, 1, 0), _pad_to(v, bk, 1, 0)
    qp, qs = _pad_to(q_pos, bq, 1, -1), _pad_to(q_seg.astype(jnp.int32), bq, 1, 0)
    kp, kss = _pad_to(k_pos, bk, 1, -1), _pad_to(k_seg.astype(jnp.int32), bk, 1, 0)
    out = _flash(qg, k, v, qp, kp, qs, kss, window, bq, bk)[:, :T].reshape(B, T, H, E)
    return _zero_blind_queries(out, q_pos)


def _zero_blind_queries(out, q_pos):
    """Zero the rows of queries that see no key (q_pos -1: padding or a stopped row), so no kernel's value for them
    (which may be NaN for a fully masked row) reaches the residual stream; their gradient is zero too."""
    return jnp.where((q_pos >= 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# Vendor kernels.


def cudnn_attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, window: Optional[int] = None,
                    implementation: str = "cudnn"):
    """jax.nn.dot_product_attention with our mask as a [B, 1, T, S] boolean array. implementation="cudnn" is the cuDNN
    flash kernel (GPU, bf16/fp16); "xla" runs the same call on any backend (used to test this wrapper on CPU)."""
    mask = visible(q_pos, k_pos, q_seg, k_seg, window)[:, None]
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                       scale=q.shape[-1] ** -0.5, implementation=implementation)
    return _zero_blind_queries(out, q_pos)


def splash_attention(q, k, v, q_pos, q_seg, window: Optional[int] = None, interpret: bool = False):
    """Pallas splash attention for self-attention (k, v computed from the same tokens as q): q [B, T, H, E],
    k, v [B, T, K, E]; q_seg [B, T] segment ids (0 = padding). Index order must equal position order within each
    segment (true for left padding and packing without a cache). interpret=True runs the Pallas kernel in the
    interpreter (any backend; slow: for tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, E = q.shape
    K = k.shape[2]
    G = H // K
    pad = -T % 128  # the kernel tiles the sequence in blocks of 128
    Tp = T + pad
    mask = sm.CausalMask((Tp, Tp)) if window is None else sm.LocalMask((Tp, Tp), (window - 1, 0), offset=0)
    block = next(b for b in (512, 256, 128) if Tp % b == 0)  # the kernel's blocks must divide the length
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * G), block_sizes=sizes, interpret=interpret)
    seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    # [B, T, K, G, E] -> [B, K, G, T, E]: one MQA call per (row, kv head) with its G query heads.
    qg = jnp.pad(q.reshape(B, T, K, G, E), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).transpose(0, 2, 3, 1, 4)
    kk = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vv = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    scale = E ** -0.5

    def per_row(qr, kr, vr, sr):  # qr [K, G, Tp, E], kr/vr [K, Tp, E], sr [Tp]
        ids = sk.SegmentIds(q=sr, kv=sr)
        return jax.vmap(lambda a, b, c: kernel(a * scale, b, c, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(per_row)(qg, kk, vv, seg)  # [B, K, G, Tp, E]
    out = out.transpose(0, 3, 1, 2, 4)[:, :T].reshape(B, T, H, E).astype(q.dtype)
    return _zero_blind_queries(out, jnp.where(q_seg > 0, 0, -1))


# ----------------------------------------------------------------------------------------------------------------------
# Choosing one.


_PLATFORM = contextvars.ContextVar("starling_attention_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: Optional[str]):
    """Within this block, calls without a mesh choose their implementation for `platform` ("tpu", "gpu", "cpu"; None =
    the default backend): the planner compiles for devices that are not this process's backend."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def target_platform(shard=None) -> str:
    """The platform an attention call compiles for (see the module docstring)."""
    mesh = getattr(shard, "mesh", None)
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return _PLATFORM.get() or jax.default_backend()


def resolve(implementation: str, dtype, T: int, S: int, self_attention: bool, platform: Optional[str] = None) -> str:
    """The implementation that `implementation` ("auto" or a name) means for this call on `platform` (default:
    target_platform())."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    backend = platform or target_platform()
    if implementation == "cudnn" and backend != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU, but the target platform is {backend!r}; use 'auto', "
                         "'blockwise' or 'dense'")
    if implementation == "splash" and backend != "tpu":
        raise ValueError(f"attention='splash' needs a TPU, but the target platform is {backend!r}; use 'auto', "
                         "'blockwise' or 'dense'")
    if implementation == "splash" and not self_attention:
        return "blockwise"
    if implementation != "auto":
        return implementation
    if T == 1:
        return "dense"  # one decode step: [B, K, G, 1, S] scores are small
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and self_attention:
        return "splash"
    return "blockwise" if T * S >= AUTO_BLOCKWISE_MIN_SCORES else "dense"


def sharded_splash_attention(q, k, v, q_seg, window: Optional[int], shard, interpret: bool = False):
    """splash_attention under jax.shard_map on shard.mesh: rows split over the batch axes and heads over the head
    axes (shard.attention_specs(B, H, K) gives the specs, dropping an axis that does not divide its dimension), so
    each device runs the kernel on its own rows and heads; nothing crosses devices."""
    q_spec, kv_spec, seg_spec = shard.attention_specs(q.shape[0], q.shape[2], k.shape[2])
    fn = functools.partial(splash_attention, window=window, interpret=interpret)
    return jax.shard_map(lambda q, k, v, s: fn(q, k, v, None, s), mesh=shard.mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, q_seg)


def attention(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, window: Optional[int] = None, *,
              implementation: str = "dense", block_size: int = 512, self_attention: bool = False, shard=None):
    """Grouped-query attention with the masking rule of the module docstring.

    q [B, T, H, E]; k, v [B, S, K, E]; q_pos [B, T]; k_pos [B, S] with -1 marking an empty or padded slot; q_seg/k_seg
    segment ids (None = one segment). self_attention: k/v come from the same tokens as q (k_pos/k_seg equal
    q_pos/q_seg where real), which "splash" needs. shard: the sharding.ActivationConstraint of the mesh the call runs
    on, or None (see target_platform). Returns [B, T, H, E].
    """
    impl = resolve(implementation, q.dtype, q.shape[1], k.shape[1], self_attention, target_platform(shard))
    if impl == "dense":
        return dense_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window, block_size, block_size)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window)
    seg = q_seg if q_seg is not None else (q_pos >= 0).astype(jnp.int32)
    if getattr(shard, "mesh", None) is not None:
        return sharded_splash_attention(q, k, v, seg, window, shard)
    return splash_attention(q, k, v, q_pos, seg, window)
