"""The sweep ledger: the spending of every job of a multirun in one file of its sweep dir,
so a whole sweep has one cap (`budget.sweep_cap_usd`), also when two sweeps share the dir."""

from __future__ import annotations

import fcntl
import hashlib
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from runner.budget import CostMeter
from runner.state_files import file_lock, read_json, try_flock, write_json_atomic

LEDGER_FILE = "budget_ledger.json"
LEDGER_STATES = ("running", "finished", "skipped")
LEDGER_REMEDY = "restore it or delete it to forget the spending recorded there"


def _is_amount(x: Any) -> bool:
    """A finite number >= 0 (not a bool): what a ledger's amounts and times must be."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _ledger_shape(data: Any) -> Optional[str]:
    """What is wrong with a parsed ledger, or None: {"jobs": {key: {"usd": >= 0, "state": ...}}}."""
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict):
        return 'expected {"jobs": {...}}'
    for key, job in data["jobs"].items():
        if not isinstance(job, dict) or not _is_amount(job.get("usd")):
            return f"job {key!r}: usd must be a number >= 0, got {job.get('usd') if isinstance(job, dict) else job!r}"
        if job.get("state") not in LEDGER_STATES:
            return f"job {key!r}: state must be one of {', '.join(LEDGER_STATES)}, got {job.get('state')!r}"
        bad = [k for k in ("at", "usd_per_s") if k in job and not _is_amount(job[k])]
        if bad:
            return f"job {key!r}: {bad[0]} must be a number >= 0, got {job[bad[0]]!r}"
    return None


def _lock_path(ledger: Path) -> Path:
    return ledger.with_suffix(".lock")


def _load_ledger(path: Path) -> dict:
    """The ledger (absent: a new sweep, nothing spent); a damaged one is refused, never taken
    as empty, which would reset the sweep's spending to $0 and let it overspend."""
    return read_json(path, LEDGER_REMEDY, _ledger_shape) or {"jobs": {}}


def read_ledger(path: Path) -> dict:
    """The ledger as it is now, under a shared lock; a sweep's start calls it so that a damaged
    ledger refuses the whole sweep before anything is made."""
    path = Path(path)
    if not path.exists():  # a new sweep (or one without a sweep cap): nothing to check, no lock file made
        return {"jobs": {}}
    with file_lock(_lock_path(path), shared=True):
        return _load_ledger(path)


_alive: dict[Path, IO] = {}  # this process's alive locks (a job's, from its admission to its end), by file


def release_alive(path: Optional[Path] = None) -> None:
    """Drop this process's alive lock on `path` (all of them by default) and its file. A job's
    `finish` drops its own; `runner.__main__` drops any left when a job ends however it ended
    (an error that a launcher survives keeps the job's objects alive in its traceback, and
    the others would go on counting a dead job's time)."""
    for held in [path] if path is not None else list(_alive):
        f = _alive.pop(held, None)
        if f is not None:
            f.close()
            held.unlink(missing_ok=True)


def _hold_alive(path: Path) -> None:
    """Hold the alive lock on `path` (shared; a prober's exclusive try is momentary)."""
    release_alive(path)
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_SH)
    _alive[path] = f


class SweepLedger:
    """Spending of every job in a sweep, in `<sweep dir>/budget_ledger.json`.

    Each job updates its own entry as it spends; every read-modify-write holds an
    exclusive flock and every read a shared one, so jobs in parallel processes (and two
    sweeps started in one sweep dir) see each other's spending. Entries are keyed by the
    job's output dir (`key_for`), not its job number: two sweeps in one dir number their
    jobs alike, and keyed by number they overwrote each other's spending.

    A running job's entry also holds when it was recorded (`at`) and the job's price per
    second; while the job's process lives (it holds a shared flock on its
    `budget_ledger.<key hash>.alive`, which the kernel drops if it dies) the others count its
    spending up to now. Without that, a job's start-up (the model load before its first
    step) and its stop are unseen by the jobs running beside it: two sweeps started together
    spent twice their cap. A job on another host whose lock this host cannot see counts
    as recorded.
    """

    def __init__(self, path: Path, cap_usd: float):
        self.path = Path(path).resolve()
        self.cap_usd = cap_usd
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def key_for(self, output_dir: Path) -> str:
        """A job's entry: its output dir, relative to the sweep dir when inside it ("0", or
        "a_0" with hydra.sweep.subdir=a_${hydra.job.num}), else absolute. Unique per job even
        across sweeps sharing this dir, the same for a resumed job (it keeps what it spent),
        and with the default subdir the key a ledger had when jobs were keyed by number."""
        out = Path(output_dir).resolve()
        try:
            return out.relative_to(self.path.parent).as_posix()
        except ValueError:
            return str(out)

    @contextmanager
    def _update(self) -> Iterator[dict]:
        with file_lock(_lock_path(self.path)):
            data = _load_ledger(self.path)
            yield data
            write_json_atomic(self.path, data)

    # -- who is still spending ------------------------------------------------------------
    def _alive_path(self, job: str) -> Path:
        """`budget_ledger.<hash of the key>.alive` beside the ledger: a file, not a folder, so a
        listing of the sweep dir's job folders is unchanged."""
        return self.path.with_name(f"{self.path.stem}.{hashlib.sha1(job.encode()).hexdigest()[:16]}.alive")

    def _is_alive(self, job: str) -> bool:
        """Whether the job's process still holds its alive lock: a job killed before `finish`
        leaves a running entry whose time must not keep counting."""
        try:
            f = open(self._alive_path(job), "r+")  # writable: over NFS an exclusive flock needs it; never creates
        except FileNotFoundError:
            return False
        with f:
            if try_flock(f, fcntl.LOCK_EX):
                fcntl.flock(f, fcntl.LOCK_UN)
                return False
            return True

    def _live_usd(self, job: str, entry: dict, now: float) -> float:
        """What a job has spent by `now`: its last record, plus, while it runs, its price for
        the time since."""
        if entry["state"] != "running" or not entry.get("usd_per_s") or "at" not in entry or not self._is_alive(job):
            return entry["usd"]
        return entry["usd"] + entry["usd_per_s"] * max(0.0, now - entry["at"])

    def _spent(self, data: dict, exclude: Optional[str] = None) -> float:
        now = time.time()
        return sum(self._live_usd(k, j, now) for k, j in data["jobs"].items() if k != exclude)

    # -- what jobs call -------------------------------------------------------------------
    def admit(self, job: str, estimate_usd: Optional[float], meter: Optional[CostMeter] = None,
              num: Optional[str] = None) -> tuple[bool, str]:
        """Register a job before it starts, or refuse it if its estimated cost does not fit
        in what is left. The estimate: the given one, else the mean cost of finished jobs.
        `meter` (the job's, running since its start) gives what it spent so far and its price
        per second, so the others count its start-up as it goes; `num` (the job number) is
        kept in the entry for people reading the file."""
        running = {"state": "running", "at": time.time(), "usd_per_s": meter.usd_for(1.0) if meter else 0.0}
        readable = {"job_num": num} if num is not None else {}
        with self._update() as data:
            if job in data["jobs"] and data["jobs"][job]["state"] != "skipped":
                data["jobs"][job].update(readable, **running)  # a resumed job keeps what it spent
                _hold_alive(self._alive_path(job))
                return True, "resumed"
            done = [j["usd"] for j in data["jobs"].values() if j["state"] == "finished"]
            est = estimate_usd if estimate_usd is not None else (sum(done) / len(done) if done else 0.0)
            left = self.cap_usd - self._spent(data)
            if left <= 0 or est > left:
                data["jobs"][job] = {**readable, "usd": 0.0, "state": "skipped",
                                     "reason": f"estimated ${est:.4f} > ${left:.4f} left of the ${self.cap_usd:g} sweep cap"}
                return False, data["jobs"][job]["reason"]
            data["jobs"][job] = {**readable, "usd": meter.usd if meter else 0.0, **running, "estimate": est}
            _hold_alive(self._alive_path(job))
            return True, f"estimated ${est:.4f}, ${left:.4f} left of ${self.cap_usd:g}"

    def charge(self, job: str, usd: float) -> float:
        """Record this job's total spending so far; returns what the whole sweep has spent."""
        with self._update() as data:
            data["jobs"].setdefault(job, {"state": "running"}).update(usd=usd, at=time.time())
            return self._spent(data)

    def others_spent(self, job: str) -> float:
        with file_lock(_lock_path(self.path), shared=True):
            return self._spent(_load_ledger(self.path), exclude=job)

    def finish(self, job: str, usd: float) -> None:
        with self._update() as data:
            data["jobs"].setdefault(job, {})
            data["jobs"][job].update(usd=usd, state="finished", at=time.time())
        release_alive(self._alive_path(job))

    def read(self) -> dict:
        return read_ledger(self.path)
