"""`python -m runner [overrides]`: the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import runner  # noqa: F401  (sets thread environment before torch is imported)
from runner.budget import CostMeter
from runner.config import ConfigError, validate

log = logging.getLogger("runner")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run_cfg = validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    meter = CostMeter(run_cfg.budget.usd_per_device_hour, run_cfg.budget.devices)
    output_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    run_cfg.output_dir = str(output_dir)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(run_cfg))

    from runner.train import run

    try:
        trainer = run(run_cfg, output_dir, config_yaml, meter)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and the run is marked KILLED", file=sys.stderr)
        sys.exit(130)
    if trainer.stop_reason != "completed":
        print(f"stopped by {trainer.stop_reason} at step {trainer.step}: checkpoint written, run marked KILLED; "
              f"the same command resumes it", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
