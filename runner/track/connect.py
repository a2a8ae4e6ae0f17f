"""Opening an MLflow store: fast to give up, safe to race.

The Tracker calls `connect` inside its guarded send path, so whatever fails here (a store
that cannot be opened, a locked one, a server that is down) means "offline, retry later"
rather than a crashed run. It must therefore fail in about a second, not after MLflow's own
minutes of retries, and two processes opening the same new SQLite store must not both
create its tables.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

# A tracking server that is down should cost a refused connection, not minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# The same for a database store. MLflow (3.x) tries to open one MAX_RETRY_COUNT=10 times
# with exponential sleeps (~100 s in all) before it raises, and has no environment variable
# for it: we set its module constant when we make a client. 3 attempts: 0.4 s of sleeps.
os.environ.setdefault("RUNNER_MLFLOW_DB_CONNECT_ATTEMPTS", "3")


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// URI (None: another store, or in memory)."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        return Path(uri[len("sqlite:///"):])
    return None


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Held while a client creates (and migrates) its store. MLflow checks "are the tables
    there?" and then creates and migrates them, unlocked: two processes starting on a new
    SQLite file both migrate and one dies with `duplicate column name: step`. An flock on
    `<db>.lock` beside the database serialises that across processes (other stores: no-op)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def connect(uri: str):
    """An MlflowClient whose store is open (created and migrated if new); raises if it cannot be."""
    import mlflow.store.db.utils as db_utils
    from mlflow.tracking import MlflowClient

    db_utils.MAX_RETRY_COUNT = int(os.environ["RUNNER_MLFLOW_DB_CONNECT_ATTEMPTS"])
    with _init_lock(uri):
        return MlflowClient(tracking_uri=uri)
