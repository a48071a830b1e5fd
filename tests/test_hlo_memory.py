"""hlo_memory: the CPU-compiled temporaries without XLA:CPU's bf16 -> f32 weight upcasts, on programs whose answer is
known (compiled only, nothing allocated)."""

import jax
import jax.numpy as jnp

from starling_jax import hlo_memory

N = 1024
MiB = 1024 ** 2
UPCAST = N * N * 4  # one f32 copy of an [N, N] weight


def _report(f, *args):
    compiled, report = hlo_memory.upcast_report(jax.jit(f).lower(*args))
    assert "error" not in report, report
    assert report["temp_size"] == compiled.memory_analysis().temp_size_in_bytes
    assert report["peak_live"] <= report["temp_size"]
    return report


def _x():
    return jax.ShapeDtypeStruct((8, N), jnp.bfloat16)


def test_bf16_weights_read_in_a_loop_are_all_upcast_on_cpu():
    """4 bf16 weights multiplied in a fori_loop: XLA:CPU hoists an f32 copy of each out of the loop (16 MiB), all of
    it upcasts; what is left is the activations' [8, N] buffers."""
    ws = [jax.ShapeDtypeStruct((N, N), jnp.bfloat16) for _ in range(4)]

    def f(ws, x):
        def body(i, x):
            for w in ws:
                x = jnp.dot(x, w)
            return x
        return jax.lax.fori_loop(0, 10, body, x)
    r = _report(f, ws, _x())
    assert r["temp_size"] >= 4 * UPCAST
    assert r["upcast_buffers"] == 4
    assert r["peak_live"] - r["peak_live_without_upcasts"] == 4 * UPCAST
    assert r["temp_accelerator_estimate"] == r["temp_size"] - 4 * UPCAST
    assert r["temp_accelerator_estimate"] < MiB


def test_a_stacked_scan_keeps_the_bf16_slice_of_its_layer():
    """lax.scan over a stacked bf16 [4, N, N] weight: the hoisted f32 copy of the whole stack goes; the per-step f32
    slice of one layer becomes its bf16 slice (half)."""
    def f(ws, x):
        def body(i, x):
            return jax.lax.scan(lambda x, w: (jnp.dot(x, w), None), x, ws)[0]
        return jax.lax.fori_loop(0, 10, body, x)
    r = _report(f, jax.ShapeDtypeStruct((4, N, N), jnp.bfloat16), _x())
    assert r["peak_live"] - r["peak_live_without_upcasts"] == 4 * UPCAST + UPCAST // 2
    assert N * N * 2 <= r["temp_accelerator_estimate"] < N * N * 2 + MiB


def test_float32_master_weights_cast_to_bf16_keep_the_bf16_copy():
    """f32 weights cast to bf16 for the dot: XLA:CPU keeps f32 copies rounded to bf16; an accelerator would hold the
    bf16 cast (half of it)."""
    ws = [jax.ShapeDtypeStruct((N, N), jnp.float32) for _ in range(4)]

    def f(ws, x):
        def body(i, x):
            for w in ws:
                x = jnp.dot(x, w.astype(jnp.bfloat16))
            return x
        return jax.lax.fori_loop(0, 10, body, x)
    r = _report(f, ws, _x())
    assert r["peak_live"] - r["peak_live_without_upcasts"] == 4 * UPCAST // 2


def test_upcasts_that_are_not_only_dot_operands_stay_counted():
    """The same f32 copy also read elementwise (a sum) is the program's own, not the backend's: nothing removed. And
    an upcast of an array computed in the loop (not a weight) is not touched either."""
    ws = [jax.ShapeDtypeStruct((N, N), jnp.bfloat16) for _ in range(2)]

    def f(ws, x):
        def body(i, x):
            for w in ws:
                x = jnp.dot(x, w) + w.astype(jnp.float32).sum(0).astype(jnp.bfloat16)
            return x
        return jax.lax.fori_loop(0, 10, body, x)
    r = _report(f, ws, _x())
    assert r["upcast_buffers"] == 0
    assert r["temp_accelerator_estimate"] == r["temp_size"]

    def g(ws, x):
        def body(i, carry):
            x, m = carry
            m = m * 2  # a matrix the loop computes: its upcast is not a weight's
            return jnp.dot(x, m), m
        return jax.lax.fori_loop(0, 10, body, (x, ws[0]))[0]
    r = _report(g, ws, _x())
    assert r["upcast_buffers"] == 0


def test_master_weights_an_update_loop_trains_count_as_weights():
    """An f32 weight the loop updates (an optimiser loop), cast to bf16 for its dot: the rounded f32 copy is an
    upcast (the bf16 cast remains); the bf16 activation the loop carries is not a weight."""
    def f(w, x):
        def body(i, carry):
            w, x = carry
            y = jnp.dot(x, w.astype(jnp.bfloat16))
            return w * 0.5 + 1.0, y
        return jax.lax.fori_loop(0, 10, body, (w, x))
    r = _report(f, jax.ShapeDtypeStruct((N, N), jnp.float32), _x())
    assert r["upcast_buffers"] == 1
    assert r["peak_live"] - r["peak_live_without_upcasts"] == UPCAST // 2
