"""A study's raw results as a compact folder the repository keeps, and the report regenerated from it alone (the
check that every figure a document quotes equals the regenerated one: starling_jax.commands.study.quotes).

    starling-jax study experiments/studies/NAME.py --workdir D --export-raw results/NAME
    starling-jax study experiments/studies/NAME.py --report-only --raw results/NAME [--workdir OUT]

The folder (FORMAT, version 1):
    study.json            {"format", "version", "study" (its name), "study_file" (NAME.py under experiments/studies),
                           "baseline", "arms", "seeds", "primary" (the study's preregistered comparisons when
                           exported), "cells" (every cell file, relative), "shared_wall_s" {seed: seconds}}
    ARM/seedS.jsonl.gz    one cell: gzip'd JSON lines, first a header {"arm", "seed", "quick", "wall_s",
                           "train_wall_s", "reused_from", "summary" (the stages' numeric summaries), "samples" (the
                           first 3 replies per policy and reference group), optionally "config_sha256" (the
                           digest of the cell's experiment as it ran: `--reuse` adopts only identical cells)}, then
                           one line per prompt and group
                           {"group": "policy/heldout", "row": i, "prompt": "...", metric: value, ...}; a missing
                           value (NaN) is null
    results.md, results.json, results.png   the report regenerated from the above (`--report-only --raw`)
Files are written deterministically (sorted keys, gzip without a time stamp), so the same records give the same
bytes, and the report (bootstrap seeded) the same results.md. Reading validates everything and names the file, line
and field of the first problem (RawError); nothing is skipped.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import math
import os
import re
from typing import Callable, Optional

from starling_jax.commands.study import SPLITS, Study
from starling_jax.commands.study.report import aggregate, short_source
from starling_jax.files import write_atomic

FORMAT = "starling-jax study raw results"
VERSION = 1
STUDY_JSON = "study.json"
SAMPLES_KEPT = 3
HEADER_FIELDS = {"arm", "seed", "quick", "wall_s", "train_wall_s", "reused_from", "summary", "samples"}
# optional: the SHA-256 of the cell's experiment as it ran (runner.config_digest), which lets `--reuse RAW` adopt
# the cell into a workdir whose cell is the identical experiment (a study finished across machines)
OPTIONAL_HEADER_FIELDS = {"config_sha256"}
STUDY_FIELDS = {"format", "version", "study", "study_file", "baseline", "arms", "seeds", "primary", "cells",
                "shared_wall_s"}


class RawError(ValueError):
    """A raw results folder that cannot be read as written: the message names the file, line and field."""


# ----------------------------------------------------------------------------------------------------------------------
# Writing.

def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, data)


def _json_line(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _finite(x):
    """x with NaN and infinities as None (JSON has no NaN)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _numeric(tree):
    """The numbers (and nested dicts of numbers) of a stage summary; text, lists and paths are left out."""
    if isinstance(tree, dict):
        kept = {str(k): _numeric(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    if isinstance(tree, bool) or not isinstance(tree, (int, float)):
        return None
    return _finite(float(tree)) if isinstance(tree, float) else tree


def cell_lines(record: dict) -> list[str]:
    """A cell.json record (starling_jax.commands.study.runner.run_cell) as the JSON lines of its raw file."""
    samples = {g: m["samples"][:SAMPLES_KEPT] for g, m in sorted(record["groups"].items()) if m.get("samples")}
    header = {"arm": record["arm"], "seed": int(record["seed"]), "quick": bool(record.get("quick", False)),
              "wall_s": float(record["wall_s"]), "train_wall_s": _finite(float(record.get("train_wall_s", 0.0))),
              "reused_from": short_source(record["reused_from"]) if record.get("reused_from") else None,
              "summary": _numeric(record.get("summary", {})), "samples": samples}
    if record.get("config_sha256"):
        header["config_sha256"] = record["config_sha256"]
    lines = [_json_line(header)]
    for group, m in sorted(record["groups"].items()):
        metrics = sorted(k for k in m if k not in ("prompt", "samples"))
        for i, prompt in enumerate(m["prompt"]):
            row = {"group": group, "row": i, "prompt": prompt}
            row.update({k: _finite(float(m[k][i])) for k in metrics})
            lines.append(_json_line(row))
    return lines


def _gzip(lines: list[str]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return buffer.getvalue()


def _cell_file(arm: str, seed: int) -> str:
    return f"{arm}/seed{seed}.jsonl.gz"


def _primary_dicts(study: Study) -> list:
    return [dataclasses.asdict(c) for c in study.primary]


def export(study: Study, study_file: str, workdir: str, out: str, shared_times: dict,
           digest: Optional[Callable[[str], Optional[str]]] = None) -> list[str]:
    """Write the finished cells of a study workdir (and shared_times: {seed: wall seconds} of its shared stages) to
    the raw folder `out`. Returns the grid's cells that are not finished (not exported). Refuses a folder of another
    study, a cell of an arm the study does not have, and a folder holding a cell this workdir lacks (it would be
    lost). digest(cell directory): the config_sha256 of a cell whose record lacks one (from its saved config)."""
    cells_root = os.path.join(workdir, "cells")
    paths = sorted(glob.glob(os.path.join(cells_root, "*", "seed*", "cell.json")))
    if not paths:
        raise FileNotFoundError(f"{workdir}: no finished cells (cells/ARM/seedS/cell.json) to export")
    names = {a.name for a in study.arms}
    records = []
    for path in paths:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RawError(f"{path}: not a readable cell record ({e}); rerun that cell") from None
        arm, seed_dir = path.split(os.sep)[-3:-1]
        if arm not in names:
            raise RawError(f"{path}: arm {arm!r} is not an arm of study {study.name!r} (arms: "
                           f"{', '.join(sorted(names))}); export from this study's own workdir")
        if record.get("arm") != arm or f"seed{record.get('seed')}" != seed_dir:
            raise RawError(f"{path}: its record says arm {record.get('arm')!r} seed {record.get('seed')!r}, its "
                           f"folder {arm}/{seed_dir}")
        if not record.get("config_sha256") and digest is not None:
            record["config_sha256"] = digest(os.path.dirname(path))
        records.append(record)
    manifest_path = os.path.join(out, STUDY_JSON)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            try:
                existing = json.load(f)
            except json.JSONDecodeError:
                existing = {}
        if existing.get("study") != study.name:
            raise RawError(f"{manifest_path}: holds study {existing.get('study')!r}, not {study.name!r}; export "
                           f"to a folder of its own")
    files = {_cell_file(r["arm"], r["seed"]): r for r in records}
    stale = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "*", "*.jsonl.gz"))
                   if os.path.relpath(p, out).replace(os.sep, "/") not in files)
    if stale:
        raise RawError(f"{os.path.join(out, stale[0])}: a cell the workdir {workdir} does not have; export from "
                       f"the workdir that has it, or remove the file if it should go")
    order = {a.name: i for i, a in enumerate(study.arms)}
    seeds = sorted({int(r["seed"]) for r in records})
    for name, record in sorted(files.items()):
        _write_atomic(os.path.join(out, name), _gzip(cell_lines(record)))
    manifest = {"format": FORMAT, "version": VERSION, "study": study.name,
                "study_file": os.path.basename(study_file), "baseline": study.baseline_arm,
                "arms": sorted({r["arm"] for r in records}, key=order.get), "seeds": seeds,
                "primary": _primary_dicts(study), "cells": sorted(files),
                "shared_wall_s": {str(s): float(shared_times[s]) for s in seeds if s in shared_times}}
    _write_atomic(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    done = {(r["arm"], int(r["seed"])) for r in records}
    return [f"{a.name}@{s}" for s in study.seeds for a in study.arms if (a.name, s) not in done]


# ----------------------------------------------------------------------------------------------------------------------
# Reading.

def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON (a missing value is null)")


def _load_json(text: str, where: str):
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise RawError(f"{where}: not valid JSON ({e})") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _expect(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise RawError(f"{where}: {message}")


def _expect_fields(obj: dict, fields: set, where: str, optional: set = frozenset()) -> None:
    """RawError at `where` unless obj has exactly `fields` and perhaps some of `optional` (names the missing and the
    unknown ones)."""
    missing, unknown = fields - set(obj), set(obj) - fields - optional
    _expect(not missing, where, f"field(s) {', '.join(sorted(missing))} missing")
    _expect(not unknown, where, f"unknown field(s) {', '.join(sorted(unknown))}")


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, STUDY_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: not a raw results folder (write one with --export-raw)")
    with open(path, encoding="utf-8") as f:
        m = _load_json(f.read(), path)
    _expect(isinstance(m, dict), path, "expected a JSON object")
    _expect_fields(m, STUDY_FIELDS, path)
    _expect(m["format"] == FORMAT and m["version"] == VERSION, path,
            f"format {m['format']!r} version {m['version']!r}; expected {FORMAT!r} version {VERSION}")
    for field in ("study", "study_file", "baseline"):
        _expect(isinstance(m[field], str) and m[field], path, f"field {field!r}: expected a non-empty string")
    _expect(isinstance(m["arms"], list) and all(isinstance(a, str) for a in m["arms"]), path,
            "field 'arms': expected a list of arm names")
    _expect(isinstance(m["seeds"], list) and all(isinstance(s, int) and not isinstance(s, bool) for s in m["seeds"]),
            path, "field 'seeds': expected a list of integers")
    _expect(isinstance(m["primary"], list) and all(isinstance(c, dict) for c in m["primary"]), path,
            "field 'primary': expected a list of comparisons")
    _expect(isinstance(m["cells"], list) and all(isinstance(c, str) for c in m["cells"]), path,
            "field 'cells': expected a list of file names")
    _expect(isinstance(m["shared_wall_s"], dict) and all(_is_number(v) for v in m["shared_wall_s"].values()), path,
            "field 'shared_wall_s': expected {seed: seconds}")
    return m


def _read_lines(path: str) -> list[str]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise RawError(f"{path}: not a readable gzip'd JSON-lines file ({e})") from None


def read_cell(path: str, arm: str, seed: int) -> dict:
    """The cell.json-shaped record of one raw cell file (validated; see the module docstring)."""
    lines = _read_lines(path)
    _expect(bool(lines), path, "empty file")
    header = _load_json(lines[0], f"{path} line 1")
    where = f"{path} line 1"
    _expect(isinstance(header, dict), where, "expected the cell's header object")
    _expect_fields(header, HEADER_FIELDS, where, OPTIONAL_HEADER_FIELDS)
    sha = header.get("config_sha256")
    _expect(sha is None or (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None), where,
            "field 'config_sha256': expected 64 lowercase hex digits")
    _expect(header["arm"] == arm and header["seed"] == seed, where,
            f"header says arm {header['arm']!r} seed {header['seed']!r}, the file name arm {arm!r} seed {seed}")
    _expect(isinstance(header["quick"], bool), where, "field 'quick': expected true or false")
    _expect(_is_number(header["wall_s"]) and header["wall_s"] >= 0, where, "field 'wall_s': expected seconds >= 0")
    _expect(header["train_wall_s"] is None or _is_number(header["train_wall_s"]), where,
            "field 'train_wall_s': expected seconds or null")
    _expect(header["reused_from"] is None or isinstance(header["reused_from"], str), where,
            "field 'reused_from': expected a string or null")
    _expect(isinstance(header["summary"], dict), where, "field 'summary': expected an object")
    _expect(isinstance(header["samples"], dict) and all(isinstance(v, list) for v in header["samples"].values()),
            where, "field 'samples': expected {group: [samples]}")
    groups: dict = {}
    for n, line in enumerate(lines[1:], start=2):
        where = f"{path} line {n}"
        row = _load_json(line, where)
        _expect(isinstance(row, dict), where, "expected a JSON object")
        group = row.get("group")
        kind, _, split = group.partition("/") if isinstance(group, str) else ("", "", "")
        _expect(kind in ("policy", "reference", "rm") and split in SPLITS, where,
                f"field 'group': {group!r} is not KIND/SPLIT (KIND policy, reference or rm; SPLIT "
                f"{' or '.join(SPLITS)})")
        _expect(isinstance(row.get("prompt"), str), where, "field 'prompt': expected a string")
        g = groups.setdefault(group, {"prompt": []})
        _expect(row.get("row") == len(g["prompt"]) and not isinstance(row.get("row"), bool), where,
                f"field 'row': {row.get('row')!r}, expected {len(g['prompt'])} (rows of {group} in order, none "
                f"missing)")
        metrics = {k: v for k, v in row.items() if k not in ("group", "row", "prompt")}
        _expect(bool(metrics), where, "no measurements")
        if len(g) == 1:
            g.update({k: [] for k in metrics})
        fields = set(g) - {"prompt"}
        _expect(set(metrics) == fields, where, f"fields {', '.join(sorted(set(metrics) ^ fields))}: every row of "
                                               f"{group} has the same measurements as its first")
        for k, v in metrics.items():
            _expect(v is None or _is_number(v), where, f"field {k!r}: {v!r} is not a number or null")
            g[k].append(float("nan") if v is None else float(v))
        g["prompt"].append(row["prompt"])
    _expect(bool(groups), path, "no measurements (only a header)")
    for group in groups:
        if group.startswith("policy/"):
            ref = group.replace("policy/", "reference/")
            _expect(ref in groups and groups[ref]["prompt"] == groups[group]["prompt"], path,
                    f"group {group} needs {ref} on the same prompts (its gain is measured against it)")
            _expect("true_reward" in groups[group] and "true_reward" in groups[ref], path,
                    f"groups {group} and {ref} need field 'true_reward'")
    for group, samples in header["samples"].items():
        _expect(group in groups, f"{path} line 1", f"field 'samples': no group {group!r} in this file")
        groups[group]["samples"] = samples
    return {"arm": arm, "seed": seed, "quick": header["quick"], "wall_s": float(header["wall_s"]),
            "train_wall_s": header["train_wall_s"], "summary": header["summary"], "groups": groups,
            **({"reused_from": header["reused_from"]} if header["reused_from"] else {}),
            **({"config_sha256": sha} if sha else {})}


def read(folder: str, study: Optional[Study] = None) -> tuple[list, dict, dict]:
    """(records, shared wall times {seed: s}, manifest) of a raw results folder, validated; given the study (from its
    file), also checked to be that study with the same preregistered comparisons and baseline."""
    m = read_manifest(folder)
    path = os.path.join(folder, STUDY_JSON)
    if study is not None:
        _expect(m["study"] == study.name, path, f"holds study {m['study']!r}, the study file defines {study.name!r}")
        _expect(m["primary"] == _primary_dicts(study), path,
                "its preregistered comparisons differ from the study file's primary; they are stated before the "
                "runs and cannot change after them (restore the study file's primary as exported)")
        _expect(m["baseline"] == study.baseline_arm, path,
                f"baseline {m['baseline']!r}, the study file's is {study.baseline_arm!r}")
        names = [a.name for a in study.arms]
        for a in m["arms"]:
            _expect(a in names, path, f"arm {a!r} is not an arm of the study file (arms: {', '.join(names)})")
    listed = set(m["cells"])
    on_disk = {os.path.relpath(p, folder).replace(os.sep, "/")
               for p in glob.glob(os.path.join(folder, "*", "*.jsonl.gz"))}
    for extra in sorted(on_disk - listed):
        raise RawError(f"{os.path.join(folder, extra)}: a cell file {STUDY_JSON} does not list; list it (export "
                       f"again) or remove it")
    records = []
    for name in m["cells"]:
        match = re.fullmatch(r"([^/]+)/seed(-?\d+)\.jsonl\.gz", name)
        _expect(match is not None, path, f"field 'cells': {name!r} is not ARM/seedS.jsonl.gz")
        arm, seed = match.group(1), int(match.group(2))
        _expect(arm in m["arms"] and seed in m["seeds"], path, f"field 'cells': {name!r} is not one of its arms "
                                                               f"and seeds")
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist ({path} lists it)")
        records.append(read_cell(file, arm, seed))
    _expect(bool(records), path, "lists no cells")
    shared = {}
    for s, t in m["shared_wall_s"].items():
        _expect(re.fullmatch(r"-?\d+", s) is not None, path, f"field 'shared_wall_s': key {s!r} is not a seed")
        shared[int(s)] = float(t)
    return records, shared, m


def report(study: Study, folder: str, num_samples: Optional[int] = None) -> dict:
    """The study's results (starling_jax.commands.study.report.aggregate) regenerated from a raw folder alone."""
    records, shared, _ = read(folder, study)
    kwargs = {} if num_samples is None else {"num_samples": num_samples}
    return aggregate(study, records, shared, this_run_s=0.0, failed=[], **kwargs)
