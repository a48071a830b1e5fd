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

Caveats: CPU compilation plans the memory of a CPU program. Temporaries on TPU/GPU differ somewhat (fusion, bf16
handled natively where the CPU backend may upcast), so treat `temp` as an estimate and keep headroom. The RL plan
covers the optimisation step (minibatch epochs); rollout generation (KV cache) and the experience pass run at other
times and are not part of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

GiB = 1024 ** 3
_REEXEC_GUARD = "STARLING_PLAN_REEXEC"


@dataclasses.dataclass
class PlanParts:
    """Everything needed to lower one stage's step from abstract shapes."""
    step: Callable  # (state, batch) -> (state, metrics), not yet jitted
    state: Any  # abstract TrainState (ShapeDtypeStructs)
    state_shardings: Any  # TrainState of NamedShardings
    batch: dict  # abstract global batch
    batch_shardings: dict
    extra: dict  # name -> (abstract tree, shardings): live state outside the step (e.g. the RL reward model)
    notes: list  # human-readable facts about what was planned


# ----------------------------------------------------------------------------------------------------------------------
# Building a stage's step abstractly.


def _abstract(specs):
    import jax
    import jax.numpy as jnp
    from starling_jax.models.transformer import is_spec
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), specs, is_leaf=is_spec)


def _layers_note(top: int, num_layers: int) -> str:
    return "all layers" if top in (0, num_layers) else f"top {top} of {num_layers} layers"


def _supervised_parts(exp, mesh, rules) -> PlanParts:
    """sft / rm_* / dpo: the step of train/step.py around the loss of train/losses.py."""
    from starling_jax import sharding
    from starling_jax.train import losses
    from starling_jax.train.state import abstract_state, make_optimizer, state_shardings
    from starling_jax.train.step import make_train_step

    name = exp.objective.name
    config = exp.model.config.replace(head=losses.HEAD_OF[name])
    top, head = exp.model.trainable_top_layers, exp.model.train_lm_head
    t_specs, f_specs = losses.stage_specs(name, config, top, head)
    t_abs, f_abs = _abstract(t_specs), _abstract(f_specs)
    optimizer = make_optimizer(exp.optim, exp.train.steps, t_abs)
    state = abstract_state(t_abs, optimizer, f_abs)
    shardings = state_shardings(optimizer, state, sharding.param_shardings(t_specs, mesh, rules),
                                sharding.param_shardings(f_specs, mesh, rules), mesh)
    loss = losses.build_loss(exp.objective, config, sharding.activation_constraint(mesh, rules))
    batch = losses.batch_spec(name, exp.train.batch_size, exp.data.max_length, exp.data.max_responses)
    notes = [f"objective {name}: global batch {exp.train.batch_size} x {exp.data.max_length} tokens"
             + (f" x K={exp.data.max_responses}" if name.startswith("rm_") else "")
             + f", grad_accum {exp.train.grad_accum}",
             f"trainable: {_layers_note(top, config.num_layers)}"
             + (", head" if head else ", head frozen")]
    return PlanParts(make_train_step(loss, optimizer, exp.train.grad_accum), state, shardings, batch,
                     sharding.batch_shardings(batch, mesh, rules), {}, notes)


def _rl_parts(exp, mesh, rules) -> PlanParts:
    """apa / ppo: the RL stage's optimisation step (train/rlaif.py make_rl_step over rl_loss) on the hydra trees of
    train/hydra.py; the reward model is extra live state (it scores rollouts between steps)."""
    import jax
    import jax.numpy as jnp
    from starling_jax import models, sharding
    from starling_jax.train import hydra, rlaif
    from starling_jax.train.state import abstract_state, make_optimizer, state_shardings

    config, o, r = exp.model.config.replace(head="lm"), exp.objective, exp.rollout
    top, head = exp.model.trainable_top_layers, exp.model.train_lm_head
    model_specs = models.param_specs(config)
    critic_kind = getattr(o, "value_head", "mlp")
    trainable, frozen = jax.eval_shape(
        lambda p, k: hydra.init_rl_params(p, config, k, top, head, critic_kind), _abstract(model_specs),
        jax.random.key(0))
    critic_specs = models.value_head_specs(config, critic_kind)
    t_specs = sharding.respec(trainable, {"policy": model_specs, "critic": critic_specs})
    f_specs = sharding.respec(frozen, {"trunk": model_specs, "reference": model_specs})
    optimizer = make_optimizer(exp.optim, exp.train.steps, trainable)
    state = abstract_state(trainable, optimizer, frozen)
    shardings = state_shardings(optimizer, state, sharding.param_shardings(t_specs, mesh, rules),
                                sharding.param_shardings(f_specs, mesh, rules), mesh)
    P, N, B = exp.data.max_prompt_length, r.max_new_tokens, r.prompts_per_step
    _, rl_loss = rlaif.build_rl_functions(config, o, P, sharding.activation_constraint(mesh, rules))
    pin = sharding.batch_constraint(mesh, rules)  # the step gathers shuffled minibatches: keep them split

    def loss(params, frozen, minibatch):
        return rl_loss(params, frozen, pin(minibatch))
    step = rlaif.make_rl_step(loss, optimizer, r.epochs, r.minibatch_size)
    S = jax.ShapeDtypeStruct
    batch = {"tokens": S((B, P + N), jnp.int32), "attention_mask": S((B, P + N), jnp.int32),
             "response_mask": S((B, N), jnp.int32)}
    batch.update({k: S((B, N), jnp.float32) for k in ("old_logprobs", "old_values", "advantages", "returns")})
    extra = {}
    if exp.reward_model is not None:
        rm_specs = models.param_specs(exp.reward_model.config.replace(head="score"))
        extra["reward_model"] = (_abstract(rm_specs), sharding.param_shardings(rm_specs, mesh, rules))
    notes = [f"objective {o.name}: {B} rollouts of {P} prompt + {N} response tokens per step, {r.epochs} epochs of "
             f"minibatches of {r.minibatch_size}",
             f"trainable: {_layers_note(top, config.num_layers)}"
             f" + {critic_kind} critic; reference: frozen copy of the trainable layers",
             "not planned: rollout generation (KV cache) and the experience pass (they run between steps)"]
    return PlanParts(step, state, shardings, batch, sharding.batch_shardings(batch, mesh, rules), extra, notes)


PLANNERS: dict[str, Callable] = {"sft": _supervised_parts, "rm_plackett_luce": _supervised_parts,
                                 "rm_bradley_terry": _supervised_parts, "dpo": _supervised_parts,
                                 "apa": _rl_parts, "ppo": _rl_parts}


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
    from starling_jax.config import stages_of
    stages = stages_of(exp)
    names = [n for n, _ in stages]
    if stage is None:
        return stages[-1]
    if stage not in names:
        raise KeyError(f"experiment {exp.name!r} has no stage {stage!r}; its stages: {', '.join(names)}")
    return stages[names.index(stage)]


def plan_experiment(exp, devices, mesh_config=None, stage: Optional[str] = None, step_time: Optional[float] = None,
                    peak_flops: Optional[float] = None) -> dict:
    """Plan one stage of `exp` (an Experiment) on `devices` (a list of jax devices). Returns the report dict."""
    import jax
    from starling_jax import sharding
    from starling_jax.train.step import jit_step

    stage_name, cfg = _pick_stage(exp, stage)
    if cfg.objective.name not in PLANNERS:
        raise KeyError(f"stage {stage_name!r}: no planner for objective {cfg.objective.name!r}; known: "
                       f"{', '.join(PLANNERS)}")
    mesh_config = mesh_config or cfg.mesh
    mesh = sharding.make_mesh(dataclasses.replace(mesh_config, distributed=False), devices)
    rules = sharding.rules_dict(mesh_config)
    parts = PLANNERS[cfg.objective.name](cfg, mesh, rules)

    t0 = time.time()
    step = jit_step(parts.step, mesh, parts.state_shardings, parts.batch_shardings)
    lowered = step.lower(parts.state, parts.batch)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = jaxpr_flops(jax.make_jaxpr(parts.step)(parts.state, parts.batch).jaxpr)

    s, sh = parts.state, parts.state_shardings
    b = {
        "params": _tree_bytes(s.params, sh.params),
        "optimizer": _tree_bytes(s.opt_state, sh.opt_state),
        "frozen": _tree_bytes(s.frozen, sh.frozen),
        "step_and_rng": _tree_bytes((s.step, s.rng), (sh.step, sh.rng)),
        "extra": sum(_tree_bytes(t, tsh) for t, tsh in parts.extra.values()),
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
                         **{k: _count(t) for k, (t, _) in parts.extra.items()}},
        "flops_per_step": flops,
        "flops_per_device": flops / n,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "compile_seconds": round(compile_s, 1),
        "notes": parts.notes,
    }
    peak = peak_flops if peak_flops is not None else cfg.logging.peak_flops
    if step_time and peak:
        report["mfu"] = flops / n / (step_time * peak)
        report["step_time_s"], report["peak_flops_per_device"] = step_time, peak
    return report


def plan_rollout(exp, devices, mesh_config=None, stage: Optional[str] = None) -> dict:
    """Memory of an RL stage's rollout generation (sampling.generate over one chunk of prompts with the full policy),
    compiled for the mesh like the step; the reward model counts as extra live state. Returns a report dict like
    plan_experiment's (no optimiser; FLOPs not counted: the decode loop's trip count is dynamic)."""
    import jax
    import jax.numpy as jnp
    from starling_jax import models, sampling, sharding

    stage_name, cfg = _pick_stage(exp, stage)
    from starling_jax.config import OBJECTIVE_KINDS
    if OBJECTIVE_KINDS.get(cfg.objective.name) != "rl":
        raise ValueError(f"--rollout plans an RL stage's generation; stage {stage_name!r} is {cfg.objective.name!r}")
    mesh_config = mesh_config or cfg.mesh
    mesh = sharding.make_mesh(dataclasses.replace(mesh_config, distributed=False), devices)
    rules = sharding.rules_dict(mesh_config)
    config, r = cfg.model.config.replace(head="lm"), cfg.rollout
    specs = models.param_specs(config)
    params, p_sh = _abstract(specs), sharding.param_shardings(specs, mesh, rules)
    B, P = r.generation_batch or r.prompts_per_step, cfg.data.max_prompt_length  # one generate call
    prompts = {"prompt_tokens": jax.ShapeDtypeStruct((B, P), jnp.int32),
               "prompt_mask": jax.ShapeDtypeStruct((B, P), jnp.int32)}
    b_sh = sharding.batch_shardings(prompts, mesh, rules)

    def rollout(p, batch, key):
        return sampling.generate(p, config, batch["prompt_tokens"], batch["prompt_mask"], key, r.max_new_tokens,
                                 r.temperature, r.top_k, r.top_p, constrain=sharding.activation_constraint(mesh, rules))

    t0 = time.time()
    fn = jax.jit(rollout, in_shardings=(p_sh, b_sh, sharding.replicated(mesh)), out_shardings=b_sh["prompt_tokens"])
    compiled = fn.lower(params, prompts, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    b = {"params": _tree_bytes(params, p_sh), "optimizer": 0, "frozen": 0, "step_and_rng": 0, "extra": 0,
         "batch": _tree_bytes(prompts, b_sh), "temp": int(mem.temp_size_in_bytes),
         "output_not_aliased": int(mem.output_size_in_bytes)}
    if cfg.reward_model is not None:
        rm_specs = models.param_specs(cfg.reward_model.config.replace(head="score"))
        b["extra"] = _tree_bytes(_abstract(rm_specs), sharding.param_shardings(rm_specs, mesh, rules))
    b["other"] = b["extra"]
    b["total"] = b["params"] + b["other"] + b["batch"] + b["temp"] + b["output_not_aliased"]
    return {
        "experiment": exp.name, "stage": stage_name, "objective": cfg.objective.name, "phase": "rollout",
        "devices": len(devices), "mesh": dict(mesh.shape), "platform": devices[0].platform,
        "per_device_bytes": b, "per_device_gib": {k: round(v / GiB, 3) for k, v in b.items()},
        "memory_analysis": {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                "alias_size_in_bytes", "temp_size_in_bytes",
                                                                "generated_code_size_in_bytes")},
        "param_counts": {"policy": _count(params)}, "flops_per_step": None,
        "compile_seconds": round(time.time() - t0, 1),
        "notes": [f"rollout generation: one generate call over {B} of the chunk's {r.prompts_per_step} prompts "
                  f"(rollout.generation_batch), {P} tokens + {r.max_new_tokens} new tokens with the full policy "
                  f"(KV cache included in temp); the reward model is counted as other live state"],
    }


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
    for key, label in (("params", "policy params" if phase else "trainable params"), ("optimizer", "optimizer state"),
                       ("other", "other live state (frozen trunk/reference, reward model, step, rng)"),
                       ("batch", "batch"), ("temp", "temporaries (XLA)"),
                       ("output_not_aliased", "outputs not aliased to donated inputs"), ("total", "total")):
        lines.append(f"    {label:<70} {b[key] / scale:9.3f}")
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
                        help="RL stages: plan rollout generation (full policy + KV cache) instead of the update step")
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
    from starling_jax.config import apply_overrides, load_experiment
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
