"""MLflow's own system-metrics monitor (CPU and memory use, disk, network, and GPU use and
memory where a GPU and pynvml are present) on the run: `tracking.system_metrics`.

A background thread of MLflow's that writes `system/*` metrics straight to the store every
`tracking.system_metrics_interval` seconds, apart from the training metrics' spool: it is
best-effort (with the store unreachable it logs a warning and stops; training goes on)."""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


def start_monitor(uri: str, run_id: str, interval: float, resumed: bool):
    """A started SystemMetricsMonitor, or None where MLflow or psutil cannot provide one."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                       resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing, an old MLflow: the run goes on without them
        log.warning("system metrics are off: %s", e)
        return None


def stop_monitor(monitor: Optional[object]) -> None:
    if monitor is not None:
        monitor.finish()
