"""What one stage kind (sft, rm, dpo, rl) provides to the one training loop (starling_jax.stages.loop).

A stage kind is a function `build(ctx: StageContext) -> StageProgram`, registered once under a name by the module
that implements it (`@register_stage_kind("rl")`; the package stages/kinds/ imports every module in it). The objective's
algorithm (starling_jax/algorithms/, Algorithm.kind) picks the kind: sft -> "sft", rm_* -> "rm", dpo -> "dpo",
apa/ppo -> "rl". The loop then does, for every kind alike:

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
import hashlib
import json
import os
import weakref
from typing import Any, Callable, Optional, Protocol, Union

import jax
import numpy as np

from starling_jax import digests
from starling_jax.algorithms import registry
from starling_jax.config import Experiment, ModelSection, RewardModelSection
from starling_jax.errors import InputError, did_you_mean
from starling_jax.io import hf, hub
from starling_jax.models import Params, init_params, param_specs, quantized_base, quantized_specs
from starling_jax.models.quantize import INPUT_AXES, is_quantized
from starling_jax.models.config import ModelConfig, architecture_conflicts
from starling_jax.parallel.sharding import init_sharded, param_shardings
from starling_jax.step import adapters
from starling_jax.step.step import jit_step

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
    params: Optional[Params]  # full params (merged if the stage trained only the top layers); None: no model
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
    export: Optional[Callable[[Any], Params]]  # None: the stage trains no model (feedback) and exports none
    model_config: ModelConfig
    evaluate: Callable[[Any], Optional[dict]] = _no_eval
    finish: Callable[[Any, str], dict] = _no_summary
    tokens_per_batch: Callable[[Batch], int] = lambda batch: count_tokens(batch)
    flops_per_token: float = 0.0
    setup: Optional["StageSetup"] = None  # the shared train/plan setup the program was built on (see StageSetup)
    # A LoRA stage (model.lora): the pointer to its frozen base (base_pointer). Its checkpoints then hold the train
    # state without `frozen` (the adapters, trained heads and their optimiser state) plus this pointer, and a resume
    # checks that the base it loads now is that one (stages/loop.py).
    base: Optional[dict] = None
    # A LoRA stage: state -> ({"lora": its adapters over every layer, "score": a reward model's head}, the lora section
    # and base pointer as a dict): written beside the merged export (export/adapters, export/lora.json) for
    # `convert --adapters`
    adapters: Optional[Callable[[Any], tuple[Params, dict]]] = None


def count_tokens(batch: Batch) -> int:
    """Real (non-pad) tokens in a batch: the sum of every *attention_mask > 0 (or every *mask for rl batches)."""
    keys = [k for k in batch if k.endswith("attention_mask")] or [k for k in batch if k.endswith("mask")]
    return int(sum(int(np.count_nonzero(np.asarray(batch[k]))) for k in keys))


class LastEvaluation:
    """A stage's most recent evaluate() result, for its finish() to reuse: the loop's final evaluate() runs on the
    final state, so when finish() measures the same thing (`what`: a split's name) with that very state, it reports
    the kept result instead of measuring again. The state is held by a weak reference: an evaluated state is never
    kept alive by it, and a state with the same values is not the same state (finish() measures it)."""

    def __init__(self):
        self._kept = None

    def keep(self, state, what, result):
        """Remember `result` as the evaluation of `what` with `state`; returns `result`."""
        self._kept = (weakref.ref(state), what, result)
        return result

    def of(self, state, what):
        """The kept result when it is `what` measured with this very `state`, else None."""
        if self._kept is None:
            return None
        ref, kept_what, result = self._kept
        return result if ref() is state and kept_what == what else None


# ----------------------------------------------------------------------------------------------------------------------
# Registry.

@dataclasses.dataclass(frozen=True)
class PhaseCall:
    """One compiled call a stage runs between its steps (an rl stage's generate call, reward-model scoring, experience
    pass), in the form the planner compiles it: fn(*resident, *inputs). `resident` are trees that stay on the devices
    anyway (parts of the train state, the reward model), `inputs` the call's own arguments (prompts, tokens); both as
    ShapeDtypeStructs, with their shardings. fn is the function the stage calls (jitted or not)."""
    fn: Callable
    resident: tuple
    resident_shardings: tuple
    inputs: tuple
    input_shardings: tuple
    note: str = ""


@dataclasses.dataclass(frozen=True)
class StageSetup:
    """A stage's trees, shardings, optimiser and (unjitted) update step: what training and planning share.

    A stage kind's `setup(config, model_config, params, mesh, key)` builds it from the stage's resolved config and
    the model's params given either as arrays (the loop: the state is created in its shards) or as
    ShapeDtypeStructs (the planner: nothing is allocated). Training and `starling-jax plan` call the same function,
    so the planned schedule, shardings and step are the trained ones.
    """
    state: Any  # TrainState of arrays, or of ShapeDtypeStructs when the params were abstract
    state_shardings: Any  # TrainState of NamedShardings
    optimizer: Any  # train.state.Optimizer
    total_updates: int  # optimiser updates the learning-rate schedule spans
    update: Callable  # (state, batch) -> (state, metrics), not jitted
    loss: Callable  # the algorithm's loss as the update calls it
    batch: dict  # ShapeDtypeStructs of one global batch
    batch_shardings: dict
    resident: dict = dataclasses.field(default_factory=dict)  # name -> (abstract tree, shardings): other live state
    notes: tuple = ()  # human-readable facts (the planner prints them)
    between_steps: dict = dataclasses.field(default_factory=dict)  # name -> PhaseCall (`plan --rollout` compiles them)

    def jit(self, mesh) -> Callable:
        """The update jitted with the state donated and the setup's in/out shardings (step/step.py jit_step)."""
        return jit_step(self.update, mesh, self.state_shardings, self.batch_shardings)


def layers_note(top: int, num_layers: int) -> str:
    """"all layers" or "top N of L layers" (model.trainable_top_layers), for setup notes."""
    return "all layers" if top in (0, num_layers) else f"top {top} of {num_layers} layers"


def is_abstract(tree) -> bool:
    """True when every leaf of `tree` is a jax.ShapeDtypeStruct (planning), False for arrays (training)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


@dataclasses.dataclass(frozen=True)
class StageKind:
    """A registered stage kind: `build(ctx)` makes the training program of a stage whose algorithm has this kind;
    `setup(config, model_config, params, mesh, key) -> StageSetup` (optional) is the part the planner shares.

    check(config, algorithm, earlier) -> [(field, message)]: the kind's own checks of a stage's resolved config, run
      by validation after the checks every stage gets (earlier: {earlier stage name: its Algorithm or None}).
    reads: the model sections a stage of this kind loads (validation checks their template, tokenizer and path): a
      tuple, or a function of the stage's config returning one where that depends on the config (reads_of).
    writes_rows: its stages write Nectar rows that a later stage reads as data.source = "stage:NAME"."""
    name: str
    build: Callable[[StageContext], StageProgram]
    setup: Optional[Callable[..., StageSetup]] = None
    check: Optional[Callable[..., list]] = None
    reads: Union[tuple[str, ...], Callable[..., tuple[str, ...]]] = ("model",)
    writes_rows: bool = False

    def reads_of(self, config) -> tuple[str, ...]:
        """The model sections a stage of this kind with the resolved `config` loads."""
        return tuple(self.reads(config)) if callable(self.reads) else self.reads


STAGE_KINDS: dict[str, StageKind] = {}  # kind name -> its StageKind


def register_stage_kind(name: str, setup: Optional[Callable[..., StageSetup]] = None,
                        check: Optional[Callable[..., list]] = None,
                        reads: Union[tuple[str, ...], Callable[..., tuple[str, ...]]] = ("model",),
                        writes_rows: bool = False):
    """Decorator: `@register_stage_kind("rl", setup=rl_setup, check=check_rl) def build(ctx: StageContext) ->
    StageProgram` registers the kind once (the fields: StageKind). Re-registering a name replaces it only with an
    equal kind."""
    def deco(fn):
        kind = StageKind(name, fn, setup, check, reads if callable(reads) else tuple(reads), writes_rows)
        old = STAGE_KINDS.get(name)
        if old is not None and old != kind:
            raise ValueError(f"stage kind {name!r} is already registered")
        STAGE_KINDS[name] = kind
        return fn
    return deco


def get_kind(name: str) -> StageKind:
    """The stage kind registered as `name`; a KeyError names the close matches otherwise."""
    try:
        return STAGE_KINDS[name]
    except KeyError:
        raise KeyError(f"no stage kind {name!r} is registered; {did_you_mean(name, sorted(STAGE_KINDS))}") from None


def stage_kind(objective_name: str) -> str:
    """The stage kind that trains objective `objective_name` (its registered Algorithm.kind)."""
    return registry.get(objective_name).kind


def build_program(ctx: StageContext) -> StageProgram:
    """The StageProgram of ctx's stage, built by the stage kind of its objective's algorithm."""
    return get_kind(stage_kind(ctx.config.objective.name)).build(ctx)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers every kind needs.

def base_pointer(ctx: StageContext, section: ModelSection) -> dict:
    """Which base a LoRA stage's adapters belong to: the model.path it loads and a digest of that source's files
    (a stage export's or a converted directory's digests.json; a directory without one: its files' names and sizes),
    or for a random init the seed and the architecture. Two pointers are equal iff the same base is loaded."""
    path = section.path
    if path is None:
        return {"path": None, "seed": ctx.config.train.seed, "config": dataclasses.asdict(section.config)}
    if path.startswith("stage:"):
        directory = os.path.join(os.path.dirname(ctx.workdir), path[len("stage:"):], "export")
    else:
        directory = hub.resolve(path) if path.startswith("hf:") else path
    manifest = digests.read_manifest(directory)
    if manifest is None:  # a directory from the Hub or transformers: what its files are, by name and size
        manifest = {f: os.path.getsize(os.path.join(directory, f)) for f in digests.list_files(directory)}
    text = json.dumps(manifest, sort_keys=True).encode()
    return {"path": path, "digest": hashlib.sha256(text).hexdigest()}


def adapter_export(c: Experiment, model_config: ModelConfig, base: dict) -> Callable[[Any], tuple[Params, dict]]:
    """StageProgram.adapters of a LoRA stage (step/adapters.py trees): state -> ({"lora": the adapters over all L
    layers, "score": a reward model's score head}, {"lora": the lora section with the adapted layer indices, "base":
    the pointer})."""
    lora, top = c.model.lora, c.model.trainable_top_layers
    opts = adapters.options(lora, model_config, top)
    layers = list(range(model_config.num_layers)) if opts.layers is None else list(opts.layers)
    meta = {"lora": {**dataclasses.asdict(lora), "targets": list(lora.targets), "layers": layers},
            "base": base}

    def export(state) -> tuple[Params, dict]:
        score = {"score": state.params["score"]} if "score" in state.params else {}  # a reward model's head
        return {"lora": adapters.full_adapters(state.params, model_config), **score}, meta
    return export


# What to do when a section's stated architecture is not its checkpoint's (load_model and validation say it alike).
ARCHITECTURE_FIX = ("state the checkpoint's architecture in {name}.config (the checkpoint decides it; the config "
                    "decides param_dtype, dtype, remat, attention, quantize), or leave {name}.config at its default "
                    "to run the checkpoint as it is")


def load_model(ctx: StageContext, section: ModelSection | RewardModelSection, key: jax.Array,
               frozen_layers: bool = False) -> tuple[ModelConfig, Params]:
    """(config, params) of a model section: "stage:NAME" -> that stage's export; a directory or "hf:ORG/NAME" ->
    Hugging Face weights (starling_jax.io.hf.load, placed on ctx.mesh); None -> random init of section.config from
    `key`.

    frozen_layers: the caller never uses this model's layer matrices dense: it stores every one of them frozen, as
    config.quantize says (an rl stage's reward model, quantize_frozen; a model trained through LoRA adapters whose
    critic copies no layers, step/adapters.py). Then, when config.quantize is not "none", a Hugging Face checkpoint's
    layers are quantized while they are read (hf.load(quantize=...): one layer at a time on the host, only codes and
    scales placed), so the dense layer stack never exists on a device; the arrays are the ones quantizing after a
    dense load would give, bit for bit, and quantized_base leaves them as they are. A stage export or a random init
    is built dense as before and quantized where the stage's trees are made.

    With a path the checkpoint decides the architecture and a stated section.config how the model runs and is
    stored (ModelConfig.run_as: param_dtype, dtype, remat, attention, ...; the parameters are read or cast into its
    param_dtype), so the run is the one `plan` and validation saw; a stated architecture that is not the
    checkpoint's is an InputError naming the fields. A config left at the section's default states nothing: the
    checkpoint runs as it is (ModelSection docstring), stored unquantized."""
    path = section.path
    if path is None:
        if ctx.mesh is not None:  # created directly in its shards: no host ever holds the whole model
            return section.config, init_sharded(param_specs(section.config), key, section.config.init_std,
                                                ctx.mesh, ctx.config.mesh.rules)
        return section.config, init_params(section.config, key)
    stated, export = section.stated_config(), path.startswith("stage:")
    if export:
        exported = ctx.load_stage(path[len("stage:"):])
        config, params = exported.config, exported.params
    else:  # read straight into the stated storage dtype (None: the checkpoint's)
        config, params = hf.load(path, dtype=section.config.param_dtype if stated else None, mesh=ctx.mesh,
                                 rules=ctx.config.mesh.rules,
                                 quantize=section.config.quantize if frozen_layers else "none",
                                 quantize_block=section.config.quantize_block)
    if stated:
        conflicts = architecture_conflicts(section.config, config)
        if conflicts:
            name = "reward_model" if isinstance(section, RewardModelSection) else "model"
            raise InputError(f"stage {ctx.stage_name!r}: {name}.config is not the architecture of "
                             f"{name}.path={path!r}: {', '.join(conflicts)}; {ARCHITECTURE_FIX.format(name=name)}")
        config = config.run_as(section.config)
    else:  # how a frozen base is stored is this run's choice, not the checkpoint's: the section's ("none")
        config = config.replace(quantize=section.config.quantize, quantize_block=section.config.quantize_block)
    if export:
        # A copy (a cast into the stated param_dtype copies too): this stage's train state is donated to its step,
        # and a later stage may load the same export (tiny_starling: rm and policy both start from "stage:sft");
        # aliasing it would leave them deleted arrays.
        dtype = jax.numpy.dtype(config.param_dtype) if stated else None  # None: as exported
        params = jax.tree.map(lambda x: jax.numpy.copy(x) if dtype is None or x.dtype == dtype else x.astype(dtype),
                              params)
    return config, params


def quantize_frozen(ctx: StageContext, config: ModelConfig, params: Params) -> Params:
    """A model that never trains (an RL stage's reward model) with its layers stored as config.quantize says
    (models.quantized_base), placed in the shards of its quantized specs; the dense arrays are donated. "none", or
    layers already quantized (load_model(frozen_layers=True) read them so, in these shards): the params as they
    are."""
    layers = params.get("layers", {})
    if config.quantize == "none" or all(is_quantized(layers[k]) for k in INPUT_AXES if k in layers):
        return params
    shardings = None if ctx.mesh is None else param_shardings(quantized_specs(param_specs(config), config), ctx.mesh,
                                                              ctx.config.mesh.rules)
    return jax.jit(lambda p: quantized_base(p, config), out_shardings=shardings, donate_argnums=0)(params)
