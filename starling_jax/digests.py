"""Per-file digests of the directories starling_jax writes and reads back (checkpoints, stage exports, converted
Hugging Face directories), so damage that keeps a file's length (a bad disk, a bad copy) is found before the data is
used instead of being loaded silently.

A directory's manifest `digests.json` lists every file under it (its path relative to the directory, with "/") with
its size and its CRC-32 (zlib's, the checksum of gzip and PNG: about 3 GB/s on one core, so digesting costs a small
fraction of writing the file; benchmarks/bench_digests.py). The manifest is written after the files are complete and
read before they are: `verify` checks every file the manifest names (or those a caller selects: each process of a
multi-process run checks its own shards) and raises `DigestMismatch` naming the first file that differs. Files the
manifest does not name are not checked (a README added to a converted directory later).
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

from starling_jax.errors import InputError

MANIFEST = "digests.json"
ALGORITHM = "crc32"
_CHUNK = 16 << 20  # bytes read at a time: large enough for full speed, small enough to keep host memory flat


class DigestMismatch(InputError):
    """A file differs from the digest its directory's manifest records. `path`: the file."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def digest_file(path: str) -> dict:
    """{"bytes": size, "crc32": 8 hex digits} of one file, read in chunks (zlib.crc32 releases the GIL on large
    buffers, so files digested in threads run in parallel)."""
    crc, size = 0, 0
    buf = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(buf[:n], crc)
            size += n
    return {"bytes": size, ALGORITHM: f"{crc:08x}"}


def list_files(directory: str) -> list[str]:
    """Every file under `directory` (relative paths with "/"), the manifest itself excluded."""
    out = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _map(fn: Callable[[str], Any], paths: list[str]) -> list:
    workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
    if workers == 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, paths))


def digest_tree(directory: str, files: Optional[Iterable[str]] = None) -> dict[str, dict]:
    """{relative path: digest_file} for `files` (relative to `directory`; default: every file under it)."""
    rels = sorted(files) if files is not None else list_files(directory)
    return dict(zip(rels, _map(digest_file, [os.path.join(directory, r) for r in rels])))


def write_manifest(directory: str, entries: dict[str, dict]) -> str:
    """Write `directory`/digests.json listing `entries` (from digest_tree), atomically; returns its path."""
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"algorithm": ALGORITHM, "files": entries}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> Optional[dict[str, dict]]:
    """The {relative path: digest} a directory's manifest lists; None when it has none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DigestMismatch(f"{path}: damaged digest manifest ({e})", path) from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("algorithm") != ALGORITHM:
        raise DigestMismatch(f"{path}: not a {ALGORITHM} digest manifest of files (written by another version?)",
                             path)
    return files


def verify(directory: str, select: Optional[Callable[[str], bool]] = None) -> bool:
    """Check the files `directory`'s manifest lists (those `select(relative path)` keeps; default all) against their
    digests. True: all match; False: the directory has no manifest (written before digests were), nothing checked.
    Raises DigestMismatch naming the first file that is missing or differs in size or CRC-32."""
    listed = read_manifest(directory)
    if listed is None:
        return False
    rels = sorted(r for r in listed if select is None or select(r))

    def check(rel: str) -> Optional[str]:
        path = os.path.join(directory, rel)
        want = listed[rel]
        if not os.path.isfile(path):
            return f"{path}: missing (the digest manifest lists it)"
        if os.path.getsize(path) != want.get("bytes"):
            return f"{path}: {os.path.getsize(path)} bytes, {want.get('bytes')} when it was written (damaged)"
        got = digest_file(path)
        if got[ALGORITHM] != want.get(ALGORITHM):
            return (f"{path}: {ALGORITHM} {got[ALGORITHM]} differs from the {want.get(ALGORITHM)} recorded when it "
                    f"was written (the file is damaged)")
        return None

    for rel, problem in zip(rels, _map(check, rels)):
        if problem is not None:
            raise DigestMismatch(problem, os.path.join(directory, rel))
    return True
