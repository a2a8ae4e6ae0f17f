"""MLflow tracking with buffered metrics.

One `log_metric` call costs ~5 ms against SQLite; a `log_batch` of 1000 costs ~0.1 s, so
metrics are buffered and sent in batches. `import mlflow` takes ~2 s, so it happens here,
lazily, after the config has been validated.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

MAX_BATCH = 1000  # MLflow's limit for metrics in one log_batch
MAX_PARAMS = 100  # and for params


def resolve_uri(uri: Optional[str]) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def _artifact_root(uri: str) -> Optional[str]:
    """Artifacts beside a local SQLite store, so the pair can be moved or deleted together."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    def __init__(self, uri: Optional[str], experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = self.client.create_experiment(experiment, artifact_location=_artifact_root(self.uri))
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.experiment = experiment
        self.run_id: Optional[str] = None
        self._buffer: list[Any] = []

    # -- run lifecycle -------------------------------------------------------------------
    def start(self, run_name: Optional[str], tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Continue a run after a restart: mark it running again."""
        self.client.get_run(run_id)  # raises if it vanished
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    # -- data ----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def flush(self) -> None:
        while self._buffer and self.run_id:
            chunk, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def run_url(self) -> str:
        return f"{self.uri} experiment={self.experiment!r} run_id={self.run_id}"
