"""The attention implementations of models/attention_ops.py against the dense reference (fp32, CPU): values and
gradients on real tokens with GQA, left padding, packed segments and a sliding window; the whole model and
generation (rolling KV cache) with each implementation; and the memory claim (no [T, T] buffer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax import models
from starling_jax.generation import sampling
from starling_jax.models import attention_ops as ops
from starling_jax.models.transformer import positions_and_segments

B, T, H, K, E = 3, 37, 4, 2, 8


def _inputs(seed=0, t=T, e=E):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, t, H, e)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, t, K, e)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, t, K, e)), jnp.float32)
    mask = np.ones((B, t), np.int32)
    mask[0, :5] = 0  # left padding
    third = t // 3
    mask[1, :third], mask[1, third:2 * third], mask[1, 2 * third:] = 1, 2, 3  # three packed sequences
    mask[2, :3] = 0
    pos, seg = positions_and_segments(jnp.asarray(mask))
    k_pos = jnp.where(seg > 0, pos, -1)
    weights = jnp.asarray(rng.normal(size=(B, t, H, e)), jnp.float32) * (seg > 0)[:, :, None, None]
    return q, k, v, pos, k_pos, seg, weights


def _grads(fn, q, k, v, weights):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)


def _max_diff_on_real(a, b, seg):
    return float(jnp.max(jnp.abs(jnp.where((seg > 0)[:, :, None, None], a - b, 0.0))))


# (8, 16) tiles: the most blocks, 164 s at load ~22 here (the others 14-22 s)
@pytest.mark.parametrize("window,blocks", [pytest.param(None, (8, 16), marks=pytest.mark.slow), (6, (16, 8)),
                                            (6, (64, 64))])
def test_blockwise_matches_dense_values_and_gradients(window, blocks):
    q, k, v, pos, k_pos, seg, w = _inputs()
    dense = lambda q, k, v: ops.dense_attention(q, k, v, pos, k_pos, seg, seg, window)
    block = lambda q, k, v: ops.blockwise_attention(q, k, v, pos, k_pos, seg, seg, window, *blocks)
    assert _max_diff_on_real(dense(q, k, v), block(q, k, v), seg) < 2e-6
    for gd, gb in zip(_grads(dense, q, k, v, w), _grads(block, q, k, v, w)):
        assert float(jnp.max(jnp.abs(gd - gb))) < 5e-6
    assert not np.isnan(np.asarray(block(q, k, v))).any()  # pad queries see nothing: zeros, not NaN


def test_blockwise_over_a_cache_with_empty_slots_matches_dense():
    """Decode-shaped call: few queries over a rolling buffer whose slots hold out-of-order positions and empties."""
    rng = np.random.default_rng(1)
    S = 24
    q = jnp.asarray(rng.normal(size=(B, 3, H, E)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, E)), jnp.float32) for _ in range(2))
    k_pos = jnp.asarray(rng.permutation(np.arange(-4, S - 4))[None].repeat(B, 0), jnp.int32)  # -1..-4: empty
    q_pos = jnp.asarray([[S - 3, S - 2, S - 1]] * B, jnp.int32)
    for window in (None, 7):
        d = ops.dense_attention(q, k, v, q_pos, k_pos, window=window)
        b = ops.blockwise_attention(q, k, v, q_pos, k_pos, window=window, block_q=2, block_k=5)
        assert float(jnp.max(jnp.abs(d - b))) < 2e-6


@pytest.mark.parametrize("window", [None, 6])
def test_dot_product_attention_wrapper_matches_dense(window):
    """The cuDNN path's wrapper (mask layout, GQA, scale) through jax.nn.dot_product_attention's XLA implementation;
    the cuDNN kernel itself is checked in test_cudnn_kernel_matches_dense where a GPU is present."""
    q, k, v, pos, k_pos, seg, w = _inputs()
    d = ops.dense_attention(q, k, v, pos, k_pos, seg, seg, window)
    c = ops.cudnn_attention(q, k, v, pos, k_pos, seg, seg, window, implementation="xla")
    assert _max_diff_on_real(d, c, seg) < 2e-6


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU")
def test_cudnn_kernel_matches_dense():
    q, k, v, pos, k_pos, seg, _ = _inputs(t=64, e=64)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    d = ops.dense_attention(q, k, v, pos, k_pos, seg, seg, 6).astype(jnp.float32)
    c = ops.cudnn_attention(q, k, v, pos, k_pos, seg, seg, 6).astype(jnp.float32)
    assert _max_diff_on_real(d, c, seg) < 3e-2


@pytest.mark.slow
def test_splash_kernel_matches_dense_in_the_pallas_interpreter():
    """The TPU splash kernel, run by the Pallas interpreter on CPU (real TPUs run the compiled kernel): values and
    gradients on real tokens, packed segments, left padding, a window, GQA, a length that is not a multiple of 128."""
    q, k, v, pos, k_pos, seg, w = _inputs(t=130, e=128)
    interpret = jax.default_backend() != "tpu"
    for window in (None, 6):
        dense = lambda q, k, v: ops.dense_attention(q, k, v, pos, k_pos, seg, seg, window)
        splash = lambda q, k, v: ops.splash_attention(q, k, v, pos, seg, window, interpret=interpret)
        assert _max_diff_on_real(dense(q, k, v), splash(q, k, v), seg) < 1e-5
    for gd, gs in zip(_grads(dense, q, k, v, w), _grads(splash, q, k, v, w)):
        assert float(jnp.max(jnp.abs(gd - gs))) < 1e-5


def test_resolve_auto_and_unavailable_kernels():
    backend = jax.default_backend()
    if backend == "cpu":
        assert ops.resolve("auto", jnp.float32, 256, 256, True) == "dense"
        assert ops.resolve("auto", jnp.bfloat16, 2148, 2148, True) == "blockwise"
        with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
            ops.resolve("cudnn", jnp.bfloat16, 64, 64, True)
        with pytest.raises(ValueError, match="attention='splash' needs a TPU"):
            ops.resolve("splash", jnp.bfloat16, 64, 64, True)
    assert ops.resolve("auto", jnp.float32, 1, 4096, False) == "dense"  # a decode step
    with pytest.raises(ValueError, match="invalid ModelConfig: attention='flash'"):
        models.get_preset("tiny", attention="flash")


def _tiny(impl, **kw):
    return models.get_preset("tiny", attention=impl, attention_block=16, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("window", [32, 7])
def test_model_logits_and_generation_blockwise_equal_dense(window):
    """The whole decoder and generation over the (rolling, window 7 < prompt) KV cache: blockwise == dense."""
    dense, block = _tiny("dense", sliding_window=window), _tiny("blockwise", sliding_window=window)
    params = models.init_params(dense, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 1000, size=(2, 40)), jnp.int32)
    mask = np.ones((2, 40), np.int32)
    mask[1, :9] = 0
    real = mask[:, :, None] > 0
    ld = models.forward(params, dense, tokens, jnp.asarray(mask))
    lb = models.forward(params, block, tokens, jnp.asarray(mask))
    assert float(jnp.max(jnp.abs(jnp.where(real, ld - lb, 0)))) < 1e-4
    outs = [sampling.generate(params, c, tokens, jnp.asarray(mask), jax.random.key(1), 12, temperature=0.0)
            for c in (dense, block)]
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(outs[1][0]))
    np.testing.assert_allclose(np.asarray(outs[0][2]), np.asarray(outs[1][2]), atol=1e-4)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_holds_no_t_by_t_buffer():
    """Compiled memory of the gradient at T = 4096, 4 heads: dense needs the [4, T, T] f32 scores (256 MiB) and
    more; blockwise (512 x 512 tiles) stays below an eighth of one such buffer."""
    t = 4096
    q = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def loss(impl):
        return lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(
            ops.attention(q, k, v, pos, pos, implementation=impl) ** 2), argnums=(0, 1, 2))(q, k, v)
    scores = 4 * t * t * 4
    assert _temp_bytes(loss("dense"), q, kv, kv) >= scores
    assert _temp_bytes(loss("blockwise"), q, kv, kv) < scores / 8


# ----------------------------------------------------------------------------------------------------------------------
# Splash on a mesh: under shard_map over the batch and head axes, chosen from the mesh's devices' platform.


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
def test_sharded_splash_matches_dense_in_the_pallas_interpreter():
    """The splash kernel under shard_map on a (data 2, fsdp 2, tensor 2) CPU mesh, in the Pallas interpreter: each
    device runs it on its rows (data x fsdp) and its kv heads with their query heads (tensor); values and gradients
    equal the dense reference's."""
    from starling_jax.parallel import sharding
    from starling_jax.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    shard = sharding.ActivationConstraint(mesh, MeshConfig().rules)
    rng = np.random.default_rng(3)
    b, t, h, kh, e = 4, 130, 4, 2, 128
    q = jnp.asarray(rng.normal(size=(b, t, h, e)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kh, e)), jnp.float32) for _ in range(2))
    mask = np.ones((b, t), np.int32)
    mask[0, :7], mask[3, :60] = 0, 0
    mask[1, 50:] = 2
    pos, seg = positions_and_segments(jnp.asarray(mask))
    w = jnp.asarray(rng.normal(size=(b, t, h, e)), jnp.float32) * (seg > 0)[:, :, None, None]
    assert shard.attention_specs(b, h, kh)[0] == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    dense = lambda q, k, v: ops.dense_attention(q, k, v, pos, jnp.where(seg > 0, pos, -1), seg, seg, 6)
    splash = jax.jit(lambda q, k, v: ops.sharded_splash_attention(q, k, v, seg, 6, shard, interpret=True))
    assert _max_diff_on_real(dense(q, k, v), splash(q, k, v), seg) < 1e-5
    for gd, gs in zip(_grads(dense, q, k, v, w), _grads(splash, q, k, v, w)):
        assert float(jnp.max(jnp.abs(gd - gs))) < 1e-5


def test_the_target_mesh_chooses_the_implementation():
    """"auto" follows the platform of the devices the call is sharded over, not this process's backend: on TPU
    topology devices (compile only, from this CPU host) it is splash; compiling_for sets it for calls without a mesh;
    a mesh whose batch does not divide leaves that axis unsplit."""
    from starling_jax.commands import plan
    from starling_jax.parallel import sharding
    from starling_jax.config import MeshConfig

    tpu = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), plan.tpu_devices("v5e:2x2"))
    shard = sharding.ActivationConstraint(tpu, MeshConfig().rules)
    assert ops.target_platform(shard) == "tpu" and ops.target_platform(None) == jax.default_backend()
    assert ops.resolve("auto", jnp.bfloat16, 256, 256, True, ops.target_platform(shard)) == "splash"
    with ops.compiling_for("tpu"):
        assert ops.target_platform(None) == "tpu"
        assert ops.resolve("auto", jnp.bfloat16, 256, 256, True) == "splash"
    assert ops.target_platform(None) == jax.default_backend()
    P = jax.sharding.PartitionSpec
    assert shard.attention_specs(4, 8, 2) == (P("data", None, "tensor", None), P("data", None, "tensor", None),
                                              P("data", None))
    assert shard.attention_specs(3, 8, 1)[0] == P(None, None, None, None)  # 3 rows, 1 kv head: nothing divides
