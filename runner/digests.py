"""SHA-256 of files the runner writes and reads back (checkpoints, the model cache, the fused
decode library): one streaming implementation, so a multi-GB file is never read into memory."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: Path) -> str:
    """A file's SHA-256, or for a directory (a `save_to_disk` dataset) the SHA-256 of its
    files' relative names and digests, in name order: equal trees, equal digests."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
