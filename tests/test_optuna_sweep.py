"""`sweeps/optuna_lr_entropy.yaml` run for real: the Optuna sweeper (hydra-optuna-sweeper 1.3.0,
optuna 2.10.1, in-memory study) drives 2 trials of the tiny model through the CLI, each a child
MLflow run whose `objective` metric is the value Optuna minimises."""

import math

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_cli

OBJECTIVE = "eval/prob/tv_uniform_valid"  # the sweep file's `objective`
LR, COEF = (1e-6, 1e-4), (0.0, 0.05)      # its declared intervals


def test_optuna_sweep_two_trials_on_tiny_model(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", "optuna_lr_entropy",
            "hydra.sweeper.n_trials=2", "model=tiny", "train.steps=1", "algo.group_size=6",
            "train.eval_samples=4", "train.final_eval_samples=4", "rollout.max_new_tokens=4",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", f"hydra.sweep.dir={sweep}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Sampler: TPESampler" in r.stdout and "Directions: ['minimize']" in r.stdout, r.stdout[-3000:]

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = c.get_experiment_by_name("runner").experiment_id
    parents = c.search_runs([exp], filter_string="tags.`runner.track.sweep` = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    children = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(ch.data.tags["job_num"] for ch in children) == ["0", "1"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]

    sampled = []
    for ch in children:
        assert ch.info.status == "FINISHED" and ch.data.tags["stop_reason"] == "completed"
        value = ch.data.metrics[OBJECTIVE]
        assert math.isfinite(value) and 0.0 <= value <= 1.0
        lr, coef = float(ch.data.params["algo.lr"]), float(ch.data.params["algo.entropy.coef"])
        assert LR[0] <= lr <= LR[1] and COEF[0] <= coef <= COEF[1], (lr, coef)
        # what the sweeper sampled is what the job ran with
        assert f"algo.lr={ch.data.params['algo.lr']}" in ch.data.tags["override"]
        assert f"algo.entropy.coef={ch.data.params['algo.entropy.coef']}" in ch.data.tags["override"]
        sampled.append((lr, coef, value, ch.data.tags["job_num"]))
    (lr0, coef0, *_), (lr1, coef1, *_) = sampled
    assert lr0 != lr1 and coef0 != coef1
    assert parent.info.status == "FINISHED"  # ended by the callback after both jobs

    # the sweeper's result: the best trial is the child with the lowest objective
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    best = min(v for _, _, v, _ in sampled)
    assert result["best_value"] == pytest.approx(best, rel=1e-12, abs=0)
    winners = [s for s in sampled if s[2] == pytest.approx(best, rel=1e-12, abs=0)]  # both, on a tie
    got = (result["best_params"]["algo.lr"], result["best_params"]["algo.entropy.coef"])
    assert any(got == pytest.approx(w[:2], rel=1e-12) for w in winners), (got, sampled)
    assert parent.data.tags["best_job"] in {w[3] for w in winners}  # the MLflow summary agrees
