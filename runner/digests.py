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
