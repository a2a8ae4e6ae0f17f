"""Checkpoints: policy weights, optimizer, step, RNG streams and run state, written atomically.

A checkpoint is written to a temporary file, fsynced and renamed into place, so a crash
mid-write never leaves a half file under a real name; its SHA-256 goes in a sidecar file.
Loading walks back from the newest, verifies the digest, and skips (with a warning) any
file that is corrupt, truncated or unloadable, so one bad file costs at most
`checkpoint_every` steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoint files, oldest first."""
    if not directory.exists():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:08d}.pt"
    tmp = directory / f".ckpt-{step:08d}.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save({**payload, "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, final)
    side_tmp = final.with_name(f".{final.name}.sha256.tmp")
    side_tmp.write_text(digest)
    os.replace(side_tmp, _sidecar(final))
    for _, old in checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    return final


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_latest(directory: Path) -> Optional[dict[str, Any]]:
    """The newest checkpoint that loads, or None. Unloadable files are reported and skipped."""
    for step, path in reversed(checkpoints(directory)):
        try:
            side = _sidecar(path)
            if side.exists() and side.read_text().strip() != _sha256(path):
                raise ValueError("SHA-256 does not match the one written with it")
            data = torch.load(path, map_location="cpu", weights_only=False)
            if data.get("step") != step:
                raise ValueError(f"file says step {data.get('step')}")
            return data
        except Exception as e:  # a truncated or corrupt file
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, str(e).splitlines()[0])
    return None
