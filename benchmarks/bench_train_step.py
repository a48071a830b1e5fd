"""One training step of a decoder: starling_jax (jax.jit) vs transformers + PyTorch eager.

    python benchmarks/bench_train_step.py                   # 44.8M Mistral-shaped toy, batch 4 x 256, 10 rounds
    python benchmarks/bench_train_step.py --shape smollm2   # SmolLM2-135M's shape, batch 2 x 256
    python benchmarks/bench_train_step.py --ab 8e75c3a      # this checkout's step vs commit 8e75c3a's (no torch)

Shapes (--shape): "toy" = 4 layers x 512, GQA 8/2, MLP 1536, vocab 32002, untied head (transformers'
MistralForCausalLM); "smollm2" = SmolLM2-135M (Llama: 30 layers x 576, GQA 9/3, head_dim 64, MLP 1536, vocab 49152,
tied embeddings, rope theta 1e5; transformers' LlamaForCausalLM). Random weights, the same in both frameworks.

The step: forward + backward of the mean next-token cross-entropy over every position, global-norm gradient clipping
at 1.0 and an AdamW update (b2 0.95, constant rate, no weight decay), fp32, from the same initial weights in both
frameworks (the script checks that both give the same loss on the first two steps). starling_jax: the project's own
SFT step (train.losses "sft", make_optimizer, make_train_step, jit_step: one jax.jit, state donated). PyTorch:
transformers' MistralForCausalLM (its default SDPA attention), eager, clip_grad_norm_ and torch.optim.AdamW. The two
steps are timed alternately, round by round, so outside load hits both alike; each median is printed with its
achieved FLOP/s as a fraction of this process's measured fp32 matmul peak (the larger of JAX's and torch's 2048^3
matmul; both are printed) and with the process CPU time per step (a figure less sensitive to other processes' load).
The script restarts itself once with glibc malloc settings (common.MALLOC_ENV: one arena, no mmap, no trimming) that
keep large temporaries mapped between steps; they apply to both frameworks; --default-malloc skips them.

--ab OLD [NEW]: the same starling_jax step built by two versions of the package, to see a speed regression before it
lands. NEW defaults to this checkout; a commit's package is extracted with `git archive` into a temporary directory.
Each version runs in its own worker process (PYTHONPATH pointing at its source, the same script, model, weights and
batch), both resident at once; rounds alternate which goes first (ABBA...), and every round prints both step times
and their ratio NEW/OLD (> 1: NEW is slower), then the medians. The first two losses of each are printed and compared
bit for bit (the same weights and batch: a change that only moves speed leaves them equal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere: import common

import numpy as np

import common

# name -> (matmul shape, other ModelConfig fields, default batch, default seq)
SHAPES = {
    "toy": (dict(vocab_size=32002, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64,
                 mlp_dim=1536), dict(architecture="mistral"), 4, 256),
    "smollm2": (dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                     mlp_dim=1536), dict(architecture="llama", tie_embeddings=True, rope_theta=100000.0), 2, 256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="toy", help="model shape (see above)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 toy, 2 smollm2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 256)")
    p.add_argument("--rounds", type=int, default=10, help="timed steps per framework (interleaved)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per framework (compilation, allocator; >= 2)")
    p.add_argument("--no-optimizer", action="store_true", help="time forward + backward only (gradients returned)")
    p.add_argument("--remat", default="none", help="starling_jax remat policy (none, full, dots, dots_no_batch)")
    p.add_argument("--scan-unroll", type=int, default=1,
                   help="starling_jax ModelConfig.scan_unroll (layers per scan iteration; >= layers: fully unrolled)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch intra-op threads (default: the cores this process may use; XLA sizes its pool the "
                        "same way, so `taskset -c 0 python ...` compares both on one core)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default malloc settings (by default the script restarts itself with "
                        "common.MALLOC_ENV, which applies to both frameworks alike)")
    p.add_argument("--ab", nargs="+", metavar="REF",
                   help="A/B of starling_jax's own step between two versions of the package, no torch: OLD [NEW] "
                        "(git commits or refs; NEW defaults to this checkout). See above.")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one side of --ab (internal)
    args = p.parse_args(argv)
    if args.ab is not None and len(args.ab) > 2:
        p.error("--ab takes OLD [NEW]: one or two git refs")
    return args


def make_batch(batch: int, seq: int, vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)
    return tokens, np.ones((batch, seq), np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# starling_jax


def _loss_api():
    """(build_loss, stage_params(params), init_state, make_optimizer, jit_step, make_train_step) of the imported
    starling_jax: today's (step/), those of the commits before the folder layout (train/), or those before the
    algorithm registry (train.losses.build_loss, stage_params(objective_name, params)), so --ab reaches back to them
    (e.g. 8e75c3a)."""
    try:
        from starling_jax.algorithms import build_loss
        from starling_jax.step.losses import stage_params
        from starling_jax.step.state import init_state, make_optimizer
        from starling_jax.step.step import jit_step, make_train_step
    except ImportError:
        from starling_jax.train.state import init_state, make_optimizer
        from starling_jax.train.step import jit_step, make_train_step
        try:
            from starling_jax.algorithms import build_loss
            from starling_jax.train.losses import stage_params
        except ImportError:
            from starling_jax.train.losses import build_loss, stage_params as by_name

            def stage_params(params):
                return by_name("sft", params)
    return build_loss, stage_params, init_state, make_optimizer, jit_step, make_train_step


def build_jax_step(config, params, lr: float, with_optimizer: bool):
    """(step, state): the project's own SFT training step, jitted with the state donated.

    step(state, batch) -> (state, metrics with "loss"). With the optimizer: train.losses "sft" loss, make_optimizer
    (global-norm clip 1.0 + AdamW, constant rate, no weight decay), make_train_step and jit_step, exactly what the
    training loop runs. Without: value_and_grad of the same loss; the state is (params, previous gradients), donated
    so this step's gradients reuse their buffers.
    """
    import jax

    from starling_jax.config import ObjectiveConfig, OptimConfig

    build_loss, stage_params, init_state, make_optimizer, jit_step, make_train_step = _loss_api()
    loss_fn = build_loss(ObjectiveConfig(name="sft"), config)
    trainable, frozen = stage_params(params)  # every layer and the head train
    if not with_optimizer:
        def grad_step(state, batch):
            p, _ = state
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, frozen, batch, jax.random.key(0))
            return (p, grads), {"loss": loss}
        zeros = jax.tree.map(jax.numpy.zeros_like, trainable)
        return jax.jit(grad_step, donate_argnums=0), (trainable, zeros)
    optimizer = make_optimizer(OptimConfig(learning_rate=lr, schedule="constant", b1=0.9, b2=0.95, eps=1e-8,
                                           weight_decay=0.0, grad_clip=1.0), 1000, trainable)
    state = init_state(trainable, optimizer, jax.random.key(1), frozen)
    return jit_step(make_train_step(loss_fn, optimizer)), state


# ----------------------------------------------------------------------------------------------------------------------
# transformers + PyTorch


def torch_model_from_params(config, params):
    """MistralForCausalLM (LlamaForCausalLM for architecture "llama") holding the same weights as our params tree
    (layout conversion only; a tied head shares the embedding)."""
    import torch
    import transformers

    c = config
    common_args = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0)
    if c.architecture == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common_args, attention_bias=False,
                                                                       mlp_bias=False)).float()
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            **common_args, sliding_window=c.sliding_window)).float()
    p = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    layers = {k: np.asarray(v) for k, v in params["layers"].items()}
    D = c.hidden_size
    sd = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = p["lm_head"].T
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = layers["attn_norm"][i]
        sd[pre + "post_attention_layernorm.weight"] = layers["mlp_norm"][i]
        sd[pre + "self_attn.q_proj.weight"] = layers["wq"][i].reshape(D, -1).T
        sd[pre + "self_attn.k_proj.weight"] = layers["wk"][i].reshape(D, -1).T
        sd[pre + "self_attn.v_proj.weight"] = layers["wv"][i].reshape(D, -1).T
        sd[pre + "self_attn.o_proj.weight"] = layers["wo"][i].reshape(-1, D).T
        sd[pre + "mlp.gate_proj.weight"] = layers["w_gate"][i].T
        sd[pre + "mlp.up_proj.weight"] = layers["w_up"][i].T
        sd[pre + "mlp.down_proj.weight"] = layers["w_down"][i].T
    state = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in sd.items()}  # writable copies
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m and not (c.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    model.train()
    return model


def build_torch_step(model, lr: float, with_optimizer: bool):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0) \
        if with_optimizer else None

    def step(tokens, mask):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, attention_mask=mask, labels=tokens).loss
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return loss

    return step


# ----------------------------------------------------------------------------------------------------------------------


def model_config(args):
    """The benchmark's ModelConfig (args.batch and args.seq already resolved)."""
    from starling_jax.models import ModelConfig

    shape, extra, _, _ = SHAPES[args.shape]
    unroll = {} if args.scan_unroll == 1 else {"scan_unroll": args.scan_unroll}  # a field older commits lack
    return ModelConfig(**shape, **extra, sliding_window=None, max_seq_len=max(4096, args.seq), remat=args.remat,
                       **unroll)


def jax_batch(tokens_np, mask_np) -> dict:
    import jax.numpy as jnp

    return {"tokens": jnp.asarray(tokens_np), "attention_mask": jnp.asarray(mask_np),
            "loss_mask": jnp.ones(tokens_np.shape, jnp.float32)}


# ----------------------------------------------------------------------------------------------------------------------
# --ab: the same step built by two versions of the package, each in a worker process.

_AB = "bench-ab "  # prefix of a worker's protocol lines on its stdout (anything else there is passed through)


def _send(obj) -> None:
    print(_AB + json.dumps(obj), flush=True)


def ab_worker(args) -> None:
    """One side of --ab: build the step with the starling_jax on PYTHONPATH, report its package path, the first two
    losses (as float.hex, for a bit-exact comparison) and the build time, then run one step per "step" line on stdin
    and report its (wall, process CPU) seconds."""
    import jax

    import starling_jax
    from starling_jax.models import init_params

    config = model_config(args)
    t0 = time.perf_counter()
    step, state = build_jax_step(config, init_params(config, jax.random.key(0)), args.lr, not args.no_optimizer)
    batch = jax_batch(*make_batch(args.batch, args.seq, config.vocab_size))
    losses = []
    for i in range(max(args.warmup, 2)):
        state, metrics = step(state, batch)
        if i < 2:
            losses.append(float(metrics["loss"]).hex())
    jax.block_until_ready(metrics["loss"])
    _send({"package": os.path.dirname(os.path.abspath(starling_jax.__file__)), "losses": losses,
           "build_s": time.perf_counter() - t0})
    for line in sys.stdin:
        if line.strip() != "step":
            return
        wall, cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        _send({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu})


def _receive(proc, label: str) -> dict:
    for line in proc.stdout:
        if line.startswith(_AB):
            return json.loads(line[len(_AB):])
        print(f"  [{label}] {line}", end="")
    raise SystemExit(f"--ab: the {label} worker exited (code {proc.wait()}) before answering; its errors are above")


def _extract(root: str, ref: str, dest_root: str) -> tuple[str, str]:
    """(short commit, directory holding that commit's starling_jax package)."""
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", f"{ref}^{{commit}}"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--ab: {ref!r} is not a commit of the git checkout at {root} "
                         f"({getattr(e, 'stderr', '') or e})".strip())
    dest = os.path.join(dest_root, sha)
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", root, "archive", "--format=tar", sha, "starling_jax"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return sha, dest


def run_ab(args) -> dict:
    """--ab OLD [NEW]: both versions' steps, rounds alternated; returns {label: median wall seconds}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    forward = ["--worker", "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq), "--warmup",
               str(args.warmup), "--remat", args.remat, "--scan-unroll", str(args.scan_unroll), "--lr", repr(args.lr)]
    forward += ["--no-optimizer"] * args.no_optimizer + ["--default-malloc"] * args.default_malloc
    with tempfile.TemporaryDirectory(prefix="bench_train_step_ab_") as tmp:
        sides = [_extract(root, ref, tmp) for ref in args.ab]
        if len(sides) == 1:
            sides.append(("checkout", root))
        procs, infos = {}, {}
        try:
            for label, path in sides:  # built one after the other, so the two compilations do not compete
                procs[label] = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), *forward], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, cwd=tmp, env={**os.environ, "PYTHONPATH": path})
                infos[label] = _receive(procs[label], label)
                if not infos[label]["package"].startswith(os.path.abspath(path)):
                    raise SystemExit(f"--ab: the {label} worker imported {infos[label]['package']}, not {path}")
                print(f"{label}: starling_jax from {infos[label]['package']}; built, compiled and "
                      f"{max(args.warmup, 2)} steps in {infos[label]['build_s']:.1f} s")
            (old, _), (new, _) = sides
            for i, (a, b) in enumerate(zip(infos[old]["losses"], infos[new]["losses"])):
                la, lb = float.fromhex(a), float.fromhex(b)
                same = "bit-identical" if a == b else f"DIFFERENT (rel {abs(lb / la - 1):.1e})"
                print(f"step {i + 1} loss: {old} {la!r}, {new} {lb!r}: {same}")
            print(f"\n{args.rounds} rounds, the first of each alternating "
                  f"(load average before {common.load_average()}):")
            times: dict[str, list] = {old: [], new: []}
            for r in range(args.rounds):
                for label in ((old, new) if r % 2 == 0 else (new, old)):
                    procs[label].stdin.write("step\n")
                    procs[label].stdin.flush()
                    t = _receive(procs[label], label)
                    times[label].append((t["wall"], t["cpu"]))
                (wa, ca), (wb, cb) = times[old][-1], times[new][-1]
                print(f"  round {r + 1:2d}: {old} {wa:.3f} s, {new} {wb:.3f} s; {new}/{old} {wb / wa:.3f} "
                      f"(CPU {cb / ca:.3f})", flush=True)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.stdin.close()
                    proc.wait(timeout=60)
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    ratios = [b[0] / a[0] for a, b in zip(times[old], times[new])]
    print(f"load average after {common.load_average()}")
    print(f"  median s/step: {old} {med[old]:.3f}, {new} {med[new]:.3f} (process CPU {cpu[old]:.2f}, {cpu[new]:.2f})")
    print(f"  {new}/{old} step time: ratio of medians {med[new] / med[old]:.3f}, median of the per-round ratios "
          f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); by CPU time "
          f"{cpu[new] / cpu[old]:.3f}. > 1: {new} is slower.")
    return med


def main(argv=None):
    args = parse_args(argv)
    malloc_tuned = common.reexec_with_malloc_env(not args.default_malloc)
    shape, extra, default_batch, default_seq = SHAPES[args.shape]
    args.batch = args.batch or default_batch
    args.seq = args.seq or default_seq
    if args.worker:
        return ab_worker(args)
    if args.ab:
        print(f"A/B of starling_jax's step: {args.shape} shape, batch {args.batch} x {args.seq}, "
              f"{'fwd + bwd' if args.no_optimizer else 'fwd + bwd + clip + AdamW'}, fp32, remat={args.remat}; "
              f"glibc malloc: {'tuned' if malloc_tuned else 'default'}")
        print(common.machine_line())
        return run_ab(args)
    import jax

    from starling_jax.models import count_params, init_params

    config = model_config(args)
    params = init_params(config, jax.random.key(0))
    n_params = count_params(params)
    flops = common.decoder_train_flops(**shape, batch=args.batch, seq=args.seq)
    with_opt = not args.no_optimizer
    tokens_np, mask_np = make_batch(args.batch, args.seq, config.vocab_size)

    print(f"model: {args.shape} ({config.architecture}-shaped), {shape}, "
          f"{'tied' if config.tie_embeddings else 'untied'} LM head, no sliding window, fp32: {n_params:,} parameters "
          f"({flops['matmul_params']:,} in matmuls)")
    print(f"step: batch {args.batch} x seq {args.seq} = {flops['tokens']} tokens, mean next-token cross-entropy, "
          f"forward + backward{' + grad clip + AdamW update' if with_opt else ''}; "
          f"{flops['total'] / 1e9:.1f} GFLOP of matmuls per step ({flops['attention'] / 1e9:.1f} of them attention)")
    print(f"jax {jax.__version__} ({jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
          f"remat={args.remat}, scan_unroll={args.scan_unroll}")
    print(common.machine_line())
    print("glibc malloc: " + (" ".join(f"{k}={v}" for k, v in common.MALLOC_ENV.items()) if malloc_tuned
                              else "default settings"))

    # Peaks first, while nothing else of ours holds the cores.
    peaks = {"jax": common.matmul_peaks("jax")}
    torch_model = None
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        peaks["torch"] = common.matmul_peaks("torch")
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
        torch_model = torch_model_from_params(config, params)  # copies the weights before donation frees them
    peak = max(p["wall"] for p in peaks.values())
    cpu_peak = max(p["cpu"] for p in peaks.values())
    print("fp32 2048^3 matmul peak: " + ", ".join(f"{k} {common.fmt_flops(v['wall'])}" for k, v in peaks.items())
          + f"; reference peak = {common.fmt_flops(peak)} (the larger). Per second of process CPU time: "
          + ", ".join(f"{k} {common.fmt_flops(v['cpu'])}" for k, v in peaks.items()))

    t0 = time.perf_counter()
    jstep, state = build_jax_step(config, params, args.lr, with_opt)
    del params
    batch = jax_batch(tokens_np, mask_np)
    jax_losses = []
    for _ in range(2):  # the second loss is after one update: checks the optimizer too
        state, metrics = jstep(state, batch)
        jax_losses.append(float(metrics["loss"]))
    print(f"starling_jax: compiled + 2 steps in {time.perf_counter() - t0:.1f} s")

    def run_jax():
        nonlocal state
        wall, cpu = time.perf_counter(), time.process_time()
        state, metrics = jstep(state, batch)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - wall, time.process_time() - cpu

    fns = {"starling_jax": run_jax}
    if torch_model is not None:
        tstep = build_torch_step(torch_model, args.lr, with_opt)
        t_tokens, t_mask = torch.from_numpy(tokens_np.astype(np.int64)), torch.from_numpy(mask_np.astype(np.int64))
        torch_losses = [tstep(t_tokens, t_mask).item() for _ in range(2)]
        for i, (lj, lt) in enumerate(zip(jax_losses, torch_losses)):
            rel = abs(lt - lj) / abs(lt)
            print(f"step {i + 1} loss: starling_jax {lj:.6f}, PyTorch {lt:.6f} (rel diff {rel:.1e})")
            if rel > 1e-4:
                raise SystemExit("the two frameworks disagree on the loss of the same weights: not the same step")

        def run_torch():
            wall, cpu = time.perf_counter(), time.process_time()
            tstep(t_tokens, t_mask)
            return time.perf_counter() - wall, time.process_time() - cpu
        fns["PyTorch eager"] = run_torch

    for _ in range(max(args.warmup - 2, 0)):
        for fn in fns.values():
            fn()
    load_before = common.load_average()
    times = common.interleaved_medians(fns, args.rounds)
    medians = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}

    print(f"\n{args.rounds} interleaved rounds (load average before {load_before}, after {common.load_average()}):")
    for name, med in medians.items():
        achieved = flops["total"] / med
        walls = [w for w, _ in times[name]]
        print(f"  {name:14s} median {med:.3f} s/step (min {min(walls):.3f}, max {max(walls):.3f})  "
              f"{common.fmt_flops(achieved)} = {achieved / peak:.0%} of peak  {flops['tokens'] / med:,.0f} tokens/s; "
              f"process CPU {cpu[name]:.2f} s/step = {flops['total'] / cpu[name] / cpu_peak:.0%} of the CPU-time peak")
    if "PyTorch eager" in medians:
        ratio = medians["PyTorch eager"] / medians["starling_jax"]
        print(f"  speed ratio (PyTorch median / starling_jax median): {ratio:.2f}x; by process CPU time: "
              f"{cpu['PyTorch eager'] / cpu['starling_jax']:.2f}x")
    return medians


if __name__ == "__main__":
    main()
