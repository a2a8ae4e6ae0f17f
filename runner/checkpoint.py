"""Checkpoints: policy weights, optimizer, step, RNG streams and run state, written atomically.

A checkpoint is written to a temporary file (its SHA-256 computed on the way), fsynced,
the digest put in a sidecar file, and only then renamed into place: a file under a real
name always has its digest, so a crash mid-write never leaves a half file that looks
complete. Loading walks back from the
newest and skips (with a warning) any file that is corrupt, truncated, unloadable, has no
digest to check, or holds non-finite weights, so one bad file costs at most
`checkpoint_every` steps. A failed write (a full disk) removes its temporary file.

A digest proves the bytes are the ones written, not that whoever wrote them was the runner:
anyone who can write a checkpoint can write its digest. So a checkpoint holds plain data
only (tensors, numbers, strings, lists, tuples, dicts and the environment contract's own
`Score` and `Prompt` records: `PLAIN_TYPES`), `write` refuses anything else before a byte is
written, and `read` unpickles with torch's weights-only unpickler, which never calls a
function or builds a class outside that allow-list: a file that asks for one (a pickled
`os.system`) is refused as unsafe, naming what it asked for, and never runs.
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

from runner.digests import file_sha256

log = logging.getLogger(__name__)

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a failing device); nothing half-written is left."""


_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """Every RNG stream as plain data: numpy's key array goes as a tensor (a pickled ndarray
    needs numpy's reconstruct functions, which a weights-only load does not allow)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
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
    payload = plain({**payload, "step": step})  # refused before a byte is written
    try:
        with open(tmp, "wb") as f, _no_zip_crc():
            out = _Digesting(f)
            torch.save(payload, out)
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


class UnsafeCheckpoint(ValueError):
    """A checkpoint that asks to call a function or build a class outside PLAIN_TYPES."""


def _plain_types() -> list[type]:
    from envs.base import Prompt, Score

    return [Score, Prompt]


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as the plain data a weights-only load gives back: numpy scalars become Python
    numbers; anything not in the allow-list raises TypeError naming where it is, at save time
    (a checkpoint that saved but could not be loaded would only fail at the resume). Tensors
    are not copied (the background commit relies on that)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                       torch.Size)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if type(obj) in _plain_types():
        import dataclasses

        return dataclasses.replace(obj, **{f.name: plain(getattr(obj, f.name), f"{where}.{f.name}")
                                           for f in dataclasses.fields(obj)})
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which a checkpoint "
                    f"cannot hold (plain data only: tensors, numbers, strings, lists, tuples, dicts, Score, Prompt)")


# what DeepSpeed's own checkpoints name besides tensors (ZeRO 0-3 on CPU, read with
# torch.serialization.get_unsafe_globals_in_checkpoint): plain records and an enum
DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")


def _deepspeed_types() -> list[type]:
    import importlib

    out = []
    for name in DEEPSPEED_TYPES:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files say what they need
            pass
    return out


@contextmanager
def weights_only_loads(deepspeed: bool = False):
    """Every torch.load inside the block, a library's included (DeepSpeed passes
    weights_only=False), unpickles weights-only with the allow-list (torch's own
    TORCH_FORCE_WEIGHTS_ONLY_LOAD switch; the process's previous value is put back after)."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_plain_types() + (_deepspeed_types() if deepspeed else [])):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def read(path: Path) -> Any:
    """torch.load with the weights-only unpickler and the allow-list: never runs code from
    the file. A file that asks for anything else raises UnsafeCheckpoint naming it."""
    import pickle

    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe(path) from e


def unsafe_globals(path: Path, deepspeed: bool = False) -> list[str]:
    """The functions and classes a pickle names beyond the allow-list (read from the
    file, never called); [] where there are none or the file cannot be read."""
    try:
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in _plain_types() + (_deepspeed_types() if deepspeed else [])}
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
    except Exception:
        return []


def unsafe(path: Path, deepspeed: bool = False) -> UnsafeCheckpoint:
    """The refusal of a file the weights-only unpickler stopped, naming what it asks for."""
    asked = unsafe_globals(path, deepspeed)[:3]
    return UnsafeCheckpoint(
        f"refused, not loaded: {Path(path).name} asks to run or build {', '.join(asked) if asked else 'objects'} "
        f"outside the plain data a checkpoint holds (a file not written by the runner, or tampered with)")
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_latest(directory: Path, problems: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The newest checkpoint that verifies and loads, or None. Each file skipped is reported
    (and appended to `problems`, for the caller's error message)."""
    for step, path in reversed(checkpoints(directory)):
        try:
            side = _sidecar(path)
            if not side.exists():
                raise ValueError("no .sha256 beside it to verify it against")
            if side.read_text().strip() != file_sha256(path):
                raise ValueError("SHA-256 does not match the one written with it")
            data = read(path)
            if data.get("step") != step:
                raise ValueError(f"file says step {data.get('step')}")
            bad = [k for k, t in (data.get("model") or {}).items()
                   if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise ValueError(f"non-finite weights ({bad[0]}{' and others' if len(bad) > 1 else ''})")
            return data
        except Exception as e:  # a truncated, corrupt or unsafe file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("checkpoint %s is %s (%s); trying the previous one", path,
                        "unsafe" if isinstance(e, UnsafeCheckpoint) else "unreadable", why)
            if problems is not None:
                problems.append(f"{path.name}: {why}")
    return None
