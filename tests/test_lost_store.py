"""An MLflow store that loses the run (issue 33, cases 3 and 8): its SQLite file deleted mid-run,
deleted while the run was killed, or a forced resume into another store. The journal is the
copy of record: every case ends with one run holding every step once. Real processes, real
SQLite files deleted under them."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import run_cli

FAST = ["model=tiny", "train.eval_every=0", "train.eval_samples=4", "train.final_eval_samples=4",
        "rollout.max_new_tokens=5", "algo.group_size=3", "train.prompts_per_step=2", "train.checkpoint_every=2",
        "tracking.system_metrics=false"]


def runs(db: Path):
    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("runner")
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def steps(c, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, p=None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and (p is None or p.poll() is None), f"{path} never appeared"
        time.sleep(0.05)


def record(out: Path) -> dict:
    return json.loads((out / "run_state.json").read_text())


def sync(out: Path, *extra: str, cwd: Path):
    return subprocess.run([sys.executable, "-m", "runner.track.store", "sync", str(out), *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_store_deleted_mid_run_is_reported_and_sync_recreates_the_run(tmp_path):
    out, db = tmp_path / "out", tmp_path / "mlruns.db"
    p = start([*FAST, "train.steps=30", f"output_dir={out}"], tmp_path)
    wait_for(out / "checkpoints" / "ckpt-00000004.pt.sha256", p)
    db.unlink()  # MLflow's open connection would go on writing into the deleted file
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-2000:]
    assert "lost this run" in stderr and "was deleted" in stderr and f"runner.track.store sync {out}" in stderr
    old_id = record(out)["run_id"]
    assert "was deleted" in record(out)["tracking_lost"]

    r = sync(out, cwd=tmp_path)  # the same store (a new file at the same path)
    assert r.returncode == 0, r.stderr[-2000:]
    c, (run,) = runs(db)
    assert run.info.run_id != old_id and run.info.status == "FINISHED"
    assert steps(c, run.info.run_id) == list(range(1, 31))  # every step, once
    assert run.data.params["train.steps"] == "30" and run.data.tags["stop_reason"] == "completed"
    assert f"from run {old_id}" in run.data.tags["runner.recreated"]
    assert record(out)["run_id"] == run.info.run_id and record(out).get("tracking_lost") is None

    other = tmp_path / "other.db"  # and into another store (the spool alone had no creation for it)
    r = sync(out, "--uri", f"sqlite:///{other}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    c2, (copy,) = runs(other)
    assert steps(c2, copy.info.run_id) == list(range(1, 31)) and copy.info.status == "FINISHED"


def test_a_store_deleted_while_the_run_was_down_is_recreated_on_resume(tmp_path):
    out, db = tmp_path / "out", tmp_path / "mlruns.db"
    args = [*FAST, "train.steps=10", f"output_dir={out}"]
    p = start(args, tmp_path)
    wait_for(out / "checkpoints" / "ckpt-00000004.pt.sha256", p)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    db.unlink()
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recreating it from the journal" in (out / "runner.log").read_text()
    c, (run,) = runs(db)
    assert run.info.status == "FINISHED" and steps(c, run.info.run_id) == list(range(1, 11))
    assert record(out)["run_id"] == run.info.run_id


def test_a_forced_resume_into_another_store_copies_the_run_there(tmp_path):
    out, a, b = tmp_path / "out", tmp_path / "a.db", tmp_path / "b.db"
    args = [*FAST, "train.steps=10", f"output_dir={out}"]
    p = start([*args, f"tracking.uri=sqlite:///{a}"], tmp_path)
    wait_for(out / "checkpoints" / "ckpt-00000006.pt.sha256", p)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    ca, (old,) = runs(a)
    r = run_cli([*args, f"tracking.uri=sqlite:///{b}"], cwd=tmp_path)
    assert r.returncode == 2 and "train.resume=force to copy the run" in r.stderr
    r = run_cli([*args, f"tracking.uri=sqlite:///{b}", "train.resume=force"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cb, (new,) = runs(b)
    assert new.info.status == "FINISHED" and new.data.params["train.steps"] == "10"
    for key in ("train/loss", "reward/raw_mean", "time/step_s"):
        assert steps(cb, new.info.run_id, key) == list(range(1, 11)), key  # the copy's 1-6, then 7-10, once each
    assert f"run {old.info.run_id}" in new.data.tags["runner.copied_from"]
    old = ca.get_run(old.info.run_id)
    assert old.info.status == "KILLED" and new.info.run_id in old.data.tags["runner.moved_to"]
    assert record(out)["run_id"] == new.info.run_id and record(out)["tracking_uri"] == f"sqlite:///{b}"


def test_a_forced_resume_without_a_journal_is_refused_before_loading(tmp_path):
    out, a, b = tmp_path / "out", tmp_path / "a.db", tmp_path / "b.db"
    args = [*FAST, "train.steps=4", f"output_dir={out}"]
    assert run_cli([*args, f"tracking.uri=sqlite:///{a}"], cwd=tmp_path).returncode == 0
    (out / "mlflow_journal.jsonl").unlink()  # a run from before journals
    r = run_cli([*args, "train.steps=6", f"tracking.uri=sqlite:///{b}", "train.resume=force"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no tracking journal" in r.stderr.strip().splitlines()[0] and not b.exists()
