"""Metrics after a resume are those of an uninterrupted run: the whole metrics.jsonl of an interrupted-and-resumed
run equals an uninterrupted run's (every record, every value bit for bit; only the wall-clock fields step_time,
tokens_per_s and mfu differ), for a SIGTERM mid-window and for a kill after a checkpoint mid-window. A window whose
cut steps were not recorded is logged with the number of steps it averages.

In-process: the stop is injected at an exact step by wrapping the stage program's step function."""

import dataclasses
import os
import shutil
import signal

import pytest

from starling_jax.stages.experiment import apply_overrides, load_experiment
from starling_jax.stages import loop
from starling_jax.step.logging import WINDOW_FILE, read_metrics

STEPS = 12
OVERRIDES = [
    "data.synthetic_prompts=96", "data.max_responses=4", f"train.steps={STEPS}", "train.batch_size=8",
    "train.eval_every=0", "logging.every=5", "checkpoint.every=7", "checkpoint.keep=3", "logging.progress=false",
    "logging.tensorboard=false", "optim.warmup_steps=0", "model.config.num_layers=1",
]
WALL_CLOCK = ("step_time", "tokens_per_s", "mfu")


class SimulatedKill(Exception):
    pass


def run(workdir, stop_at=None, how=None, monkeypatch=None):
    """Train tiny_rm in workdir; with stop_at, SIGTERM the process during step stop_at (how="sigterm": the loop
    checkpoints after it and stops) or die inside it (how="kill": nothing after the last checkpoint survives)."""
    exp = apply_overrides(load_experiment("tiny_rm"), OVERRIDES)
    if stop_at is not None:
        build = loop.build_program
        calls = {"n": 0}

        def build_with_stop(ctx):
            program = build(ctx)
            start = int(program.state.step) if hasattr(program.state, "step") else 0
            inner = program.step

            def step(state, batch):
                calls["n"] += 1
                if calls["n"] == stop_at - start and how == "kill":
                    raise SimulatedKill(f"killed during step {stop_at}")
                out = inner(state, batch)
                if calls["n"] == stop_at - start and how == "sigterm":
                    signal.raise_signal(signal.SIGTERM)
                return out
            return dataclasses.replace(program, step=step)
        monkeypatch.setattr(loop, "build_program", build_with_stop)
        with pytest.raises(loop.StageInterrupted if how == "sigterm" else SimulatedKill):
            loop.run_experiment(exp, str(workdir))
        monkeypatch.setattr(loop, "build_program", build)
    else:
        loop.run_experiment(exp, str(workdir))
    return read_metrics(os.path.join(workdir, "rm"))


def without_wall_clock(records):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("reference"))


def check_resumed_equals(reference, resumed):
    assert [r["step"] for r in reference if "loss" in r] == [5, 10, 12]
    assert without_wall_clock(resumed) == without_wall_clock(reference)
    assert all(set(r) == set(ref) for r, ref in zip(resumed, reference))  # no extra field, none missing


@pytest.mark.slow
def test_sigterm_mid_window(reference, tmp_path, monkeypatch):
    """SIGTERM during step 9 (logging every 5): the checkpoint at 9 records steps 6..9, the resumed run logs the mean
    of 6..10 at step 10 exactly as the uninterrupted run does. Without the record (a checkpoint from before), step
    10's record says it averages 1 step."""
    interrupted = run(tmp_path / "a", stop_at=9, how="sigterm", monkeypatch=monkeypatch)
    assert [r["step"] for r in interrupted] == [5]  # the window 6..10 was cut at step 9
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    check_resumed_equals(reference, run(tmp_path / "a"))

    os.remove(tmp_path / "b" / "rm" / WINDOW_FILE)
    by_step = {r["step"]: r for r in run(tmp_path / "b") if "loss" in r}
    assert by_step[10]["window_steps"] == 1  # step 10 alone, and the record says so
    assert "window_steps" not in by_step[5] and "window_steps" not in by_step[12]
    ref = {r["step"]: r for r in reference if "loss" in r}
    assert by_step[12]["loss"] == ref[12]["loss"] and by_step[5]["loss"] == ref[5]["loss"]
    assert by_step[10]["loss"] != ref[10]["loss"]  # one step's loss is not the mean of five


@pytest.mark.slow
def test_kill_after_a_checkpoint_mid_window(reference, tmp_path, monkeypatch):
    """Killed during step 9, after the checkpoint at 7: the resumed run restarts at 7 and completes the window 6..10
    from the steps 6, 7 recorded with that checkpoint."""
    interrupted = run(tmp_path, stop_at=9, how="kill", monkeypatch=monkeypatch)
    assert [r["step"] for r in interrupted] == [5]
    check_resumed_equals(reference, run(tmp_path))


def test_a_line_half_written_by_a_kill_is_dropped_on_resume(tmp_path):
    """SIGKILL during a metrics write leaves a partial last line: resuming drops it (and records past the checkpoint)
    so the next record starts on its own line; read_metrics leaves such a line out instead of failing."""
    from starling_jax.step.logging import MetricsLogger, truncate_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.5}\n{"step": 10, "loss": 1.25}\n{"step": 15, "lo')
    assert read_metrics(str(path)) == [{"step": 5, "loss": 1.5}, {"step": 10, "loss": 1.25}]
    truncate_metrics(str(path), 10)
    assert path.read_text() == '{"step": 5, "loss": 1.5}\n{"step": 10, "loss": 1.25}\n'
    path.write_text('{"step": 5, "loss": 1.5}')  # a complete record that lost its newline
    logger = MetricsLogger(str(tmp_path), total_steps=20, start_step=5, tensorboard=False, progress=False)
    logger.log(10, {"loss": 1.0})
    logger.close()
    assert read_metrics(str(path)) == [{"step": 5, "loss": 1.5}, {"step": 10, "loss": 1.0}]
