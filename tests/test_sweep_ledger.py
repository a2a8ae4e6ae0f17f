"""Two sweeps in one sweep dir (issue 33, case 5): one budget ledger keyed by job, not by job
number; atomic, locked updates; damaged state files refused; one parent run, ended."""

import json
import multiprocessing as mp
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli
from runner.budget import CostMeter
from runner.sweep_ledger import SweepLedger
from runner.config import ConfigError
from runner.outdir import read_record
from runner.track.sweep import parent_of

CAP = 30.0  # $ at $1 per second: two tiny-model start-ups and a few seconds of steps
JOB = ["model=tiny", "train.steps=100000", "train.eval_every=0", "train.eval_samples=4", "rollout.max_new_tokens=4",
       "train.export=false", "budget.usd_per_device_hour=3600"]


def _sweep(sweep_dir, prefix, cwd, *extra):
    return run_cli(["-m", *JOB, f"budget.sweep_cap_usd={CAP}", f"hydra.sweep.dir={sweep_dir}",
                    f"hydra.sweep.subdir={prefix}_${{hydra.job.num}}", "seed=0,1,2", *extra], cwd=cwd)


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_sweeps_in_one_dir_share_the_cap_and_one_parent_run(tmp_path):
    sweep = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()  # the store's tables exist before two processes open it
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_sweep, sweep, "a", tmp_path)
        time.sleep(2)
        second = pool.submit(_sweep, sweep, "b", tmp_path)
        runs = [first.result(), second.result()]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]

    # one entry per job of both sweeps (by job number there were 3 for 6 jobs)
    jobs = json.loads((sweep / "budget_ledger.json").read_text())["jobs"]
    assert sorted(jobs) == ["a_0", "a_1", "a_2", "b_0", "b_1", "b_2"]
    assert {k: v["job_num"] for k, v in jobs.items()} == {k: k[-1] for k in jobs}

    # what the ledger recorded is what each job spent by its own meter: its total_usd tag
    # (the same reading, to 4 decimals), and no less than any cost/usd it logged after a step
    c = MlflowClient(uri)
    ran = {k: read_record(sweep / k)["run_id"] for k, v in jobs.items() if v["state"] != "skipped"}
    assert ran and any(c.get_run(i).data.tags["stop_reason"] == "budget" for i in ran.values())
    for key, run_id in ran.items():
        usd, tag = jobs[key]["usd"], float(c.get_run(run_id).data.tags["total_usd"])
        assert jobs[key]["state"] == "finished" and tag == pytest.approx(usd, abs=5.1e-5), (key, usd, tag)
        assert all(x <= usd for x in _history(c, run_id, "cost/usd"))  # none if stopped before a step
    total = sum(v["usd"] for v in jobs.values())

    # the guarantee: a job takes a step only while the sweep (every job's spending up to
    # now) plus that step fits the cap. So every step after a job's first began with the
    # sweep under the cap, and the sweep ends past it by at most what each job spent after
    # its last passing check: its last step and its stop (all of a job that took no step)
    slack = 0.0
    for key, run_id in ran.items():
        own, sweep_usd = _history(c, run_id, "cost/usd"), _history(c, run_id, "cost/sweep_usd")
        assert all(s <= CAP + 1e-6 for s in sweep_usd[:-1]), (key, sweep_usd)
        slack += jobs[key]["usd"] - (own[-2] if len(own) >= 2 else 0.0)
    assert total <= CAP + slack + 1e-3, (total, slack, jobs)

    _one_parent_run_ended(c, sweep, runs, children=6)


def _one_parent_run_ended(client, sweep, runs, children):
    """Both sweeps' jobs are children of one parent run, which the second sweep joined (it
    says so) and the last sweep to end ended: no run is left RUNNING."""
    every = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    parents = [x for x in every if x.data.tags.get("runner.track.sweep") == "parent"]
    assert [x.info.status for x in parents] == ["FINISHED"]
    assert parent_of(sweep)["run_id"] == parents[0].info.run_id
    kids = [x for x in every if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == children and len(every) == children + 1
    assert not [x.info.run_id for x in every if x.info.status == "RUNNING"]
    assert "joining the parent run" in "".join(r.stdout + r.stderr for r in runs)  # Hydra's log: stdout


def test_two_sweeps_started_together_make_one_parent_run(tmp_path):
    """Started at once, both found no sweep_parent.json, both made a parent run and one
    overwrote the other's, left RUNNING for ever. Every job is refused by the sweep budget
    here (nothing loads): the test is about the parent."""
    sweep = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()
    skip_all = ["budget.sweep_cap_usd=1", "budget.job_estimate_usd=2", f"hydra.sweep.dir={sweep}", "seed=0,1"]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda name: run_cli(["-m", "model=tiny", *skip_all,
                                                   f"hydra.sweep.subdir={name}_${{hydra.job.num}}"], cwd=tmp_path),
                             "ab"))
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    _one_parent_run_ended(MlflowClient(uri), sweep, runs, children=4)


def _job(path, sweep_dir, name, num, n):
    """One job of one sweep: admitted, charged n times, finished (a process of its own)."""
    led = SweepLedger(path, 1e9)
    key = led.key_for(sweep_dir / f"{name}_{num}")
    assert led.admit(key, None, num=str(num))[0]
    for i in range(1, n + 1):
        led.charge(key, float(i))
        led.others_spent(key)
    led.finish(key, float(n))


def _reader(path, stop):
    led = SweepLedger(path, 1e9)
    while not stop.is_set():
        led.read()  # never a half-written or damaged file: that would raise


def test_parallel_jobs_of_two_sweeps_lose_no_update(tmp_path):
    path = tmp_path / "budget_ledger.json"
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    reader = ctx.Process(target=_reader, args=(path, stop))
    jobs = [ctx.Process(target=_job, args=(path, tmp_path, name, num, 40)) for name in "ab" for num in (0, 1)]
    reader.start()
    for p in jobs:
        p.start()
    for p in jobs:
        p.join()
    stop.set()
    reader.join()
    assert [p.exitcode for p in jobs] == [0, 0, 0, 0] and reader.exitcode == 0
    data = SweepLedger(path, 1e9).read()["jobs"]
    assert {k: (v["usd"], v["state"], v["job_num"]) for k, v in data.items()} == {
        f"{name}_{num}": (40.0, "finished", str(num)) for name in "ab" for num in (0, 1)}
    assert not list(tmp_path.glob(".budget_ledger.json.*"))  # no temporary left behind


def _start_up(path, ready):
    """A job admitted at $3600/h ($1/s) that then loads its model for a long time."""
    led = SweepLedger(path, 1e9)
    assert led.admit("a_0", None, CostMeter(3600.0), num="0")[0]
    ready.set()
    time.sleep(60)


def test_a_starting_job_counts_as_it_spends_and_a_dead_one_stops(tmp_path):
    """A job's start-up (before its first step records anything) counts for the jobs beside
    it while its process lives; a job killed without finishing stops counting."""
    path = tmp_path / "budget_ledger.json"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    job = ctx.Process(target=_start_up, args=(path, ready))
    job.start()
    try:
        assert ready.wait(30)
        other = SweepLedger(path, 1e9)
        time.sleep(1.0)
        seen = other.others_spent("b_0")
        assert seen >= 0.9
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.join()
    dead = other.others_spent("b_0")
    time.sleep(0.5)
    assert other.others_spent("b_0") == dead < 0.5  # what it recorded at admission, no more


DAMAGED = {"truncated": '{"jobs": {"a_0": {"usd": 0.5, "sta', "garbage": "\x00\x01 not json at all", "empty": "",
           "wrong shape": '{"jobs": []}', "negative spending": '{"jobs": {"0": {"usd": -1, "state": "running"}}}'}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_a_damaged_ledger_is_refused_by_every_call_and_left_as_it_is(tmp_path, kind):
    path = tmp_path / "budget_ledger.json"
    path.write_text(DAMAGED[kind])
    led = SweepLedger(path, 10.0)
    calls = [lambda: led.admit("a_0", None), lambda: led.charge("a_0", 1.0), lambda: led.others_spent("a_0"),
             lambda: led.finish("a_0", 1.0), led.read]
    for call in calls:
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))} is damaged .*delete it to forget the spending"):
            call()
    assert path.read_text() == DAMAGED[kind]


def _refused_sweep(tmp_path, name, text, *extra):
    """A sweep whose sweep dir holds a damaged `name`: it must exit 2 with one line naming
    the file, make no MLflow run and leave the file as it was."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / name).write_text(text)
    r = run_cli(["-m", "model=tiny", f"hydra.sweep.dir={sweep}", "seed=0,1", *extra], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{sweep / name} is damaged" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (sweep / name).read_text() == text
    assert not (tmp_path / "mlruns.db").exists() and not [p for p in sweep.iterdir() if p.is_dir()]
    return errors[0]


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_sweep_with_a_damaged_ledger_is_refused(tmp_path, kind):
    line = _refused_sweep(tmp_path, "budget_ledger.json", DAMAGED[kind], "budget.sweep_cap_usd=1")
    assert "delete it to forget the spending recorded there" in line


def test_a_sweep_with_a_damaged_parent_file_is_refused(tmp_path):
    line = _refused_sweep(tmp_path, "sweep_parent.json", '{"run_id": "abc", "tracking')
    assert "delete it to give the next sweep in this dir a new parent run" in line
    (tmp_path / "sweep" / "sweep_parent.json").write_text('["not", "a", "parent"]')
    with pytest.raises(ConfigError, match="sweep_parent.json is damaged"):
        parent_of(tmp_path / "sweep")
