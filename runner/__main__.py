"""`python -m runner [overrides]`: the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

import runner  # noqa: F401  (sets thread environment before torch is imported)
from runner.budget import CostMeter
from runner.config import ConfigError, validate

log = logging.getLogger("runner")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """Runs one job; returns the sweep objective (`objective`, a metric name) for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    meter = CostMeter(0.0)  # the job's clock starts here, before any loading; priced below
    try:
        run_cfg = validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    meter.usd_per_device_hour, meter.devices = run_cfg.budget.usd_per_device_hour, run_cfg.budget.devices
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir).resolve()
    run_cfg.output_dir = str(output_dir)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(run_cfg))

    ledger, parent_id, job = None, None, "0"
    recipe = hc.runtime.choices.get("recipe")
    tags = {"recipe": recipe} if recipe and recipe != "null" else {}
    if hc.mode == RunMode.MULTIRUN:
        from runner.budget import SweepLedger
        from runner.sweep import parent_of

        job = str(hc.job.num)
        parent = parent_of(hc.sweep.dir)
        parent_id = parent["run_id"] if parent else None
        tags.update(job_num=job, override=hc.job.override_dirname or "(defaults)")
        if run_cfg.budget.sweep_cap_usd is not None:
            ledger = SweepLedger(Path(hc.sweep.dir) / "budget_ledger.json", run_cfg.budget.sweep_cap_usd)
            admitted, why = ledger.admit(job, run_cfg.budget.job_estimate_usd)
            if not admitted:
                skip(run_cfg, parent_id, tags, why)
                return math.nan

    from runner.train import NonFiniteError, run

    try:
        trainer = run(run_cfg, output_dir, config_yaml, meter, ledger, job, parent_id, tags)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and the run is marked KILLED", file=sys.stderr)
        sys.exit(130)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if trainer.stop_reason not in ("completed", "budget", "estimate"):
        print(f"stopped by {trainer.stop_reason} at step {trainer.step}: checkpoint written, run marked KILLED; "
              f"the same command resumes it", file=sys.stderr)
        sys.exit(130)
    return trainer.final_metrics.get(cfg.get("objective"), math.nan)


def skip(run_cfg, parent_id: Optional[str], tags: dict, why: str) -> None:
    """A sweep job refused by the shared budget: recorded as a child run, nothing loaded."""
    from runner.tracking import Tracker

    print(f"skipped by the sweep budget: {why}", file=sys.stderr)
    t = Tracker(run_cfg.tracking.uri, run_cfg.tracking.experiment)
    t.start(f"skipped job {tags['job_num']}", {**tags, "stop_reason": "sweep_budget", "skip_reason": why},
            parent_run_id=parent_id)
    t.end("FINISHED")


if __name__ == "__main__":
    main()
