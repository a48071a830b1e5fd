"""Digests (starling_jax.digests) on everything written to be read back: a checkpoint, a stage export and a converted
Hugging Face directory each carry digests.json, and bytes flipped in place (same length: what a bad disk or copy does,
and what orbax/tensorstore and safetensors do not notice) are found before the data is used. A checkpoint falls back
to the previous one; an export or converted directory is an error naming the file. The end-to-end checkpoint case
(the fallback reproduces an uninterrupted run's losses) is tests/test_loop.py::test_flipped_bytes_in_the_newest_
checkpoint_fall_back_and_match."""

import json
import logging
import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from file_damage import flip

from starling_jax import digests, models
from starling_jax.commands import cli
from starling_jax.io import hf
from starling_jax.errors import InputError
from starling_jax.step import checkpoint
from starling_jax.step.checkpoint import Checkpoints, load_export, save_export


@pytest.fixture
def said():
    """The package's log lines (the CLI stops them propagating to the root logger, so caplog may miss them)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("starling_jax")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def largest_file(directory) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs if f != digests.MANIFEST]
    return max(files, key=os.path.getsize)


def test_crc32_is_the_standard_one_in_any_chunking(tmp_path, monkeypatch):
    (tmp_path / "check").write_bytes(b"123456789")
    assert digests.digest_file(str(tmp_path / "check")) == {"bytes": 9, "crc32": "cbf43926"}  # CRC-32's check value
    data = np.random.default_rng(0).bytes(100_003)
    (tmp_path / "big").write_bytes(data)
    monkeypatch.setattr(digests, "_CHUNK", 4096)  # many chunks, the last one short
    assert digests.digest_file(str(tmp_path / "big")) == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def test_verify_names_the_missing_resized_or_changed_file(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name, text in (("a.bin", b"a" * 5000), ("sub/b.json", b'{"x": 1}'), ("c", b"")):
        (d / name).write_bytes(text)
    assert not digests.verify(str(d))  # no manifest: nothing checked, and the caller says so
    digests.write_manifest(str(d), digests.digest_tree(str(d)))
    assert sorted(json.loads((d / digests.MANIFEST).read_text())["files"]) == ["a.bin", "c", "sub/b.json"]
    assert digests.verify(str(d))
    (d / "README.md").write_text("added later")  # not listed: not checked
    assert digests.verify(str(d))
    (d / "sub" / "b.json").write_bytes(b'{"x": 2}')  # same length
    with pytest.raises(digests.DigestMismatch, match=r"sub/b\.json: crc32 [0-9a-f]{8} differs from the [0-9a-f]{8}"):
        digests.verify(str(d))
    assert digests.verify(str(d), select=lambda rel: rel != "sub/b.json")  # what another process checks
    (d / "sub" / "b.json").write_bytes(b'{"x": 1}')
    (d / "a.bin").write_bytes(b"a" * 4000)
    with pytest.raises(digests.DigestMismatch, match=r"a\.bin: 4000 bytes, 5000 when it was written"):
        digests.verify(str(d))
    os.remove(d / "a.bin")
    with pytest.raises(digests.DigestMismatch, match=r"a\.bin: missing"):
        digests.verify(str(d))
    (d / digests.MANIFEST).write_text('{"files": ')
    with pytest.raises(digests.DigestMismatch, match=r"digests\.json: damaged digest manifest"):
        digests.verify(str(d))


def test_each_process_verifies_its_own_shards_and_process_0_the_rest():
    files = ["state/ocdbt.process_0/d/aa", "state/ocdbt.process_1/d/bb", "state/ocdbt.process_3/manifest.ocdbt",
             "state/array_metadatas/process_1", "state/_METADATA", "state/manifest.ocdbt", "data/metadata"]
    owners = {f: [i for i in range(2) if checkpoint._own_files(2, i)(f)] for f in files}
    assert owners == {"state/ocdbt.process_0/d/aa": [0], "state/ocdbt.process_1/d/bb": [1],
                      "state/ocdbt.process_3/manifest.ocdbt": [1],  # written by 4 processes, read by 2
                      "state/array_metadatas/process_1": [1], "state/_METADATA": [0], "state/manifest.ocdbt": [0],
                      "data/metadata": [0]}
    assert all(checkpoint._own_files(1, 0)(f) for f in files)


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)  # random floats: incompressible, like trained weights
    return {"params": {"w": jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32),  # most of the data file
                       "b": jnp.asarray(rng.standard_normal(7), jnp.float32)},
            "step": jnp.asarray(step, jnp.int32)}


def _saved(directory, steps=(1, 2)) -> Checkpoints:
    ckpts = Checkpoints(str(directory), keep=5)
    for s in steps:
        ckpts.save(s, _state(s), {"position": s}, {"name": "t"})
    ckpts.wait()
    return ckpts


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_checkpoints_carry_digests_of_every_file_written_before_the_commit(tmp_path):
    ckpts = _saved(tmp_path / "ckpt")
    for step in (1, 2):
        d = tmp_path / "ckpt" / str(step)
        listed = set(json.loads((d / digests.MANIFEST).read_text())["files"])
        # all but orbax's step metadata and commit marker, both rewritten / written when the save commits
        assert set(digests.list_files(str(d))) - listed == {"_CHECKPOINT_METADATA", "commit_success.txt"}
        assert any("ocdbt.process_0/d/" in f for f in listed)
        assert digests.verify(str(d))
    assert not [n for n in os.listdir(tmp_path / "ckpt") if "tmp" in n]
    ckpts.close()


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous(tmp_path, said):
    ckpts = _saved(tmp_path / "ckpt")
    damaged = largest_file(tmp_path / "ckpt" / "2")
    flip(damaged)
    restored = ckpts.restore_latest(_state(0))
    assert restored.step == 1 and restored.data_state == {"position": 1} and _equal(restored.state, _state(1))
    warnings = [line for line in said if "could not be restored" in line]
    assert len(warnings) == 1, said
    assert damaged in warnings[0] and "crc32" in warnings[0] and "falling back to the previous" in warnings[0]
    assert ckpts.steps() == [1]
    aside = os.listdir(tmp_path / "ckpt_corrupt")
    assert len(aside) == 1 and aside[0].startswith("2.")
    # step 2 is saved again without trouble (the damaged one is out of the way)
    ckpts.save(2, _state(2), {"position": 2}, {"name": "t"})
    ckpts.wait()
    assert _equal(ckpts.restore_latest(_state(0)).state, _state(2))
    ckpts.close()


def test_no_good_checkpoint_left_is_a_clear_error(tmp_path, said):
    ckpts = _saved(tmp_path / "ckpt")
    for step in (1, 2):
        flip(largest_file(tmp_path / "ckpt" / str(step)), n=8)
    with pytest.raises(InputError, match=r"ckpt: no checkpoint restores \(steps 1, 2 were damaged and are moved to "
                                         r".*ckpt_corrupt"):
        ckpts.restore_latest(_state(0))
    assert len([line for line in said if "could not be restored" in line]) == 2
    assert ckpts.steps() == []
    ckpts.close()
    assert Checkpoints(str(tmp_path / "empty")).restore_latest(_state(0)) is None  # none at all: a fresh start


def test_a_checkpoint_without_digests_restores_with_one_line(tmp_path, said):
    """A checkpoint saved before digests existed still restores, saying so in one line. (Without digests, bytes
    flipped inside a compressed block are restored as other values or fail in zstd, depending on where they land: the
    digests are what make the outcome certain, test_loop.py's fall-back test.)"""
    ckpts = _saved(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "2" / digests.MANIFEST)
    restored = ckpts.restore_latest(_state(0))
    assert restored.step == 2 and _equal(restored.state, _state(2))
    assert [line for line in said if "unverified" in line] == [
        f"checkpoint {tmp_path / 'ckpt' / '2'} has no digests.json (saved before checkpoints carried digests): "
        f"restoring it unverified"]
    ckpts.close()


def _export(directory, seed=0) -> tuple:
    config = models.get_preset("tiny")
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))  # no compilation
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
    save_export(str(directory), config, params, {"stage": "sft"})
    return config, params


def test_stage_export_digests_and_a_flip_is_an_error_naming_the_file(tmp_path, said):
    export = tmp_path / "run" / "sft" / "export"
    config, params = _export(export)
    listed = json.loads((export / digests.MANIFEST).read_text())["files"]
    assert set(listed) == set(digests.list_files(str(export))) and {"summary.json", "model_config.json"} <= set(listed)
    loaded_config, loaded, summary = load_export(str(export))
    assert loaded_config == config and _equal(loaded, params) and summary == {"stage": "sft"}
    assert not said
    damaged = largest_file(export / "params")
    flip(damaged)
    expected = re.escape(damaged) + r": crc32 .* the stage export .*export is damaged: delete it and run the stage again"
    with pytest.raises(digests.DigestMismatch, match=expected):
        load_export(str(export))
    # what a later stage, generate and convert say: one line, exit 2
    status = cli.main(["convert", str(tmp_path / "run" / "sft" / "export"), str(tmp_path / "out")])
    assert status == 2 and not (tmp_path / "out").exists()


def test_an_export_without_digests_loads_with_one_line(tmp_path, said):
    export = tmp_path / "export"
    _, params = _export(export)
    os.remove(export / digests.MANIFEST)
    _, loaded, _ = load_export(str(export))
    assert _equal(loaded, params)
    assert said == [f"stage export {export} has no digests.json (exported before exports carried digests): loading it "
                    f"unverified"]


def test_convert_output_carries_digests_and_a_flip_is_an_error_naming_the_file(tmp_path, capsys):
    out = str(tmp_path / "hf")
    assert cli.main(["convert", "preset:tiny", out]) == 0
    assert "digests.json" in capsys.readouterr().out
    listed = json.loads(open(os.path.join(out, digests.MANIFEST)).read())["files"]
    assert sorted(listed) == ["config.json", "model.safetensors"]
    config, _ = hf.load(out)
    assert config.num_layers == models.get_preset("tiny").num_layers
    flip(os.path.join(out, "model.safetensors"))
    with pytest.raises(hf.HFFormatError, match=r"hf/model\.safetensors: crc32 .* re-convert or re-copy the directory"):
        hf.load(out)
    assert cli.main(["convert", out, str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hf/model.safetensors: crc32" in err and "Traceback" not in err
    # --overwrite replaces the manifest with the new files' digests
    assert cli.main(["convert", "preset:tiny", out, "--overwrite", "--seed", "1"]) == 0
    assert hf.load(out)[0].num_layers == config.num_layers
