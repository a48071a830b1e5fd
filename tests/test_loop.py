"""The training loop's reliability: SIGKILL + resume reproduces the uninterrupted losses exactly, SIGTERM writes a
checkpoint and exits cleanly, a NaN loss stops the run with the last good checkpoint intact, a corrupted latest
checkpoint (cut short, and bytes flipped in place in the one before it) falls back past both. A tiny reward model on
a small synthetic set keeps each run to seconds."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from cpu_env import cpu_env
from file_damage import flip

from starling_jax.stages.experiment import apply_overrides, load_experiment
from starling_jax.step.checkpoint import Checkpoints
from starling_jax.step.logging import read_metrics

pytestmark = pytest.mark.slow  # every test here trains or runs a subprocess end to end

STEPS = 24
OVERRIDES = [
    "data.synthetic_prompts=160", "data.max_responses=4", f"train.steps={STEPS}", "train.batch_size=8",
    "train.eval_every=0", "logging.every=2", "checkpoint.every=6", "checkpoint.keep=3", "logging.progress=false",
    "optim.warmup_steps=0", "model.config.num_layers=1",
]
REPO = Path(__file__).resolve().parent.parent


def experiment(extra=()):
    return apply_overrides(load_experiment("tiny_rm"), OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def env():
    """Every run is a fresh process on one CPU device; they compile the same programs, which the session's persistent
    compilation cache (tests/conftest.py, inherited with the environment) lets only the first pay for."""
    return cpu_env()


def train_command(workdir, extra=()):
    args = [sys.executable, "-m", "starling_jax.commands.cli", "train", "tiny_rm", "--workdir", str(workdir)]
    for o in OVERRIDES + list(extra):
        args += ["--set", o]
    return args


def train(workdir, env, extra=()):
    done = subprocess.run(train_command(workdir, extra), capture_output=True, cwd=REPO, env=env, timeout=400)
    return done.returncode, done.stderr.decode()


def start(workdir, env):
    return subprocess.Popen(train_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=env)


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "rm")) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    rc, err = train(workdir, env)
    assert rc == 0, err
    return workdir


def unfinished_copy(reference, workdir):
    """A copy of the reference run with its stage unfinished (no export, no summary): a rerun resumes it."""
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "rm" / "export")
    os.remove(workdir / "summary.json")
    return workdir


def wait_for_step(proc, workdir, step, timeout=300):
    path = os.path.join(workdir, "rm", "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"training exited early:\n{proc.stderr.read().decode()}"
        if os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path) if line.strip()):
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from TensorBoard event files, read as TFRecords of Event protos (no TensorFlow)."""
    from tensorboardX.proto.event_pb2 import Event
    out: dict = {}
    for path in Path(directory).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])  # after length (8) and its crc (4)
            i += 12 + length + 4  # and the data's crc
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_reference_run(reference):
    summary = json.load(open(reference / "summary.json"))
    assert sorted(losses(reference)) == list(range(2, STEPS + 1, 2))
    assert all(np.isfinite(list(losses(reference).values())))
    assert summary["rm"]["heldout_groups"] == 16
    # the newest checkpoint.keep checkpoints are kept, each with the experiment config
    assert Checkpoints(str(reference / "rm" / "checkpoints")).steps() == [12, 18, 24]
    saved = json.load(open(reference / "rm" / "checkpoints" / "24" / "config" / "metadata"))
    assert saved["name"] == "tiny_rm" and saved["train"]["steps"] == STEPS
    # TensorBoard holds the same losses (as float32)
    board = tensorboard_scalars(reference / "rm" / "tensorboard")
    assert board["loss"] == pytest.approx(losses(reference), rel=1e-6)
    assert set(board) >= {"loss", "grad_norm", "lr", "pair_accuracy", "step_time", "tokens_per_s"}


def test_sigkill_then_resume_is_exact(reference, env, tmp_path):
    proc = start(tmp_path, env)
    wait_for_step(proc, tmp_path, 14)  # past the checkpoint at 12, before the end
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "rm" / "export").exists()
    rc, err = train(tmp_path, env)
    assert rc == 0, err
    assert "resumed from" in err
    assert losses(tmp_path) == losses(reference)  # bit-exact at every logged step, none missing or repeated


def test_sigterm_writes_checkpoint_and_exits_cleanly(reference, env, tmp_path):
    proc = start(tmp_path, env)
    wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "SIGTERM at step" in err and "Run the same command again to resume" in err
    saved = int(err.split("SIGTERM at step ")[1].split(";")[0])
    assert 2 <= saved < STEPS
    assert Checkpoints(str(tmp_path / "rm" / "checkpoints")).steps()[-1] == saved
    # resuming from it (usually not a multiple of checkpoint.every) continues the same trajectory: compare the
    # logging windows that lie wholly after the checkpoint
    rc, err = train(tmp_path, env)
    assert rc == 0, err
    after = {s: v for s, v in losses(reference).items() if s - 2 >= saved}
    assert after and {s: v for s, v in losses(tmp_path).items() if s in after} == after


def test_nan_loss_stops_with_last_good_checkpoint(env, tmp_path):
    # an absurd learning rate overflows the weights after the first updates
    rc, err = train(tmp_path, env, ["optim.learning_rate=1e35", "checkpoint.every=1", "optim.grad_clip=none"])
    assert rc == 1, err
    assert "Traceback" not in err
    assert re.search(r"error: stage 'rm': the loss is (nan|inf|-inf) at step (\d+); stopping without saving. "
                     r"Last good checkpoint: step (\d+) in ", err), err
    bad, last = map(int, re.search(r"at step (\d+);.*checkpoint: step (\d+)", err).groups())
    ckpts = Checkpoints(str(tmp_path / "rm" / "checkpoints"))
    assert ckpts.steps()[-1] == last == bad - 1
    state = ckpts.restore(last, None).state  # raw arrays as saved
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert not (tmp_path / "rm" / "export").exists()


@pytest.fixture(scope="module")
def damaged(reference, env, tmp_path_factory):
    """One resume of a copy of the reference run whose two newest checkpoints are damaged: 24 cut short (every state
    file 7 zero bytes), and in 18 4 KiB of the largest file overwritten in place (same length: orbax would restore it
    without a word, tests/test_digests.py shows). Each is caught, set aside with one warning, and the run falls back
    to 12. One run for both damages (a start-up and the reference's copy less than one run each). Returns the
    workdir, the flipped file (relative to its checkpoint), the exit status and stderr."""
    workdir = unfinished_copy(reference, tmp_path_factory.mktemp("damaged") / "run")
    for f in (workdir / "rm" / "checkpoints" / "24" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)
    second = workdir / "rm" / "checkpoints" / "18"
    largest = max((f for f in second.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    flip(largest)
    rc, err = train(workdir, env)
    return workdir, largest.relative_to(second), rc, err


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_and_match(reference, damaged):
    """The flipped bytes in checkpoint 18 (the newest once 24 is set aside): the digests catch them, one warning names
    the file, the checkpoint is moved aside and the run resumes from the previous one, reproducing the uninterrupted
    losses."""
    workdir, flipped, rc, err = damaged
    assert rc == 0, err
    warned = [line for line in err.splitlines() if "could not be restored" in line]
    assert len(warned) == 2, err  # one line per damaged checkpoint: 24 (cut short), then 18
    assert f"checkpoints/18/{flipped}: crc32" in warned[1] and "checkpoints/18" not in warned[0], err
    assert "falling back to the previous checkpoint" in warned[1]
    assert err.split("resumed from ")[1].split()[0].endswith("checkpoints/12")
    assert sorted(p.name.split(".")[0] for p in (workdir / "rm" / "checkpoints_corrupt").iterdir()) == ["18", "24"]
    assert losses(workdir) == losses(reference)  # steps 13..24 recomputed from checkpoint 12, identically


def test_corrupted_latest_checkpoint_falls_back(reference, damaged):
    workdir, _, rc, err = damaged
    assert rc == 0, err
    assert re.search(r"checkpoints/24 could not be restored .* falling back to the previous", err), err
    assert "resumed from" in err and err.split("resumed from ")[1].split()[0].endswith("checkpoints/12")
    assert losses(workdir) == losses(reference)  # steps 13..24 recomputed from checkpoint 12, identically
