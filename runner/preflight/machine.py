"""This machine: the device asked for, and the start-up time measured here (what a budget cap
must at least cover)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from runner.config import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# the device

GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str) -> str:
    """What runner.train.pick_device will pick, without importing torch where no GPU driver
    is installed (torch could see no GPU there)."""
    if name != "auto":
        return name
    return "cuda" if any(os.path.exists(p) for p in GPU_DRIVER_FILES) and cuda_visible() else "cpu"


def check_device(c: Any) -> str:
    """trainer.device=cuda needs a visible CUDA GPU (and DeepSpeed one per process). Returns
    the device the run will use."""
    t = c.trainer
    if t.device == "cuda" and not cuda_visible():
        import torch

        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            why = f"this torch ({torch.__version__}) is built without CUDA"
        else:
            cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={cvd!r})" if cvd is not None else "")
        raise ConfigError(f"trainer.device='cuda': {why}; allowed here: auto, cpu (auto takes a GPU where there is one)")
    device = resolve_device(t.device)
    if device == "cuda" and t.name == "deepspeed" and not t.hostfile:
        import torch

        n = torch.cuda.device_count()
        if t.num_procs > n:
            raise ConfigError(f"trainer.num_procs={t.num_procs}: one process per GPU and {n} CUDA device(s) are "
                              f"visible; at most {n}")
    return device


# ---------------------------------------------------------------------------------------
# the budget: start-up measured on this machine

STARTUP_FILE = "startup.json"


def startup_path() -> Path:
    from runner.models import cache_dir

    return cache_dir() / STARTUP_FILE


def startup_key(model: str, trainer: str, device: str, rollout: str) -> str:
    return f"model={model} trainer={trainer} device={device} rollout={rollout}"


def read_startups() -> dict[str, Any]:
    try:
        data = json.loads(startup_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_startup(trainer: Any) -> None:
    """Called where start-up ends (runner/train.py `run()`, after `Trainer.setup`): keep the
    seconds from the job's start to here, the fastest and the last, keyed by model, trainer,
    device and rollout engine, for `check_startup_budget`. Never raises: a cache that cannot
    be written costs the next run this check, nothing else."""
    try:
        if not trainer.backend.is_main:
            return
        c = trainer.cfg
        seconds = float(trainer.meter.attempt_seconds)
        key = startup_key(c.model.name, c.trainer.name, trainer.device, c.rollout.name)
        path = startup_path()
        data = read_startups()
        old = data.get(key) if isinstance(data.get(key), dict) else {}
        data[key] = {"min_s": round(min(seconds, float(old.get("min_s", seconds))), 3), "last_s": round(seconds, 3),
                     "runs": int(old.get("runs", 0)) + 1, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - a measurement must not fail a run
        log.warning("could not record the start-up time: %s", e)


def check_startup_budget(c: Any, device: str) -> None:
    """A cap below what start-up alone costs is refused, where this machine has measured a
    start-up of this model, trainer, device and rollout before (the fastest one: a cold
    first start is slower). Nothing measured yet: the cap is checked before each step."""
    b = c.budget
    if b.cap_usd is None or b.usd_per_device_hour <= 0:
        return
    key = startup_key(c.model.name, c.trainer.name, device, c.rollout.name)
    rec = read_startups().get(key)
    try:
        seconds = float(rec["min_s"])
    except (TypeError, KeyError, ValueError):
        return
    usd = b.usd_per_device_hour * b.devices * seconds / 3600.0
    if b.cap_usd < usd:
        raise ConfigError(
            f"budget.cap_usd={b.cap_usd:g}: start-up alone costs more: ${usd:.6g} = {seconds:.1f} s (the fastest "
            f"start-up measured here for {key}, in {startup_path()}) x ${b.usd_per_device_hour:g}/device-hour x "
            f"{b.devices} device(s); give a cap above ${usd:.6g}")


