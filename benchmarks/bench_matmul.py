"""The dense matrix products of one training step, XLA:CPU (what a jitted starling_jax step runs) vs PyTorch (MKL,
what transformers' eager step runs), side by side in one process.

    python benchmarks/bench_matmul.py                      # both shapes of bench_train_step.py
    python benchmarks/bench_matmul.py --shape smollm2 --rounds 7

Why: a training step of these shapes is mostly matmuls (torch.profiler on transformers' step: mm ~75%, SDPA ~7%,
elementwise ~15%; benchmarks/RESULTS.md). If XLA's products alone take longer than torch's, no change to the rest of
our step can make it much faster than torch's. This script times every dense product of the step as the step has
it (forward y = x W, and the backward dx = dy W^T and dW = x^T dy, for the q/k/v/o projections, the MLP and the LM
head over batch x (seq - 1) rows; attention's batched products are left out) with operands laid out as in the step,
each framework on the same arrays, interleaved round by round; it prints each product's GFLOP/s in both and the
step-weighted ratio: torch's total matmul time / XLA's. With torch's step at fraction m of its time in matmuls, a
step whose matmuls are XLA's cannot beat torch's by more than ratio / m (all other work free).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere

import numpy as np

import common
from bench_train_step import SHAPES


def products(shape: str, batch: int, seq: int) -> list[tuple[str, int, int, int, str, int]]:
    """(name, M, K, N, layout, count per step): layout "nn" x[M, K] @ W[K, N], "nt" dy[M, K] @ W[N, K]^T,
    "tn" x[K, M]^T @ dy[K, N]."""
    dims, extra, b0, s0 = SHAPES[shape]
    T = (batch or b0) * ((seq or s0) - 1)
    D, F, V, L = dims["hidden_size"], dims["mlp_dim"], dims["vocab_size"], dims["num_layers"]
    HE, KE = dims["num_heads"] * dims["head_dim"], dims["num_kv_heads"] * dims["head_dim"]
    out = []
    for name, k, n, count in (("q/o", D, HE, 2 * L), ("k/v", D, KE, 2 * L), ("mlp up/gate", D, F, 2 * L),
                              ("mlp down", F, D, L), ("lm head", D, V, 1)):
        out += [(f"{name} fwd", T, k, n, "nn", count), (f"{name} dx", T, n, k, "nt", count),
                (f"{name} dW", k, T, n, "tn", count)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES) + ["all"], default="all")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per product and framework (interleaved)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads); "
          f"fp32; {common.machine_line()}")
    ops = {"nn": lambda a, b: a @ b, "nt": lambda a, b: a @ b.T, "tn": lambda a, b: a.T @ b}
    # Each product runs `count` times per call, as in a step: XLA as one jitted lax.map over `count` different second
    # operands (nothing to hoist; no per-product dispatch, as in the step's one program), torch as a loop of calls
    # over the same arrays (as its eager step makes them).
    jitted = {k: jax.jit(lambda a, bs, f=f: jax.lax.map(lambda b: f(a, b), bs)) for k, f in ops.items()}
    rng = np.random.default_rng(0)
    for shape in (sorted(SHAPES) if args.shape == "all" else [args.shape]):
        total = {"xla": 0.0, "torch": 0.0}
        print(f"\n{shape}: the step's dense products (batch {args.batch or SHAPES[shape][2]} x "
              f"seq {args.seq or SHAPES[shape][3]}); GFLOP/s over all `count` products of a step")
        for name, M, K, N, layout, count in products(shape, args.batch, args.seq):
            a = rng.standard_normal((K, M) if layout == "tn" else (M, K), np.float32)
            bs = rng.standard_normal((count,) + ((N, K) if layout == "nt" else (K, N)), np.float32)
            ja, jbs, ta, tbs = jnp.asarray(a), jnp.asarray(bs), torch.from_numpy(a), list(torch.from_numpy(bs))
            f, tf = jitted[layout], ops[layout]
            fns = {"xla": lambda: jax.block_until_ready(f(ja, jbs)), "torch": lambda: [tf(ta, b) for b in tbs]}
            for fn in fns.values():  # compile, warm the allocators
                fn(), fn()
            times = common.interleaved_medians({k: (lambda fn=fn: common.time_once(fn)) for k, fn in fns.items()},
                                               args.rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            flops = 2 * M * K * N * count
            for k in total:
                total[k] += med[k]
            print(f"  {name:16s} {M:>6} x {K:>6} x {N:>6} ({layout}) x{count:<3d} "
                  f"xla {flops / med['xla'] / 1e9:6.0f} GFLOP/s, torch {flops / med['torch'] / 1e9:6.0f} GFLOP/s, "
                  f"xla speed {med['torch'] / med['xla']:.2f}x")
        r = total["torch"] / total["xla"]
        print(f"  step's dense products: xla {total['xla']:.3f} s, torch {total['torch']:.3f} s; xla speed {r:.2f}x; "
              f"bound on the whole step's speed vs torch's with matmuls at 75% of torch's step: {r / 0.75:.2f}x")
        print(f"  load {common.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
