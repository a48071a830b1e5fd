"""Orbax checkpoints of a stage: WORKDIR/<stage>/checkpoints/<step>/{state, data, config, digests.json}, keeping the
newest N, and the stage's exported model WORKDIR/<stage>/export/{params, model_config.json, summary.json,
digests.json} for later stages.

A checkpoint holds the train state pytree (params, frozen, optimizer state, step, rng), the data stream's position
(JSON) and the experiment config (JSON, so a checkpoint directory says what produced it). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves no half checkpoint behind. Orbax
0.12 checksums only the index of a zarr3 shard, not the data (its codecs are fixed), so damage that keeps a file's
length would restore silently: once orbax has finalized a save, and before its rename commits it, process 0 writes
digests.json, the size and CRC-32 of every file (starling_jax.digests). A restore first checks them, each process the
files of its own shards (process 0 also the shared metadata), and the processes agree on the outcome; a checkpoint
that fails the check or the restore is moved aside with one warning naming the file, and the previous one is restored.
A stage export carries the same manifest, and loading a damaged one is an error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from starling_jax import digests
from starling_jax.errors import InputError
from starling_jax.files import write_json
from starling_jax.models import abstract_params
from starling_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: dict
    config: dict


def _abstract(tree):
    """Restore target: shapes, dtypes and shardings of `tree` (so arrays come back placed like the fresh state)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


_PROCESS_PART = re.compile(r"(?:ocdbt\.)?process_(\d+)")  # orbax's per-process folders and files
_MESSAGE_BYTES = 1024
# orbax's step metadata (item handler names, timestamps): rewritten when the save commits, after the digests; it holds
# no state (a damaged one fails the restore rather than changing what is restored)
_REWRITTEN_ON_COMMIT = ("_CHECKPOINT_METADATA",)


def _own_files(count: int, index: int) -> Callable[[str], bool]:
    """Which files of a checkpoint or export this process verifies: those under orbax's ocdbt.process_<i> (and
    array_metadatas/process_<i>) for i = this process (modulo the process count, for a checkpoint written by more
    processes); process 0 also everything else (the shared metadata, the JSON items)."""
    def own(rel: str) -> bool:
        for part in rel.split("/"):
            m = _PROCESS_PART.fullmatch(part)
            if m:
                return int(m.group(1)) % count == index
        return index == 0
    return own


def _agree(problem: Optional[str]) -> Optional[str]:
    """Several processes: every process gets the same answer, the first problem any process found (with its index),
    or None when none found one."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils
    raw = (problem or "").encode()[:_MESSAGE_BYTES]
    mine = np.zeros(_MESSAGE_BYTES, np.int32)
    mine[:len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    for i, row in enumerate(every):
        if row.any():
            text = bytes(row[row != 0].astype(np.uint8)).decode(errors="replace")
            return text if i == jax.process_index() else f"(found by process {i}) {text}"
    return None


def _verify_agreed(directory: str) -> tuple[Optional[str], bool]:
    """(the problem any process found in `directory`'s digests, or None; whether it has a manifest). Each process
    checks its own files (_own_files)."""
    try:
        verified = digests.verify(directory, _own_files(jax.process_count(), jax.process_index()))
        problem = None
    except digests.DigestMismatch as e:
        verified, problem = True, str(e)
    return _agree(problem), verified


def _say(message: str) -> None:
    if jax.process_index() == 0:
        log.warning(message)


class Checkpoints:
    """The stage's CheckpointManager. Saves are asynchronous; call wait() (or close()) before relying on one."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        # Orbax calls post_finalization_callback on process 0 after every process has written and the save is
        # finalized, before the rename that commits it: the manifest lands inside the checkpoint atomically.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digests))
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "config"))
        self._saving: Optional[int] = None  # the step being saved (orbax finishes one save before the next starts)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        self._manager.wait_until_finished()  # orbax does too; here so that _saving changes only between saves
        self._saving = step
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def _write_digests(self) -> None:
        """digests.json of the step being saved, in orbax's temporary directory (the final one where the storage
        commits in place); runs on process 0 in orbax's background thread."""
        step = str(self._saving)
        names = [n for n in os.listdir(self.directory)
                 if n.startswith(step + ".") and os.path.isdir(os.path.join(self.directory, n))]
        if not names and os.path.isdir(os.path.join(self.directory, step)):
            names = [step]
        if len(names) != 1:
            raise RuntimeError(f"{self.directory}: cannot tell which directory holds the checkpoint of step {step} "
                               f"being saved ({names or 'none'}); not committing it without digests")
        where = os.path.join(self.directory, names[0])
        files = [f for f in digests.list_files(where) if f not in _REWRITTEN_ON_COMMIT]
        digests.write_manifest(where, digests.digest_tree(where, files))

    def restore(self, step: int, like) -> Restored:
        """Checkpoint `step` after checking its digests (a DigestMismatch naming the damaged file, the same on every
        process); one without digests (saved before they were written) restores with a line saying so."""
        path = os.path.join(self.directory, str(step))
        problem, verified = _verify_agreed(path)
        if problem is not None:
            raise digests.DigestMismatch(problem, path)
        if not verified:
            _say(f"checkpoint {path} has no {digests.MANIFEST} (saved before checkpoints carried digests): restoring "
                 f"it unverified")
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like)),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return Restored(step=step, state=out["state"], data_state=out["data"], config=out["config"])

    def restore_latest(self, like) -> Optional[Restored]:
        """The newest checkpoint that passes its digests and restores, the same step on every process. A damaged one
        is moved aside to <directory>_corrupt/<step>.<time> (kept for inspection, and out of the way of the step that
        will be saved again) with one warning naming the file or the error. None when there is no checkpoint; an
        InputError when there were some and none restores."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored, problem = self.restore(step, like), None
            except digests.DigestMismatch as e:
                restored, problem = None, str(e)
            except Exception as e:  # orbax raises many kinds (ValueError, FileNotFoundError, tensorstore errors)
                restored, problem = None, f"{type(e).__name__}: {str(e)[:300]}"
            problem = _agree(problem)
            if problem is None:
                return restored
            path = os.path.join(self.directory, str(step))
            aside = os.path.join(self.directory + "_corrupt", f"{step}.{int(time.time())}")
            _say(f"checkpoint {path} could not be restored ({problem}); moved to {aside}; falling back to the "
                 f"previous checkpoint")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.move(path, aside)
            if jax.process_count() > 1:  # every process sees it gone before any lists the steps again
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"starling_jax checkpoint {path} set aside")
            self._manager.reload()
        if steps:
            raise InputError(f"{self.directory}: no checkpoint restores (steps {', '.join(map(str, steps))} were "
                             f"damaged and are moved to {self.directory}_corrupt; the warnings above name the files). "
                             f"Put back a good copy of the checkpoints, or run the same command again to start the "
                             f"stage over")
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

def save_export(directory: str, model_config: ModelConfig, params, summary: dict, adapters=None) -> None:
    """Write params (orbax), the ModelConfig and the stage summary; the summary goes last, marking the stage done.
    params None: a stage that trains no model (feedback) writes only its summary. adapters: a LoRA stage's
    (adapter tree, description) pair: the tree goes to adapters/ (orbax) and the description (its lora section, the
    base pointer) to lora.json, beside the merged params (load_adapters reads them back)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    for name, tree in (("params", params), ("adapters", None if adapters is None else adapters[0])):
        if tree is not None:
            ckptr.save(os.path.join(directory, name), tree, force=True)
            ckptr.wait_until_finished()
    if jax.process_index() != 0:  # every process writes its shards above; one writes the small files
        return
    if adapters is not None:
        write_json(os.path.join(directory, LORA_FILE), adapters[1], indent=1)
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(model_config), f, indent=1)
    tmp = os.path.join(directory, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    # the digests of every file (summary.json's from its temporary copy), then the summary that marks the export done
    entries = digests.digest_tree(directory, [f for f in digests.list_files(directory)
                                              if f not in ("summary.json", "summary.json.tmp")])
    entries["summary.json"] = digests.digest_file(tmp)
    digests.write_manifest(directory, entries)
    os.replace(tmp, os.path.join(directory, "summary.json"))


LORA_FILE = "lora.json"  # a LoRA stage's export: its lora section, adapted layers and base pointer


def load_adapters(directory: str) -> tuple[Any, dict]:
    """({"lora": the adapters {projection: {"a", "b"}} over every layer, "score": a reward model's score head}, lora.json's
    description) of a LoRA stage's export
    (save_export), after checking the export's digests; an InputError when the stage trained no adapters."""
    directory = os.path.abspath(directory)
    if not export_done(directory):
        raise FileNotFoundError(f"{directory} holds no finished stage export (no summary.json); run that stage first")
    if not os.path.isfile(os.path.join(directory, LORA_FILE)):
        raise InputError(f"{directory}: this stage trained no LoRA adapters (no {LORA_FILE}); convert it without "
                         f"--adapters (a Hugging Face directory of its weights)")
    problem, _ = _verify_agreed(directory)
    if problem is not None:
        raise digests.DigestMismatch(f"{problem}; the stage export {directory} is damaged", directory)
    meta = _read_json(os.path.join(directory, LORA_FILE))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckptr = ocp.StandardCheckpointer()
    shapes = ckptr.metadata(os.path.join(directory, "adapters"))
    shapes = getattr(shapes, "item_metadata", shapes)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), shapes,
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    return ckptr.restore(os.path.join(directory, "adapters"), target), meta


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
    problem, verified = _verify_agreed(directory)
    if problem is not None:
        raise digests.DigestMismatch(f"{problem}; the stage export {directory} is damaged: delete it and run the "
                                     f"stage again (it resumes from its last checkpoint)", directory)
    if not verified:
        _say(f"stage export {directory} has no {digests.MANIFEST} (exported before exports carried digests): loading "
             f"it unverified")
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
