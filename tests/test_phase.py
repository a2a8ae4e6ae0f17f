"""The phase diagram: its table and heatmap from a store (real SQLite), and the sweep file
run end to end through Hydra's joblib launcher on the tiny model."""

from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from conftest import CONF, run_cli
from runner.track.phase import phase


def fake(c, exp, parent, g, shaper, seed, final):
    r = c.create_run(exp, tags={"shaper": shaper, "mlflow.parentRunId": parent})
    ms = [Metric(f"eval/answers/frac/{a}", v, 0, 40) for a, v in final.items()]
    ps = [Param("algo.group_size", str(g)), Param("train.prompts_per_step", str(48 // g)), Param("seed", str(seed)),
          Param("env.name", "even_dice"), Param("env.faces", "6")]
    c.log_batch(r.info.run_id, metrics=ms, params=ps)
    c.set_terminated(r.info.run_id, "FINISHED")


def test_phase_table_counts_spread_and_collapsed_seeds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("runner")
    parent = c.create_run(exp).info.run_id
    spread = {"2": 0.3, "4": 0.35, "6": 0.3, "invalid": 0.05}
    fake(c, exp, parent, 48, "divisor", 0, spread)
    fake(c, exp, parent, 48, "divisor", 1, spread)
    fake(c, exp, parent, 48, "divisor", 2, {"2": 0.5, "4": 0.5})  # two answers: neither
    fake(c, exp, parent, 48, "none", 0, {"2": 0.9, "4": 0.1})
    fake(c, exp, parent, 6, "divisor", 0, {"4": 0.15, "2": 0.6, "6": 0.25})
    fake(c, exp, parent, 6, "none", 0, {"2": 0.3, "4": 0.3, "6": 0.25, "1": 0.15})  # 0.15 unrewarded: not spread
    text, stats = phase(uri, parent, out=tmp_path / "ph")
    assert stats[(48, "divisor")] == (2, 0, 3)
    assert stats[(48, "none")] == (0, 1, 1)
    assert stats[(6, "divisor")] == (0, 0, 1)
    assert stats[(6, "none")] == (0, 0, 1)
    assert "| 48 x 1 | 0/1 / 1/1 | 2/3 / 0/3 |" in text
    assert (tmp_path / "ph" / "phase_heatmap.png").stat().st_size > 0
    assert {a.path for a in c.list_artifacts(parent)} >= {"phase.md", "phase_heatmap.png"}


def test_phase_sweep_runs_end_to_end(tmp_path):
    args = ["--config-dir", str(CONF.parent / "sweeps"), "--config-name", "phase_diagram", "-m", "model=tiny",
            "phase=g6,g12", "shaper=divisor", "seed=0", "train.steps=1", "train.eval_samples=4",
            "rollout.max_new_tokens=4", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "sweep" / "phase" / "phase.md").read_text()
    assert "| 6 x 8 |" in text and "| 12 x 4 |" in text
    assert Path(tmp_path / "sweep" / "phase" / "phase_heatmap.png").exists()
