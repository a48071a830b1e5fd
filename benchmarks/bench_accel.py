"""Accelerator benchmark: MFU of a 7B-shaped layer stack, decode throughput against HBM bandwidth, and the APA update
step of a 1B-shaped hydra, on jax.devices()[0].

    python benchmarks/bench_accel.py                 # on a GPU/TPU host: the full shapes (a few minutes)
    python benchmarks/bench_accel.py --smoke         # tiny shapes, any backend (CPU included): checks the script runs
    python benchmarks/bench_accel.py --json out.json

1. Training MFU: forward + backward (no optimizer) of a Mistral-7B-shaped stack of `--layers` decoder layers (4096
   wide, 32/8 heads, MLP 14336, window 4096), bf16 weights and compute, one row of `--train-tokens` tokens (4k), full
   remat, attention "auto" (the cuDNN flash kernel on GPU, Pallas splash attention on TPU, blockwise flash attention
   elsewhere). FLOPs are the matmul FLOPs of the jaxpr (starling_jax.commands.plan.jaxpr_flops: remat recomputation and the
   full T x T attention square included, as the kernels compute it; causal halving is not credited).
2. Decode: sampling.generate, greedy, a Mistral-7B-shaped model (`--decode-layers` layers, bf16), `--prompt` prompt
   tokens then `--new` new tokens, at batch 1 and 64. tokens/s = batch x new / (generate - prefill-only time), and the
   fraction of HBM bandwidth = (bytes of weights + the KV cache read per step) x steps / decode time / peak bandwidth.
2b. Sharded attention: the same stack (2 layers) with the batch split over every local device, attention "auto"
   for the mesh's platform (splash under shard_map on TPU, cuDNN partitioned by XLA on GPU): that it compiles and
   runs on a mesh, and its time.
3. APA update: the RL stage's whole optimisation step (starling_jax.commands.plan's builder for experiments/starling_alpha_apa.py
   with the model swapped for a 1B-shaped Llama: 16 layers x 2048, 16/8 heads, MLP 5632, vocab 32000; hydra top 4
   layers + head trainable, reference copy and MLP critic), `--apa-rollouts` rollouts of 512 prompt + 512 response
   tokens, one epoch of one minibatch, as jitted for training (donated state).

Device facts: the name is jax.devices()[0].device_kind; the peak bf16 FLOP/s and HBM bandwidth come from the table
below keyed by that name (vendor datasheets, dense bf16), overridable with --peak-flops / --peak-bw. On a device not
in the table (and on CPU) the peak is the measured bf16 matmul throughput and the bandwidth the measured copy rate of
a large array, and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# device_kind substring -> (peak dense bf16 FLOP/s, HBM bytes/s), vendor datasheets.
DEVICE_PEAKS = {
    "TPU v4": (275e12, 1228e9),
    "TPU v5 lite": (197e12, 819e9),  # v5e
    "TPU v5e": (197e12, 819e9),
    "TPU v5p": (459e12, 2765e9),
    "TPU v5": (459e12, 2765e9),
    "TPU v6 lite": (918e12, 1640e9),  # v6e (Trillium)
    "TPU v6e": (918e12, 1640e9),
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),  # SXM
    "A100": (312e12, 2.039e12),  # 80 GB SXM
    "L4": (121e12, 300e9),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any backend: check that everything runs")
    p.add_argument("--layers", type=int, default=8, help="decoder layers in the MFU stack (7B shape)")
    p.add_argument("--train-tokens", type=int, default=4096)
    p.add_argument("--decode-layers", type=int, default=32, help="layers of the decode model (32 = Mistral-7B)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--apa-rollouts", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s")
    p.add_argument("--peak-bw", type=float, default=None, help="override the device's HBM bytes/s")
    p.add_argument("--json", default=None, help="also write the report to this file")
    return p.parse_args(argv)


def _median_seconds(fn, iters: int) -> float:
    import statistics

    import jax
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak(given, flag: str, datasheet, kind: str, measured: float, what: str) -> tuple[float, str]:
    """(peak, where it came from): the command-line value, else the device table's, else the measured figure."""
    if given:
        return given, flag
    if datasheet:
        return datasheet, f"datasheet ({kind})"
    return measured, f"measured {what} (device not in the table)"


def device_facts(args) -> dict:
    """Name from the device; peaks from DEVICE_PEAKS (or measured when the device is not listed)."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    kind = dev.device_kind
    known = next((v for k, v in DEVICE_PEAKS.items() if k.lower() in kind.lower()), None)
    facts = {"platform": dev.platform, "device_kind": kind, "device_count": jax.device_count()}
    n = 512 if args.smoke else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    measured_flops = 2 * n ** 3 / _median_seconds(lambda: mm(a), 3)
    big = jnp.ones((64 if args.smoke else 1024) * 2 ** 20 // 4, jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    measured_bw = 2 * big.nbytes / _median_seconds(lambda: copy(big), 3)  # read + write
    facts["measured_bf16_matmul_flops"], facts["measured_copy_bytes_per_s"] = measured_flops, measured_bw
    facts["peak_flops"], facts["peak_source"] = _peak(args.peak_flops, "--peak-flops", known and known[0], kind,
                                                      measured_flops, "bf16 matmul")
    facts["peak_bw"], facts["bw_source"] = _peak(args.peak_bw, "--peak-bw", known and known[1], kind, measured_bw,
                                                 "copy")
    return facts


def seven_b(layers: int, smoke: bool):
    from starling_jax.models import PRESETS
    base = PRESETS["mistral-7b-v0.1"].replace(dtype="bfloat16", param_dtype="bfloat16", remat="full",
                                              num_layers=layers)
    if smoke:
        base = base.replace(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, vocab_size=512,
                            sliding_window=32, attention_block=16)
    return base


def bench_train_mfu(args, facts) -> dict:
    import jax
    import jax.numpy as jnp

    from starling_jax import models
    from starling_jax.commands.plan import jaxpr_flops

    config = seven_b(args.layers, args.smoke)
    T = args.train_tokens
    params = jax.jit(lambda k: models.init_params(config, k)["layers"])(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, T, config.hidden_size), jnp.bfloat16)
    mask = jnp.ones((1, T), jnp.int32)

    def loss(layers, x):
        y, _ = models.run_layers(layers, config, x, mask)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    flops = jaxpr_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr)
    seconds = _median_seconds(lambda: grad(params, x), args.iters)
    impl = models.attention_ops.resolve(config.attention, jnp.bfloat16, T, T, True)
    return {"layers": config.num_layers, "tokens": T, "attention": impl, "seconds": seconds, "flops": flops,
            "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / facts["peak_flops"]}


def bench_sharded_attention(args) -> dict:
    """Does the accelerator's attention kernel run on a mesh? The 7B-shaped stack's forward and backward with the
    batch split over every local device (data axis), attention "auto" chosen for the mesh's platform: on TPU the
    Pallas splash kernel under shard_map (XLA cannot partition a Mosaic kernel itself), on GPU the cuDNN kernel
    (which XLA partitions over the batch). Compiled and run once; reports the kernel and the seconds per call."""
    import jax
    import jax.numpy as jnp

    from starling_jax import models
    from starling_jax.parallel import sharding
    from starling_jax.config import MeshConfig

    config = seven_b(2, args.smoke)
    devices = jax.devices()
    mesh = sharding.make_mesh(MeshConfig(data=len(devices), fsdp=1, tensor=1), devices)
    shard = sharding.ActivationConstraint(mesh, MeshConfig().rules)
    T, rows = args.train_tokens, len(devices)
    params = jax.jit(lambda k: models.init_params(config, k)["layers"],
                     out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (rows, T, config.hidden_size), jnp.bfloat16),
                       shard.activations)
    mask = jnp.ones((rows, T), jnp.int32)

    def loss(layers, x):
        y, _ = models.run_layers(layers, config, x, mask, constrain=shard)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    seconds = _median_seconds(lambda: grad(params, x), args.iters)
    impl = models.attention_ops.resolve(config.attention, jnp.bfloat16, T, T, True,
                                        models.attention_ops.target_platform(shard))
    return {"devices": len(devices), "rows": rows, "tokens": T, "attention": impl, "seconds": seconds}


def bench_decode(args, facts) -> list:
    import jax
    import jax.numpy as jnp

    from starling_jax import models
    from starling_jax.generation import sampling

    config = seven_b(args.decode_layers, args.smoke).replace(remat="none")
    params = jax.jit(lambda k: models.init_params(config, k))(jax.random.key(0))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["embed"].nbytes  # a token reads 1 row
    if "lm_head" not in params:
        weight_bytes += params["embed"].nbytes
    rows = []
    for B in args.decode_batch:
        tokens = jax.random.randint(jax.random.key(B), (B, args.prompt), 0, config.vocab_size, jnp.int32)
        mask = jnp.ones_like(tokens)
        gen = lambda n: sampling.generate(params, config, tokens, mask, jax.random.key(0), n, temperature=0.0)
        full = _median_seconds(lambda: gen(args.new), args.iters)
        first = _median_seconds(lambda: gen(1), args.iters)  # prefill + one token
        steps = args.new - 1
        decode_s = full - first
        if decode_s <= 0:  # tiny shapes on a noisy host: fall back to the whole call (prefill included)
            decode_s = full
        kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # bf16 K and V
        mean_len = args.prompt + args.new / 2
        bytes_per_step = weight_bytes + B * mean_len * kv_per_token
        rows.append({"batch": B, "tokens_per_s": B * steps / decode_s, "ms_per_step": 1e3 * decode_s / steps,
                     "prefill_plus_first_s": first, "bytes_per_step": bytes_per_step,
                     "hbm_fraction": bytes_per_step * steps / decode_s / facts["peak_bw"]})
    return rows


def bench_apa(args, facts) -> dict:
    import jax
    import jax.numpy as jnp

    from starling_jax.commands import plan
    from starling_jax.parallel import sharding
    from starling_jax.stages.experiment import load_experiment
    exp = load_experiment(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                                       "starling_alpha_apa.py"))
    one_b = exp.model.config.replace(num_layers=16, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                                     mlp_dim=5632, vocab_size=32000, sliding_window=None)
    P = N = 512
    if args.smoke:
        one_b = seven_b(6, True)
        P = N = 16
    B = args.apa_rollouts
    exp = dataclasses.replace(
        exp, model=dataclasses.replace(exp.model, config=one_b), reward_model=None,
        mesh=dataclasses.replace(exp.mesh, data=1, fsdp=1, tensor=1),
        data=dataclasses.replace(exp.data, max_length=P + N, max_prompt_length=P),
        rollout=dataclasses.replace(exp.rollout, prompts_per_step=B, minibatch_size=B, epochs=1, max_new_tokens=N))
    mesh = sharding.make_mesh(exp.mesh, jax.devices()[:1])
    _, cfg = plan._pick_stage(exp, None)  # the recipe's rl stage, resolved as training resolves it
    parts = plan.stage_setup(cfg, mesh)  # the setup training builds (stages/program.py StageSetup), abstract

    def materialise(leaf, k):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return (0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    def random_tree(tree, key):
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(treedef, [materialise(l, k) for l, k in
                                            zip(leaves, jax.random.split(key, len(leaves)))])

    state = random_tree(parts.state, jax.random.key(1))
    batch = random_tree(parts.batch, jax.random.key(2))
    batch["tokens"] = jax.random.randint(jax.random.key(3), batch["tokens"].shape, 0, one_b.vocab_size, jnp.int32)
    batch["attention_mask"] = jnp.ones_like(batch["tokens"])
    batch["response_mask"] = jnp.ones(batch["response_mask"].shape, jnp.int32)
    step = parts.jit(mesh)
    flops = plan.jaxpr_flops(jax.make_jaxpr(parts.update)(parts.state, parts.batch).jaxpr)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics
    seconds = _median_seconds(run, args.iters)
    return {"rollouts": B, "tokens_per_rollout": P + N, "seconds": seconds, "flops": flops,
            "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / facts["peak_flops"],
            "trainable_params": sum(x.size for x in jax.tree.leaves(parts.state.params))}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.layers, args.train_tokens, args.decode_layers = 2, 64, 2
        args.prompt, args.new, args.decode_batch, args.apa_rollouts, args.iters = 8, 8, [1, 4], 2, 1
    import jax
    facts = device_facts(args)
    report = {"device": facts, "jax": jax.__version__, "smoke": args.smoke}
    print(f"device: {facts['device_kind']} ({facts['platform']}); peak {facts['peak_flops'] / 1e12:.3g} TFLOP/s "
          f"[{facts['peak_source']}], {facts['peak_bw'] / 1e9:.3g} GB/s [{facts['bw_source']}]", flush=True)
    report["train"] = t = bench_train_mfu(args, facts)
    print(f"train: {t['layers']} 7B-shaped layers, {t['tokens']} tokens, attention {t['attention']}: "
          f"{t['seconds'] * 1e3:.1f} ms fwd+bwd, {t['tflops_per_s']:.3g} TFLOP/s, MFU {100 * t['mfu']:.1f}%",
          flush=True)
    report["sharded_attention"] = m = bench_sharded_attention(args)
    print(f"sharded attention: 2 7B-shaped layers fwd+bwd, {m['rows']} rows of {m['tokens']} tokens over "
          f"{m['devices']} devices (data axis), attention {m['attention']}: {m['seconds'] * 1e3:.1f} ms", flush=True)
    report["decode"] = rows = bench_decode(args, facts)
    for r in rows:
        print(f"decode batch {r['batch']}: {r['tokens_per_s']:.1f} tok/s ({r['ms_per_step']:.2f} ms/step), "
              f"{100 * r['hbm_fraction']:.1f}% of HBM bandwidth", flush=True)
    report["apa"] = a = bench_apa(args, facts)
    print(f"apa update (1B hydra, {a['rollouts']} x {a['tokens_per_rollout']} tokens): {a['seconds'] * 1e3:.1f} ms, "
          f"{a['tflops_per_s']:.3g} TFLOP/s, MFU {100 * a['mfu']:.1f}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
