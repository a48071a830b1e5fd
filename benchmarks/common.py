"""Timing helpers shared by the benchmarks: median wall time, in-process matmul peak, FLOP counts, machine facts.

Benchmarks here are scripts, not tests. Timings on a shared machine are noisy: compare A against B inside one process
(interleaved, see `interleaved_medians`) and print the load average beside every figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional


def cpu_model() -> str:
    """The CPU's model name (as `lscpu` shows it), or the platform string when /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1/5/15-minute load averages as 'a, b, c' (other processes' load makes timings noisy)."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {cpu_model()} x {os.cpu_count()} logical cores ({usable} usable here); load average {load_average()}"


def time_once(fn: Callable[[], object], sync: Optional[Callable[[object], object]] = None) -> float:
    """Seconds for one call of fn(); `sync` (e.g. jax.block_until_ready) waits for asynchronous results."""
    start = time.perf_counter()
    out = fn()
    if sync is not None:
        sync(out)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], iters: int = 10, warmup: int = 2,
                sync: Optional[Callable[[object], object]] = None) -> tuple[float, list[float]]:
    """(median seconds, all timings) of `iters` calls after `warmup` untimed calls (compilation, caches)."""
    for _ in range(warmup):
        time_once(fn, sync)
    times = [time_once(fn, sync) for _ in range(iters)]
    return statistics.median(times), times


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list]:
    """Run each timed callable once per round, in turn, so a burst of outside load hits all of them alike.

    fns: name -> a callable that runs one measured unit and returns its timing (seconds, or e.g. (wall, cpu)).
    Returns name -> the timings, in round order.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


# glibc malloc settings for steps that allocate large temporaries. By default glibc serves every block over 32 MB
# (and most blocks allocated from worker threads, via per-thread arenas) with a fresh mmap and unmaps it on free, so
# each training step page-faults its logits, dlogits and embedding gradient in again: about 0.25 s of kernel time per
# step of bench_train_step at batch 2. One brk-grown arena, no mmap and no trimming keep that memory mapped and reused.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def reexec_with_malloc_env(enable: bool = True) -> bool:
    """Restart this script with MALLOC_ENV set (glibc reads it only at process start). Returns whether it is set.

    Call first thing in main(), before importing JAX or torch. A no-op when the settings are already in place, when
    `enable` is false, or off Linux/glibc.
    """
    if not enable or not platform.libc_ver()[0] == "glibc":
        return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return True
    import sys

    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    return True  # not reached


# ----------------------------------------------------------------------------------------------------------------------
# Matmul peak: what this process can get from large fp32 matmuls, the yardstick for "fraction of peak".


def matmul_peaks(framework: str, n: int = 2048, iters: int = 5) -> dict:
    """fp32 [n,n] @ [n,n] throughput in this process: {"wall": FLOP per second (median of `iters`), "cpu": FLOP per
    second of process CPU time (user + system, median)}. framework: "jax" (jitted), "numpy" (its BLAS) or "torch"
    (its current thread setting). The CPU figure hardly moves with other processes' load; the wall figure does."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        run, warmup = (lambda: jax.block_until_ready(mm(a, b))), 2
    elif framework == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        run, warmup = (lambda: a @ b), 1
    elif framework == "torch":
        import torch

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        run, warmup = (lambda: torch.mm(a, b)), 1
    else:
        raise ValueError(f"matmul_peaks: framework must be 'jax', 'numpy' or 'torch', got {framework!r}")
    for _ in range(warmup):
        run()
    walls, cpus = [], []
    for _ in range(iters):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    flop = 2 * n ** 3
    return {"wall": flop / statistics.median(walls), "cpu": flop / statistics.median(cpus)}


def matmul_peak_jax(n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of a jitted fp32 [n,n] @ [n,n] in JAX (median of `iters`)."""
    return matmul_peaks("jax", n, iters)["wall"]


def matmul_peak_numpy(n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of an fp32 [n,n] @ [n,n] in numpy (its BLAS)."""
    return matmul_peaks("numpy", n, iters)["wall"]


def matmul_peak_torch(n: int = 2048, iters: int = 5) -> float:
    """FLOP/s of an fp32 [n,n] @ [n,n] in torch with its current thread setting."""
    return matmul_peaks("torch", n, iters)["wall"]


# ----------------------------------------------------------------------------------------------------------------------
# FLOP counting.


def decoder_train_flops(*, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        mlp_dim: int, vocab_size: int, batch: int, seq: int, causal_half: bool = False) -> dict:
    """Matmul FLOPs of one forward + backward pass of a Llama/Mistral decoder with an untied LM head.

    Counts 2 FLOPs per multiply-add; backward = 2x forward (input and weight gradients), so a step is 3x forward.
    Weight matmuls: q, k, v, o, gate, up, down and the LM head (the embedding is a gather: no FLOPs).
    Attention: QK^T and PV over the full T x T square (what dense kernels compute), or half of it if causal_half.
    Elementwise work (norms, RoPE, softmax, the optimizer) is not counted: it is small next to the matmuls.
    """
    L, D, H, K, E, F, V = num_layers, hidden_size, num_heads, num_kv_heads, head_dim, mlp_dim, vocab_size
    tokens = batch * seq
    per_layer_weights = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F
    weight_fwd = 2 * tokens * (L * per_layer_weights + D * V)
    attn_fwd = L * 2 * 2 * batch * H * seq * seq * E * (0.5 if causal_half else 1.0)
    return {"weights": 3 * weight_fwd, "attention": 3 * attn_fwd, "total": 3 * (weight_fwd + attn_fwd),
            "matmul_params": L * per_layer_weights + D * V, "tokens": tokens}


def fmt_flops(x: float) -> str:
    return f"{x / 1e9:.1f} GFLOP/s" if x < 1e12 else f"{x / 1e12:.2f} TFLOP/s"
