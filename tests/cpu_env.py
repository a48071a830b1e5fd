"""The environment of a process a test starts (a CLI run, a notebook kernel, a worker of a multi-process run): the
test session's own (its compilation cache and XLA's optimisation level: tests/conftest.py) on `devices` simulated CPU
devices. The guard of the published main job (tests/test_main_job.py) builds its own instead: it runs as a user's
command does, at XLA's default level, which is also the faster one there: its 400 SFT and 1,200 RM steps run
programs far more than they compile (a shortened main job: 145 s of CPU at level 3 against 192 s at level 0, an SFT
step 0.41 s against 0.72 s). The short runs every other process makes do better at level 0, measured per test (CPU
seconds, level 3 -> 0): the real-model notebook 205 -> 169, the tiny notebook 70 -> 52, the group multi-process runs
107 -> 79, the accelerator benchmark's smoke run 61 -> 36; the real-model study cell and a --quick study cell equal."""

import os

LEVEL = "--xla_backend_optimization_level"


def cpu_env(devices: int = 1, **extra: str) -> dict:
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    flags += [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(LEVEL)]
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **extra)
