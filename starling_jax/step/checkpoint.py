"""Orbax checkpoints of a stage: WORKDIR/<stage>/checkpoints/<step>/{state, data, config}, keeping the newest N, and
the stage's exported model WORKDIR/<stage>/export/{params, model_config.json, summary.json} for later stages.

A checkpoint holds the train state pytree (params, frozen, optimizer state, step, rng), the data stream's position
(JSON) and the experiment config (JSON, so a checkpoint directory says what produced it). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves no half checkpoint behind; a
checkpoint damaged afterwards (e.g. a truncated file) fails to restore and we fall back to the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from starling_jax.errors import InputError
from starling_jax.files import write_json
from starling_jax.models import abstract_params
from starling_jax.models.config import ModelConfig


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: dict
    config: dict


def _abstract(tree):
    """Restore target: shapes, dtypes and shardings of `tree` (so arrays come back placed like the fresh state)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The stage's CheckpointManager. Saves are asynchronous; call wait() (or close()) before relying on one."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "config"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, like) -> Restored:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like)),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return Restored(step=step, state=out["state"], data_state=out["data"], config=out["config"])

    def restore_latest(self, like) -> Optional[Restored]:
        """The newest checkpoint that restores. A damaged one is moved aside to <directory>_corrupt/<step> (kept for
        inspection, and out of the way of the step that will be saved again) with a warning. None when there is none."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, like)
            except Exception as e:  # orbax raises many kinds (ValueError, FileNotFoundError, tensorstore errors)
                path = os.path.join(self.directory, str(step))
                aside = os.path.join(self.directory + "_corrupt", f"{step}.{int(time.time())}")
                warnings.warn(f"checkpoint {path} could not be restored ({type(e).__name__}: {str(e)[:300]}); "
                              f"moved to {aside}; falling back to the previous checkpoint", stacklevel=2)
                if jax.process_index() == 0:
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    shutil.move(path, aside)
                self._manager.reload()
        return None

    def delete_all(self) -> None:
        """Remove every checkpoint (starting over with checkpoint.resume = False)."""
        for step in self.steps():
            self._manager.delete(step)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ----------------------------------------------------------------------------------------------------------------------
# A finished stage's exported model.

def save_export(directory: str, model_config: ModelConfig, params, summary: dict) -> None:
    """Write params (orbax), the ModelConfig and the stage summary; the summary goes last, marking the stage done.
    params None: a stage that trains no model (feedback) writes only its summary."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if params is not None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(directory, "params"), params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() != 0:  # every process writes its shards above; one writes the small files
        return
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(model_config), f, indent=1)
    write_json(os.path.join(directory, "summary.json"), summary, indent=1)


def export_done(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "summary.json"))


def load_export(directory: str, shardings=None) -> tuple[ModelConfig, Any, dict]:
    """(model_config, params, summary) written by save_export. `shardings`: a tree like the params, or a function
    ModelConfig -> such a tree, placing each parameter as it is read (default: all on the first device)."""
    directory = os.path.abspath(directory)
    if not export_done(directory):
        raise FileNotFoundError(f"{directory} holds no finished stage export (no summary.json); run that stage first")
    if not os.path.isdir(os.path.join(directory, "params")):
        raise FileNotFoundError(f"{directory}: that stage exports no model (a feedback stage writes rows: read them "
                                f"with data.source='stage:NAME', not model.path)")
    config = ModelConfig(**_read_json(os.path.join(directory, "model_config.json"), "ModelConfig"))
    summary = _read_json(os.path.join(directory, "summary.json"))
    target = abstract_params(config)
    if callable(shardings):
        shardings = shardings(config)
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target,
                                        shardings)
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
    except Exception as e:  # orbax/tensorstore raise many kinds for damaged or missing files
        root = e
        while root.__cause__ is not None or root.__context__ is not None:  # the innermost error says what broke
            root = root.__cause__ or root.__context__
        detail = (str(root).strip().splitlines() or [type(root).__name__])[0][:300]
        raise InputError(f"{directory}/params: the exported parameters cannot be read ({detail}); the export is "
                         f"damaged: delete {directory} and run the stage again (it resumes from its last "
                         f"checkpoint)") from e
    return config, params, summary


def _read_json(path: str, fields_of: Optional[str] = None) -> dict:
    """A JSON object from an export file, or an InputError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: damaged ({e}); delete the export directory and run the stage again") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if fields_of == "ModelConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:
            raise InputError(f"{path}: unknown ModelConfig field(s) {', '.join(unknown)} (written by another "
                             f"version?)")
    return data
