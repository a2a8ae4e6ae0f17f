"""What a command line names, checked against this machine before anything loads.

runner.config checks values against rules that hold anywhere. This module checks what only
this machine can answer: that one option was picked per config group, that the output dir
can be made, that the MLflow store is one MLflow can open, that the model's files are here,
that a GPU is there when one is asked for, that the start-up alone fits the budget cap, and
that one generation batch fits the model's context and this machine's memory. A failure is
a ConfigError whose one line names the key, the value and what is allowed; `python -m
runner` prints it and exits 2, before any model loads and with nothing written.

Two entry points:
- `PreflightCallback` (a Hydra callback, conf/config.yaml) runs before Hydra makes the run
  directory: a group given a list of options, an output_dir that cannot be a directory;
- `check(run_cfg)`, from `check_installed` in runner/__main__.py, after validation.

The checks live by what they ask about: commandline, store, model_files, machine, fits.

Nothing here imports torch, transformers or MLflow, except torch where CUDA is asked for
(trainer.device=cuda, or auto on a machine with a GPU driver): refusals take seconds.
"""

from __future__ import annotations

from typing import Any

from runner.preflight.commandline import PreflightCallback, check_hydra_choices, check_output_dir  # noqa: F401
from runner.preflight.fits import check_fits
from runner.preflight.machine import check_device, check_startup_budget, cuda_visible, record_startup  # noqa: F401
from runner.preflight.model_files import check_model, check_model_dir, hub_snapshot  # noqa: F401
from runner.preflight.store import check_tracking, tracking_schemes  # noqa: F401


def check(run_cfg: Any) -> None:
    """Everything a validated RunConfig names, cheapest first."""
    check_tracking(run_cfg.tracking)
    model_dir = check_model(run_cfg.model)
    device = check_device(run_cfg)
    check_startup_budget(run_cfg, device)
    check_fits(run_cfg, device, model_dir)
