"""What one stage kind (sft, rm, dpo, rl) provides to the one training loop (starling_jax.train.loop).

A stage kind is a function `build(ctx: StageContext) -> StageProgram`, registered under a name with
`@register_stage_kind("rl")`. The objective's name picks the kind (OBJECTIVE_KINDS): sft -> "sft", rm_* -> "rm",
dpo -> "dpo", apa/ppo -> "rl". The loop then does, for every kind alike:

    program = build_program(ctx)
    state = program.state                      # restored over from the latest checkpoint when resuming
    program.batches.set_state(saved)           # likewise
    for step in range(start, ctx.config.train.steps):
        batch = program.batches.next_batch(state)   # numpy batch; the rl kind rolls out from `state` here
        state, metrics = program.step(state, batch) # jitted; metrics: scalar arrays, "loss" required
        ... every logging.every steps: one device_get of the accumulated metrics -> progress / jsonl / TensorBoard
        ... every train.eval_every steps: program.evaluate(state) -> dict of floats or None
        ... every checkpoint.every steps: orbax save of `state`, batches.get_state() and the config
    summary = program.finish(state, ctx.workdir)   # e.g. the RM's held-out ranking accuracy
    export = program.export(state)                 # full params of program.model_config, for later stages

`state` is any pytree of arrays that orbax can save and restore (normally train.state.TrainState); everything the
loop must not lose on a kill lives either in `state` (device arrays) or in `batches.get_state()` (JSON-able host state,
e.g. the data iterator position, a running reward std or an adaptive KL coefficient).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Protocol

import jax
import numpy as np

from starling_jax.config import OBJECTIVE_KINDS, Experiment, ModelSection, RewardModelSection
from starling_jax.models.config import ModelConfig
from starling_jax.models import Params

Batch = dict[str, np.ndarray]
Metrics = dict[str, Any]  # name -> scalar (a jax array inside the step; floats once fetched)


class BatchSource(Protocol):
    """The stage's input stream. Deterministic from the config's seeds and its own saved state."""

    def next_batch(self, state: Any) -> Batch:
        """The next training batch (dict of numpy arrays, leading dim train.batch_size). `state` is the current train
        state, which the rl kind uses to generate rollouts; data-driven kinds ignore it."""

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (saved in every checkpoint)."""

    def set_state(self, state: dict) -> None:
        """Continue from a position returned by get_state() (called once when resuming)."""


@dataclasses.dataclass(frozen=True)
class StageExport:
    """A finished stage's model as later stages see it ("stage:NAME" in model.path or reward_model.path)."""
    config: ModelConfig
    params: Params  # full params (merged if the stage trained only the top layers)
    summary: dict  # the stage's finish() summary


@dataclasses.dataclass
class StageContext:
    """What the loop hands to a stage kind's build function."""
    experiment: Experiment  # the whole experiment, all stages
    config: Experiment  # this stage's resolved view: its sections merged over the experiment's (config.stages == ())
    stage_name: str
    workdir: str  # WORKDIR/<stage name>: the stage may write files here (samples, plots); checkpoints live below it
    mesh: Optional[jax.sharding.Mesh]  # None on a single device
    load_stage: Callable[[str], StageExport]  # an earlier stage's exported model by name (loaded from disk if needed)


def _no_eval(state) -> Optional[dict]:
    return None


def _no_summary(state, workdir: str) -> dict:
    return {}


@dataclasses.dataclass
class StageProgram:
    """What one stage kind provides to the loop.

    state:   the initial train state (a pytree of arrays; normally train.state.TrainState(step, params, frozen,
             opt_state, rng)), already placed on the mesh. On resume the loop restores a checkpoint *over* it (its
             shapes, dtypes and shardings are the restore target).
    step:    jitted (state, batch) -> (state, metrics); metrics are scalar arrays and include "loss". It must not
             sync with the host (the loop fetches metrics every logging.every steps).
    batches: the BatchSource.
    export:  state -> full params of `model_config` (the stage's result, handed to later stages and saved at the end).
    model_config: the architecture of export(state).
    evaluate: state -> dict of floats (held-out metrics) or None; called every train.eval_every steps and at the end.
    finish:  (state, workdir) -> summary dict of JSON-able values, merged into WORKDIR/summary.json by `run`.
    tokens_per_batch: batch -> number of real tokens, for tokens/s (host-side numpy).
    flops_per_token: training FLOPs per real token (about 6 * trained params for fwd+bwd); 0 = no MFU reported.
    """
    state: Any
    step: Callable[[Any, Batch], tuple[Any, Metrics]]
    batches: BatchSource
    export: Callable[[Any], Params]
    model_config: ModelConfig
    evaluate: Callable[[Any], Optional[dict]] = _no_eval
    finish: Callable[[Any, str], dict] = _no_summary
    tokens_per_batch: Callable[[Batch], int] = lambda batch: count_tokens(batch)
    flops_per_token: float = 0.0


def count_tokens(batch: Batch) -> int:
    """Real (non-pad) tokens in a batch: the sum of every *attention_mask > 0 (or every *mask for rl batches)."""
    keys = [k for k in batch if k.endswith("attention_mask")] or [k for k in batch if k.endswith("mask")]
    return int(sum(int(np.count_nonzero(np.asarray(batch[k]))) for k in keys))


# ----------------------------------------------------------------------------------------------------------------------
# Registry.

STAGE_KINDS: dict[str, Callable[[StageContext], StageProgram]] = {}


# modules whose import registers each kind (imported lazily so a missing optional kind only fails when used)
KIND_MODULES = {
    "sft": "starling_jax.train.stages",
    "rm": "starling_jax.train.stages",
    "dpo": "starling_jax.train.stages",
    "rl": "starling_jax.train.rlaif",
}


def register_stage_kind(name: str):
    """Decorator: `@register_stage_kind("rl") def build(ctx: StageContext) -> StageProgram`."""
    def deco(fn):
        STAGE_KINDS[name] = fn
        return fn
    return deco


def stage_kind(objective_name: str) -> str:
    if objective_name not in OBJECTIVE_KINDS:
        raise KeyError(f"unknown objective {objective_name!r}; known objectives: {', '.join(OBJECTIVE_KINDS)}")
    return OBJECTIVE_KINDS[objective_name]


def build_program(ctx: StageContext) -> StageProgram:
    kind = stage_kind(ctx.config.objective.name)
    if kind not in STAGE_KINDS and kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])
    if kind not in STAGE_KINDS:
        raise KeyError(f"stage {ctx.stage_name!r}: no stage kind {kind!r} is registered (known: {sorted(STAGE_KINDS)})")
    return STAGE_KINDS[kind](ctx)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers every kind needs.

def load_model(ctx: StageContext, section: ModelSection | RewardModelSection, key: jax.Array
               ) -> tuple[ModelConfig, Params]:
    """(config, params) of a model section: "stage:NAME" -> that stage's export; a directory -> Hugging Face weights
    (starling_jax.hf.load, placed on ctx.mesh); None -> random init of section.config from `key`."""
    path = section.path
    if path is not None and path.startswith("stage:"):
        exported = ctx.load_stage(path[len("stage:"):])
        # A copy: this stage's train state is donated to its step, and a later stage may load the same export
        # (tiny_starling: rm and policy both start from "stage:sft"); aliasing it would leave them deleted arrays.
        return exported.config, jax.tree.map(jax.numpy.copy, exported.params)
    if path is not None:
        from starling_jax import hf  # imported lazily: converting weights is not needed for random-init runs
        return hf.load(path, mesh=ctx.mesh)
    if ctx.mesh is not None:  # created directly in its shards: no host ever holds the whole model
        from starling_jax.models import param_specs
        from starling_jax.sharding import init_sharded
        return section.config, init_sharded(param_specs(section.config), key, section.config.init_std, ctx.mesh,
                                            ctx.config.mesh.rules)
    from starling_jax.models import init_params
    return section.config, init_params(section.config, key)
