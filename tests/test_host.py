"""Process settings made by the entry points (runner/host.py), checked in fresh processes:
the OpenMP wait policy must be chosen before torch loads, and the allocator setting must
really stop freed memory from coming back as page faults."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

PROBE = """
import json, resource
from runner import host
host.configure()  # what python -m runner does first
import torch
torch.set_num_threads(1)
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # gradient-sized tensors (40 MB, over glibc's 32 MB mmap ceiling), freed together
        xs = [torch.ones(10_000_000) for _ in range(3)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults(), faults()  # warm-up: the heap reaches its working size
print(json.dumps({**host.POLICY, "faults": faults(), "env": __import__("os").environ.get("OMP_WAIT_POLICY")}))
"""


def probe(**env_changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
           and not k.startswith("MALLOC_")}
    env.update(env_changes)
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_importing_the_package_changes_nothing():
    code = ("import os, json, runner, runner.train; from runner import host; "
            "print(json.dumps([host.POLICY, os.environ.get('OMP_WAIT_POLICY')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [{}, None]


def test_the_users_wait_policy_wins():
    got = probe(OMP_WAIT_POLICY="ACTIVE")
    assert got["omp_wait_policy"] == "ACTIVE" and got["why"] == "set in the environment" and got["env"] == "ACTIVE"


def test_busy_cores_make_threads_sleep():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        got = probe()
    finally:
        hog.kill()
    assert got["omp_wait_policy"] == "PASSIVE" and got["env"] == "PASSIVE", got
    assert got["why"].endswith("cores busy at start")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    kept = probe()
    assert kept["malloc"] == "keep freed memory"
    system = probe(MALLOC_ARENA_MAX="8")  # any MALLOC_* variable: glibc's own behaviour
    assert system["malloc"].startswith("system")
    # 5 x 3 x 40 MB allocated and freed: ~10k faults each under glibc's default (~150k);
    # kept, mostly none (glibc's aligned allocations still grow the heap now and then:
    # up to ~20k seen)
    assert system["faults"] > 100_000 and kept["faults"] * 4 < system["faults"], (kept, system)


def test_free_cores_spin_briefly_then_sleep():
    """Cores free at start: libgomp's spin count drops from 300000 to host.SPINCOUNT (as fast
    alone, ~passive under load that appears later: README, Speed on AMD EPYC)."""
    code = ("import json, os; from runner import host; host.choose(busy_threshold=float('inf')); "
            "print(json.dumps([host.POLICY, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY')]))")

    def run(**extra):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    from runner.host import SPINCOUNT

    policy, spins, wait = run()
    assert spins == SPINCOUNT == policy["gomp_spincount"] and wait is None, policy
    policy, spins, _ = run(GOMP_SPINCOUNT="50")  # the user's own spin count wins
    assert spins == "50" and policy == {"omp_wait_policy": "default", "why": "set in the environment",
                                        "gomp_spincount": "50"}


def test_the_bench_takes_a_spin_count_as_wait_policy():
    import argparse

    from runner.bench import wait_policy

    assert [wait_policy(v) for v in ("auto", "spin", "passive", "1000")] == ["auto", "spin", "passive", "1000"]
    with pytest.raises(argparse.ArgumentTypeError, match="'fast': use auto, spin, passive or a spin count"):
        wait_policy("fast")
