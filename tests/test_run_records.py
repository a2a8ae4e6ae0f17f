"""What a run records beside its metrics: the completions table over training
(tracking.samples_every), MLflow's system metrics (tracking.system_metrics), the command
lines that made it (overrides.yaml), and the whole config (`python -m runner.show_config`);
on real CLI runs of the tiny model read back through MLflow."""

import json

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_cli
from runner.track import completions

FAST = ["model=tiny", "train.eval_every=2", "train.eval_samples=8", "train.prompts_per_step=2", "algo.group_size=6",
        "rollout.max_new_tokens=6", "train.checkpoint_every=2"]


def test_a_resumed_step_replaces_its_rows(tmp_path):
    """A resume recomputes the steps after its checkpoint: their old rows go, earlier ones stay."""
    path = tmp_path / completions.TABLE
    row = lambda step, text: [step, 0, "p", text, 1.0, 0.5, "2", 0.1, True]  # noqa: E731
    completions.append(path, 2, [row(2, "a")])
    completions.append(path, 4, [row(4, "b")])
    completions.append(path, 6, [row(6, "c")])
    completions.append(path, 4, [row(4, "b2")])  # resumed from the step-2 checkpoint, step 4 again
    data = json.loads(path.read_text())
    assert data["columns"] == completions.COLUMNS
    assert [(r[0], r[3]) for r in data["data"]] == [(2, "a"), (4, "b2")]
    assert not path.with_name(path.name + ".tmp").exists()


def test_completions_table_and_system_metrics_reach_mlflow(tmp_path):
    out = tmp_path / "out"
    args = [*FAST, "tracking.samples_every=4", "tracking.system_metrics_interval=1", f"output_dir={out}"]
    r = run_cli([*args, "train.steps=4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([*args, "train.steps=6"], cwd=tmp_path)  # the same run, resumed for two more steps
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    assert {"path": completions.TABLE, "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("runner")
    try:
        table = mlflow.load_table(completions.TABLE, run_ids=[run.info.run_id])  # MLflow's own table reader
    finally:
        mlflow.set_tracking_uri(None)
    assert list(table.columns) == completions.COLUMNS
    # every 4 steps and the last step of each command (6 is not a multiple of 4): 2 groups x 6, no duplicates
    assert table.groupby("step").size().to_dict() == {4: 12, 6: 12}
    assert set(table["answer"]) <= {*"123456", "invalid"}
    assert table["reward"].between(0, 1).all() and set(table["group"]) == {0, 1}
    # grpo_wide: advantage = shaped reward - its group's mean, so each group's advantages sum to 0
    by_group = table.groupby(["step", "group"])
    assert (by_group["advantage"].sum().abs() < 1e-5).all()
    assert ((table["shaped_reward"] - by_group["shaped_reward"].transform("mean") - table["advantage"]).abs() < 1e-5).all()
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    # both command lines, in order, in the output dir and in MLflow; the tag names what started it
    history = yaml.safe_load((out / "overrides.yaml").read_text())
    assert [h["action"] for h in history] == ["fresh", "resume"]
    assert history[0]["overrides"] == [*args, "train.steps=4"] and history[1]["overrides"] == [*args, "train.steps=6"]
    logged = c.download_artifacts(run.info.run_id, "config/overrides.yaml", str(tmp_path))
    assert yaml.safe_load(open(logged).read()) == history
    assert run.data.tags["overrides"] == " ".join([*args, "train.steps=4"])


def test_show_config_prints_every_schema_key_with_the_overrides():
    """`--cfg job` shows the YAML only; show_config shows what the run will use."""
    from runner.config import flatten, to_dict, validate
    from runner.show_config import main, show

    shown = yaml.safe_load(show(["rollout.max_new_tokens=12", "shaper=none"]))
    assert shown["rollout"]["max_new_tokens"] == 12 and shown["shaper"]["name"] == "none"
    schema_keys = set(flatten(to_dict(validate({}))))
    assert schema_keys <= set(flatten(shown))  # vLLM's and DeepSpeed's keys too, at their defaults
    assert shown["rollout"]["sleep"] is not None and "zero_stage" in shown["trainer"]
    assert main(["algo.group_size=1"]) == 2
