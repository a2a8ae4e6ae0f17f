"""Money as a first-class, enforced quantity.

- CostMeter: wall time x devices x price per device-hour, counted from the job's start
  (model load and evaluation included) and carried across resumes.
- Before each step the trainer asks `would_exceed(cap)`: the projected cost of the next
  step (the slowest of the recent step times), plus the final checkpoint that every stop
  writes, must still fit under the cap, or the run stops cleanly. A projection, not a
  guarantee: a step much slower than the ones before it (a busy machine) can still end
  past the cap, by its excess over the projection.
- SweepLedger (runner/sweep_ledger.py): one file in a multirun's sweep directory, shared
  by its jobs under a lock, so a whole sweep can have one cap.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional


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
