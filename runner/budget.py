"""Money as a first-class, enforced quantity.

- CostMeter: wall time x devices x price per device-hour, counted from the job's start
  (model load and evaluation included) and carried across resumes.
- Before each step the trainer asks `would_exceed(cap)`: the projected cost of the next
  step (the slowest of the recent step times), plus the final checkpoint that every stop
  writes, must still fit under the cap, or the run stops cleanly. A projection, not a
  guarantee: a step much slower than the ones before it (a busy machine) can still end
  past the cap, by its excess over the projection.
- SweepLedger: one file in a multirun's sweep directory, shared by its jobs under an
  exclusive lock (safe for parallel launchers), so a whole sweep can have one cap.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


class CostMeter:
    def __init__(self, usd_per_device_hour: float, devices: int = 1, spent_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, window: int = 5):
        self.usd_per_device_hour = usd_per_device_hour
        self.devices = devices
        self._clock = clock
        self._start = clock()
        self._carried = spent_seconds  # wall seconds spent by earlier attempts of this run
        self._before_clock = spent_seconds  # as given here (a DeepSpeed launcher's share); carry() leaves it
        self._recent: deque[float] = deque(maxlen=window)

    def carry(self, seconds: float) -> None:
        """Add the wall time of earlier attempts (a resumed run keeps what it spent)."""
        self._carried = seconds

    @property
    def wall_seconds(self) -> float:
        return self._carried + self._clock() - self._start

    @property
    def attempt_seconds(self) -> float:
        """Wall seconds of this attempt alone, from the job's start (a DeepSpeed launcher's
        included), without the earlier attempts a resume carries in."""
        return self._before_clock + self._clock() - self._start

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.devices / 3600.0

    @property
    def usd(self) -> float:
        return self.usd_for(self.wall_seconds)

    def usd_for(self, seconds: float) -> float:
        return seconds * self.devices / 3600.0 * self.usd_per_device_hour

    def record_step(self, seconds: float) -> None:
        self._recent.append(seconds)

    @property
    def recent_steps(self) -> list[float]:
        """The step times the projection uses, oldest first (kept in checkpoints: a resumed
        run near its cap projects from them instead of from nothing)."""
        return list(self._recent)

    def carry_steps(self, seconds: list[float]) -> None:
        self._recent.clear()
        self._recent.extend(seconds)

    def next_step_seconds(self) -> float:
        """The slowest of the recent step times (0 before the first step: nothing to project
        from). The slowest, not the mean: with the mean, any step slower than average
        (half of them) would push a run that stops at its cap just over it."""
        return max(self._recent) if self._recent else 0.0

    def would_exceed(self, cap_usd: Optional[float], extra_seconds: Optional[float] = None,
                     periodic_seconds: float = 0.0) -> bool:
        """Whether spending `extra_seconds` more crosses the cap; by default one more step
        plus `periodic_seconds` (the evaluation or checkpoint that step will also do: they
        come every N steps, so the recent-steps window does not hold them)."""
        if cap_usd is None:
            return False
        extra = self.next_step_seconds() + periodic_seconds if extra_seconds is None else extra_seconds
        return self.usd + self.usd_for(extra) > cap_usd

    def metrics(self) -> dict[str, float]:
        return {"cost/wall_s": self.wall_seconds, "cost/device_hours": self.device_hours, "cost/usd": self.usd}


class SweepLedger:
    """Spending of every job in a sweep, in `<sweep dir>/budget_ledger.json`.

    Each job updates its own entry as it spends; every read-modify-write holds an
    exclusive flock, so jobs in parallel processes see each other's spending.
    """

    def __init__(self, path: Path, cap_usd: float):
        self.path = Path(path)
        self.cap_usd = cap_usd
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text()) if self.path.exists() else {"jobs": {}}
                yield data
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=2))
                os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _spent(data: dict, exclude: Optional[str] = None) -> float:
        return sum(j["usd"] for k, j in data["jobs"].items() if k != exclude)

    def admit(self, job: str, estimate_usd: Optional[float]) -> tuple[bool, str]:
        """Register a job before it starts, or refuse it if its estimated cost does not fit
        in what is left. The estimate: the given one, else the mean cost of finished jobs."""
        with self._locked() as data:
            if job in data["jobs"] and data["jobs"][job]["state"] != "skipped":
                data["jobs"][job]["state"] = "running"  # a resumed job keeps what it spent
                return True, "resumed"
            done = [j["usd"] for j in data["jobs"].values() if j["state"] == "finished"]
            est = estimate_usd if estimate_usd is not None else (sum(done) / len(done) if done else 0.0)
            left = self.cap_usd - self._spent(data)
            if left <= 0 or est > left:
                data["jobs"][job] = {"usd": 0.0, "state": "skipped",
                                     "reason": f"estimated ${est:.4f} > ${left:.4f} left of the ${self.cap_usd:g} sweep cap"}
                return False, data["jobs"][job]["reason"]
            data["jobs"][job] = {"usd": 0.0, "state": "running", "estimate": est}
            return True, f"estimated ${est:.4f}, ${left:.4f} left of ${self.cap_usd:g}"

    def charge(self, job: str, usd: float) -> float:
        """Record this job's total spending so far; returns what the whole sweep has spent."""
        with self._locked() as data:
            data["jobs"].setdefault(job, {"state": "running"})["usd"] = usd
            return self._spent(data)

    def others_spent(self, job: str) -> float:
        with self._locked() as data:
            return self._spent(data, exclude=job)

    def finish(self, job: str, usd: float) -> None:
        with self._locked() as data:
            data["jobs"].setdefault(job, {})
            data["jobs"][job].update(usd=usd, state="finished")

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {"jobs": {}}
