"""MLflow tracking that never loses data and never stops training.

Everything a run records (its creation and tags, params, metrics, artifacts, its end
status) is an operation appended to a spool file in the run's output directory and sent
to MLflow in order when `flush` is called. If MLflow cannot be reached, operations stay
in the spool and are retried at the next flush, at the end of the run, or later with

    python -m runner.track.store sync OUTPUT_DIR [--uri URI]

Metrics are only sent up to the step of the last checkpoint (`flush(upto_step=...)`):
after a crash, the resumed run recomputes the steps after that checkpoint, so the logged
history has neither duplicates nor gaps. Batching also matters for speed: one
`log_metric` call costs ~5 ms against SQLite, a `log_batch` of 1000 ~0.1 s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit for metrics in one log_batch
MAX_PARAMS = 100  # and for params
SPOOL = "mlflow_spool.jsonl"

# A tracking server that is down should cost a refused connection, not minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def resolve_uri(uri: Optional[str]) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def _artifact_root(uri: str) -> Optional[str]:
    """Artifacts beside a local SQLite store, so the pair can be moved or deleted together."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics, _ - . space : and /; anything else becomes _ ("pass@4" -> "pass_4")."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class Tracker:
    """One MLflow run, fed through an on-disk spool (or an in-memory one if spool_dir is None)."""

    def __init__(self, uri: Optional[str], experiment: str, spool_dir: Optional[Path] = None,
                 on_run_created: Optional[Callable[[str], None]] = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.spool_path = Path(spool_dir) / SPOOL if spool_dir else None
        self._ops: list[dict] = []
        self._on_run_created = on_run_created
        self.offline_since: Optional[float] = None
        if self.spool_path and self.spool_path.exists():
            self._ops = [json.loads(x) for x in self.spool_path.read_text().splitlines() if x.strip()]

    # -- recording: append operations ------------------------------------------------
    def _add(self, op: dict) -> None:
        self._ops.append(op)
        if self.spool_path:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool_path, "a") as f:
                f.write(json.dumps(op) + "\n")

    def start(self, run_name: Optional[str], tags: Mapping[str, str], parent_run_id: str | None = None) -> None:
        """Create the run (now if MLflow answers, else at the first flush that reaches it)."""
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self._add({"op": "create", "name": run_name, "tags": tags})
        self.flush(upto_step=-1)

    def resume(self, run_id: Optional[str], upto_step: int) -> None:
        """Continue a run after a restart. Metrics spooled past the checkpoint we resume from
        are dropped: those steps are about to be recomputed."""
        self.run_id = run_id  # None: the run's creation is still in the spool
        self._ops = [o for o in self._ops if not (o["op"] == "metrics" and o["step"] > upto_step)]
        self._rewrite()
        self._add({"op": "status", "status": "RUNNING"})
        self.flush(upto_step=upto_step)

    def end(self, status: str = "FINISHED", upto_step: Optional[int] = None) -> bool:
        """Send everything (metrics up to `upto_step` if given) and set the status. Returns
        False, leaving the spool for `sync`, if MLflow could not be reached."""
        self._add({"op": "status", "status": status, "end": True})
        ok = self.flush(upto_step=upto_step)
        if not ok and self.spool_path:
            print(f"MLflow at {self.uri} is unreachable: {len(self._ops)} records are kept in {self.spool_path}; "
                  f"send them later with `python -m runner.track.store sync {self.spool_path.parent}`", file=sys.stderr)
        return ok

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._add({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._add({"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # a name MLflow refuses would block the spool behind it forever: make it legal here
        self._add({"op": "metrics", "step": step, "ts": int(time.time() * 1000),
                   "values": {metric_name(k): float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._add({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._add({"op": "text", "text": text, "file": artifact_file})

    # -- sending ----------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._ops)

    def _rewrite(self) -> None:
        if self.spool_path:
            tmp = self.spool_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(o) + "\n" for o in self._ops))
            os.replace(tmp, self.spool_path)

    def _experiment(self) -> str:
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment, artifact_location=_artifact_root(self.uri))
        return self.experiment_id

    def _send(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "create":
            if self.run_id is None:
                run = self.client.create_run(self._experiment(), run_name=op["name"], tags=op["tags"])
                self.run_id = run.info.run_id
                if self._on_run_created:
                    self._on_run_created(self.run_id)
            return
        if self.run_id is None:
            raise RuntimeError("tracking operation before the run exists")
        if kind == "metrics":
            ms = [Metric(k, v, op["ts"], op["step"]) for k, v in op["values"].items()]
            for i in range(0, len(ms), MAX_BATCH):
                self.client.log_batch(self.run_id, metrics=ms[i:i + MAX_BATCH], synchronous=True)
        elif kind == "params":
            ps = [Param(k, v) for k, v in op["params"].items()]
            for i in range(0, len(ps), MAX_PARAMS):
                self.client.log_batch(self.run_id, params=ps[i:i + MAX_PARAMS], synchronous=True)
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()], synchronous=True)
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, op["path"], op["artifact_path"])
        elif kind == "text":
            self.client.log_text(self.run_id, op["text"], op["file"])
        elif kind == "status":
            if op.get("end"):
                self.client.set_terminated(self.run_id, status=op["status"])
            else:
                self.client.update_run(self.run_id, status=op["status"])

    def flush(self, upto_step: Optional[int] = None) -> bool:
        """Send spooled operations in order; metrics only up to `upto_step` (None: all).
        Held-back metrics keep their place. Returns False if MLflow could not be reached."""
        if not self._ops:
            return True
        sent: set[int] = set()
        batch: list[int] = []  # consecutive metric records go out as one log_batch
        ok = True
        try:
            for j, op in enumerate(self._ops):
                if op["op"] == "metrics":
                    if upto_step is None or op["step"] <= upto_step:
                        batch.append(j)
                    continue
                if batch:
                    self._send_metrics([self._ops[k] for k in batch])
                    sent.update(batch)
                    batch = []
                self._send(op)
                sent.add(j)
            if batch:
                self._send_metrics([self._ops[k] for k in batch])
                sent.update(batch)
        except Exception as e:  # unreachable or failing store: keep what is left, try later
            ok = False
            if self.offline_since is None:
                self.offline_since = time.time()
                log.warning("MLflow unreachable (%s); buffering on disk and retrying", str(e).splitlines()[0][:200])
        if ok and self.offline_since is not None:
            log.warning("MLflow reachable again after %.0f s; buffered records sent", time.time() - self.offline_since)
            self.offline_since = None
        self._ops = [op for j, op in enumerate(self._ops) if j not in sent]
        self._rewrite()
        return ok and not any(o["op"] != "metrics" for o in self._ops)

    def _send_metrics(self, ops: list[dict]) -> None:
        from mlflow.entities import Metric

        ms = [Metric(k, v, o["ts"], o["step"]) for o in ops for k, v in o["values"].items()]
        for i in range(0, len(ms), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + MAX_BATCH], synchronous=True)

    def run_url(self) -> str:
        return f"{self.uri} experiment={self.experiment!r} run_id={self.run_id}"


def sync(output_dir: Path, uri: Optional[str] = None) -> bool:
    """Send what a run left in its spool (MLflow was down when it ended)."""
    state_path = Path(output_dir) / "run_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    target = uri or state.get("tracking_uri")

    def remember(run_id: str) -> None:
        state.update(run_id=run_id, tracking_uri=target)
        state_path.write_text(json.dumps(state, indent=2))

    t = Tracker(target, state.get("experiment", "runner"), Path(output_dir), on_run_created=remember)
    if state.get("run_id") and state.get("tracking_uri") == target:
        t.run_id = state["run_id"]
    n = t.pending()
    ok = t.flush()
    print(f"{'sent' if ok else 'could not send'} {n - t.pending()} of {n} records to {t.uri} (run {t.run_id})")
    return ok


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m runner.track.store")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="send a run's spooled tracking records")
    s.add_argument("output_dir", type=Path)
    s.add_argument("--uri", default=None, help="tracking URI (default: the run's own)")
    a = p.parse_args(argv)
    return 0 if sync(a.output_dir, a.uri) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
