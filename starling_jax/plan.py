"""`starling-jax plan EXPERIMENT --devices N`: per-device memory and FLOPs of an experiment's training step on a mesh,
without hardware and without allocating a single weight.

The stage's whole step (loss, gradients, optimiser update, donated state, in/out shardings) is built from abstract
shapes (jax.eval_shape), lowered and compiled ahead of time for a mesh of N devices. When this process has fewer than
N devices it re-executes itself on N simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N). The
report gives per-device bytes of the parameters, the optimiser state, other live state (frozen trunk, reference, reward
model), the batch and XLA's temporaries (compiled.memory_analysis()), and FLOPs per step.

FLOPs are counted from the step's jaxpr (every matmul, 2 * M * N * K, each scan body times its length), not from
compiled.cost_analysis(), because XLA's cost analysis counts a while-loop body once: a 32-layer scan would be reported
as one layer. The XLA figure is kept in the JSON (xla_flops_per_device) for reference. Elementwise work is left out,
as in the usual MFU convention; recomputation from remat is included (it is work the device does).

Caveats: CPU compilation plans the memory of a CPU program. XLA:CPU has no bf16 dot: it keeps an f32 copy of every
bf16 weight a loop's dots read. `accelerator_estimate` is the same compiled schedule without those copies (from XLA's
buffer assignment and live ranges, starling_jax/hlo_memory.py); other differences on TPU/GPU (fusion, scheduling)
remain, so treat both as estimates and keep headroom. The RL plan
covers the optimisation step (minibatch epochs); `--rollout` plans the rollout phase instead (the resident train state
and reward model + the largest of its compiled calls: generation with the KV cache, reward-model scoring, the
experience pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

GiB = 1024 ** 3
_REEXEC_GUARD = "STARLING_PLAN_REEXEC"


def stage_setup(cfg, mesh):
    """The StageSetup (train/program.py) of stage config `cfg` on `mesh`, built by its stage kind's `setup` - the
    function the training stage builds its state and step with - from ShapeDtypeStructs of the model's params
    (cfg.model.config with the algorithm's head), so nothing is allocated."""
    import jax
    from starling_jax import models
    from starling_jax.algorithms import registry
    from starling_jax.train import kinds  # noqa: F401  (registers the stage kinds)

    algorithm = registry.get(cfg.objective.name)
    kind = registry.stage_kind(algorithm.kind)
    if kind.setup is None:
        raise KeyError(f"stage kind {kind.name!r} registers no setup, so it cannot be planned")
    model_config = cfg.model.config.replace(head=algorithm.head)
    return kind.setup(cfg, model_config, _abstract(models.param_specs(model_config)), mesh, jax.random.key(0))


def _abstract(specs):
    import jax
    import jax.numpy as jnp
    from starling_jax.models.transformer import is_spec
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), specs, is_leaf=is_spec)


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs from the jaxpr.


def _dot_flops(eqn) -> int:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2 * math.prod(lhs) * math.prod(rhs_free)


def _sub_jaxprs(value):
    from jax.extend import core
    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr) -> int:
    """Matmul FLOPs of a jaxpr: dot_general = 2 * (lhs size) * (rhs free dims); scan bodies times their length,
    cond = its most expensive branch, while loops once (trip count unknown), other sub-jaxprs (pjit, remat,
    custom_vjp) once."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if eqn.primitive.name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
            continue
        inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
        total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


# ----------------------------------------------------------------------------------------------------------------------
# The plan.


def _tree_bytes(tree, shardings) -> int:
    from starling_jax.sharding import per_device_bytes
    return per_device_bytes(tree, shardings)


def _count(tree) -> int:
    import jax
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _pick_stage(exp, stage: Optional[str]):
    """(name, resolved config) of `stage`, by default the last one (normally the heaviest: RL, or the RM after SFT)."""
    from starling_jax.config_loading import stages_of
    stages = stages_of(exp)
    names = [n for n, _ in stages]
    if stage is None:
        return stages[-1]
    if stage not in names:
        raise KeyError(f"experiment {exp.name!r} has no stage {stage!r}; its stages: {', '.join(names)}")
    return stages[names.index(stage)]


def _upcast_report(lowered):
    """hlo_memory.upcast_report, compiled past JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR): a
    cache hit skips XLA's compile and so its buffer-assignment and live-range dumps (the dump options are not part
    of the cache key), which would leave the report without its upcast analysis."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    from starling_jax import hlo_memory

    enabled = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()  # JAX decides once per process whether the cache is used: ask again, now off
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return hlo_memory.upcast_report(lowered)
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()  # and on again (if it was) for every later compile


def plan_experiment(exp, devices, mesh_config=None, stage: Optional[str] = None, step_time: Optional[float] = None,
                    peak_flops: Optional[float] = None) -> dict:
    """Plan one stage of `exp` (an Experiment) on `devices` (a list of jax devices). Returns the report dict."""
    import jax
    from starling_jax import sharding

    stage_name, cfg = _pick_stage(exp, stage)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(mesh_config or cfg.mesh, distributed=False))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    parts = stage_setup(cfg, mesh)

    t0 = time.time()
    step = parts.jit(mesh)
    lowered = step.lower(parts.state, parts.batch)
    compiled, upcasts = _upcast_report(lowered)
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = jaxpr_flops(jax.make_jaxpr(parts.update)(parts.state, parts.batch).jaxpr)

    s, sh = parts.state, parts.state_shardings
    b = {
        "params": _tree_bytes(s.params, sh.params),
        "optimizer": _tree_bytes(s.opt_state, sh.opt_state),
        "frozen": _tree_bytes(s.frozen, sh.frozen),
        "step_and_rng": _tree_bytes((s.step, s.rng), (sh.step, sh.rng)),
        "extra": sum(_tree_bytes(t, tsh) for t, tsh in parts.resident.values()),
        "batch": _tree_bytes(parts.batch, parts.batch_shardings),
        "temp": int(mem.temp_size_in_bytes),
        # outputs that could not reuse a donated input buffer (the metrics, mostly)
        "output_not_aliased": int(mem.output_size_in_bytes - mem.alias_size_in_bytes),
    }
    b["other"] = b["frozen"] + b["step_and_rng"] + b["extra"]
    b["total"] = b["params"] + b["optimizer"] + b["other"] + b["batch"] + b["temp"] + b["output_not_aliased"]
    n = len(devices)
    report = {
        "experiment": exp.name, "stage": stage_name, "objective": cfg.objective.name, "devices": n,
        "mesh": dict(mesh.shape), "platform": devices[0].platform,
        "per_device_bytes": b,
        "per_device_gib": {k: round(v / GiB, 3) for k, v in b.items()},
        "memory_analysis": {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                "alias_size_in_bytes", "temp_size_in_bytes",
                                                                "generated_code_size_in_bytes")},
        "param_counts": {"trainable": _count(s.params), "frozen": _count(s.frozen),
                         **{k: _count(t) for k, (t, _) in parts.resident.items()}},
        "optimizer_updates": parts.total_updates,
        "flops_per_step": flops,
        "flops_per_device": flops / n,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "compile_seconds": round(compile_s, 1),
        "notes": list(parts.notes),
        "accelerator_estimate": _accelerator_estimate(b, upcasts),
    }
    peak = peak_flops if peak_flops is not None else cfg.logging.peak_flops
    if step_time and peak:
        report["mfu"] = flops / n / (step_time * peak)
        report["step_time_s"], report["peak_flops_per_device"] = step_time, peak
    return report


_MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes")


def plan_rollout(exp, devices, mesh_config=None, stage: Optional[str] = None) -> dict:
    """Memory of an RL stage's rollout phase (RolloutSource.next_batch): the train state and the reward model stay on
    the devices while the phase's compiled calls run one after the other (StageSetup.between_steps, built by the
    stage's own setup: the generate call, reward-model scoring, the experience pass). Each call is compiled for the
    mesh like the step; the phase needs the resident state + the reward model + the largest call's own inputs,
    temporaries and outputs. Returns a report dict like plan_experiment's, plus "calls" (each call's figures) and
    "largest_call"; FLOPs are not counted (the decode loop's trip count is dynamic).

    per_device_bytes: params = the policy the generate call reads (trainable top + frozen trunk), optimizer = the
    optimiser state, critic = the rest of the trainable params, frozen = the rest of the frozen params (the
    reference), step_and_rng, extra = the reward model, state = the whole train state (the sum of those five but
    extra), other = critic + frozen + step_and_rng + extra; batch, temp, output_not_aliased = the largest call's;
    total = params + optimizer + other + batch + temp + output_not_aliased."""
    import jax
    from starling_jax import sharding
    from starling_jax.algorithms import registry

    stage_name, cfg = _pick_stage(exp, stage)
    if registry.get(cfg.objective.name).kind != "rl":
        raise ValueError(f"--rollout plans an RL stage's generation; stage {stage_name!r} is {cfg.objective.name!r}")
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(mesh_config or cfg.mesh, distributed=False))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    parts = stage_setup(cfg, mesh)
    s, sh = parts.state, parts.state_shardings
    policy = (s.params["policy"], s.frozen["trunk"]), (sh.params["policy"], sh.frozen["trunk"])
    rest = lambda tree, drop: {k: v for k, v in tree.items() if k != drop}
    b = {"params": _tree_bytes(*policy),
         "optimizer": _tree_bytes(s.opt_state, sh.opt_state),
         "critic": _tree_bytes(rest(s.params, "policy"), rest(sh.params, "policy")),
         "frozen": _tree_bytes(rest(s.frozen, "trunk"), rest(sh.frozen, "trunk")),
         "step_and_rng": _tree_bytes((s.step, s.rng), (sh.step, sh.rng)),
         "extra": sum(_tree_bytes(t, tsh) for t, tsh in parts.resident.values())}
    b["state"] = b["params"] + b["optimizer"] + b["critic"] + b["frozen"] + b["step_and_rng"]
    b["other"] = b["critic"] + b["frozen"] + b["step_and_rng"] + b["extra"]

    t0 = time.time()
    calls = {}
    for name, call in parts.between_steps.items():
        fn = jax.jit(call.fn, in_shardings=(*call.resident_shardings, *call.input_shardings))
        compiled, upcasts = _upcast_report(fn.lower(*call.resident, *call.inputs))
        mem = compiled.memory_analysis()
        c = {"batch": sum(_tree_bytes(x, xs) for x, xs in zip(call.inputs, call.input_shardings)),
             "temp": int(mem.temp_size_in_bytes), "output_not_aliased": int(mem.output_size_in_bytes)}
        c["own"] = c["batch"] + c["temp"] + c["output_not_aliased"]  # on top of the resident state and reward model
        c["total"] = b["state"] + b["extra"] + c["own"]
        calls[name] = {"per_device_bytes": c, "per_device_gib": {k: round(v / GiB, 3) for k, v in c.items()},
                       "memory_analysis": {k: int(getattr(mem, k)) for k in _MEMORY_KEYS}, "note": call.note,
                       "accelerator_estimate": _accelerator_estimate(c, upcasts)}
    largest = max(calls, key=lambda n: calls[n]["per_device_bytes"]["own"])
    big = calls[largest]["per_device_bytes"]
    b.update(batch=big["batch"], temp=big["temp"], output_not_aliased=big["output_not_aliased"])
    b["total"] = b["params"] + b["optimizer"] + b["other"] + b["batch"] + b["temp"] + b["output_not_aliased"]
    estimates = {n: calls[n]["accelerator_estimate"] for n in calls}
    if all("per_device_bytes" in e for e in estimates.values()):
        largest_acc = max(estimates, key=lambda n: estimates[n]["per_device_bytes"]["total"])
        acc = dict(estimates[largest_acc], largest_call=largest_acc)
    else:
        acc = {"error": "; ".join(f"{n}: {e['error']}" for n, e in estimates.items() if "error" in e)}
    return {
        "experiment": exp.name, "stage": stage_name, "objective": cfg.objective.name, "phase": "rollout",
        "devices": len(devices), "mesh": dict(mesh.shape), "platform": devices[0].platform,
        "per_device_bytes": b, "per_device_gib": {k: round(v / GiB, 3) for k, v in b.items()},
        "memory_analysis": calls[largest]["memory_analysis"], "largest_call": largest, "calls": calls,
        "accelerator_estimate": acc,
        "param_counts": {"policy": _count(policy[0]), "trainable": _count(s.params), "frozen": _count(s.frozen),
                         **{k: _count(t) for k, (t, _) in parts.resident.items()}},
        "flops_per_step": None,
        "compile_seconds": round(time.time() - t0, 1),
        "notes": [f"rollout phase: the train state and the reward model stay resident while these calls run one "
                  f"after another; batch/temp/outputs below are the largest call's ({largest})",
                  *(calls[n]["note"] for n in calls)],
    }


UPCAST_NOTE = ("the same compiled schedule with XLA:CPU's bf16->f32 upcasts of weights read by dots removed (a backend "
               "with bf16 dots, TPU/GPU, holds none: nothing for a plain convert of a bf16 array, the bf16 array for "
               "a rounding or sliced one); everything else as CPU-compiled (starling_jax/hlo_memory.py)")


def _accelerator_estimate(b: dict, upcasts: Optional[dict]) -> dict:
    """per-device bytes `b` (with "temp" and "total") with temp replaced by hlo_memory's temp_accelerator_estimate."""
    if upcasts is None or "error" in upcasts:
        return {"error": (upcasts or {}).get("error", "no buffer dump")}
    temp = upcasts["temp_accelerator_estimate"]
    out = {"temp": temp, "total": b["total"] - b["temp"] + temp}
    return {"per_device_bytes": out, "per_device_gib": {k: round(v / GiB, 3) for k, v in out.items()},
            "upcast_buffers": upcasts["upcast_buffers"], "temp_peak_live": upcasts["peak_live"],
            "temp_peak_live_without_upcasts": upcasts["peak_live_without_upcasts"], "note": UPCAST_NOTE}


def format_report(r: dict) -> str:
    b = r["per_device_bytes"]
    unit, scale = ("GiB", GiB) if b["total"] >= GiB else ("MiB", 1024 ** 2)
    phase = " rollout generation" if r.get("phase") == "rollout" else ""
    lines = [f"{r['experiment']} / stage {r['stage']} ({r['objective']}){phase} on {r['devices']} {r['platform']} "
             f"devices, mesh {', '.join(f'{k}={v}' for k, v in r['mesh'].items())}"]
    lines += [f"  {note}" for note in r["notes"]]
    counts = r["param_counts"]
    human = lambda v: f"{v / 1e9:.3f}B" if v >= 1e8 else (f"{v / 1e6:.3f}M" if v else "0")
    lines.append("  parameters: " + ", ".join(f"{k} {human(v)}" for k, v in counts.items()))
    lines.append(f"  per-device memory ({unit}):")
    rows = (("params", "policy params (trainable top + frozen trunk)" if phase else "trainable params"),
            ("optimizer", "optimizer state"),
            ("other", "other live state (critic, reference, reward model, step, rng)" if phase else
             "other live state (frozen trunk/reference, reward model, step, rng)"),
            ("batch", "batch" + (f" (largest call: {r['largest_call']})" if phase else "")),
            ("temp", "temporaries (XLA)"), ("output_not_aliased", "outputs not aliased to donated inputs"),
            ("total", "total"))
    for key, label in rows:
        lines.append(f"    {label:<70} {b[key] / scale:9.3f}")
    for name, call in r.get("calls", {}).items():
        c = call["per_device_bytes"]
        acc = call["accelerator_estimate"].get("per_device_bytes")
        lines.append(f"    call {name + ':':<13} inputs {c['batch'] / scale:.3f} + temp {c['temp'] / scale:.3f} + "
                     f"outputs {c['output_not_aliased'] / scale:.3f}; phase total with it {c['total'] / scale:.3f}"
                     + (f" (accelerator estimate: temp {acc['temp'] / scale:.3f}, total {acc['total'] / scale:.3f})"
                        if acc else ""))
    acc = r.get("accelerator_estimate", {})
    if "per_device_bytes" in acc:
        lines.append(f"  accelerator estimate ({unit}): temp {acc['per_device_bytes']['temp'] / scale:.3f}, total "
                     f"{acc['per_device_bytes']['total'] / scale:.3f}: {acc['note']}")
    elif acc:
        lines.append(f"  accelerator estimate: not available ({acc['error']})")
    if r["flops_per_step"] is not None:
        lines.append(f"  FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_device']:.4g} per device; matmuls, "
                     f"scans counted per iteration)")
    if "mfu" in r:
        lines.append(f"  MFU at {r['step_time_s']} s/step and {r['peak_flops_per_device']:.4g} FLOP/s per device: "
                     f"{100 * r['mfu']:.1f}%")
    lines.append(f"  compiled in {r['compile_seconds']} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# CLI.


def parse_mesh(text: str):
    """"data=2,fsdp=4,tensor=1" -> MeshConfig (unnamed axes keep their defaults)."""
    from starling_jax.config import MeshConfig
    sizes = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected data=N,fsdp=N,tensor=N (N may be -1), got {part!r} in {text!r}")
        sizes[key.strip()] = int(value)
    return sizes


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment file or name (experiments/NAME.py)")
    parser.add_argument("--devices", type=int, required=True, help="number of devices to plan for")
    parser.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: the experiment's mesh)")
    parser.add_argument("--stage", default=None, help="stage name (default: the last stage)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.batch_size=64 (repeatable)")
    parser.add_argument("--step-time", type=float, default=None, help="seconds per step, for the implied MFU")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s per device for MFU (default: the experiment's logging.peak_flops)")
    parser.add_argument("--rollout", action="store_true",
                        help="RL stages: plan the rollout phase (train state + reward model resident, and the "
                             "largest of generate / reward-model scoring / experience pass) instead of the update "
                             "step")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _argv(args) -> list[str]:
    out = [args.experiment, "--devices", str(args.devices)]
    for flag, value in (("--mesh", args.mesh), ("--stage", args.stage), ("--step-time", args.step_time),
                        ("--peak-flops", args.peak_flops)):
        if value is not None:
            out += [flag, str(value)]
    for o in args.overrides:
        out += ["--set", o]
    return out + (["--rollout"] if args.rollout else []) + (["--json"] if args.json else [])


def _ensure_devices(args) -> list:
    """N devices for the plan: this process's first N, or a re-exec of this command on N simulated CPU devices."""
    import jax
    if jax.device_count() >= args.devices:
        return jax.devices()[:args.devices]
    if os.environ.get(_REEXEC_GUARD):
        raise RuntimeError(f"plan: asked for {args.devices} devices but only {jax.device_count()} exist even after "
                           f"re-executing with --xla_force_host_platform_device_count")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_REEXEC_GUARD: "1"})
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "starling_jax.cli", "plan", *_argv(args)], env)


def plan_cli(args) -> int:
    from starling_jax.config_loading import apply_overrides, load_experiment
    exp = load_experiment(args.experiment)
    if args.overrides:
        exp = apply_overrides(exp, args.overrides)
    mesh_config = None
    if args.mesh:
        mesh_config = dataclasses.replace(exp.mesh, **parse_mesh(args.mesh))
    devices = _ensure_devices(args)
    if args.rollout:
        report = plan_rollout(exp, devices, mesh_config, args.stage)
    else:
        report = plan_experiment(exp, devices, mesh_config, args.stage, args.step_time, args.peak_flops)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


add_arguments, cli = add_plan_arguments, plan_cli
