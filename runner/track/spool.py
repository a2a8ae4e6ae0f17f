"""The tracking spool: one JSON record a line, the part of a run's tracking MLflow has not
received yet. It must survive what the disk does to it, because it is read back on resume
and by `python -m runner.track.store sync`:

* reading skips a line that does not parse (a disk that filled up mid-write leaves a cut
  last line) with a warning naming the file and line, and repairs the file, so the next
  record is not glued onto the cut one;
* appending writes each line with one write(2); if that fails or is short (ENOSPC, EFBIG)
  the file is truncated back to its previous size, the record stays in memory (the caller
  keeps it) and nothing is raised into training. The next append rewrites the whole spool,
  putting back what could not be written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class Spool:
    """The file behind a Tracker's records; `path` None keeps them in memory only."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.stale = False  # the file lacks records the Tracker holds (or has a cut line): rewrite it
        self._failing = False  # a write failed and we said so; quiet until one succeeds again

    def load(self) -> list[dict]:
        """The records in the file; unparsable lines are skipped, each with a warning."""
        if not self.path or not self.path.exists():
            return []
        raw = self.path.read_bytes()
        ops = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                op = json.loads(line)
                if not isinstance(op, dict) or "op" not in op:
                    raise ValueError("not a tracking record")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                log.warning("%s line %d is unreadable and skipped (%s): %r", self.path, n, e, line[:120])
                self.stale = True
                continue
            ops.append(op)
        if raw and not raw.endswith(b"\n"):
            self.stale = True  # appending now would continue that last line
        return ops

    def append(self, op: dict, all_ops: list[dict]) -> None:
        """Add `op` (already the last of `all_ops`) to the file; never raises."""
        if not self.path:
            return
        if self.stale:
            self.rewrite(all_ops)
            return
        self.append_line(json.dumps(op) + "\n")

    def append_line(self, text: str) -> bool:
        """Append `text` with one write(2), or leave the file as it was; never raises."""
        data = text.encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self._failed(e)
            return False
        try:
            size = os.fstat(fd).st_size
            try:
                n = os.write(fd, data)
                if n != len(data):
                    raise OSError(errno.ENOSPC, f"short write, {n} of {len(data)} bytes")
            except OSError as e:
                try:
                    os.ftruncate(fd, size)  # no cut line left behind
                except OSError:
                    pass
                self._failed(e)
                return False
        finally:
            os.close(fd)
        self._recovered()
        return True

    def rewrite(self, ops: list[dict]) -> None:
        """Replace the file by `ops` (atomically: a failed rewrite leaves the old file); never raises."""
        if not self.path:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(json.dumps(o) + "\n" for o in ops))
            os.replace(tmp, self.path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._failed(e)
            return
        self._recovered()

    # what the warnings say of a failed write, and of the first one that works again
    FAILED = "records are kept in memory and written when the disk allows; training goes on"
    RECOVERED = "it holds every record"

    def _failed(self, e: OSError) -> None:
        self.stale = True
        if not self._failing:
            self._failing = True
            log.warning("cannot write the %s %s (%s): %s", self.what, self.path, e, self.FAILED)

    def _recovered(self) -> None:
        self.stale = False
        if self._failing:
            self._failing = False
            log.warning("%s %s is writable again; %s", self.what, self.path, self.RECOVERED)

    what = "tracking spool"
