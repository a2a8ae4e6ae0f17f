"""The MLflow store a command names: a scheme MLflow registers, a driver that is installed,
a SQLite directory that exists."""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

from runner.config import ConfigError
from runner.preflight.commandline import check_creatable_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# tracking store

# The schemes the installed MLflow registers tracking stores for, in
# mlflow.tracking._tracking_service.utils._register_tracking_stores (importing it costs
# seconds; tests/test_bad_input.py compares this list with the registry), plus plug-ins
# (entry points `mlflow.tracking_store`). "" is a plain directory path.
MLFLOW_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                  "databricks", "databricks-uc", "uc")
DB_ENGINES = ("postgresql", "mysql", "sqlite", "mssql")  # mlflow.store.db.db_types.DATABASE_ENGINES
# SQLAlchemy's driver (the part after "+", or the engine's default) -> (module, pip package)
DB_DRIVERS = {"postgresql": ("psycopg2", "psycopg2-binary"), "psycopg2": ("psycopg2", "psycopg2-binary"),
              "psycopg": ("psycopg", "psycopg"), "pg8000": ("pg8000", "pg8000"),
              "mysql": ("MySQLdb", "mysqlclient"), "mysqldb": ("MySQLdb", "mysqlclient"),
              "pymysql": ("pymysql", "pymysql"), "mysqlconnector": ("mysql.connector", "mysql-connector-python"),
              "mssql": ("pyodbc", "pyodbc"), "pyodbc": ("pyodbc", "pyodbc"), "pymssql": ("pymssql", "pymssql")}


def tracking_schemes() -> list[str]:
    from importlib.metadata import entry_points

    return [*MLFLOW_SCHEMES, *(ep.name for ep in entry_points(group="mlflow.tracking_store"))]


def check_tracking(t: Any) -> None:
    """tracking.uri (else $MLFLOW_TRACKING_URI) names a store MLflow can open. Reachability is
    not checked: an unreachable server is what the spool is for (runner/track/store.py)."""
    uri, key = (t.uri, "tracking.uri") if t.uri else (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")
    if not uri or uri in ("databricks", "databricks-uc", "uc"):
        return  # none: sqlite:///mlruns.db in the working directory
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1 and scheme.isalpha():  # C:\... (MLflow reads it as a path)
        scheme = ""
    engine = next((db for db in DB_ENGINES if scheme.startswith(db)), None)
    base = scheme.split("+")[0] if engine else scheme
    allowed = tracking_schemes()
    if base not in allowed or scheme.count("+") > 1:
        plugins = [s for s in allowed if s not in MLFLOW_SCHEMES]
        raise ConfigError(
            f"{key}={uri!r}: MLflow has no tracking store for the scheme {scheme!r}; allowed: sqlite:///path/to/mlruns.db, "
            f"a directory path (or file:///path), http(s)://host:port, postgresql://, mysql://, mssql://, databricks"
            + (f", {', '.join(s + '://' for s in plugins)}" if plugins else ""))
    if base == "sqlite":
        path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            return
        db = Path(os.path.abspath(path))
        if db.is_dir():
            raise ConfigError(f"{key}={uri!r}: {db} is a directory, not a database file")
        if not db.parent.is_dir():
            raise ConfigError(f"{key}={uri!r}: the directory {db.parent} does not exist (SQLite creates the "
                              f"database file, not its directory)")
        if not db.exists() and not os.access(db.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={uri!r}: this user cannot create a file in {db.parent}")
    elif base in ("", "file"):
        check_creatable_dir(key, uri, parsed.path if base == "file" else uri)
    elif base in ("http", "https"):
        if not parsed.netloc:
            raise ConfigError(f"{key}={uri!r}: names no host; e.g. http://localhost:5000")
    elif engine:
        driver = scheme.split("+")[1] if "+" in scheme else engine
        module, package = DB_DRIVERS.get(driver, (None, None))
        if module and importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"{key}={uri!r}: needs the database driver {module}, which is not installed "
                              f"(pip install {package})")


