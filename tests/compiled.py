"""The model's forward and score jitted once for the whole test session (config static), for tests that compare their
outputs: a call outside jit re-traces and re-compiles the scan over layers on every call (about 0.7-1.7 s of CPU each
on the tiny models), a jitted one compiles once per (config, shapes, tree structure) and is then reused by every test
that asks for the same program. The same functions, run as a training step runs them: under jit."""

import jax

from starling_jax import models

forward = jax.jit(models.forward, static_argnums=1)
score = jax.jit(models.score, static_argnums=1)
