"""How this process uses the host's CPUs and memory, set before torch is imported.

OpenMP wait policy (the OpenMP runtime reads it once, when torch loads it).

Spinning threads (OpenMP's default) wake instantly between the many small ops of a decode
step; sleeping ones (PASSIVE) give the core back. Which one wins depends on whether
anything else wants the cores. Measured on 2 cores (SmolLM2-135M, G=6, one training step):

    policy                idle machine   one other busy process
    default (spinning)    2.9 s          8.6 s
    PASSIVE               3.9 s          4.5 s

So: sleep when the cores are busy at start. When they are free, spin only briefly
(GOMP_SPINCOUNT=1000, a few microseconds, where libgomp's default 300000 spins for
milliseconds): the policy cannot change once torch has loaded, and load may appear later.
Measured on 2 cores of an AMD EPYC (G=6 x 2 prompts, a one-thread rival started after step
5; three runs each, `python -m runner.bench --contend-after 5 --wait-policy ...`):

    policy                alone (s/step)        after the rival started
    libgomp default       8.9 / 7.8 / 8.9       21.9 / 19.8 / 21.2
    PASSIVE               8.2 / 8.5 / 7.6       12.4 / 12.4 / 11.3
    GOMP_SPINCOUNT=1000   7.9 / 7.9 / 7.7       13.8 / 12.3 / 12.8
    GOMP_SPINCOUNT=10000  7.6                   20.6

The user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT always win. Jobs that share cores by design
(the test suite, several workers on one CPU node) set PASSIVE themselves.

Freed memory is kept for reuse (glibc mallopt): by default glibc gives every large freed
block back to the kernel, so each step's gradients and activations (~800 MB for the
default model) come back as fresh pages, each one a page fault: ~200k faults and ~0.3 s
of kernel time a step, 12% of the step on 2 cores. Kept, the same pages are reused (same
peak RSS, measured). Any MALLOC_* variable in the environment turns this off.
"""

from __future__ import annotations

import functools
import os
import sys
import time

# what was decided and why; logged with every run
POLICY: dict[str, str] = {}

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
# spins before a waiting OpenMP thread sleeps, on cores free at start (libgomp's default
# 300000 is milliseconds of spinning, 1000 a few microseconds); see the module docstring
SPINCOUNT = "1000"


def keep_freed_memory() -> str:
    """Serve every allocation from the heap (no per-allocation mmap) and never trim it."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "system (MALLOC_* set in the environment)"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # (the value is a C int: 2 GiB - 1 is the largest trim threshold)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        return "system (not glibc)"
    return "keep freed memory" if ok else "system (mallopt refused)"


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


def configure() -> dict[str, str]:
    """Once per process, by an entry point (python -m runner, runner.launch, runner.bench),
    before torch is imported."""
    if "malloc" in POLICY:
        return POLICY
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    choose()
    POLICY["malloc"] = keep_freed_memory()
    return POLICY


def choose(seconds: float = 0.1, busy_threshold: float = 0.5) -> dict[str, str]:
    """OMP_WAIT_POLICY=PASSIVE when other work holds the CPUs, else a short spin (SPINCOUNT)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        POLICY.update(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"), why="set in the environment")
        if "GOMP_SPINCOUNT" in os.environ:
            POLICY["gomp_spincount"] = os.environ["GOMP_SPINCOUNT"]
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
        # free cores: spin briefly between ops, then sleep, in case load appears later
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        POLICY.update(omp_wait_policy="default", gomp_spincount=SPINCOUNT, why=f"{busy:.1f} cores busy at start")
    return POLICY


@functools.lru_cache(maxsize=1)
def cpu_description() -> str:
    """The CPU model and the features that decide which fast paths exist (bf16 dot products,
    AMX tiles): the figures are only comparable between CPUs of one kind."""
    import platform

    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        for line in open("/proc/cpuinfo"):
            key = line.split(":", 1)[0].strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif key in ("cpu family", "model"):  # "AMD EPYC" alone names Zen 3 and Zen 4 VMs alike
                ids[key] = line.split(":", 1)[1].strip()
            elif key == "flags":
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if ids:
        model += f" (family {ids.get('cpu family', '?')}, model {ids.get('model', '?')})"
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, features: {' '.join(feats) or 'none of avx2/avx512/bf16/amx'}"
