"""Cost meter: wall time x devices x price per device-hour, counted from the job's start.

Enforcement of a cap comes with the budget issue; the meter exists from day one so every
run records its wall time and device-hours.
"""

from __future__ import annotations

import time
from typing import Callable


class CostMeter:
    def __init__(self, usd_per_device_hour: float, devices: int = 1, spent_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.usd_per_device_hour = usd_per_device_hour
        self.devices = devices
        self._clock = clock
        self._start = clock()
        self._carried = spent_seconds  # wall seconds spent by earlier attempts of this run

    @property
    def wall_seconds(self) -> float:
        return self._carried + self._clock() - self._start

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.devices / 3600.0

    @property
    def usd(self) -> float:
        return self.device_hours * self.usd_per_device_hour

    def metrics(self) -> dict[str, float]:
        return {"cost/wall_s": self.wall_seconds, "cost/device_hours": self.device_hours, "cost/usd": self.usd}
