"""LoRA vs the hydra's top-N full layers: the train state's bytes and one SFT step's time, side by side in one process.

    python benchmarks/bench_lora.py                      # SmolLM2-135M's shape, batch 2 x 256, 6 rounds
    python benchmarks/bench_lora.py --top 4 --rank 8 --rounds 6

Each arm is the project's own data stage (stages/kinds/data.py data_setup: the trees, the optimiser, the jitted step
with the state donated), built from the same random weights of SmolLM2-135M's shape (bench_train_step.SHAPES: Llama,
30 layers x 576, GQA 9/3, MLP 1536, vocab 49152, tied embeddings; fp32; the weights' values change neither the bytes
nor the time, so no download is needed):

  full          every layer trains (model.trainable_top_layers = 0, the tied embedding with them)
  hydra top-N   the top N layers + final norm train, the trunk below runs once without gradient (Starling-alpha's
                num_layers_unfrozen)
  lora          rank-r adapters on q k v o gate up down of every layer; the base is frozen
  lora top-N    the same adapters on the top N layers only; the trunk below as in the hydra

Bytes: the TrainState's arrays (trainable params, frozen params, optimiser state), counted from the arrays. Time: the
arms' steps alternate round by round (common.interleaved_medians), so outside load hits all alike; the medians are
printed with the ratio to the hydra's, and the process CPU time per step beside the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere

import numpy as np

import common
from bench_train_step import SHAPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=4, help="N of the hydra top-N and of 'lora top-N' (default 4)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 * rank)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6, help="timed steps per arm (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm (compilation)")
    p.add_argument("--arms", default="hydra,lora,lora_top",
                   help="comma-separated subset of full, hydra, lora, lora_top (default: the last three; 'full' holds "
                        "three more copies of the model, ~1.6 GB)")
    return p.parse_args(argv)


def _bytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def build(arm: str, args, config, params):
    """(jitted step, state) of one arm: data_setup of an SFT stage with that arm's model section."""
    import jax

    from starling_jax.config import (DataConfig, Experiment, LoraConfig, MeshConfig, ModelSection, ObjectiveConfig,
                                     OptimConfig, TrainConfig)
    from starling_jax.parallel import sharding
    from starling_jax.stages.kinds.data import data_setup

    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank) if arm.startswith("lora") else None
    top = args.top if arm in ("hydra", "lora_top") else 0
    c = Experiment(name=f"bench_{arm}", model=ModelSection(config=config, trainable_top_layers=top, lora=lora),
                   mesh=MeshConfig(fsdp=1), objective=ObjectiveConfig(name="sft"),
                   optim=OptimConfig(learning_rate=1e-4, schedule="constant", weight_decay=0.0, grad_clip=1.0),
                   train=TrainConfig(steps=1000, batch_size=args.batch),
                   data=DataConfig(max_length=args.seq, max_prompt_length=args.seq // 2))
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    setup = data_setup(c, config, jax.tree.map(jax.numpy.copy, params), mesh, jax.random.key(1))
    return setup.jit(mesh), setup.state


def main(argv=None):
    args = parse_args(argv)
    malloc_tuned = common.reexec_with_malloc_env(True)
    import jax
    import jax.numpy as jnp

    from starling_jax.models import ModelConfig, count_params, init_params

    shape, extra, _, _ = SHAPES["smollm2"]
    config = ModelConfig(**shape, **extra, sliding_window=None, max_seq_len=max(4096, args.seq))
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq), dtype=np.int32)
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones(tokens.shape, jnp.int32),
             "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    print(f"SmolLM2-135M shape {shape}, tied embeddings, fp32, random weights: {count_params(params):,} parameters; "
          f"SFT step on batch {args.batch} x {args.seq}: forward + backward + clip + AdamW; hydra/lora top N = "
          f"{args.top}, LoRA rank {args.rank} (alpha {2 * args.rank}) on q k v o gate up down")
    print(f"jax {jax.__version__} ({jax.default_backend()}); {common.machine_line()}; glibc malloc "
          f"{'tuned' if malloc_tuned else 'default'}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")

    arms = args.arms.split(",")
    steps, states, sizes, losses = {}, {}, {}, {}
    for arm in arms:
        step, state = build(arm, args, config, params)
        sizes[arm] = {"trainable": _bytes(state.params), "frozen": _bytes(state.frozen),
                      "optimizer": _bytes(state.opt_state), "trained params": count_params(state.params)}
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
        losses[arm] = float(metrics["loss"])
        steps[arm], states[arm] = step, state
        print(f"built and warmed up: {arm}", file=sys.stderr, flush=True)
    del params

    def timed(arm):
        def one():
            t0, c0 = time.perf_counter(), time.process_time()
            states[arm], metrics = steps[arm](states[arm], batch)
            jax.block_until_ready(metrics["loss"])
            return time.perf_counter() - t0, time.process_time() - c0
        return one

    times = common.interleaved_medians({arm: timed(arm) for arm in arms}, args.rounds)
    med = {arm: (float(np.median([t[0] for t in ts])), float(np.median([t[1] for t in ts])))
           for arm, ts in times.items()}
    ref = "hydra" if "hydra" in arms else arms[0]
    print(f"\nload average after: {common.load_average()}")
    print("| arm | trained params | trainable MB | frozen MB | optimizer MB | state MB | s/step wall (CPU) | "
          f"wall vs {ref} |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        s, (wall, cpu) = sizes[arm], med[arm]
        total = s["trainable"] + s["frozen"] + s["optimizer"]
        print(f"| {arm} | {s['trained params']:,} | {s['trainable'] / 1e6:.1f} | {s['frozen'] / 1e6:.1f} | "
              f"{s['optimizer'] / 1e6:.1f} | {total / 1e6:.1f} | {wall:.2f} ({cpu:.2f}) | "
              f"{wall / med[ref][0]:.2f}x |")
    print("loss after the warm-up steps: " + ", ".join(f"{a} {losses[a]:.4f}" for a in arms))


if __name__ == "__main__":
    main()
