"""`starling-jax plan EXPERIMENT --target v5e-8`: per-device memory, FLOPs and a roofline bound of an experiment's
training step (or, with --rollout, its rollout phase) on a TPU slice or a simulated CPU mesh, without hardware and
without allocating a single weight.

The stage's whole step (loss, gradients, optimiser update, donated state, in/out shardings) is built from abstract
shapes (jax.eval_shape), lowered and compiled ahead of time for the target's devices:
- a TPU slice (`--target v5e-8`, `v5p-16`, `v4-8`, `v6e-8` or a topology `v5e:2x4`, `v5p:2x2x2`): libtpu describes the
  topology's devices and the TPU compiler compiles the program for them on this host, no TPU needed (the `[tpu]`
  extra installs the libtpu that matches jax). The figures are the TPU program's: memory_analysis, cost_analysis,
  and the attention kernels a TPU host runs (models.attention_ops chooses them for the target's platform).
- `--target cpu:N` (or `--devices N`): this process's first N devices, or, when it has fewer, a re-execution of this
  command on N simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N). XLA:CPU plans a CPU
  program: it has no bf16 dot and keeps an f32 copy of every bf16 weight a loop's dots read, so its temporaries
  overstate an accelerator's. The report's first line says which compiler produced the figures.

The report gives per-device bytes of the parameters, the optimiser state, other live state (frozen trunk, reference,
reward model), the batch and the compiler's temporaries (compiled.memory_analysis()), and FLOPs per step. On a TPU
target it checks the total against the chip's HBM and, when it does not fit, says by how much and which slice would.

FLOPs are counted from the step's jaxpr (every matmul, 2 * M * N * K, each scan body times its length), not from
compiled.cost_analysis(), because XLA's cost analysis counts a while-loop body once: a 32-layer scan would be reported
as one layer. XLA's figures (flops, bytes accessed) are kept in the report for reference. Elementwise work is left
out, as in the usual MFU convention; recomputation from remat is included (it is work the device does).

Roofline (TPU targets, update step): a lower bound on the step time, max(FLOPs per device / peak bf16 FLOP/s, bytes per
device / HBM bandwidth), with bytes = the larger of XLA's bytes accessed (loop bodies counted once, so low) and the
step's arguments + outputs (each read or written at least once); the MFU it implies is the most the step can reach.
The RL plan covers the optimisation step (minibatch epochs); `--rollout` plans the rollout phase instead (the resident
train state and reward model + the largest of its compiled calls: generation with the KV cache, reward-model scoring,
the experience pass); its decode loop's trip count is dynamic, so it has no FLOPs or roofline.

Why this file is long (~650 lines): it is the whole planner, and it must not import JAX before it has re-executed
itself with XLA_FLAGS (docs/ARCHITECTURE.md), so the target table, the jaxpr FLOP count, the update-step and
rollout-phase plans and the command line share this one module of function-level imports. The seam to cut when it
grows is the TPU target table and the FLOP count (no JAX needed at import) into a module of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Optional

from starling_jax.errors import EXIT_BAD_INPUT, InputError  # stdlib only: no JAX at import time

GiB = 1024 ** 3
_REEXEC_GUARD = "STARLING_PLAN_REEXEC"


# ----------------------------------------------------------------------------------------------------------------------
# Targets.

# Per chip: peak dense bf16 FLOP/s, HBM bandwidth (bytes/s) and HBM capacity, from Google Cloud's TPU pages
# (https://cloud.google.com/tpu/docs/v4, https://cloud.google.com/tpu/docs/v5e, https://cloud.google.com/tpu/docs/v5p,
# https://cloud.google.com/tpu/docs/v6e: "Peak compute per chip (bf16)", "HBM capacity / bandwidth per chip"):
#   v4 275 TFLOP/s, 1200 GB/s, 32 GiB; v5e 197 TFLOP/s, 819 GB/s, 16 GiB; v5p 459 TFLOP/s, 2765 GB/s, 95 GiB;
#   v6e (Trillium) 918 TFLOP/s, 1640 GB/s, 32 GiB.
# Slice names count chips (v5e-8, v6e-8) or, for the two-TensorCore chips, cores (v4-8 and v5p-8 are 4 chips); the
# topologies are the slice shapes those pages list. One-chip slices (v5e-1 = v5litepod-1, v6e-1) are single-host
# shapes smaller than libtpu's default host (2x2 chips): tpu_devices passes their host bounds. v4 and v5p sell no
# slice below 4 chips (v4-8, v5p-8), so they have none.


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip
    hbm_bytes_per_s: float  # per chip
    hbm_bytes: int  # per chip
    cores_per_chip: int  # the unit of the slice name (v5p-8 = 8 cores = 4 chips)
    devices_per_chip: int  # jax devices libtpu's topology gives per chip (v4: one per TensorCore)
    topologies: tuple[str, ...]


_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8")
CHIPS = {
    "v4": Chip("v4", 275e12, 1200e9, 32 * GiB, 2, 2, _3D),
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB, 1, 1, _2D),
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * GiB, 2, 1, _3D),
    "v6e": Chip("v6e", 918e12, 1640e9, 32 * GiB, 1, 1, _2D),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: a TPU slice (chip + topology) or N CPU devices (chip None)."""
    name: str
    chip: Optional[Chip] = None
    topology: Optional[str] = None
    cpu_devices: int = 0

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split("x")) if self.topology else 0


def slice_name(chip: Chip, topology: str) -> str:
    return f"{chip.name}-{math.prod(int(d) for d in topology.split('x')) * chip.cores_per_chip}"


def valid_targets() -> str:
    return "; ".join(f"{c.name}: " + ", ".join(f"{slice_name(c, t)} ({c.name}:{t})" for t in c.topologies)
                     for c in CHIPS.values()) + "; or cpu:N (N simulated CPU devices)"


def parse_target(text: str) -> Target:
    """"v5e-8" / "v5e:2x4" / "cpu:8" -> Target; anything else is an InputError listing the valid chips and shapes."""
    t = text.strip().lower()
    if t.startswith("cpu:") and t[4:].isdigit() and int(t[4:]) > 0:
        return Target(t, cpu_devices=int(t[4:]))
    for chip in CHIPS.values():
        for topo in chip.topologies:
            if t in (f"{chip.name}:{topo}", slice_name(chip, topo)):
                return Target(slice_name(chip, topo), chip, topo)
    raise InputError(f"--target {text!r} is not a known slice; valid targets: {valid_targets()}")


def libtpu_version() -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def target_devices(target: Target) -> list:
    """The devices to compile for: the TPU topology's (libtpu, compile only) or this process's first N CPU devices."""
    import jax
    if target.chip is None:
        return jax.devices()[:target.cpu_devices]
    if libtpu_version() is None:
        raise InputError(f"--target {target.name} compiles with libtpu, which is not installed: pip install -e "
                         f"'.[tpu]' (or pip install 'jax[tpu]=={jax.__version__}'); --target cpu:N needs nothing")
    return tpu_devices(f"{target.chip.name}:{target.topology}")


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology ("v5e:2x4", "v5p:2x2x1", ...) described by libtpu, for compiling only: no TPU
    is needed, and this process's own backend (the CPU) stays as it is. Several processes may do this at once (libtpu
    otherwise takes a host-wide lock file, meant for processes that drive real chips)."""
    import tempfile
    from jax.experimental import topologies
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chips = math.prod(int(d) for d in topology.partition(":")[2].split("x"))
    # libtpu assumes hosts of 2x2(x1) chips; a smaller slice is one host of its own size (otherwise: "is not
    # divisible by the given (or default) chips_per_host_bounds")
    bounds = {"chips_per_host_bounds": [1, 1, 1]} if chips == 1 else {}
    # libtpu, loaded off a TPU VM, writes a screen of warnings about the host it cannot find (metadata, worker
    # hostnames) straight to file descriptor 2: keep them, and show them only if loading fails.
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **bounds).devices)
        except Exception:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def stage_setup(cfg, mesh):
    """The StageSetup (stages/program.py) of stage config `cfg` on `mesh`, built by its stage kind's `setup` - the
    function the training stage builds its state and step with - from ShapeDtypeStructs of the model's params
    (cfg.model.config with the algorithm's head), so nothing is allocated."""
    import jax
    from starling_jax import models
    from starling_jax.algorithms import registry
    from starling_jax.stages import kinds  # noqa: F401  (registers the stage kinds)
    from starling_jax.stages.program import get_kind

    algorithm = registry.get(cfg.objective.name)
    kind = get_kind(algorithm.kind)
    if kind.setup is None:
        raise KeyError(f"stage kind {kind.name!r} registers no setup, so it cannot be planned")
    model_config = cfg.model.config.replace(head=algorithm.head)
    setup = kind.setup(cfg, model_config, _abstract(models.param_specs(model_config)), mesh, jax.random.key(0))
    # A section with a path plans as the run loads it only when its config is stated (config.ModelSection): say so
    unstated = [(name, section.path) for name in kind.reads_of(cfg) if (section := getattr(cfg, name, None)) is not None
                and section.path is not None and not section.stated_config()]
    notes = tuple(f"note: {name}.path={path!r} with {name}.config left at its default: planned as that default config, "
                  f"which the run uses only if the checkpoint is that model (state the checkpoint's architecture and "
                  f"run choices in {name}.config)" for name, path in unstated)
    return dataclasses.replace(setup, notes=setup.notes + notes) if notes else setup


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
    a Pallas kernel's body times its grid (blocks a kernel skips at run time, e.g. splash attention's fully masked
    ones, are counted), cond = its most expensive branch, while loops once (trip count unknown), other sub-jaxprs
    (pjit, remat, custom_vjp) once."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if eqn.primitive.name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
            continue
        inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
        if eqn.primitive.name == "scan":
            inner *= eqn.params["length"]
        elif eqn.primitive.name == "pallas_call":  # the kernel body runs once per grid point
            inner *= math.prod(d if isinstance(d, int) else 1 for d in eqn.params["grid_mapping"].grid)
        total += inner
    return total


# ----------------------------------------------------------------------------------------------------------------------
# The plan.


def _tree_bytes(tree, shardings) -> int:
    from starling_jax.parallel.sharding import per_device_bytes
    return per_device_bytes(tree, shardings)


def _pick_stage(exp, stage: Optional[str]):
    """(name, resolved config) of `stage`, by default the last one (normally the heaviest: RL, or the RM after SFT)."""
    from starling_jax.stages.experiment import stages_of
    stages = stages_of(exp)
    names = [n for n, _ in stages]
    if stage is None:
        return stages[-1]
    if stage not in names:
        raise KeyError(f"experiment {exp.name!r} has no stage {stage!r}; its stages: {', '.join(names)}")
    return stages[names.index(stage)]


def _state_bytes(parts) -> dict:
    s, sh = parts.state, parts.state_shardings
    return {"params": _tree_bytes(s.params, sh.params), "optimizer": _tree_bytes(s.opt_state, sh.opt_state),
            "frozen": _tree_bytes(s.frozen, sh.frozen), "step_and_rng": _tree_bytes((s.step, s.rng), (sh.step, sh.rng)),
            "extra": sum(_tree_bytes(t, tsh) for t, tsh in parts.resident.values())}


class DoesNotFit(Exception):
    """The TPU compiler could not fit the program in the chip's memory (message: by how much, what would)."""


def _compile(lowered, target: Optional[Target], resident: int, n: int):
    """lowered.compile(); on a TPU target a program over HBM is reported in one line with a slice that would hold it
    (estimated from the `resident` state bytes per device, which shrink with the slice)."""
    try:
        return lowered.compile()
    except Exception as e:  # the TPU compiler's RESOURCE_EXHAUSTED (jax.errors.JaxRuntimeError)
        if target is None or target.chip is None or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if "memory" in line.lower()), str(e)[:300])
        sizes = [float(v) * 1024 ** "KMGT".index(u) * 1024 for v, u in re.findall(r"\(([\d.]+)([KMGT])\)", first)]
        temp = int(sizes[0]) if sizes else 0  # "the total memory required for HLO temporaries (127.20G) exceeds ..."
        raise DoesNotFit(f"does not fit on {target.name} ({target.chip.hbm_bytes / GiB:.0f} GiB per chip): the TPU "
                         f"compiler says: {first}; resident state {resident / GiB:.2f} GiB per device; "
                         f"{_suggest(target, resident, temp, n)}") from None


def _suggest(target: Target, state: int, rest: int, n: int) -> str:
    """The smallest slice of each chip whose HBM would hold `state` bytes per device (on n devices now; sharded state
    shrinks as n grows) plus `rest` (held constant: batch, temporaries, outputs): an estimate to check with plan."""
    out = []
    for chip in (target.chip, CHIPS["v5p"]) if target.chip.name != "v5p" else (target.chip,):
        for topo in chip.topologies:
            chips = math.prod(int(d) for d in topo.split("x"))
            devices = chips * chip.devices_per_chip
            if (chips > target.chips or chip is not target.chip) and \
                    state * n / devices + rest <= chip.hbm_bytes / chip.devices_per_chip:
                out.append(f"{slice_name(chip, topo)} ({chip.name}:{topo}) would hold about "
                           f"{(state * n / devices + rest) / GiB:.2f} GiB per device")
                break
    hint = "; ".join(out) or ("no listed slice holds it at this per-device batch: shrink what each device holds "
                              "at once (train.grad_accum, rollout.generation_batch, model remat)")
    return (f"estimate: {hint} (the sharded state scales with the slice; batch, temporaries and outputs per device "
            f"kept as they are; with --mesh data=1,fsdp=-1 the state is sharded over every device; check with plan "
            f"--target)")


def _fit(report: dict, target: Optional[Target]) -> None:
    """Adds report["fit"] on a TPU target: the chip's HBM per device, whether the total fits, by how much it does
    not, and a slice that would hold it."""
    if target is None or target.chip is None:
        return
    b, n = report["per_device_bytes"], report["devices"]
    capacity = target.chip.hbm_bytes // target.chip.devices_per_chip
    # the compiler's own sum where it is larger: TPU pads small arrays to its (8, 128) tiles
    need = max(b["total"], report.get("compiled_bytes", 0))
    fit = {"hbm_per_device_bytes": capacity, "fits": need <= capacity, "headroom_bytes": capacity - need}
    if not fit["fits"]:
        state = b["params"] + b["optimizer"] + b["other"]
        fit["suggestion"] = _suggest(target, state, need - state, n)
    report["fit"] = fit


def _compiler(target: Optional[Target], devices) -> str:
    if target is not None and target.chip is not None:
        return (f"TPU compiler (libtpu {libtpu_version()}) for {target.name} ({target.chip.name}:{target.topology}, "
                f"{len(devices)} {devices[0].device_kind} devices)")
    if devices[0].platform == "cpu":
        return (f"XLA:CPU on {len(devices)} CPU devices (a CPU program: f32 copies of bf16 weights inflate the "
                f"temporaries; --target v5e-8 with the [tpu] extra compiles for TPU)")
    return f"XLA:{devices[0].platform.upper()} on {len(devices)} {devices[0].device_kind} devices"


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float((cost or {}).get("flops", 0.0)), "bytes_accessed": float((cost or {}).get("bytes accessed", 0.0))}


def _roofline(report: dict, target: Optional[Target]) -> None:
    """report["roofline"] on a TPU target (see the module docstring)."""
    if target is None or target.chip is None or report.get("flops_per_step") is None:
        return
    mem = report["memory_analysis"]
    peak = target.chip.peak_bf16_flops / target.chip.devices_per_chip
    bandwidth = target.chip.hbm_bytes_per_s / target.chip.devices_per_chip
    moved = max(report["cost_analysis"]["bytes_accessed"], mem["argument_size_in_bytes"] + mem["output_size_in_bytes"])
    compute_s, memory_s = report["flops_per_device"] / peak, moved / bandwidth
    step = max(compute_s, memory_s)
    report["roofline"] = {"peak_bf16_flops_per_device": peak, "hbm_bytes_per_s_per_device": bandwidth,
                          "bytes_per_device": moved, "compute_seconds": compute_s, "memory_seconds": memory_s,
                          "step_seconds_lower_bound": step,
                          "mfu_upper_bound": report["flops_per_device"] / (step * peak) if step else 0.0}


def plan_experiment(exp, devices, mesh_config=None, stage: Optional[str] = None, step_time: Optional[float] = None,
                    peak_flops: Optional[float] = None, target: Optional[Target] = None) -> dict:
    """Plan one stage of `exp` (an Experiment) on `devices` (a list of jax devices; `target` describes them when they
    are a TPU slice's). Returns the report dict."""
    import jax
    from starling_jax import models
    from starling_jax.models import attention_ops
    from starling_jax.parallel import sharding

    stage_name, cfg = _pick_stage(exp, stage)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(mesh_config or cfg.mesh, distributed=False))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    parts = stage_setup(cfg, mesh)
    b = _state_bytes(parts)
    b["batch"] = _tree_bytes(parts.batch, parts.batch_shardings)
    n = len(devices)

    t0 = time.time()
    with attention_ops.compiling_for(devices[0].platform):
        lowered = parts.jit(mesh).lower(parts.state, parts.batch)
    compiled = _compile(lowered, target, b["params"] + b["optimizer"] + b["frozen"] + b["extra"], n)
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    flops = jaxpr_flops(jax.make_jaxpr(parts.update)(parts.state, parts.batch).jaxpr)

    b["temp"] = int(mem.temp_size_in_bytes)
    # outputs that could not reuse a donated input buffer (the metrics, mostly)
    b["output_not_aliased"] = int(mem.output_size_in_bytes - mem.alias_size_in_bytes)
    b["other"] = b["frozen"] + b["step_and_rng"] + b["extra"]
    b["total"] = b["params"] + b["optimizer"] + b["other"] + b["batch"] + b["temp"] + b["output_not_aliased"]
    s = parts.state
    cost = _cost(compiled)
    report = {
        "experiment": exp.name, "stage": stage_name, "objective": cfg.objective.name, "devices": n,
        "mesh": dict(mesh.shape), "platform": devices[0].platform, "target": target.name if target else None,
        "compiler": _compiler(target, devices), "libtpu": libtpu_version() if target and target.chip else None,
        "per_device_bytes": b,
        "per_device_gib": {k: round(v / GiB, 3) for k, v in b.items()},
        "memory_analysis": {k: int(getattr(mem, k)) for k in _MEMORY_KEYS},
        "cost_analysis": cost,
        # what the compiler allocates: arguments (TPU: padded to tiles) + temporaries + outputs not aliased
        "compiled_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                              - mem.alias_size_in_bytes),
        "param_counts": {"trainable": models.count_params(s.params), "frozen": models.count_params(s.frozen),
                         **{k: models.count_params(t) for k, (t, _) in parts.resident.items()}},
        "optimizer_updates": parts.total_updates,
        "flops_per_step": flops,
        "flops_per_device": flops / n,
        "xla_flops_per_device": cost["flops"],
        "compile_seconds": round(compile_s, 1),
        "notes": list(parts.notes),
    }
    peak = peak_flops if peak_flops is not None else cfg.logging.peak_flops
    if step_time and peak:
        report["mfu"] = flops / n / (step_time * peak)
        report["step_time_s"], report["peak_flops_per_device"] = step_time, peak
    _roofline(report, target)
    _fit(report, target)
    return report


_MEMORY_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes")


def plan_rollout(exp, devices, mesh_config=None, stage: Optional[str] = None, target: Optional[Target] = None) -> dict:
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
    from starling_jax.parallel import sharding
    from starling_jax.algorithms import registry
    from starling_jax import models
    from starling_jax.models import attention_ops

    stage_name, cfg = _pick_stage(exp, stage)
    if registry.get(cfg.objective.name).kind != "rl":
        raise ValueError(f"--rollout plans an RL stage's generation; stage {stage_name!r} is {cfg.objective.name!r}")
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(mesh_config or cfg.mesh, distributed=False))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    parts = stage_setup(cfg, mesh)
    s, sh = parts.state, parts.state_shardings
    # the policy the generate call reads: trainable top + frozen trunk, or with LoRA (step/adapters.py) the adapters +
    # the base under them + the trunk
    trained, bases = (("lora",), ("base", "trunk")) if "lora" in s.params else (("policy",), ("trunk",))
    pick = lambda tree, keys: tuple(tree[k] for k in keys)
    policy = (pick(s.params, trained) + pick(s.frozen, bases), pick(sh.params, trained) + pick(sh.frozen, bases))
    rest = lambda tree, drop: {k: v for k, v in tree.items() if k not in drop}
    b = {"params": _tree_bytes(*policy),
         "optimizer": _tree_bytes(s.opt_state, sh.opt_state),
         "critic": _tree_bytes(rest(s.params, trained), rest(sh.params, trained)),
         "frozen": _tree_bytes(rest(s.frozen, bases), rest(sh.frozen, bases)),
         "step_and_rng": _tree_bytes((s.step, s.rng), (sh.step, sh.rng)),
         "extra": sum(_tree_bytes(t, tsh) for t, tsh in parts.resident.values())}
    b["state"] = b["params"] + b["optimizer"] + b["critic"] + b["frozen"] + b["step_and_rng"]
    b["other"] = b["critic"] + b["frozen"] + b["step_and_rng"] + b["extra"]

    t0 = time.time()
    calls = {}
    for name, call in parts.between_steps.items():
        fn = jax.jit(call.fn, in_shardings=(*call.resident_shardings, *call.input_shardings))
        with attention_ops.compiling_for(devices[0].platform):
            lowered = fn.lower(*call.resident, *call.inputs)
        compiled = _compile(lowered, target, b["state"] + b["extra"], len(devices))
        mem = compiled.memory_analysis()
        c = {"batch": sum(_tree_bytes(x, xs) for x, xs in zip(call.inputs, call.input_shardings)),
             "temp": int(mem.temp_size_in_bytes), "output_not_aliased": int(mem.output_size_in_bytes)}
        c["own"] = c["batch"] + c["temp"] + c["output_not_aliased"]  # on top of the resident state and reward model
        c["total"] = b["state"] + b["extra"] + c["own"]
        calls[name] = {"per_device_bytes": c, "per_device_gib": {k: round(v / GiB, 3) for k, v in c.items()},
                       "memory_analysis": {k: int(getattr(mem, k)) for k in _MEMORY_KEYS},
                       "cost_analysis": _cost(compiled), "note": call.note}
    largest = max(calls, key=lambda n: calls[n]["per_device_bytes"]["own"])
    big = calls[largest]["per_device_bytes"]
    b.update(batch=big["batch"], temp=big["temp"], output_not_aliased=big["output_not_aliased"])
    b["total"] = b["params"] + b["optimizer"] + b["other"] + b["batch"] + b["temp"] + b["output_not_aliased"]
    report = {
        "experiment": exp.name, "stage": stage_name, "objective": cfg.objective.name, "phase": "rollout",
        "devices": len(devices), "mesh": dict(mesh.shape), "platform": devices[0].platform,
        "target": target.name if target else None, "compiler": _compiler(target, devices),
        "libtpu": libtpu_version() if target and target.chip else None,
        "per_device_bytes": b, "per_device_gib": {k: round(v / GiB, 3) for k, v in b.items()},
        "memory_analysis": calls[largest]["memory_analysis"], "cost_analysis": calls[largest]["cost_analysis"],
        "largest_call": largest, "calls": calls,
        "param_counts": {"policy": models.count_params(policy[0]), "trainable": models.count_params(s.params),
                         "frozen": models.count_params(s.frozen),
                         **{k: models.count_params(t) for k, (t, _) in parts.resident.items()}},
        "flops_per_step": None,
        "compile_seconds": round(time.time() - t0, 1),
        "notes": [f"rollout phase: the train state and the reward model stay resident while these calls run one "
                  f"after another; batch/temp/outputs below are the largest call's ({largest})",
                  *(calls[n]["note"] for n in calls)],
    }
    _fit(report, target)
    return report


def format_report(r: dict) -> str:
    b = r["per_device_bytes"]
    unit, scale = ("GiB", GiB) if b["total"] >= GiB else ("MiB", 1024 ** 2)
    phase = " rollout generation" if r.get("phase") == "rollout" else ""
    lines = [f"{r['experiment']} / stage {r['stage']} ({r['objective']}){phase} on {r['devices']} {r['platform']} "
             f"devices, mesh {', '.join(f'{k}={v}' for k, v in r['mesh'].items())}",
             f"  figures from the {r['compiler']}"]
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
            ("temp", "temporaries (compiler)"), ("output_not_aliased", "outputs not aliased to donated inputs"),
            ("total", "total"))
    for key, label in rows:
        lines.append(f"    {label:<70} {b[key] / scale:9.3f}")
    for name, call in r.get("calls", {}).items():
        c = call["per_device_bytes"]
        lines.append(f"    call {name + ':':<13} inputs {c['batch'] / scale:.3f} + temp {c['temp'] / scale:.3f} + "
                     f"outputs {c['output_not_aliased'] / scale:.3f}; phase total with it {c['total'] / scale:.3f}")
    fit = r.get("fit")
    if fit:
        cap = fit["hbm_per_device_bytes"] / GiB
        lines.append(f"  fits in {cap:.2f} GiB of HBM per device: headroom {fit['headroom_bytes'] / GiB:.2f} GiB"
                     if fit["fits"] else
                     f"  DOES NOT FIT in {cap:.2f} GiB of HBM per device: over by {-fit['headroom_bytes'] / GiB:.2f} "
                     f"GiB; {fit['suggestion']}")
    if r["flops_per_step"] is not None:
        lines.append(f"  FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_device']:.4g} per device; matmuls, "
                     f"scans counted per iteration); XLA cost analysis per device: {r['cost_analysis']['flops']:.4g} "
                     f"FLOPs, {r['cost_analysis']['bytes_accessed']:.4g} bytes accessed (loop bodies counted once)")
    roof = r.get("roofline")
    if roof:
        lines.append(f"  roofline: step >= {roof['step_seconds_lower_bound'] * 1e3:.2f} ms (compute "
                     f"{roof['compute_seconds'] * 1e3:.2f} ms at {roof['peak_bf16_flops_per_device']:.4g} bf16 FLOP/s, "
                     f"memory {roof['memory_seconds'] * 1e3:.2f} ms for {roof['bytes_per_device']:.4g} bytes at "
                     f"{roof['hbm_bytes_per_s_per_device']:.4g} B/s per device): MFU at most "
                     f"{100 * roof['mfu_upper_bound']:.1f}%")
    if "mfu" in r:
        lines.append(f"  MFU at {r['step_time_s']} s/step and {r['peak_flops_per_device']:.4g} FLOP/s per device: "
                     f"{100 * r['mfu']:.1f}%")
    lines.append(f"  compiled in {r['compile_seconds']} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# CLI.


def parse_mesh(text: str):
    """"data=2,fsdp=4,tensor=1" -> MeshConfig (unnamed axes keep their defaults)."""
    sizes = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected data=N,fsdp=N,tensor=N (N may be -1), got {part!r} in {text!r}")
        sizes[key.strip()] = int(value)
    return sizes


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment file or name (experiments/NAME.py)")
    parser.add_argument("--target", default=None,
                        help="what to compile for: a TPU slice (v5e-8, v5p-16, v4-8, v6e-8, or a topology such as "
                             "v5e:2x4; needs the [tpu] extra, no TPU) or cpu:N (N simulated CPU devices)")
    parser.add_argument("--devices", type=int, default=None,
                        help="plan for this process's first N devices (simulated CPU devices when it has fewer); "
                             "the default when --target is not given")
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
    parser.add_argument("--search", default=None, metavar="KEY=V1,V2,...",
                        help="TPU targets: plan once per value of one config key, in increasing order (e.g. "
                             "rollout.generation_batch=8,16,32 or rollout.max_new_tokens=1024,2048), stop at the "
                             "first that does not fit, and report the largest that does")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _argv(args, devices: int) -> list[str]:
    out = [args.experiment, "--devices", str(devices)]
    for flag, value in (("--mesh", args.mesh), ("--stage", args.stage), ("--step-time", args.step_time),
                        ("--peak-flops", args.peak_flops)):
        if value is not None:
            out += [flag, str(value)]
    for o in args.overrides:
        out += ["--set", o]
    return out + (["--rollout"] if args.rollout else []) + (["--json"] if args.json else [])


def _ensure_devices(args, count: int) -> list:
    """`count` devices for the plan: this process's first ones, or a re-exec of this command on simulated CPU
    devices."""
    import jax
    if jax.device_count() >= count:
        return jax.devices()[:count]
    if os.environ.get(_REEXEC_GUARD):
        raise RuntimeError(f"plan: asked for {count} devices but only {jax.device_count()} exist even after "
                           f"re-executing with --xla_force_host_platform_device_count")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_REEXEC_GUARD: "1"})
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "starling_jax.commands.cli", "plan", *_argv(args, count)], env)


def plan_cli(args) -> int:
    from starling_jax.stages.experiment import apply_overrides, load_experiment
    if args.target is not None and args.devices is not None:
        raise InputError("plan: give --target or --devices, not both (--devices N is --target cpu:N)")
    if args.target is None and args.devices is None:
        raise InputError(f"plan: give --target (e.g. v5e-8, or cpu:8 for simulated CPU devices); valid targets: "
                         f"{valid_targets()}")
    target = parse_target(args.target) if args.target is not None else None
    if args.search is not None and (target is None or target.chip is None):
        raise InputError("plan --search compares against a TPU chip's HBM: give a TPU --target (e.g. v5e-1)")
    exp = load_experiment(args.experiment)
    if args.overrides:
        exp = apply_overrides(exp, args.overrides)
    mesh_config = None
    if args.mesh:
        mesh_config = dataclasses.replace(exp.mesh, **parse_mesh(args.mesh))
    if target is not None and target.chip is not None:
        devices = target_devices(target)
    else:
        devices = _ensure_devices(args, target.cpu_devices if target is not None else args.devices)
        target = None
    def one(exp):
        if args.rollout:
            return plan_rollout(exp, devices, mesh_config, args.stage, target)
        return plan_experiment(exp, devices, mesh_config, args.stage, args.step_time, args.peak_flops, target)

    if args.search is not None:
        return _search(args, exp, target, one)
    try:
        report = one(exp)
    except DoesNotFit as e:
        print(f"error: {exp.name}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(report) if args.json else format_report(report))
    fit = report.get("fit")
    if fit and not fit["fits"]:
        print(f"error: {exp.name} does not fit on {target.name}: "
              f"{report['per_device_bytes']['total'] / GiB:.2f} GiB per device needed, "
              f"{fit['hbm_per_device_bytes'] / GiB:.2f} GiB available (over by {-fit['headroom_bytes'] / GiB:.2f} "
              f"GiB); {fit['suggestion']}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _search(args, exp, target: Optional[Target], plan_one) -> int:
    """--search KEY=V1,V2,...: plan_one(exp with KEY=V) for each value in increasing order until one does not fit
    the target's HBM; prints one line per value (or one JSON object) and the largest value that fits."""
    from starling_jax.stages.experiment import apply_overrides
    key, _, values = args.search.partition("=")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not key.strip() or not values or not all(v.isdigit() for v in values):
        raise InputError(f"--search {args.search!r}: expected KEY=N1,N2,... with integers, e.g. "
                         f"rollout.generation_batch=8,16,32")
    rows, reports, largest = [], [], None
    for value in sorted(values, key=int):
        try:
            report = plan_one(apply_overrides(exp, [f"{key.strip()}={value}"]))
        except DoesNotFit as e:
            rows.append({"value": int(value), "fits": False, "total_gib": None, "note": str(e)})
            break
        fit = report["fit"]
        need = fit["hbm_per_device_bytes"] - fit["headroom_bytes"]
        rows.append({"value": int(value), "fits": fit["fits"], "total_gib": round(need / GiB, 3),
                     "largest_call": report.get("largest_call")})
        reports.append(report)
        if not fit["fits"]:
            break
        largest = int(value)
    result = {"experiment": exp.name, "target": target.name, "search": key.strip(), "results": rows,
              "largest_that_fits": largest, "libtpu": libtpu_version(), "reports": reports}
    if args.json:
        print(json.dumps(result))
    else:
        phase = "rollout phase" if args.rollout else "update step"
        print(f"{exp.name}: {phase} on {target.name}, {key.strip()} searched (figures from the TPU compiler, libtpu "
              f"{libtpu_version()}):")
        for r in rows:
            print(f"  {key.strip()}={r['value']}: " + (f"{r['total_gib']:.2f} GiB per device, "
                                                        f"{'fits' if r['fits'] else 'DOES NOT FIT'}"
                                                        if r["total_gib"] is not None else r["note"]))
        print(f"  largest {key.strip()} that fits on {target.name}: {largest}")
    return 0 if largest is not None else EXIT_BAD_INPUT


add_arguments, cli = add_plan_arguments, plan_cli
