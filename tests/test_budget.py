"""Cost meter, caps, the estimate, the sweep ledger, and sweeps as one MLflow study."""

import multiprocessing as mp

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from conftest import CONF, run_cli
from runner.budget import CostMeter
from runner.sweep_ledger import SweepLedger
from runner.config import validate
from runner.train import run


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_cost_meter_arithmetic():
    clock = FakeClock()
    m = CostMeter(usd_per_device_hour=2.0, devices=4, clock=clock)
    clock.t += 1800  # half an hour on 4 devices = 2 device-hours = $4
    assert m.device_hours == pytest.approx(2.0)
    assert m.usd == pytest.approx(4.0)
    assert m.metrics() == {"cost/wall_s": 1800.0, "cost/device_hours": pytest.approx(2.0), "cost/usd": pytest.approx(4.0)}
    m.carry(900)  # a resumed run carries what earlier attempts spent
    assert m.usd == pytest.approx(6.0)


def test_projection_uses_recent_steps():
    clock = FakeClock()
    m = CostMeter(usd_per_device_hour=3600.0, clock=clock, window=2)  # $1 per second
    assert not m.would_exceed(None)
    clock.t += 5  # $5 spent
    assert not m.would_exceed(5.5)  # no step timed yet: nothing to project
    for s in (10.0, 2.0, 4.0):
        m.record_step(s)
    assert m.next_step_seconds() == pytest.approx(4.0)  # the slower of the last two
    assert not m.would_exceed(9.0)
    assert m.would_exceed(8.9)
    assert m.would_exceed(5.5, extra_seconds=1.0)
    # a step that will also evaluate or save a checkpoint: that time on top
    assert not m.would_exceed(9.0) and m.would_exceed(9.0, periodic_seconds=2.0)
    assert not m.would_exceed(11.0, periodic_seconds=2.0)


def test_a_resumed_meter_projects_from_the_carried_steps():
    """Without the carried step times, a run resumed $0.5 under its cap would project a
    0 s step, run one more step, and end past the cap."""
    clock = FakeClock()
    first = CostMeter(usd_per_device_hour=3600.0, clock=clock, window=3)
    for s in (1.0, 3.0, 2.0, 2.5):
        first.record_step(s)
    assert first.recent_steps == [3.0, 2.0, 2.5]
    again = CostMeter(usd_per_device_hour=3600.0, clock=clock, window=3)
    again.carry(19.5)
    assert not again.would_exceed(20.0)  # nothing carried: projects nothing
    again.carry_steps(first.recent_steps)
    assert again.next_step_seconds() == 3.0 and again.would_exceed(20.0) and not again.would_exceed(22.5)


def test_ledger_admits_charges_and_refuses(tmp_path):
    led = SweepLedger(tmp_path / "ledger.json", cap_usd=10.0)
    assert led.admit("0", None)[0]
    assert led.charge("0", 6.0) == pytest.approx(6.0)
    led.finish("0", 6.0)
    ok, why = led.admit("1", None)  # estimate = mean of finished jobs = 6 > 4 left
    assert not ok and "sweep cap" in why
    assert led.read()["jobs"]["1"]["state"] == "skipped"
    assert led.admit("2", 3.0)[0]  # an explicit estimate that fits
    assert led.others_spent("2") == pytest.approx(6.0)


def _charge_many(path, job, n):
    led = SweepLedger(path, 1000.0)
    for i in range(1, n + 1):
        led.charge(job, float(i))


def test_ledger_is_safe_for_parallel_jobs(tmp_path):
    path = tmp_path / "ledger.json"
    procs = [mp.get_context("fork").Process(target=_charge_many, args=(path, str(j), 50)) for j in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    data = SweepLedger(path, 1000.0).read()
    assert {k: v["usd"] for k, v in data["jobs"].items()} == {str(j): 50.0 for j in range(4)}


def compose_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return validate(compose("config", overrides=[
            "model=tiny", "train.eval_samples=4", "rollout.max_new_tokens=4", "algo.group_size=3",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides]))


def test_a_tiny_cap_stops_the_run_by_budget(tmp_path):
    # $1 per second of wall time: the cap allows start-up and a few steps, not 100000
    cfg = compose_cfg(tmp_path, "hardware=h100", "budget.usd_per_device_hour=3600", "budget.cap_usd=20",
                      "train.steps=100000", "train.eval_every=0")
    t = run(cfg, tmp_path / "out", "{}")
    assert t.stop_reason == "budget" and 0 < t.step < 100000
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    r = c.get_run(t.tracker.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["stop_reason"] == "budget"
    assert (tmp_path / "out" / "checkpoints" / f"ckpt-{t.step:08d}.pt").exists()
    spent = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "cost/usd"), key=lambda m: m.step)]
    assert len(spent) == t.step
    # every step but the last ended under the cap (the next check would have stopped the run);
    # the last may end past it only by its excess over the projection (a busy machine: seen
    # in CI, a 0.8 s step after 0.1 s ones), so it is not asserted under the cap
    assert max(spent[:-1]) <= 20.0
    # ...and the run did not stop long before the cap: the projection (slowest recent step +
    # the final checkpoint) crossed it, give or take the last step's logging
    assert spent[-1] + t.meter.usd_for(t.meter.next_step_seconds() + 2 * t.save_seconds) > 17.0
    # resuming carries the spending and the step times forward: it stops before any step
    again = run(cfg, tmp_path / "out", "{}")
    assert again.stop_reason == "budget" and again.step == t.step
    assert again.meter.usd >= spent[-1] and again.meter.recent_steps == t.meter.recent_steps


def test_a_token_budget_stops_the_run_as_finished(tmp_path):
    cfg = compose_cfg(tmp_path, "train.steps=1000", "train.eval_every=0", "train.max_generated_tokens=50")
    t = run(cfg, tmp_path / "out", "{}")
    assert t.stop_reason == "token_budget" and 1 < t.step < 1000
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    r = c.get_run(t.tracker.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["stop_reason"] == "token_budget"
    per_step = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "tokens/generated"), key=lambda m: m.step)]
    total = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "tokens/generated_total"),
                                     key=lambda m: m.step)]
    assert len(per_step) == t.step and all(0 < x <= 2 * 3 * 4 for x in per_step)  # 2 groups x G=3 x 4 tokens
    assert total == [sum(per_step[: i + 1]) for i in range(len(per_step))]
    assert total[-2] < 50 <= total[-1]  # it stops at the first step that reaches the budget
    assert "eval/reward_mean" in r.data.metrics  # the final evaluation ran
    # the count is checkpointed: resumed with the same budget, the run stops before any step
    again = run(cfg, tmp_path / "out", "{}")
    assert again.stop_reason == "token_budget" and again.step == t.step and again.generated_tokens == total[-1]


def test_a_bad_token_budget_is_refused():
    from runner.config import ConfigError

    with pytest.raises(ConfigError, match="^train.max_generated_tokens"):
        validate({"train": {"max_generated_tokens": 0}})


def test_estimate_only_projects_and_logs_nothing(tmp_path, capsys):
    cfg = compose_cfg(tmp_path, "budget.estimate_only=true", "budget.estimate_steps=2", "hardware=a100",
                      "train.steps=40", "train.eval_every=10", "budget.cap_usd=0.000001")
    t = run(cfg, tmp_path / "out", "{}")
    est = t.estimate
    assert est["steps"] == 40 and est["evals"] == 4 and est["step_s"] > 0
    assert est["usd"] == pytest.approx(est["total_s"] / 3600 * 1.79)
    assert est["fits"] is False
    assert "does NOT fit" in capsys.readouterr().out
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_two_job_sweep_is_one_parent_with_two_children(tmp_path, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    r = run_cli(["-m", "model=tiny", "train.steps=2", "train.eval_samples=4", "rollout.max_new_tokens=4",
                 "shaper=none,divisor", *extra], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    parents = [x for x in runs if x.data.tags.get("runner.track.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(k.data.tags["job_num"] for k in kids) == ["0", "1"]
    assert {k.data.tags["shaper"] for k in kids} == {"none", "divisor"}
    assert all("shaper=" in k.data.tags["override"] for k in kids)
    arts = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {"sweep_summary.md", "sweep_objective.png"} <= arts
    assert "sweep summary (2 jobs" in r.stdout


def test_sweep_budget_skips_jobs_that_would_overrun(tmp_path):
    r = run_cli(["-m", "model=tiny", "train.steps=1", "train.eval_samples=4", "budget.sweep_cap_usd=1",
                 "budget.job_estimate_usd=2", "seed=0,1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipped by the sweep budget") == 2
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    kids = [x for x in runs if x.data.tags.get("stop_reason") == "sweep_budget"]
    assert len(kids) == 2 and all("sweep cap" in k.data.tags["skip_reason"] for k in kids)
    assert not list(tmp_path.glob("multirun/*/*/*/checkpoints"))  # never half-started


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF / "recipe").glob("*usd.yaml")))
def test_budget_recipes_run_on_cpu_with_the_tiny_model(tmp_path, recipe):
    cfg = compose_cfg(tmp_path, f"recipe={recipe}", "model=tiny", "hardware=cpu", "train.steps=1",
                      "train.prompts_per_step=2", "trainer.device=cpu", "algo.overlong.buffer=2")
    assert cfg.budget.cap_usd is not None  # a recipe states its budget
    t = run(cfg, tmp_path / "out", "{}")
    assert t.stop_reason == "completed" and t.step == 1
