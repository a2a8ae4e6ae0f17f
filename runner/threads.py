"""OpenMP wait policy, chosen before torch is imported (the OpenMP runtime reads it once).

Spinning threads (OpenMP's default) wake instantly between the many small ops of a decode
step; sleeping ones (PASSIVE) give the core back. Which one wins depends on whether
anything else wants the cores. Measured on 2 cores (SmolLM2-135M, G=6, one training step):

    policy                idle machine   one other busy process
    default (spinning)    2.9 s          8.6 s
    PASSIVE               3.9 s          4.5 s

So: spin when the cores are free at start, sleep when they are not, and always let the
user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT win. Jobs that share cores by design (the
test suite, several workers on one CPU node) set PASSIVE themselves.
"""

from __future__ import annotations

import os
import sys
import time

# what was decided and why; logged with every run
POLICY: dict[str, str] = {}


def _busy_cores(seconds: float) -> float:
    """Cores kept busy by anything during `seconds` (this process sleeps meanwhile)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v) - idle, sum(v)

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def user_set() -> bool:
    return POLICY.get("why") == "set in the environment"


def choose(seconds: float = 0.1, busy_threshold: float = 0.5) -> dict[str, str]:
    """Set OMP_WAIT_POLICY=PASSIVE when other work holds the CPUs, else leave spinning on."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        POLICY.update(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"), why="set in the environment")
        return POLICY
    if "torch" in sys.modules:
        POLICY.update(omp_wait_policy="default", why="torch was imported before runner")
        return POLICY
    try:
        busy = _busy_cores(seconds)
    except (OSError, ValueError, IndexError):  # no /proc (not Linux): sleeping is the safe side
        busy = float("inf")
    if busy >= busy_threshold:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        POLICY.update(omp_wait_policy="PASSIVE", why=f"{busy:.1f} cores busy at start")
    else:
        POLICY.update(omp_wait_policy="default", why=f"{busy:.1f} cores busy at start")
    return POLICY
