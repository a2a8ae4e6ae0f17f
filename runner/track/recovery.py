"""When the MLflow store loses a run: noticing it, and recreating the run from the journal.

A SQLite file deleted mid-run is the common case. MLflow keeps its connection to the
deleted file and goes on writing into it without an error, so every step sent after the
deletion would vanish with it; a file put in its place (a restore, a `rm` then a new run)
holds other runs. So a Tracker remembers which file (device, inode) it connected to and
sends nothing once the path names another file or none; a server store that answers "run
not found" counts the same way. Nothing is lost by not sending: every record is in the
run's journal (`mlflow_journal.jsonl`, append-only), and `recreate_ops` turns the journal
into the records of a new run, in the same store or in another one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from runner.track.connect import sqlite_path
from runner.track.spool import Spool

log = logging.getLogger(__name__)

GAP = {"op": "gap"}  # the journal could not be written for a while (a full disk): records are missing here


def store_identity(uri: str) -> Optional[tuple[int, int]]:
    """(device, inode) of a SQLite store's file; None for other stores or no file."""
    db = sqlite_path(uri)
    try:
        st = os.stat(db) if db else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


def store_changed(uri: str, identity: Optional[tuple[int, int]]) -> Optional[str]:
    """Why the store is no longer the one this process connected to (None: it is)."""
    if identity is None or sqlite_path(uri) is None:
        return None
    now = store_identity(uri)
    if now is None:
        return f"its file {sqlite_path(uri)} was deleted"
    if now != identity:
        return f"its file {sqlite_path(uri)} was replaced by another"
    return None


def run_missing(e: Exception) -> bool:
    """Whether a send failed because the store does not have the run (any store kind)."""
    code = getattr(e, "error_code", "")
    return "RESOURCE_DOES_NOT_EXIST" in str(code) or ("Run with id=" in str(e) and "not found" in str(e))


class Journal(Spool):
    """Every record a run logged, append-only (one write(2) a line, as the spool). A record
    that cannot be written (a full disk) is not retried: the next one that can be is
    preceded by a gap marker, so a recreated run says it misses records rather than
    pretending to be whole."""

    what = "tracking journal"
    FAILED = "records still go to MLflow, and the journal marks the gap once it can be written"
    RECOVERED = "a gap marker stands for the records it missed"

    def __init__(self, path: Optional[Path]):
        super().__init__(path)
        self._gap = False

    def append(self, op: dict, all_ops: list[dict]) -> None:
        if self.path:
            self._gap = not self.append_line((json.dumps(GAP) + "\n" if self._gap else "") + json.dumps(op) + "\n")

    def trim(self, upto_step: int) -> None:
        """Drop metrics past the checkpoint a resume starts from: those steps are recomputed
        and logged again, so the journal stays the run's history with no step twice."""
        if self.path and self.path.exists():
            ops = self.load()
            kept = [o for o in ops if not (o["op"] == "metrics" and o["step"] > upto_step)]
            if len(kept) != len(ops) or self.stale:  # (stale: a cut last line, repaired)
                self.rewrite(kept)


def recreate_ops(journal: list[dict], tags: dict[str, str], upto_step: Optional[int] = None) -> list[dict]:
    """The journal as the records of a new run: its creation first (with `tags` added, e.g.
    where it was recreated from), then everything else in order, metrics up to `upto_step`.
    Statuses are kept but the run's end is left to whoever ends it now (a run still training
    must not be marked FINISHED early); raises ValueError if there is nothing to recreate."""
    creates = [o for o in journal if o["op"] == "create"]
    if not creates:
        raise ValueError("the journal holds no creation record: nothing to recreate the run from")
    first = dict(creates[0])
    first["tags"] = {**first.get("tags", {}), **tags}
    if any(o["op"] == "gap" for o in journal):
        first["tags"]["runner.journal_gap"] = "the journal missed records (a full disk): this run lacks them"
    out = [first]
    for o in journal:
        if o["op"] in ("create", "gap"):
            continue
        if o["op"] == "metrics" and upto_step is not None and o["step"] > upto_step:
            continue
        if o["op"] == "artifact" and not Path(o["path"]).exists():
            log.warning("recreating the run: artifact %s is gone, not logged again", o["path"])
            continue
        out.append(o)
    return out
