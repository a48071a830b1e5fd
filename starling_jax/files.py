"""Writing a file whole: a reader, or a run resumed after a kill, sees the old content or the new, never a part."""

from __future__ import annotations

import json
import os


def write_atomic(path: str, text: str | bytes, encoding: str = "utf-8") -> None:
    """Write `text` (or bytes) to `path` through `path`.tmp, flushed to disk, then renamed over `path` (atomic on
    POSIX)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding=encoding) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj, **dump_options) -> None:
    """`json.dump(obj, **dump_options)` to `path`, atomically (write_atomic)."""
    write_atomic(path, json.dumps(obj, **dump_options))
