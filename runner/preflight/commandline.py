"""The command line itself: one option per config group, an output_dir that can be a directory
(a Hydra callback, before Hydra makes the run directory)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from runner.config import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"

log = logging.getLogger(__name__)


def _refuse(e: ConfigError) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------
# config groups: one option each


def group_options(group: str) -> list[str]:
    """The options Hydra offers for a group (conf/, --config-dir, installed entry points)."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        if GlobalHydra.instance().is_initialized():
            return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    except Exception:  # no Hydra context (a test, a tool): the built-in options
        pass
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_choices(hydra_cfg: Any) -> None:
    """`env=[dice,math]` picks a list of options of one group: Hydra merges them all (the
    last one wins key by key) and runs. A group takes one option here.

    Hydra records no choice for a group given a list (`runtime.choices` leaves it out: the
    options become plain config nodes), so the lists are read from the overrides themselves;
    the groups are those in `runtime.choices` plus conf/'s folders."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = dict(hydra_cfg.runtime.get("choices") or {})
    groups = {g for g in choices if not g.startswith("hydra/")}
    groups |= {p.name for p in CONF.iterdir() if p.is_dir()}
    try:
        overrides = OverridesParser.create().parse_overrides([str(o) for o in hydra_cfg.overrides.task])
    except Exception:  # Hydra parsed them already; nothing more to say here
        return
    for o in overrides:
        if o.key_or_group not in groups or o.is_delete() or o.is_sweep_override():
            continue
        value = o.value()
        if isinstance(value, (list, tuple)):
            got = "[" + ", ".join(map(str, value)) + "]"
            raise ConfigError(f"{o.key_or_group}: pick one, got {got}; allowed: "
                              f"{', '.join(group_options(o.key_or_group))}")


def check_hydra_choices() -> None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        check_choices(HydraConfig.get())


# ---------------------------------------------------------------------------------------
# directories that must be (or become) directories


def _nearest_existing(p: Path) -> Path:
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_creatable_dir(key: str, value: str, path: str) -> None:
    """`path` is a directory this process can write in, or can be created as one."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}={value!r}: is a file, not a directory; give a directory path "
                              f"(it is created if missing)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value!r}: this user cannot write in that directory; give another path")
        return
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise ConfigError(f"{key}={value!r}: cannot be created: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value!r}: cannot be created: this user cannot write in {base}")


def check_output_dir(config: Any) -> None:
    """The run directory Hydra is about to make (hydra.run.dir, `${output_dir}` here)."""
    from omegaconf import OmegaConf

    try:
        run_dir = OmegaConf.select(config, "hydra.run.dir")
        out = OmegaConf.select(config, "output_dir")
    except Exception:  # an interpolation that does not resolve: validation names it
        return
    if run_dir is None:
        return
    key, value = ("output_dir", out) if out is not None and str(out) == str(run_dir) else ("hydra.run.dir", run_dir)
    check_creatable_dir(key, str(value), str(run_dir))


class PreflightCallback(Callback):
    """Runs before Hydra creates the run directory (which it does before the task starts,
    so a path it cannot make would otherwise be a raw traceback)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            check_choices(config.hydra)
            check_output_dir(config)
        except ConfigError as e:
            _refuse(e)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        try:
            check_choices(config.hydra)  # before the sweep's parent MLflow run is made
        except ConfigError as e:
            _refuse(e)


