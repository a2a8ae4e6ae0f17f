"""Opening a job's MLflow run: a new run, or the output dir's own run again on a resume.

The output dir decides which: its record (run_state.json) names the store and run, or, if
MLflow was down so far, the run's creation is still in the spool. What goes in at the start
(params, the config, the command history, the completions-table tag, system metrics) goes
in on both routes, so a resumed run is as complete as one that never stopped."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from runner import host, outdir
from runner.config import flatten, to_dict
from runner.track import completions
from runner.track.store import Tracker

log = logging.getLogger(__name__)


def open_run(cfg, output_dir: Path, step: int, config_yaml: str, parent_run_id: Optional[str] = None,
             extra_tags: Optional[dict[str, str]] = None, invocation: Optional[dict] = None,
             fell_back: str = "") -> Tracker:
    """The tracker of this output dir's run, started or resumed at `step`. `invocation` (this
    command's overrides and resume action) is appended to the dir's history first: by now the
    resume checks have passed. `fell_back`: why an older checkpoint was resumed, if one was."""
    prior = outdir.read_record(output_dir)
    extra_tags = dict(extra_tags or {})
    resumed_with = extra_tags.pop("resumed_with", None)  # what a resume changed (runner.outdir)
    if invocation:
        outdir.record_command(output_dir, invocation["overrides"], invocation["action"])

    def remember(run_id: str) -> None:
        outdir.update_record(output_dir, run_id=run_id, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment)

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, output_dir, on_run_created=remember, background=True)
    same_store = prior.get("tracking_uri") in (None, tracker.uri)
    spooled_create = any(o["op"] == "create" for o in tracker._ops)
    if same_store and (prior.get("run_id") or spooled_create):
        tracker.resume(prior.get("run_id"), upto_step=step)
        tracker.log_text(config_yaml, f"config/resumed_at_step_{step}.yaml")
        _log_overrides(tracker, output_dir)
        _start_system_metrics(tracker, cfg, resumed=True)
        note = "; ".join(x for x in (resumed_with, fell_back) if x)
        if note:
            tracker.set_tags({f"resumed_at_step_{step}": note})
        return tracker
    tags = {
        "env": cfg.env.name,
        "algo": cfg.algo.name,
        "shaper": cfg.shaper.name,
        "model": cfg.model.name,
        "output_dir": str(output_dir),
        "omp_wait_policy": f"{host.POLICY.get('omp_wait_policy')} ({host.POLICY.get('why')})",
        "malloc": host.POLICY.get("malloc", ""),
        **extra_tags,
    }
    name = cfg.tracking.run_name or f"{cfg.env.name}-{cfg.algo.name}-{cfg.shaper.name}-s{cfg.seed}"
    tracker.start(name, tags, parent_run_id=parent_run_id)
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.log_text(config_yaml, "config/config.yaml")
    _log_overrides(tracker, output_dir)
    if cfg.tracking.samples_every:
        tracker.set_tags(dict([completions.LOGGED_ARTIFACTS_TAG]))
    _start_system_metrics(tracker, cfg, resumed=False)
    return tracker


def _log_overrides(tracker: Tracker, output_dir: Path) -> None:
    """The dir's command history (runner.outdir.record_command), as config/overrides.yaml."""
    path = output_dir / outdir.OVERRIDES_FILE
    if path.exists():
        tracker.log_artifact(path, "config")


def _start_system_metrics(tracker: Tracker, cfg, resumed: bool) -> None:
    t = cfg.tracking
    if t.system_metrics and not tracker.start_system_metrics(t.system_metrics_interval, resumed):
        log.info("system metrics: not started (the MLflow run is not in the store yet)")
