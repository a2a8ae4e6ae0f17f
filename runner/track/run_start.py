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
        outdir.update_record(output_dir, run_id=run_id, tracking_uri=tracker.uri, experiment=cfg.tracking.experiment,
                             tracking_lost=None)

    def lost(why: str) -> None:
        outdir.update_record(output_dir, tracking_lost=f"{tracker.uri}: {why}")

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, output_dir, on_run_created=remember, background=True,
                      on_store_lost=lost)
    same_store = prior.get("tracking_uri") in (None, tracker.uri)
    spooled_create = any(o["op"] == "create" for o in tracker._ops)
    moved = not same_store and bool(prior.get("run_id"))  # train.resume=force into another store (runner.outdir)
    if moved:
        _copy_run(tracker, prior, step)
    if moved or (same_store and (prior.get("run_id") or spooled_create)):
        tracker.resume(None if moved else prior.get("run_id"), upto_step=step)
        if moved:
            _end_old_run(tracker, prior)
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


def _copy_run(tracker: Tracker, prior: dict, step: int) -> None:
    """A forced resume into another store: the run is copied there from its journal (the
    resume then drops the metrics past the checkpoint, which are recomputed) and goes on as
    that copy. Without a journal (a run from before journals) the new store would hold the
    later steps only: refused."""
    was = f"run {prior['run_id']} in {prior.get('tracking_uri')}"
    if not tracker.recreate({"runner.copied_from": f"{was} (train.resume=force at step {step})"}):
        raise outdir.OutputDirError(
            f"train.resume=force into {tracker.uri}: this output dir has no tracking journal to copy {was} from, so "
            f"the new store would hold the steps after {step} only; pass tracking.uri={prior.get('tracking_uri')}, "
            f"or train.resume=never to start a new run here")


def _end_old_run(tracker: Tracker, prior: dict) -> None:
    """The run a forced resume moved away from is ended KILLED, tagged with where it went, if
    its store can still be reached (else it stays as it was; the copy is whole either way)."""
    if tracker.run_id is None:
        return
    try:
        from runner.track.connect import connect

        old = connect(prior["tracking_uri"])
        old.set_tag(prior["run_id"], "runner.moved_to", f"run {tracker.run_id} in {tracker.uri}")
        old.set_terminated(prior["run_id"], status="KILLED")
    except Exception as e:
        log.warning("could not end run %s in %s (%s); this run goes on as %s in %s", prior["run_id"],
                    prior.get("tracking_uri"), str(e).splitlines()[0] if str(e) else type(e).__name__,
                    tracker.run_id, tracker.uri)


def _log_overrides(tracker: Tracker, output_dir: Path) -> None:
    """The dir's command history (runner.outdir.record_command), as config/overrides.yaml."""
    path = output_dir / outdir.OVERRIDES_FILE
    if path.exists():
        tracker.log_artifact(path, "config")


def _start_system_metrics(tracker: Tracker, cfg, resumed: bool) -> None:
    t = cfg.tracking
    if t.system_metrics and not tracker.start_system_metrics(t.system_metrics_interval, resumed):
        log.info("system metrics: not started (the MLflow run is not in the store yet)")
