"""Runs before any test module imports jax: simulate 8 CPU devices so sharding tests can build real meshes.

Single-device code is unaffected (arrays live on device 0 and jit runs there unless a mesh says otherwise). A user's
own XLA_FLAGS are kept; an explicit device count in them wins.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
