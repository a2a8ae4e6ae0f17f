"""State files that processes share and read back: JSON read strictly (an absent file is
None, a damaged one a one-line ConfigError naming it and what to do, never taken as absent),
written atomically (a unique temporary, fsync, rename, fsync of the folder), and flocks.
Used by the sweep ledger and the sweep's parent-run file."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from runner.config import ConfigError


def damaged(path: Path, why: str, remedy: str) -> ConfigError:
    """The one-line refusal for a state file that cannot be read: taking it as absent would
    forget what it records (a ledger's spending, a sweep's parent run)."""
    return ConfigError(f"{path} is damaged ({why}); {remedy}")


def read_json(path: Path, remedy: str, shape: Callable[[Any], Optional[str]]) -> Optional[Any]:
    """The file's JSON, None if it does not exist; a ConfigError (exit 2) naming the file if it
    is empty, truncated, not JSON or not of the `shape` (which returns what is wrong, or None)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(path, f"unreadable: {e}", remedy) from None
    if not text.strip():
        raise damaged(path, "empty", remedy)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise damaged(path, f"truncated or not JSON: {e}", remedy) from None
    why = shape(data)
    if why:
        raise damaged(path, why, remedy)
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as JSON, written as `write_text_durable` writes."""
    write_text_durable(path, json.dumps(data, indent=2))


def write_text_durable(path: Path, text: str) -> None:
    """Write beside `path`, fsync, rename into place, fsync the directory: a crash or a full
    disk leaves the old file whole (never a truncated one that a reader would refuse). The
    temporary's name is unique to this process and call (O_EXCL), so two writers never
    write into one temporary."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An flock on `path` (created if absent) for the duration: exclusive for a
    read-modify-write, shared for a read (readers do not wait on each other, and each one
    reads between two whole updates)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def try_flock(f: IO, op: int) -> bool:
    """Take flock `op` without waiting; False if another open file holds a conflicting one."""
    try:
        fcntl.flock(f, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
