"""Multirun sweeps as one MLflow study: a parent run per sweep, a child run per job.

The Hydra callback creates the parent run once, in the process that launches the sweep,
and writes its id into the sweep directory; every job (in-process with the basic launcher,
or in worker processes with joblib or submitit) reads it from there and tags its run as a
child. At the end the callback collects the children into a summary table and a plot of
the objective per job, logs both to the parent run and prints the table.

A second sweep started in the same sweep dir (or the same command resuming one) joins the
parent run already named there instead of making another: `sweep_parent.json` is written
once, atomically, under `sweep_parent.lock`. Every sweep running in the dir holds a shared
flock on `sweep_running.lock` (the kernel drops it if the process dies); at its end a sweep
always refreshes the summary, and ends the parent run only if it can then take that lock
exclusively, i.e. it is the last sweep running there. So no parent run is left RUNNING by
a sweep that ended, nor marked ended while another sweep still adds children to it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
from pathlib import Path
from typing import IO, Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.state_files import file_lock, read_json, try_flock, write_json_atomic
from runner.sweep_ledger import LEDGER_FILE, read_ledger
from runner.config import ConfigError
from runner.preflight.commandline import _refuse  # the command line's refusal: "error: ...", exit 2

log = logging.getLogger(__name__)

PARENT_FILE = "sweep_parent.json"
PARENT_LOCK = "sweep_parent.lock"  # exclusive while a sweep looks up or makes the parent, or summarises
RUNNING_LOCK = "sweep_running.lock"  # shared by every sweep running in the dir, from start to end
PARENT_REMEDY = ("restore it, or delete it to give the next sweep in this dir a new parent run "
                 "(runs already logged keep the old one)")


def _parent_shape(data: Any) -> Optional[str]:
    """What is wrong with a parsed sweep_parent.json, or None. A null run_id is whole: the
    parent was made while MLflow could not be reached (its creation waits in a spool)."""
    if not isinstance(data, dict) or not isinstance(data.get("run_id", 0), (str, type(None))):
        return 'expected {"run_id": ..., "tracking_uri": ..., "experiment": ...}'
    missing = [k for k in ("tracking_uri", "experiment") if not isinstance(data.get(k), str)]
    return f"no {' or '.join(missing)}" if missing else None


def parent_of(sweep_dir: str | Path) -> Optional[dict]:
    """The sweep's parent run (None: no sweep made one here yet); a damaged file is refused
    (ConfigError), not taken as absent, which would make a second parent run."""
    return read_json(Path(sweep_dir) / PARENT_FILE, PARENT_REMEDY, _parent_shape)


def _tracking(config: DictConfig) -> tuple[Optional[str], str]:
    t = config.get("tracking", {})
    return t.get("uri"), t.get("experiment", "runner")


def _hold_running(sweep_dir: Path) -> tuple[IO, bool]:
    """Take the shared "a sweep runs here" lock for this sweep's lifetime; also says whether
    another sweep held it already (for the message when this one joins its parent)."""
    f = open(sweep_dir / RUNNING_LOCK, "a+")
    alone = try_flock(f, fcntl.LOCK_EX)
    fcntl.flock(f, fcntl.LOCK_SH)  # from exclusive (alone) or from nothing: blocks only on a sweep ending
    return f, not alone


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self._running: Optional[IO] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            read_ledger(sweep_dir / LEDGER_FILE)  # damaged: refused before any parent run or job
            self._running, other = _hold_running(sweep_dir)
            with file_lock(sweep_dir / PARENT_LOCK):
                parent = parent_of(sweep_dir)
                if parent:
                    log.warning("joining the parent run %s named in %s (made by %s): this sweep's jobs are its "
                                "children too", parent["run_id"], sweep_dir / PARENT_FILE,
                                "a sweep still running in this dir" if other else "an earlier sweep in this dir")
                    return
                self._make_parent(config, sweep_dir)
        except ConfigError as e:
            _refuse(e)

    @staticmethod
    def _make_parent(config: DictConfig, sweep_dir: Path) -> None:
        """The parent run and the file naming it (only ever under PARENT_LOCK, once per dir)."""
        from runner.track.store import Tracker

        uri, experiment = _tracking(config)
        tracker = Tracker(uri, experiment)
        overrides = " ".join(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else dict(params or {})
        tracker.start(f"sweep {sweep_dir.name}", {"runner.track.sweep": "parent", "sweep_dir": str(sweep_dir.resolve()),
                                                  "overrides": overrides, "sweeper": str(config.hydra.sweeper._target_)})
        tracker.log_text(json.dumps(params, indent=2), "sweep_params.json")
        tracker.flush()
        write_json_atomic(sweep_dir / PARENT_FILE, {"run_id": tracker.run_id, "tracking_uri": tracker.uri,
                                                    "experiment": experiment})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            with file_lock(sweep_dir / PARENT_LOCK):  # one sweep's end at a time: the last one ends the parent
                parent = parent_of(sweep_dir)
                last = self._leave()
                try:
                    if parent and parent["run_id"]:
                        self._report(config, sweep_dir, parent, end=last)
                finally:
                    if self._running is not None:
                        self._running.close()
                        self._running = None
        except ConfigError as e:
            _refuse(e)

    def _leave(self) -> bool:
        """Drop this sweep's shared lock; True if no other sweep in the dir holds one (this is
        the last to end), and then hold it exclusively so none joins until the parent is ended."""
        if self._running is None:
            return True
        fcntl.flock(self._running, fcntl.LOCK_UN)
        return try_flock(self._running, fcntl.LOCK_EX)

    @staticmethod
    def _report(config: DictConfig, sweep_dir: Path, parent: dict, end: bool) -> None:
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
        text, rows = summarise(parent["tracking_uri"], parent["run_id"], objective, sweep_dir, end=end)
        print(text)
        if not end:
            print(f"parent run {parent['run_id']} left RUNNING: another sweep in {sweep_dir} is still running, "
                  f"and the last one to end ends it")


def summarise(uri: str, parent_run_id: str, objective: str, out_dir: Path,
              end: bool = True) -> tuple[str, list[dict]]:
    """Table and plot of the children of a sweep's parent run, logged to the parent; with
    `end`, the parent's status is set from its children's (else it stays RUNNING: another
    sweep in the dir still adds children)."""
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
    if not end:
        tracker.flush()
        return text, rows
    statuses = {r["status"] for r in rows}
    tracker.end("FINISHED" if statuses <= {"FINISHED"} else "FAILED" if "FAILED" in statuses else "FINISHED")
    return text, rows
