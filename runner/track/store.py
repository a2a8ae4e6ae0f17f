"""MLflow tracking that never loses data and never stops training.

Everything a run records (its creation and tags, params, metrics, artifacts, its end
status) is an operation appended to a spool file in the run's output directory and sent
to MLflow in order when `flush` is called. If MLflow cannot be reached, operations stay
in the spool and are retried at the next flush, at the end of the run, or later with

    python -m runner.track.store sync OUTPUT_DIR [--uri URI]

"Cannot be reached" includes a store that cannot even be opened at start-up (a directory
that is not writable, a SQLite file locked by another writer): the MLflow client is made
lazily, inside the guarded send path (runner.track.connect), so the run starts offline and
connects later. With `background=True` the sends happen on a worker thread
(runner.track.sender): a slow or locked store never stalls a training step. The spool
file's own failures (a full disk, a cut line) are handled in runner.track.spool.

Every record also goes to an append-only journal beside the spool (`mlflow_journal.jsonl`):
the spool is what MLflow has not received, the journal is the copy of record, everything the
run logged. A store that loses the run (its SQLite file deleted or replaced mid-run, a server
whose database was reset: runner.track.recovery) is not written to again; a later `sync`, or
a resume, recreates the run from the journal (params, tags, every metric) in that store or
in another one, and a forced resume into another store copies the run there the same way.

Metrics are only sent up to the step of the last checkpoint (`flush(upto_step=...)`):
after a crash, the resumed run recomputes the steps after that checkpoint, so the logged
history has neither duplicates nor gaps. Batching also matters for speed: one
`log_metric` call costs ~5 ms against SQLite, a `log_batch` of 1000 ~0.1 s.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from runner.track import recovery
from runner.track.connect import connect, sqlite_path
from runner.track.sender import BackgroundSender
from runner.track.spool import Spool

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit for metrics in one log_batch
MAX_PARAMS = 100  # and for params
SPOOL = "mlflow_spool.jsonl"
JOURNAL = "mlflow_journal.jsonl"

# start() and resume() wait this long at most for their first send, even in the background
START_WAIT_S = 30.0
# while offline, the background sender tries the store at most this often (a try costs a
# locked SQLite file its 5 s busy timeout, an unopenable one a few of MLflow's warnings)
OFFLINE_RETRY_S = 10.0


def resolve_uri(uri: Optional[str]) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def _artifact_root(uri: str) -> Optional[str]:
    """Artifacts beside a local SQLite store, so the pair can be moved or deleted together."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db else None


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics, _ - . space : and /; anything else becomes _ ("pass@4" -> "pass_4")."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class Tracker:
    """One MLflow run, fed through an on-disk spool (or an in-memory one if spool_dir is None).

    background=True: `flush()` only asks a worker thread to send (see runner.track.sender);
    `start()`/`resume()` wait for that first send (at most START_WAIT_S) and `end()` waits
    for the worker, then sends what is left itself. `_ops` and the spool are shared with the
    worker and guarded by `_lock`; a send takes a snapshot of `_ops` and removes what it
    sent by identity, since records keep being appended meanwhile."""

    def __init__(self, uri: Optional[str], experiment: str, spool_dir: Optional[Path] = None,
                 on_run_created: Optional[Callable[[str], None]] = None, background: bool = False,
                 on_store_lost: Optional[Callable[[str], None]] = None):
        import mlflow.tracking  # noqa: F401  (imported here, on the caller's thread: the import is slow)

        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self._client = None  # made at the first send: an unusable store must not stop the run from starting
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.spool_path = Path(spool_dir) / SPOOL if spool_dir else None
        self._spool = Spool(self.spool_path)
        self._journal = recovery.Journal(Path(spool_dir) / JOURNAL if spool_dir else None)
        self._lock = threading.RLock()  # _ops and the spool file
        self._send_lock = threading.Lock()  # one send at a time, in order
        self._ops: list[dict] = self._spool.load()
        self._on_run_created = on_run_created
        self._on_store_lost = on_store_lost
        self.lost: Optional[str] = None  # why the store no longer holds this run (nothing is sent there then)
        self._lost_due: Optional[str] = None  # announced on the caller's thread, like a creation
        self._identity: Optional[tuple] = None  # the SQLite file this process connected to
        self._sent_any = False  # whether this process has sent anything to the store yet
        self._missing_at_start: Optional[str] = None  # a run id the store did not have at our first send
        # on_run_created runs on the caller's thread (it writes run_state.json, which the caller
        # writes too): a run the worker created is announced at the caller's next call
        self._owner = threading.current_thread()
        self._created_due: Optional[str] = None
        self.offline_since: Optional[float] = None
        self._last_try = 0.0
        self._sender = BackgroundSender(self._send_later) if background else None
        self._system = None  # MLflow's system-metrics monitor, where started (runner.track.system)

    @property
    def client(self):
        """The MlflowClient, connected on first use (raises if the store cannot be opened)."""
        if self._client is None:
            self._client = connect(self.uri)
            self._identity = recovery.store_identity(self.uri)
        return self._client

    # -- recording: append operations ------------------------------------------------
    def _add(self, op: dict) -> None:
        self._announce()
        with self._lock:
            self._ops.append(op)
            self._spool.append(op, self._ops)
            self._journal.append(op, self._ops)

    def start(self, run_name: Optional[str], tags: Mapping[str, str], parent_run_id: str | None = None) -> None:
        """Create the run (now if MLflow answers, else at the first flush that reaches it)."""
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self._add({"op": "create", "name": run_name, "tags": tags})
        self._first_flush(upto_step=-1)

    def resume(self, run_id: Optional[str], upto_step: int) -> None:
        """Continue a run after a restart. Metrics spooled past the checkpoint we resume from
        are dropped: those steps are about to be recomputed."""
        self.run_id = run_id  # None: the run's creation is still in the spool
        with self._lock:
            self._ops = [o for o in self._ops if not (o["op"] == "metrics" and o["step"] > upto_step)]
            self._spool.rewrite(self._ops)
            self._journal.trim(upto_step)
        self._add({"op": "status", "status": "RUNNING"})
        self._first_flush(upto_step=upto_step)

    def start_system_metrics(self, interval: float, resumed: bool) -> bool:
        """MLflow's system metrics on this run until end(); needs the run to exist in the store."""
        from runner.track.system import start_monitor

        if self.run_id is not None and self._system is None:
            self._system = start_monitor(self.uri, self.run_id, interval, resumed)
        return self._system is not None

    def end(self, status: str = "FINISHED", upto_step: Optional[int] = None) -> bool:
        """Send everything (metrics up to `upto_step` if given) and set the status. Returns
        False, leaving the spool for `sync`, if MLflow could not be reached."""
        from runner.track.system import stop_monitor

        stop_monitor(self._system)  # before the status changes: its last samples land in a running run
        self._system = None
        self._add({"op": "status", "status": status, "end": True})
        if self._sender is not None:  # the send in flight finishes first; from here on we send ourselves
            self._sender.close()
            self._sender = None
            self._announce()
        ok = self._send_pending(upto_step)
        self._announce()
        if self.lost:
            print(f"MLflow at {self.uri} lost this run ({self.lost}): its status there is not {status}. "
                  f"{self.recovery_hint()}", file=sys.stderr)
        elif not ok and self.spool_path:
            print(f"MLflow at {self.uri} is unreachable: {self.pending()} records are kept in {self.spool_path}; "
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

    def log_input(self, path: str | Path, sha256: str, rows: int, context: str, schema=None) -> None:
        """A data file as the run's dataset input (runner/track/inputs.py), e.g. what an SFT
        run trains on; journaled like every record, so a run rebuilt by `sync` has it too."""
        self._add({"op": "input", "path": str(Path(path).resolve()), "sha256": sha256, "rows": int(rows),
                   "context": context, "schema": schema.to_json() if schema is not None else None})

    # -- sending ----------------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return len(self._ops)

    def _experiment(self) -> str:
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=_artifact_root(self.uri))
                    return self.experiment_id
                except Exception:  # another process may have created it just now; else the error stands
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
            self.experiment_id = exp.experiment_id
        return self.experiment_id

    def _send(self, op: dict) -> None:
        from mlflow.entities import Param, RunTag

        kind = op["op"]
        if kind == "create":
            if self.run_id is None:
                run = self.client.create_run(self._experiment(), run_name=op["name"], tags=op["tags"])
                self.run_id = run.info.run_id
                if threading.current_thread() is self._owner:
                    if self._on_run_created:
                        self._on_run_created(self.run_id)
                else:
                    with self._lock:
                        self._created_due = self.run_id
            return
        if self.run_id is None:
            raise RuntimeError("tracking operation before the run exists")
        if kind == "metrics":
            self._send_metrics([op])
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
        elif kind == "input":
            self._send_input(op)
        elif kind == "status":
            if op.get("end"):
                self.client.set_terminated(self.run_id, status=op["status"])
            else:
                self.client.update_run(self.run_id, status=op["status"])

    def _send_input(self, op: dict) -> None:
        """A dataset input describes a file the run also names by tag and digest: one that
        MLflow refuses (not a store that cannot be reached: that fails an earlier record
        first) is reported and dropped, never left to block the records behind it."""
        from mlflow.types.schema import Schema

        from runner.track.inputs import log_file_input

        schema = Schema.from_json(op["schema"]) if op.get("schema") else None
        try:
            log_file_input(self.client, self.run_id, Path(op["path"]), op["sha256"], op["rows"], op["context"], schema)
        except Exception as e:  # noqa: BLE001 - see the docstring
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: MLflow did not take {op['path']} as a dataset input of run {self.run_id}: {why}",
                  file=sys.stderr)

    def flush(self, upto_step: Optional[int] = None) -> bool:
        """Send spooled operations in order; metrics only up to `upto_step` (None: all).
        Held-back metrics keep their place. Returns False if MLflow could not be reached.
        With a background sender this only schedules the send, and returns whether MLflow
        was reachable at the last attempt."""
        if self._sender is not None:
            self._announce()
            self._sender.request(upto_step)
            return self.offline_since is None
        return self._send_pending(upto_step)

    def _announce(self) -> None:
        """Run on_run_created for a run the worker created, and on_store_lost for a store
        the worker found without the run (on the caller's thread: both write the record)."""
        if self._created_due is None and self._lost_due is None:
            return
        with self._lock:
            run_id, self._created_due = self._created_due, None
            lost, self._lost_due = self._lost_due, None
        if run_id and self._on_run_created:
            self._on_run_created(run_id)
        if lost and self._on_store_lost:
            self._on_store_lost(lost)

    def _first_flush(self, upto_step: Optional[int]) -> None:
        """At start or resume, even with a background sender, wait for one attempt: a healthy
        store has the run before the first step (a kill -9 during training finds it there),
        and a failing one costs one failed attempt (a locked SQLite file: its 5 s busy
        timeout; one that cannot be opened: ~0.4 s), then the run goes on offline."""
        if self._sender is None:
            self._send_pending(upto_step)
        else:
            self._last_try = 0.0  # this one is tried whatever happened before
            self._sender.request(upto_step)
            self._sender.wait(START_WAIT_S)
            self._announce()

    def _send_later(self, upto_step: Optional[int]) -> None:
        """The worker's send: while offline, a request soon after a failed try is dropped
        (the records stay spooled; the training loop asks again, and end() sends all)."""
        if self.offline_since is None or time.time() - self._last_try >= OFFLINE_RETRY_S:
            self._send_pending(upto_step)

    # -- a store that lost the run (runner.track.recovery) ---------------------------------
    def recreate(self, tags: Mapping[str, str]) -> bool:
        """Make this run anew from the journal (in `self.uri`, at the next send): everything it
        logged, in order, under a new run id. False where there is no journal to do it from."""
        journal = self._journal.load() if self._journal.path else []
        try:
            ops = recovery.recreate_ops(journal, {k: str(v) for k, v in tags.items()})
        except ValueError:
            return False
        with self._lock:
            self._ops = ops
            self._spool.rewrite(ops)
            self.run_id, self.lost, self.experiment_id = None, None, None
        return True

    def _mark_lost(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            with self._lock:
                self._lost_due = why
            log.warning("MLflow at %s lost run %s (%s): nothing more is sent there. %s", self.uri, self.run_id, why,
                        self.recovery_hint())

    def recovery_hint(self) -> str:
        if not self.spool_path:
            return "This run's records were kept in memory only."
        return (f"Every record is kept in {self.spool_path.parent / JOURNAL}: `python -m runner.track.store sync "
                f"{self.spool_path.parent}` recreates the run (params, tags, every metric) there, or with "
                f"--uri URI in another store")

    def _store_check(self) -> Optional[str]:
        """Why the store this process connected to is gone (None: it is still there)."""
        return recovery.store_changed(self.uri, self._identity) if self._client is not None else None

    def _send_pending(self, upto_step: Optional[int]) -> bool:
        with self._send_lock:
            if self.lost is None and (why := self._store_check()):
                self._mark_lost(why)
            if self.lost is not None:
                return False  # never into a file that is not the run's any more
            ok = self._send_some(upto_step)
            if self.lost is None and self._missing_at_start and self.recreate(
                    {"runner.recreated": f"run {self._missing_at_start} was not in {self.uri}; recreated from "
                                         f"the journal"}):
                log.warning("MLflow at %s has no run %s (its store was deleted or replaced): recreating it from "
                            "the journal", self.uri, self._missing_at_start)
                self._missing_at_start = None
                ok = self._send_some(upto_step)
            return ok

    def _send_some(self, upto_step: Optional[int]) -> bool:
        """One pass over the pending records, in order (held-back metrics keep their place)."""
        self._last_try = time.time()
        with self._lock:
            ops = list(self._ops)  # records added during the send wait for the next one
        if not ops:
            return True
        sent: list[dict] = []
        batch: list[dict] = []  # consecutive metric records go out as one log_batch
        ok = True
        try:
            for op in ops:
                if op["op"] == "metrics":
                    if upto_step is None or op["step"] <= upto_step:
                        batch.append(op)
                    continue
                if batch:
                    self._send_metrics(batch)
                    sent += batch
                    batch = []
                self._send(op)
                sent.append(op)
            if batch:
                self._send_metrics(batch)
                sent += batch
        except Exception as e:  # unreachable, unopenable or locked store: keep what is left, try later
            ok = False
            if recovery.run_missing(e) and self.run_id:
                if self._sent_any:  # it had the run a moment ago
                    self._mark_lost(f"it no longer has run {self.run_id}")
                else:  # a fresh process finds the store without the run: make it anew
                    self._missing_at_start = self.run_id
            elif self.offline_since is None:
                self.offline_since = time.time()
                self._warn_offline(e)
        if ok and self.offline_since is not None:
            log.warning("MLflow reachable again after %.0f s; buffered records sent", time.time() - self.offline_since)
            self.offline_since = None
        self._sent_any = self._sent_any or bool(sent)
        with self._lock:
            if sent:
                gone = {id(o) for o in sent}
                self._ops = [o for o in self._ops if id(o) not in gone]
                self._spool.rewrite(self._ops)
            return ok and not any(o["op"] != "metrics" for o in self._ops)

    def _warn_offline(self, e: Exception) -> None:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if self.spool_path:
            log.warning("MLflow at %s is unreachable (%s): its records are kept in %s and training goes on; "
                        "they are retried at each flush, or send them later with "
                        "`python -m runner.track.store sync %s`", self.uri, why, self.spool_path, self.spool_path.parent)
        else:
            log.warning("MLflow at %s is unreachable (%s): records are kept in memory and retried at each flush",
                        self.uri, why)

    def _send_metrics(self, ops: list[dict]) -> None:
        from mlflow.entities import Metric

        ms = [Metric(k, v, o["ts"], o["step"]) for o in ops for k, v in o["values"].items()]
        for i in range(0, len(ms), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + MAX_BATCH], synchronous=True)

    def run_url(self) -> str:
        return f"{self.uri} experiment={self.experiment!r} run_id={self.run_id}"


def sync(output_dir: Path, uri: Optional[str] = None) -> bool:
    """Send what a run left in its spool (MLflow was down when it ended). Where the store
    lost the run (runner.track.recovery), or `uri` names another store, the run is made anew
    there from the journal: params, tags, every metric, the artifacts still on disk."""
    from runner import outdir

    d = Path(output_dir)
    outdir.lock(d)  # not while the run itself is sending
    try:
        state = outdir.read_record(d)  # a damaged record is refused, not taken as absent
        target = resolve_uri(uri or state.get("tracking_uri"))

        def remember(run_id: str) -> None:
            outdir.update_record(d, run_id=run_id, tracking_uri=target, experiment=t.experiment, tracking_lost=None)

        t = Tracker(target, state.get("experiment", "runner"), d, on_run_created=remember)
        before = state.get("run_id")
        if before and state.get("tracking_uri") == target and not state.get("tracking_lost"):
            t.run_id = before  # a fresh process: a store without the run recreates it (_send_pending)
        elif before and not t.recreate({"runner.recreated": f"from run {before} in {state.get('tracking_uri')}"}):
            print(f"{d / JOURNAL} holds no record of the run's creation: it cannot be recreated in {target}",
                  file=sys.stderr)
            return False
        n = t.pending()
        ok = t.flush()
        print(f"{'sent' if ok else 'could not send'} {n - t.pending()} of {n} records to {t.uri} (run {t.run_id})")
        return ok
    finally:
        outdir.unlock(d)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m runner.track.store")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="send a run's spooled tracking records")
    s.add_argument("output_dir", type=Path)
    s.add_argument("--uri", default=None, help="tracking URI (default: the run's own)")
    a = p.parse_args(argv)
    from runner.config import ConfigError

    try:
        return 0 if sync(a.output_dir, a.uri) else 1
    except ConfigError as e:  # a damaged record, a dir in use
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
