"""Prefix-shared sampling (sampling.generate's rows=) against repeated prefill: K samples of each prompt.

    python benchmarks/bench_prefix_sharing.py            # CPU tokens/s, both ways, side by side in this process
    python benchmarks/bench_prefix_sharing.py --tpu      # + the TPU compiler's bytes of both generate calls (libtpu)

CPU: a 4-layer 512-wide model (Mistral layout, bf16), `--prompts` prompts of `--prompt-len` tokens sampled K times
(`--k`, 7 as in AI feedback) for `--new` tokens; the two ways alternate `--iters` times, median wall time each; the
samples are checked equal. TPU: the same calls for a Mistral-7B-shaped policy on v5e:2x2 (batch over 4 devices),
compiled only: the generate call's temporaries with and without sharing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tpu", action="store_true")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from starling_jax import models
    from starling_jax.generation import sampling

    config = models.PRESETS["mistral-7b-v0.1"].replace(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=2,
                                                       head_dim=64, mlp_dim=1536, vocab_size=8000, dtype="bfloat16",
                                                       sliding_window=None)
    params = models.init_params(config, jax.random.key(0))
    U, K, P, N = args.prompts, args.k, args.prompt_len, args.new
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (U, P), 3, config.vocab_size), np.int32)
    mask = np.ones((U, P), np.int32)
    rows = np.repeat(np.arange(U), K).astype(np.int32)
    key = jax.random.key(2)
    run = {"repeated": lambda: sampling.generate(params, config, tokens[rows], mask[rows], key, N),
           "shared": lambda: sampling.generate(params, config, tokens, mask, key, N, rows=rows)}
    outs = {name: jax.block_until_ready(fn()) for name, fn in run.items()}  # compile
    assert (np.asarray(outs["shared"][0]) == np.asarray(outs["repeated"][0])).all(), "samples differ"
    times = {name: [] for name in run}
    for _ in range(args.iters):
        for name, fn in run.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name in run:
        print(f"{name:>9}: {U} prompts x K={K}, prompt {P} + {N} new tokens: {med[name]:.3f} s, "
              f"{U * K * N / med[name]:.1f} generated tok/s")
    print(f"shared / repeated tokens/s: {med['repeated'] / med['shared']:.2f}x (same samples)")

    if args.tpu:
        from starling_jax.commands import plan
        from starling_jax.parallel import sharding
        from starling_jax.config import MeshConfig
        from starling_jax.models import attention_ops
        big = models.PRESETS["mistral-7b-v0.1"].replace(dtype="bfloat16", param_dtype="bfloat16")
        devices = plan.tpu_devices("v5e:2x2")
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=1), devices)
        rules = MeshConfig().rules
        shard = sharding.ActivationConstraint(mesh, rules)
        specs = models.param_specs(big)
        abstract = plan._abstract(specs)
        pshard = sharding.param_shardings(specs, mesh, rules)
        U4 = 4
        toks = jax.ShapeDtypeStruct((U4 * K, P), jnp.int32)
        utoks = jax.ShapeDtypeStruct((U4, P), jnp.int32)
        bsh = lambda n: jax.sharding.NamedSharding(mesh, sharding.batch_spec(2, rules))
        for name, (t, r) in {"repeated": (toks, None), "shared": (utoks, jnp.repeat(jnp.arange(U4), K))}.items():
            fn = jax.jit(lambda prm, tk, mk, key, rr: sampling.generate(prm, big, tk, mk, key, N, constrain=shard,
                                                                        rows=rr),
                         in_shardings=(pshard, bsh(2), bsh(2), None, None))
            with attention_ops.compiling_for("tpu"):
                compiled = fn.lower(abstract, t, t, jax.random.key(0), r).compile()
            mem = compiled.memory_analysis()
            print(f"TPU v5e:2x2 (libtpu {plan.libtpu_version()}), Mistral-7B shape, {U4} prompts x K={K} of {P} "
                  f"tokens, {name}: generate temporaries {mem.temp_size_in_bytes / 2 ** 30:.3f} GiB per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
