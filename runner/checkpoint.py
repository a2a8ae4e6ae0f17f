"""Checkpoints: policy weights, optimizer, step, RNG streams and run state, written atomically.

A checkpoint is written to a temporary file (its SHA-256 computed on the way), fsynced,
the digest put in a sidecar file, and only then renamed into place: a file under a real
name always has its digest, so a crash mid-write never leaves a half file that looks
complete. Loading walks back from the
newest and skips (with a warning) any file that is corrupt, truncated, unloadable, has no
digest to check, or holds non-finite weights, so one bad file costs at most
`checkpoint_every` steps. A failed write (a full disk) removes its temporary file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a failing device); nothing half-written is left."""


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


class _Digesting:
    """The file torch.save writes through: each block is hashed as it goes by, so the
    digest costs no second read of a file the size of the model and its optimizer."""

    def __init__(self, f) -> None:
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


# what a backend's save returns: serialize (calling `written()` once the weights and the
# optimizer state have been read), then commit; returns the checkpoint's path
Finish = Callable[[Callable[[], None]], Path]


@dataclass
class Staged:
    """A checkpoint serialized under its temporary name, not yet durable: `commit` makes it
    so (fsync, digest sidecar, rename, pruning). The two halves are apart so the commit,
    which mostly waits for the disk, can run beside the next training step."""

    directory: Path
    step: int
    tmp: Path
    digest: str

    @property
    def final(self) -> Path:
        return self.directory / f"ckpt-{self.step:08d}.pt"

    def commit(self, keep: int) -> Path:
        side_tmp = self.final.with_name(f".{self.final.name}.sha256.tmp")
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            side_tmp.write_text(self.digest)
            os.replace(side_tmp, _sidecar(self.final))
            os.replace(self.tmp, self.final)
        except BaseException as e:
            self.tmp.unlink(missing_ok=True)
            side_tmp.unlink(missing_ok=True)
            raise _write_error(e, self.directory, self.final, self.step)
        for _, old in checkpoints(self.directory)[:-keep]:
            old.unlink(missing_ok=True)
            _sidecar(old).unlink(missing_ok=True)
        return self.final


def write(directory: Path, step: int, payload: dict[str, Any]) -> Staged:
    """Serialize a checkpoint to its temporary file, digesting it on the way."""
    directory.mkdir(parents=True, exist_ok=True)
    _tidy(directory)
    tmp = directory / f".ckpt-{step:08d}.pt.tmp"
    try:
        with open(tmp, "wb") as f, _no_zip_crc():
            out = _Digesting(f)
            torch.save({**payload, "step": step}, out)
            f.flush()
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(e, directory, directory / f"ckpt-{step:08d}.pt", step)
    return Staged(directory, step, tmp, out.h.hexdigest())


@contextmanager
def _no_zip_crc():
    """torch.save without its per-record CRC-32: the SHA-256 of the whole file is checked
    before every load, and the CRC cost ~1 s of a 1.6 GB checkpoint on 2 cores."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def save(directory: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write and commit a checkpoint in one go."""
    return write(directory, step, payload).commit(keep)


def _write_error(e: BaseException, directory: Path, final: Path, step: int) -> BaseException:
    """A failed write as CheckpointWriteError naming what is kept (a full disk, a failing
    device; torch.save reports a full disk as a RuntimeError); other errors pass as they are."""
    if not isinstance(e, (OSError, RuntimeError)) or isinstance(e, CheckpointWriteError):
        return e
    # a failed write never renames, so every checkpoint file is intact, one of this very
    # step included (the final save after a periodic one at the same step)
    kept = [s for s, p in checkpoints(directory) if p.is_file()]
    why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    free = shutil.disk_usage(directory).free / 2**20
    err = CheckpointWriteError(
        f"could not write checkpoint {final} ({why}; {free:.0f} MiB free there); "
        f"{f'the checkpoint at step {kept[-1]} is kept' if kept else 'no earlier checkpoint exists'}; "
        f"free space and run the same command to resume")
    err.__cause__ = e
    return err


def _tidy(directory: Path) -> None:
    """Remove what interrupted saves and prunes leave: temporary files, digests without a checkpoint."""
    for p in directory.iterdir():
        if p.name.startswith(".ckpt-") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        elif p.name.endswith(".pt.sha256") and not p.with_name(p.name[:-len(".sha256")]).exists():
            p.unlink(missing_ok=True)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_latest(directory: Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The newest checkpoint that verifies and loads, or None. Each file skipped is reported
    (and appended to `problems`, for the caller's error message)."""
    for step, path in reversed(checkpoints(directory)):
        try:
            side = _sidecar(path)
            if not side.exists():
                raise ValueError("no .sha256 beside it to verify it against")
            if side.read_text().strip() != _sha256(path):
                raise ValueError("SHA-256 does not match the one written with it")
            data = torch.load(path, map_location="cpu", weights_only=False)
            if data.get("step") != step:
                raise ValueError(f"file says step {data.get('step')}")
            bad = [k for k, t in (data.get("model") or {}).items()
                   if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise ValueError(f"non-finite weights ({bad[0]}{' and others' if len(bad) > 1 else ''})")
            return data
        except Exception as e:  # a truncated or corrupt file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, why)
            if problems is not None:
                problems.append(f"{path.name}: {why}")
    return None
