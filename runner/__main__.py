"""`python -m runner [overrides]`: the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import logging
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Optional

from runner import host

host.configure()  # OpenMP wait policy and allocator, before anything imports torch

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from runner import outdir  # noqa: E402
from runner.budget import CostMeter  # noqa: E402
from runner.sweep_ledger import release_alive  # noqa: E402
from runner.config import ConfigError, validate  # noqa: E402
from runner.plugins import register_entry_points  # noqa: E402

log = logging.getLogger("runner")
# installed packages' environments (entry points `runner.envs`) become env=<name>
register_entry_points()


def refuse(e: Exception, output_dir: Path) -> None:
    """One line, exit 2, and nothing left behind: the output dir Hydra made for this command
    goes if nothing of a run is in it (runner/outdir.py discard_if_unused)."""
    print(f"error: {e}", file=sys.stderr)
    outdir.unlock(output_dir)
    outdir.discard_if_unused(output_dir)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Runs one job; returns the sweep objective (`objective`, a metric name) for sweepers."""
    from hydra.core.hydra_config import HydraConfig

    started_at = time.time()
    meter = CostMeter(0.0)  # the job's clock starts here, before any loading; priced below
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir).resolve()
    try:
        run_cfg = validate(cfg)
        check_installed(run_cfg)
    except ConfigError as e:
        refuse(e, output_dir)
    meter.usd_per_device_hour, meter.devices = run_cfg.budget.usd_per_device_hour, run_cfg.budget.devices
    run_cfg.output_dir = str(output_dir)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(run_cfg))
    if run_cfg.stages:  # a staged recipe: each stage is a job of its own (runner/recipe.py)
        from runner.recipe import run_recipe

        from hydra.types import RunMode

        # in a sweep the jobs share the stages they have in common (keyed by content)
        shared = Path(hc.sweep.dir).resolve() / "stages" if hc.mode == RunMode.MULTIRUN else None
        try:
            outdir.lock(output_dir)
            rc = run_recipe(run_cfg, list(hc.overrides.task), output_dir, shared)
            if rc:
                sys.exit(rc)
            return math.nan  # (a sweep's other jobs go on; the card holds the results)
        except ConfigError as e:
            refuse(e, output_dir)
        finally:
            outdir.unlock(output_dir)
    try:
        outdir.lock(output_dir)  # held until this job returns (the kernel drops it if we die)
        resume = outdir.decide(output_dir, config_yaml, run_cfg.train.resume, explicit_store(run_cfg.tracking.uri),
                               run_cfg.train.steps)
    except outdir.AlreadyFinished as e:
        outdir.unlock(output_dir)
        print(e, file=sys.stderr)
        return math.nan
    except ConfigError as e:
        refuse(e, output_dir)
    try:
        return run_job(cfg, run_cfg, hc, output_dir, resume, meter, started_at)
    except ConfigError as e:  # a damaged sweep_parent.json or budget ledger, before anything is loaded
        refuse(e, output_dir)
    except KeyboardInterrupt:  # before the run began (imports, a sweep's admission): nothing exists yet
        print("interrupted during start-up, before any step ran; nothing was logged or checkpointed",
              file=sys.stderr)
        sys.exit(130)
    finally:
        release_alive()  # the sweep ledger stops counting this job's time, however it ended
        outdir.unlock(output_dir)


def explicit_store(uri: Optional[str]) -> Optional[str]:
    """The store this command names (tracking.uri or $MLFLOW_TRACKING_URI), None for the default."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def run_job(cfg: DictConfig, run_cfg, hc, output_dir: Path, resume: "outdir.Resume", meter: CostMeter,
            started_at: float) -> Optional[float]:
    from hydra.types import RunMode

    for note in resume.notes:
        print(note, file=sys.stderr)
    if resume.tracking_uri and resume.tracking_uri != run_cfg.tracking.uri:
        log.info("resuming into the run's own store %s", resume.tracking_uri)
        run_cfg.tracking.uri = resume.tracking_uri
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(run_cfg))

    # a staged recipe's stage names its parent run and its own tags (runner/recipe.py)
    ledger, parent_id, job, job_id = None, run_cfg.tracking.parent_run_id, "0", "0"  # job_id: its sweep-ledger key
    recipe = hc.runtime.choices.get("recipe")
    tags = {"recipe": recipe} if recipe and recipe != "null" else {}
    tags.update(run_cfg.tracking.tags)
    overrides = list(hc.overrides.task)
    tags["overrides"] = (" ".join(overrides) or "(defaults)")[:5000]
    # appended to <output_dir>/overrides.yaml once the resume checks passed (Trainer.open_tracking):
    # a refused command leaves the dir as it was
    invocation = {"overrides": overrides, "action": resume.action}
    if resume.changes:
        tags["resumed_with"] = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in resume.changes.items())[:5000]
    if hc.mode == RunMode.MULTIRUN:
        from runner.sweep_ledger import LEDGER_FILE, SweepLedger
        from runner.track.sweep import parent_of

        job = str(hc.job.num)
        parent = parent_of(hc.sweep.dir)
        parent_id = parent["run_id"] if parent else None
        tags.update(job_num=job, override=hc.job.override_dirname or "(defaults)")
        if run_cfg.budget.sweep_cap_usd is not None:
            ledger = SweepLedger(Path(hc.sweep.dir) / LEDGER_FILE, run_cfg.budget.sweep_cap_usd)
            job_id = ledger.key_for(output_dir)  # not the job number: two sweeps in one dir share those
            admitted, why = ledger.admit(job_id, run_cfg.budget.job_estimate_usd, meter, num=job)
            if not admitted:
                skip(run_cfg, parent_id, tags, why)
                return math.nan

    if run_cfg.trainer.name == "deepspeed":
        from runner.launch import launch

        ledger_info = {"path": str(ledger.path), "cap_usd": ledger.cap_usd} if ledger is not None else None
        result = launch(run_cfg, output_dir, config_yaml, started_at=started_at, job_id=job_id,
                        parent_run_id=parent_id, extra_tags=tags, ledger=ledger_info, invocation=invocation)
        if result["returncode"] != 0:
            print(f"DeepSpeed workers exited with {result['returncode']} "
                  f"(stop reason: {result.get('stop_reason', 'unknown')}); the same command resumes from the "
                  f"last checkpoint", file=sys.stderr)
            sys.exit(result["returncode"] if result["returncode"] > 0 else 1)
        return result.get("objective", math.nan)

    from runner.train import CLEAN_EXIT_REASONS, Interrupted, NonFiniteError, run

    try:
        trainer = run(run_cfg, output_dir, config_yaml, meter, ledger, job_id, parent_id, tags, invocation)
    except Interrupted as e:
        print(e.message, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # between the loop's own handlers
        print("interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except ConfigError as e:  # the output dir's checkpoints, found unreadable after loading
        refuse(e, output_dir)
    except (NonFiniteError, OSError) as e:  # OSError: a full disk, say; the traceback is in MLflow (traceback.txt)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if trainer.stop_reason not in CLEAN_EXIT_REASONS:
        print(f"stopped by {trainer.stop_reason} at step {trainer.step}: checkpoint written, run marked KILLED; "
              f"the same command resumes it", file=sys.stderr)
        sys.exit(130)
    return objective_value(trainer.final_metrics, run_cfg.objective, hc.mode == RunMode.MULTIRUN)


def objective_value(final: dict, objective: str, sweep: bool) -> float:
    """The metric a sweeper ranks by; in a sweep, a run that has no such metric (the default
    eval/prob/tv_uniform_valid exists only for environments with a fixed answer set) says so
    in one line with the keys it has, instead of handing Optuna a silent NaN."""
    if objective in final:
        return final[objective]
    if sweep:
        have = sorted(k for k in final if k.startswith("eval/") and "/" not in k[5:])
        print(f"warning: objective={objective}: this run logged no such metric, so the sweep gets NaN for it; "
              f"set objective= one of {', '.join(have) or '(no eval/ metrics)'}", file=sys.stderr)
    return math.nan


def check_installed(run_cfg) -> None:
    """Optional parts (DeepSpeed, vLLM) and what the command names on this machine (one
    option per group, tracking store, model files, GPU, budget, context and memory:
    runner/preflight/) are checked here, before anything is loaded."""
    from runner import preflight

    preflight.check_hydra_choices()
    if run_cfg.trainer.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer=deepspeed: the deepspeed package is not installed; it is one of this "
                          "package's dependencies: `make setup`, or pip install deepspeed==0.19.8 (or use trainer=torch)")
    if run_cfg.rollout.name == "vllm":
        from runner.rollout.vllm import check_available

        check_available(run_cfg)
    preflight.check(run_cfg)


def skip(run_cfg, parent_id: Optional[str], tags: dict, why: str) -> None:
    """A sweep job refused by the shared budget: recorded as a child run, nothing loaded."""
    from runner.track.store import Tracker

    print(f"skipped by the sweep budget: {why}", file=sys.stderr)
    t = Tracker(run_cfg.tracking.uri, run_cfg.tracking.experiment)
    t.start(f"skipped job {tags['job_num']}", {**tags, "stop_reason": "sweep_budget", "skip_reason": why},
            parent_run_id=parent_id)
    t.end("FINISHED")


if __name__ == "__main__":
    from runner.preflight.foreign_names import foreign_name_hint

    hint = foreign_name_hint(sys.argv[1:])  # before Hydra's five-line "Could not override"
    if hint:
        print(f"error: {hint}", file=sys.stderr)
        sys.exit(2)
    main()
