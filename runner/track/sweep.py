"""Multirun sweeps as one MLflow study: a parent run per sweep, a child run per job.

The Hydra callback creates the parent run once, in the process that launches the sweep,
and writes its id into the sweep directory; every job (in-process with the basic launcher,
or in worker processes with joblib or submitit) reads it from there and tags its run as a
child. At the end the callback collects the children into a summary table and a plot of
the objective per job, logs both to the parent run and prints the table.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PARENT_FILE = "sweep_parent.json"


def parent_of(sweep_dir: str | Path) -> Optional[dict]:
    p = Path(sweep_dir) / PARENT_FILE
    return json.loads(p.read_text()) if p.exists() else None


def _tracking(config: DictConfig) -> tuple[Optional[str], str]:
    t = config.get("tracking", {})
    return t.get("uri"), t.get("experiment", "runner")


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.track.store import Tracker

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if parent_of(sweep_dir):  # a resumed sweep keeps its parent run
            return
        uri, experiment = _tracking(config)
        tracker = Tracker(uri, experiment)
        overrides = " ".join(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else dict(params or {})
        tracker.start(f"sweep {sweep_dir.name}", {"runner.track.sweep": "parent", "sweep_dir": str(sweep_dir.resolve()),
                                                  "overrides": overrides, "sweeper": str(config.hydra.sweeper._target_)})
        tracker.log_text(json.dumps(params, indent=2), "sweep_params.json")
        tracker.flush()
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.uri,
                                                         "experiment": experiment}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        parent = parent_of(sweep_dir)
        if not parent:
            return
        objective = config.get("objective", "eval/answers/tv_uniform_valid")
        if config.get("report") == "dice_post":
            from runner.track.report import report

            text, _ = report(parent["tracking_uri"], parent["run_id"], out=sweep_dir / "report")
            print(text)
            print(f"report and plots: {sweep_dir / 'report'} (and on the sweep's parent run)")
        if config.get("report") == "phase":
            from runner.track.phase import phase

            text, _ = phase(parent["tracking_uri"], parent["run_id"], out=sweep_dir / "phase")
            print(text)
            print(f"phase diagram: {sweep_dir / 'phase'} (and on the sweep's parent run)")
        text, rows = summarise(parent["tracking_uri"], parent["run_id"], objective, sweep_dir)
        print(text)


def summarise(uri: str, parent_run_id: str, objective: str, out_dir: Path) -> tuple[str, list[dict]]:
    """Table and plot of the children of a sweep's parent run, logged to the parent."""
    from mlflow.tracking import MlflowClient

    from runner.track.store import Tracker

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    rows = []
    for r in children:
        t, m = r.data.tags, r.data.metrics
        rows.append({"job": int(t.get("job_num", -1)), "overrides": t.get("override", ""), "status": r.info.status,
                     "stop_reason": t.get("stop_reason", ""), objective: m.get(objective, math.nan),
                     "usd": float(t.get("total_usd", "nan")), "run_id": r.info.run_id})
    rows.sort(key=lambda x: x["job"])
    head = f"| job | overrides | status | stop | {objective} | usd |\n|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['job']} | {r['overrides']} | {r['status']} | {r['stop_reason']} | "
                   f"{r[objective]:.4f} | {r['usd']:.4f} |\n" for r in rows)
    text = f"sweep summary ({len(rows)} jobs, parent run {parent_run_id}):\n" + head + body
    tracker = Tracker(uri, client.get_experiment(parent.info.experiment_id).name)
    tracker.run_id = parent_run_id
    tracker.log_text(head + body, "sweep_summary.md")
    finite = [r for r in rows if not math.isnan(r[objective])]
    if finite:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(finite)), 4))
        ax.bar(range(len(finite)), [r[objective] for r in finite])
        ax.set_xticks(range(len(finite)), [str(r["job"]) for r in finite])
        ax.set_xlabel("job (overrides in sweep_summary.md)")
        ax.set_ylabel(objective)
        ax.set_title("objective per job")
        fig.tight_layout()
        path = out_dir / "sweep_objective.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        tracker.log_artifact(path)
        best = min(finite, key=lambda r: r[objective])
        tracker.set_tags({"best_job": best["job"], "best_overrides": best["overrides"],
                          f"best_{objective.replace('/', '_')}": f"{best[objective]:.4f}"})
    statuses = {r["status"] for r in rows}
    tracker.end("FINISHED" if statuses <= {"FINISHED"} else "FAILED" if "FAILED" in statuses else "FINISHED")
    return text, rows
