"""The environment of a process a test starts (a CLI run, a notebook kernel, a worker of a multi-process run): the
test session's own (its compilation cache and XLA's optimisation level: tests/conftest.py) on `devices` simulated CPU
devices. The guard of the published main job (tests/test_main_job.py) and the accelerator benchmark's smoke test
build theirs by hand instead: they run as a user's command does, at XLA's default level."""

import os

LEVEL = "--xla_backend_optimization_level"


def cpu_env(devices: int = 1, **extra: str) -> dict:
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    flags += [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(LEVEL)]
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", **extra)
