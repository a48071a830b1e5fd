"""Damage a file the way a silent storage fault would, for the integrity tests (tests/test_digests.py, test_loop.py,
test_multiprocess.py): bytes flipped in place, the length unchanged, so only a content check can notice."""

import os


def flip(path, n: int = 4096) -> None:
    """Invert n bytes (all of a smaller file) in the middle of `path`, in place: same length, different content."""
    size = os.path.getsize(path)
    n = min(n, size)
    start = (size - n) // 2
    with open(path, "r+b") as f:
        f.seek(start)
        data = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))
    assert os.path.getsize(path) == size
