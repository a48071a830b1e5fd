"""One training loop for every stage kind (its commands, `starling-jax run | train | feedback`: commands/train.py).

    run_experiment(exp, workdir) -> summary      all stages in order; a finished stage (its export exists) is skipped
    train_stage(ctx) -> summary                  one stage: resume, step, log, eval, checkpoint, finish, export

Per stage the loop writes WORKDIR/<stage>/metrics.jsonl, WORKDIR/<stage>/tensorboard/, WORKDIR/<stage>/checkpoints/
(orbax, the newest checkpoint.keep) and, when done, WORKDIR/<stage>/export/ (the model later stages load with
"stage:NAME"). `run` also writes WORKDIR/summary.json ({stage name: that stage's finish() summary}).

Host syncs: the step's metrics stay on the device until a logged step (every logging.every steps), a checkpoint step
(a NaN check guards every save) or the end, where one device_get fetches all of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Optional

import jax
import numpy as np

from starling_jax.config import ConfigError, Experiment
from starling_jax.errors import InputError
from starling_jax.files import write_json
from starling_jax.models import param_specs
from starling_jax.parallel import sharding
from starling_jax.parallel.sharding import param_shardings
from starling_jax.stages.experiment import stages_of, to_dict
from starling_jax.stages.validation import validate
from starling_jax.stages.kinds.feedback import rows_path
from starling_jax.stages.program import StageContext, StageExport, build_program
from starling_jax.step.checkpoint import Checkpoints, export_done, load_export, save_export
from starling_jax.step.logging import MetricsLogger, delete_windows, load_window, mfu, save_window

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops without saving the bad state."""


class StageInterrupted(RuntimeError):
    """SIGTERM/SIGINT: a checkpoint was written and the run stopped; running the same command resumes it."""




class _StopFlag:
    """Turns SIGTERM and SIGINT into a stop the loop checks between steps (a signal never interrupts a save).

    One process: a flag set by the signal handler. Several processes: every process must stop at the same step, so
    the decision is JAX's preemption sync (jax.experimental.multihost_utils.reached_preemption_sync_point, the
    mechanism orbax's CheckpointManager.reached_preemption uses): XLA's own SIGTERM handler, installed by
    jax.distributed.initialize, tells the coordination service; every process then learns of it and they agree on
    the first step all can still reach. SIGINT is forwarded to that handler as SIGTERM."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}
        self.synced = False

    def __enter__(self):
        from jax._src import distributed
        self.synced = (jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None)
        for sig in ((signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT)):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        if self.synced:
            os.kill(os.getpid(), signal.SIGTERM)  # to XLA's preemption notifier: all processes stop together

    def reached(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (call once per step, every step, on every process)."""
        if self.synced:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None

    def describe(self) -> str:
        if self.synced:
            return "a preemption notice (SIGTERM or SIGINT to one of the processes)"
        return signal.Signals(self.signal).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_same_on_every_process(data_state: dict, what: str) -> None:
    """Several processes: the host state saved with a checkpoint (written by process 0 only) must be every
    process's. Raises when it is not, naming the first differing process."""
    if jax.process_count() == 1:
        return
    import hashlib
    from jax.experimental import multihost_utils
    digest = hashlib.sha256(json.dumps(data_state, sort_keys=True, default=float).encode()).digest()
    mine = np.frombuffer(digest, np.uint8).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))
    bad = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if bad:
        raise RuntimeError(f"{what}: the data/rollout state of process {bad[0]} differs from process 0's; the "
                           f"processes have diverged (their checkpoint would not resume them all)")


def _write_process_state(directory: str, data_state: dict) -> None:
    """Several processes: each writes the host state it ends with to DIR/process_state/<index>.json, so one can see
    that they agree (the checkpoint holds process 0's)."""
    if jax.process_count() == 1:
        return
    os.makedirs(os.path.join(directory, "process_state"), exist_ok=True)
    _write_json(os.path.join(directory, "process_state", f"{jax.process_index()}.json"), data_state)


def _mean_metrics(fetched: list[dict]) -> dict:
    """Mean of each scalar metric over the steps of a logging window."""
    out = {}
    for k in fetched[0]:
        values = [np.asarray(m[k], dtype=np.float64) for m in fetched if k in m]
        if all(v.ndim == 0 for v in values):
            out[k] = float(np.mean(values))
    return out


def _host_scalars(fetched: list[dict]) -> list[dict]:
    """The scalar metrics of each step of a window as JSON numbers (exact: float32/float64 -> Python float)."""
    return [{k: float(np.asarray(v)) for k, v in m.items() if np.ndim(v) == 0} for m in fetched]


def _first_nonfinite(fetched: list[dict], first_step: int) -> Optional[tuple[int, float]]:
    for i, m in enumerate(fetched):
        if "loss" not in m:  # a stage that trains nothing (feedback)
            continue
        loss = float(np.asarray(m["loss"]))
        if not math.isfinite(loss):
            return first_step + i, loss
    return None


def _checkpoint_parts(program):
    """(state -> the tree a checkpoint saves, host state -> the JSON it saves beside it). A LoRA stage
    (program.base) saves its state without `frozen` (the base: reloaded from model.path, never written again) and
    the pointer to that base beside the data position; every other stage saves both as they are."""
    if program.base is None:
        return (lambda state: state), (lambda data_state: data_state)
    return (lambda state: state.replace(frozen={})), (lambda data_state: {"batches": data_state,
                                                                          "base": program.base})


def _check_base(saved: Optional[dict], loaded: dict, where: str) -> None:
    """A LoRA checkpoint's adapters belong to the base they were trained on: an InputError when the base the stage
    loads now is another one (step/adapters.py; program.base_pointer)."""
    if saved != loaded:
        raise InputError(f"{where}: these LoRA adapters were trained on the base {_describe(saved)}, but "
                         f"model.path now loads {_describe(loaded)}; restore that base, or set "
                         f"checkpoint.resume=False to train the stage again from the start")


def _describe(pointer: Optional[dict]) -> str:
    if not pointer:
        return "(none recorded)"
    if pointer.get("path") is None:
        return f"(a random init, seed {pointer.get('seed')})"
    return f"{pointer['path']!r} (files digest {str(pointer.get('digest'))[:12]})"


def train_stage(ctx: StageContext) -> tuple[dict, StageExport]:
    """Train one stage to config.train.steps (resuming from its newest checkpoint unless checkpoint.resume is False),
    then evaluate, finish and export it. Returns (summary, export)."""
    c = ctx.config
    steps, log_every, ckpt_every = c.train.steps, c.logging.every, c.checkpoint.every
    eval_every = c.train.eval_every
    is_main = jax.process_index() == 0
    program = build_program(ctx)
    ckpts = Checkpoints(os.path.join(ctx.workdir, "checkpoints"), keep=c.checkpoint.keep)
    state, start = program.state, 0
    say = log.info if is_main else (lambda msg: None)
    saved, host_state = _checkpoint_parts(program)
    if c.checkpoint.resume:
        restored = ckpts.restore_latest(saved(program.state))
        if restored is not None:
            state, start = restored.state, restored.step
            if program.base is not None:  # a LoRA stage: its adapters over the base they were trained on
                _check_base(restored.data_state.get("base"), program.base, f"{ckpts.directory}/{start}")
                state = state.replace(frozen=program.state.frozen)
                restored.data_state = restored.data_state["batches"]
            program.batches.set_state(restored.data_state)
            say(f"[{ctx.stage_name}] resumed from {ckpts.directory}/{start}")
    elif ckpts.steps():
        say(f"[{ctx.stage_name}] checkpoint.resume=False: starting over; deleting checkpoints {ckpts.steps()}")
        ckpts.delete_all()
    if start == 0 and is_main:
        delete_windows(ctx.workdir)
    logger = MetricsLogger(ctx.workdir, steps, start, tensorboard=c.logging.tensorboard and is_main,
                           progress=c.logging.progress and is_main, desc=ctx.stage_name) if is_main else None
    config_dict = to_dict(ctx.experiment)
    num_devices = jax.device_count()

    pending: list = []  # device metrics of the steps since the last log
    window_start, window_tokens, window_t0 = start, 0, time.perf_counter()
    short_window = None  # a resumed window whose steps before the checkpoint were not recorded: log its length
    if start and start % log_every:
        cut = load_window(ctx.workdir, start)  # the steps of this window before the checkpoint (save_window)
        if cut is not None and cut.get("start") == start - len(cut.get("steps", [])):
            pending = list(cut["steps"])
            window_start, window_tokens = cut["start"], cut["tokens"]
            window_t0 -= cut["elapsed"]
        else:
            short_window = start
            say(f"[{ctx.stage_name}] the metrics of steps {start - start % log_every + 1}..{start} were not "
                f"recorded with checkpoint {start}; the window logged at step "
                f"{min(start - start % log_every + log_every, steps)} averages only the steps after it "
                f"(its record says how many: window_steps)")
    last_saved = start
    step = start
    try:
        with _StopFlag() as stop:
            while step < steps:
                batch = program.batches.next_batch(state)
                window_tokens += program.tokens_per_batch(batch)
                state, metrics = program.step(state, batch)
                pending.append(metrics)
                step += 1
                # decided once per step: a signal arriving later in this iteration is handled after the next step
                stopping = stop.reached(step)
                log_due = step % log_every == 0 or step == steps
                ckpt_due = (ckpt_every and step % ckpt_every == 0) or stopping
                if log_due or ckpt_due:
                    fetched = jax.device_get(pending)  # the one host sync of this window
                    bad = _first_nonfinite(fetched, window_start + 1)
                    if bad is not None:
                        kept = f"step {last_saved} in {ckpts.directory}" if ckpts.steps() else "none (no checkpoint yet)"
                        raise TrainingDiverged(
                            f"stage {ctx.stage_name!r}: the loss is {bad[1]} at step {bad[0]}; stopping without "
                            f"saving. Last good checkpoint: {kept}. Try a lower optim.learning_rate, optim.grad_clip, "
                            f"or check the data around that step.")
                    if log_due:
                        elapsed = time.perf_counter() - window_t0
                        values = _mean_metrics(fetched)
                        values["step_time"] = elapsed / len(fetched)
                        values["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                        u = mfu(program.flops_per_token, values["tokens_per_s"], c.logging.peak_flops, num_devices)
                        if u is not None:
                            values["mfu"] = u
                        if short_window is not None:
                            values["window_steps"] = len(fetched)
                            short_window = None
                        if logger:
                            logger.log(step, values)
                        pending, window_start, window_tokens = [], step, 0
                        window_t0 = time.perf_counter()
                if eval_every and step % eval_every == 0 and step < steps:
                    evaluated = program.evaluate(state)
                    if evaluated and logger:
                        logger.log(step, evaluated, prefix="eval/")
                if ckpt_due:
                    if is_main and pending:  # the window this checkpoint cuts, for a resumed run to complete
                        save_window(ctx.workdir, step, {"start": window_start, "steps": _host_scalars(fetched),
                                                        "tokens": int(window_tokens),
                                                        "elapsed": time.perf_counter() - window_t0}, ckpts.steps())
                    data_state = program.batches.get_state()
                    _check_same_on_every_process(data_state, f"stage {ctx.stage_name!r} step {step}")
                    ckpts.save(step, saved(state), host_state(data_state), config_dict)
                    last_saved = step
                if stopping:
                    ckpts.wait()
                    raise StageInterrupted(f"stage {ctx.stage_name!r}: {stop.describe()} at step {step}; checkpoint "
                                           f"saved in {ckpts.directory}/{step}. Run the same command again to "
                                           f"resume.")
        data_state = program.batches.get_state()
        _check_same_on_every_process(data_state, f"stage {ctx.stage_name!r} step {steps}")
        _write_process_state(ctx.workdir, data_state)
        if last_saved != steps or not ckpts.steps():
            ckpts.save(steps, saved(state), host_state(data_state), config_dict)
        ckpts.wait()
        evaluated = program.evaluate(state)
        if evaluated and logger:
            logger.log(steps, evaluated, prefix="eval/")
        summary = dict(program.finish(state, ctx.workdir) or {})
        if evaluated:
            summary.setdefault("eval", evaluated)
        params = program.export(state) if program.export is not None else None  # None: the stage trains no model
        export = StageExport(config=program.model_config, params=params, summary=summary)
        save_export(os.path.join(ctx.workdir, "export"), program.model_config, params, summary,
                    adapters=program.adapters(state) if program.adapters is not None else None)
        return summary, export
    finally:
        ckpts.close()
        if logger:
            logger.close()


def run_experiment(exp: Experiment, workdir: str, only_stage: Optional[str] = None, launch=None) -> dict:
    """Run the experiment's stages in order in WORKDIR; stages already exported are skipped (their summaries kept).
    Returns {stage name: summary} and writes it to WORKDIR/summary.json. only_stage: train just that stage (the
    stages it depends on must be finished). launch: a sharding.Launch (coordinator, process count and id, timeouts)
    for a multi-process run; mesh.distributed or a coordinator in it or in JAX_COORDINATOR_ADDRESS starts one.
    Every process runs this same function on the same WORKDIR (a shared filesystem)."""
    try:
        sharding.initialize_distributed(exp.mesh, launch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate(exp, num_devices=jax.device_count())
    stages = stages_of(exp)
    names = [n for n, _ in stages]
    if only_stage is not None and only_stage not in names:
        raise ConfigError(f"--stage {only_stage}: no such stage; stages: {', '.join(names)}")
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:  # one writer: every process shares WORKDIR (and the temporary file's name)
        _write_json(os.path.join(workdir, "config.json"), to_dict(exp))
    mesh = sharding.make_mesh(exp.mesh)
    exports: dict[str, StageExport] = {}

    def shardings_of(config):
        if mesh is None:
            return None
        return param_shardings(param_specs(config), mesh, exp.mesh.rules)

    def load_stage(name: str) -> StageExport:
        """An earlier stage's export: in memory if it ran in this process, else read from disk onto the mesh."""
        if name not in exports or exports[name].params is None:
            config, params, summary = load_export(os.path.join(workdir, name, "export"), shardings_of)
            exports[name] = StageExport(config=config, params=params, summary=summary)
        return exports[name]

    summary_path = os.path.join(workdir, "summary.json")
    summaries = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    for name, config in stages:
        stage_dir = os.path.join(workdir, name)
        if only_stage is not None and name != only_stage:
            continue
        if export_done(os.path.join(stage_dir, "export")) and config.checkpoint.resume:
            with open(os.path.join(stage_dir, "export", "summary.json")) as f:
                summaries[name] = json.load(f)
            log.info("[%s] already finished (%s/export); skipping", name, stage_dir)
            continue
        if config.data.source.startswith("stage:"):  # the rows a feedback stage wrote
            config = dataclasses.replace(config, data=dataclasses.replace(
                config.data, source=rows_path(workdir, config.data.source[len("stage:"):])))
        ctx = StageContext(experiment=exp, config=config, stage_name=name, workdir=stage_dir, mesh=mesh,
                           load_stage=load_stage)
        summary, export = train_stage(ctx)
        exports[name] = export
        summaries[name] = summary
        if jax.process_index() == 0:
            _write_json(summary_path, summaries)
    return summaries


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=1, default=float)
