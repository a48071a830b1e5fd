"""What the digests of checkpoints, exports and converted directories cost (starling_jax.digests).

    python benchmarks/bench_digests.py [--rounds 3] [--shape smollm2|toy] [--dir DIR]

1. Checksum throughput on this CPU, one core, over 256 MiB in memory: zlib's CRC-32 (what starling_jax uses) beside
   the hashlib digests a manifest could use instead (and crc32c packages, where installed).
2. `digest_file` over a page-cached file, and `digest_tree` / `verify` over a saved checkpoint (the work orbax's
   finalize callback and a restore add; files in threads).
3. Saving and restoring a train state of the given model shape (params + AdamW's two moments, float32; SmolLM2-135M:
   1.6 GB) with `train.checkpoint.Checkpoints`, with digests and without (the same class with the manifest step
   removed), interleaved in one process (A B, B A, ...): the added seconds and their fraction of the save / restore,
   and the time of the manifest step itself inside each save.
4. The same for a 7B train state by arithmetic from the measured throughput.

Figures are from a shared machine: read the ratios; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere: import common

import numpy as np

import common

SHAPES = {  # as benchmarks/bench_train_step.py
    "toy": dict(vocab_size=32002, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                mlp_dim=1536, architecture="mistral"),
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                    mlp_dim=1536, architecture="llama", tie_embeddings=True, rope_theta=100000.0),
}
SEVEN_B_PARAMS = 7.24e9  # Mistral-7B / OpenChat-3.5, the policy of the Starling recipes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--rounds", type=int, default=3, help="interleaved save/restore rounds per variant")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    return p.parse_args(argv)


def throughput(data: bytes, fn, repeats: int = 3) -> float:
    """Median GB/s of fn(data)."""
    fn(data)
    times = [common.time_once(lambda: fn(data)) for _ in range(repeats)]
    return len(data) / statistics.median(times) / 1e9


def checksums(mib: int = 256) -> dict[str, float]:
    data = np.random.default_rng(0).bytes(mib << 20)
    out = {"zlib.crc32 (used)": throughput(data, zlib.crc32)}
    for name in ("sha256", "blake2b", "md5"):
        out[f"hashlib.{name}"] = throughput(data, lambda b, n=name: hashlib.new(n, b).digest())
    try:
        import google_crc32c
        out["google_crc32c"] = throughput(data, google_crc32c.value)
    except ImportError:
        pass
    try:
        import crc32c
        out["crc32c"] = throughput(data, crc32c.crc32c)
    except ImportError:
        pass
    return out


def train_state(shape: str):
    """{"params", "opt": {"mu", "nu"}, "step"}: random float32 arrays of the shape's parameters (incompressible, like
    trained weights), placed on the default device."""
    import jax

    from starling_jax import models
    config = models.ModelConfig(**SHAPES[shape], param_dtype="float32", dtype="float32")
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)

    def fill(scale):
        return jax.tree.map(lambda a: jax.device_put((scale * rng.standard_normal(a.shape, np.float32))), shapes)

    return {"params": fill(0.02), "opt": {"mu": fill(1e-3), "nu": fill(1e-6)}, "step": jax.device_put(np.int32(0))}


def tree_bytes(tree) -> int:
    import jax
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.getLogger("starling_jax").setLevel(logging.ERROR)  # the "restoring it unverified" lines of variant B
    import jax

    from starling_jax import digests
    from starling_jax.step.checkpoint import Checkpoints

    class WithoutDigests(Checkpoints):
        def _write_digests(self) -> None:
            pass

    class TimedDigests(Checkpoints):  # records how long orbax's finalize callback (the manifest) takes in each save
        callback_s: list = []

        def _write_digests(self) -> None:
            t0 = time.perf_counter()
            super()._write_digests()
            self.callback_s.append(time.perf_counter() - t0)

    print(common.machine_line())
    print(f"jax {jax.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}")

    print("\n1. checksum throughput, one core, 256 MiB in memory (GB/s):")
    rates = checksums()
    for name, rate in rates.items():
        print(f"   {name:22s} {rate:6.2f}")
    crc_rate = rates["zlib.crc32 (used)"]

    root = args.dir or tempfile.mkdtemp(prefix="bench_digests_")
    os.makedirs(root, exist_ok=True)
    try:
        state = train_state(args.shape)
        nbytes = tree_bytes(state)
        print(f"\n{args.shape} train state (params + 2 AdamW moments, float32): {nbytes / 1e9:.2f} GB")
        like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        variants = {"with digests": TimedDigests(os.path.join(root, "with"), keep=args.rounds),
                    "without": WithoutDigests(os.path.join(root, "without"), keep=args.rounds)}
        save_times: dict[str, list] = {k: [] for k in variants}
        blocking_times: dict[str, list] = {k: [] for k in variants}  # what the training loop waits for
        restore_times: dict[str, list] = {k: [] for k in variants}
        # all saves, then all restores: one state in memory at a time besides orbax's host copy (a small box)
        for r in range(1, args.rounds + 1):
            for name, ckpts in (list(variants.items()) if r % 2 else list(variants.items())[::-1]):  # A B, B A, ...
                t0 = time.perf_counter()
                ckpts.save(r, state, {"r": r}, {})
                blocking_times[name].append(time.perf_counter() - t0)
                ckpts.wait()
                save_times[name].append(time.perf_counter() - t0)
        del state
        for r in range(1, args.rounds + 1):
            for name, ckpts in (list(variants.items()) if r % 2 else list(variants.items())[::-1]):
                restore_times[name].append(common.time_once(
                    lambda: jax.block_until_ready(ckpts.restore(r, like).state)))
        step_dir = os.path.join(root, "with", str(args.rounds))
        on_disk = sum(os.path.getsize(os.path.join(step_dir, f)) for f in digests.list_files(step_dir))
        files = digests.list_files(step_dir)
        largest = max(files, key=lambda f: os.path.getsize(os.path.join(step_dir, f)))
        largest_s, _ = common.median_time(lambda: digests.digest_file(os.path.join(step_dir, largest)), iters=3,
                                          warmup=1)
        file_rate = os.path.getsize(os.path.join(step_dir, largest)) / largest_s / 1e9
        tree_s, _ = common.median_time(lambda: digests.digest_tree(step_dir), iters=3, warmup=1)
        verify_s, _ = common.median_time(lambda: digests.verify(step_dir), iters=3, warmup=1)
        print(f"   on disk: {on_disk / 1e9:.2f} GB in {len(files)} files (largest {largest}: "
              f"{os.path.getsize(os.path.join(step_dir, largest)) / 1e9:.2f} GB)")

        print("\n2. the digest work alone on that checkpoint (page-cached), "
              f"{min(8, os.cpu_count() or 1)} threads:")
        print(f"   digest_file(largest)  {file_rate:6.2f} GB/s (one thread)")
        print(f"   digest_tree (save)    {tree_s:6.2f} s  = {on_disk / tree_s / 1e9:.2f} GB/s")
        print(f"   verify (restore)      {verify_s:6.2f} s  = {on_disk / verify_s / 1e9:.2f} GB/s")

        print(f"\n3. Checkpoints: the save call (what the training loop waits for), save + wait (until committed) and "
              f"restore, {args.rounds} interleaved rounds, median s (load average {common.load_average()}):")
        for what, times in (("save call", blocking_times), ("save", save_times), ("restore", restore_times)):
            a, b = statistics.median(times["with digests"]), statistics.median(times["without"])
            print(f"   {what:9s} with digests {a:6.2f}  without {b:6.2f}  added {a - b:+6.2f} s ({(a - b) / b:+.0%}); "
                  f"rounds with {[round(t, 2) for t in times['with digests']]}, without "
                  f"{[round(t, 2) for t in times['without']]}")
        print(f"   the manifest in orbax's finalize callback (within 'save' above): "
              f"{[round(t, 2) for t in TimedDigests.callback_s]} s")
        for c in variants.values():
            c.close()
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n4. a 7B train state by arithmetic (7.24e9 params), CRC-32 at {crc_rate:.2f} GB/s per core as measured:")
    for label, per_param in (("float32 params + fp32 AdamW moments", 12), ("bf16 params + fp32 moments", 10)):
        gb = SEVEN_B_PARAMS * per_param / 1e9
        print(f"   {label}: {gb:.0f} GB = {gb / crc_rate:.0f} core-s of CRC-32; on 8 threads {gb / crc_rate / 8:.1f} s "
              f"(save: process 0 digests every file, in orbax's background thread; restore: each process its own "
              f"shards, so divided by the process count), if the files read at that rate")


if __name__ == "__main__":
    main()
