"""Reading a dataset file for `env=dataset`: once, every row checked before any model loads.

A fault is one line (a ConfigError, exit 2) naming the key, the file and, where it can, the
line or row: a malformed JSON line, bytes that are not UTF-8, a missing prompt column, an
empty file, a damaged Parquet file or save_to_disk directory. Without this the loader's
error came late and wrapped, and a bad byte failed the run at the step that reached it.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from runner.config import ConfigError

# The rows read per (file, prompt column), with the files' (mtime, size) they were read at:
# the preflight (runner/preflight/fits.py) builds the env to measure its prompts and the run
# builds it again, so the second build costs nothing.
_LOADED: dict[tuple[str, Optional[str]], tuple[tuple, Any]] = {}
_UTF8_AT = re.compile(r"Column (\d+): In chunk (\d+): Invalid: Invalid UTF8 sequence at string index (\d+)")
_CSV_LINE = re.compile(r"in line (\d+)")


def load_rows(path: str, key: str = "env.path", prompt_column: Optional[str] = None):
    """A `datasets.Dataset` from a file or a save_to_disk directory (local only), read once
    with every row checked, so that a bad file is refused before any model loads (the
    preflight builds the env) instead of failing at the step that reaches the bad row.
    Raises ConfigError (exit 2) whose one line names `key`, the file and, where it can,
    the line (JSON Lines) or the 1-based row at fault."""
    p = _abs(path)
    if not p.exists():
        raise _fail(key, p, "", "does not exist (paths are relative to the directory you run in)")
    stamp = _stamp(p)
    hit = _LOADED.get((str(p), prompt_column))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    rows = _read(p, key, prompt_column)
    _LOADED[(str(p), prompt_column)] = (stamp, rows)
    return rows


def _abs(path: str) -> Path:
    """The file as refusals name it: absolute, so it is found whatever the run's directory."""
    return Path(path).expanduser().absolute()


def _stamp(p: Path) -> tuple:
    """What tells an edited file (or directory of files) from the one read before."""
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return tuple((str(f), s.st_mtime_ns, s.st_size) for f in files for s in [f.stat()])


@dataclass
class _Source:
    """A source's rows as read, checked before they become a Dataset."""

    count: int
    columns: list[str]
    column: Callable[[str], list]  # a column's values as Python objects
    where: Callable[[int], str]  # where row i is in the file: "line 7" (JSON Lines), "row 7"
    build: Callable[[], Any]  # the datasets.Dataset


def _read(p: Path, key: str, prompt_column: Optional[str]):
    """The rows, refused unless there is one at least and, where `prompt_column` is given,
    it is a column and every row's prompt a non-empty string or chat."""
    import datasets

    datasets.disable_progress_bars()
    reader = _from_disk if p.is_dir() else {".parquet": _from_parquet, ".csv": _from_csv}.get(p.suffix.lower(),
                                                                                               _from_json)
    src = reader(p, key)
    if src.count == 0:
        raise _fail(key, p, "", "no rows")
    if prompt_column is not None:
        if prompt_column not in src.columns:
            raise ConfigError(f"env.prompt_column: {prompt_column!r} is not a column of {p} "
                              f"(columns: {', '.join(src.columns)})")
        for i, value in enumerate(src.column(prompt_column)):
            why = _bad_prompt(value)
            if why:
                raise _fail(key, p, src.where(i), f"{prompt_column!r} {why}")
    return src.build()


def _fail(key: str, p: Path, where: str, what: str) -> ConfigError:
    """The one line: `env.path: /abs/file.jsonl line 7: what is wrong`."""
    return ConfigError(f"{key}: {p}{' ' + where if where else ''}: {what}")


def _row(i: int) -> str:
    return f"row {i + 1}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _kind(value: Any) -> str:
    """A value's JSON type name, as a user who wrote the file knows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, (list, tuple)) else "object" if isinstance(value, dict) else type(value).__name__


def _bad_prompt(value: Any) -> Optional[str]:
    """What is wrong with one row's prompt (None: nothing): it must be a non-empty string
    or a chat, a non-empty list of {role, content} strings (what _prompt renders)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # NaN: an empty CSV cell
        return "is missing or null"
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, (list, tuple)):
        if not value:
            return "is an empty chat"
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"is not a chat: message {j + 1} is not {{role, content}} strings ({m!r:.80})"
        return None
    return f"is not a string or a chat [{{role, content}}, ...] (a {_kind(value)})"


# -- the readers: one per kind of source, each reads the source once ------------------------

def _text(p: Path, key: str) -> str:
    """The file as UTF-8 text (a leading BOM dropped), or the line and column of the first
    byte that is not UTF-8: found here, not at the training step that reaches that row."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise _fail(key, p, "", f"cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise _fail(key, p, f"line {line}", f"not UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


def _from_json(p: Path, key: str) -> _Source:
    """A .json list of objects, or JSON Lines (.jsonl, or a .json holding one object per
    line): each line parsed once, the rows' columns the union of their keys."""
    text = _text(p, key)
    lines: Optional[list[int]] = None
    if not text.strip():
        records: list[dict] = []
    elif p.suffix.lower() == ".json" and not _looks_like_lines(text):
        records = _json_list(p, key, text)
    else:
        records, lines = _json_lines(p, key, text)
    columns = list(dict.fromkeys(k for r in records for k in r))
    where = (lambda i: f"line {lines[i]}") if lines is not None else _row  # noqa: E731
    values = lambda c: [r.get(c) for r in records]  # noqa: E731
    return _Source(len(records), columns, values, where, lambda: _records_dataset(p, key, columns, values))


def _looks_like_lines(text: str) -> bool:
    """A .json file that is JSON Lines (datasets reads those too): an object, then more."""
    if not text.lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
        return False
    except json.JSONDecodeError as e:
        return e.msg == "Extra data"


def _json_list(p: Path, key: str, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(key, p, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(str, list(data)[:5]))}" if isinstance(data, dict) else ""
        raise _fail(key, p, "", f"not a list of objects (one JSON {_kind(data)}{keys}); "
                                "give [{...}, {...}] or one object per line")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise _fail(key, p, _row(i), f"not a JSON object (a {_kind(item)})")
    return data


def _json_lines(p: Path, key: str, text: str) -> tuple[list[dict], list[int]]:
    """(the objects, the file line of each); blank lines are skipped. Split on "\\n" only:
    str.splitlines would also split inside strings at U+2028 and friends."""
    records, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(key, p, f"line {n}", f"not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise _fail(key, p, f"line {n}", f"not a JSON object (a {_kind(item)})")
        records.append(item)
        lines.append(n)
    return records, lines


def _records_dataset(p: Path, key: str, columns: list[str], values: Callable[[str], list]):
    """The Dataset of parsed rows; a column whose rows hold different types (a number here,
    a string there) is kept as JSON values, as datasets' own json loader keeps it."""
    import pyarrow as pa
    from datasets import Dataset

    try:
        return Dataset.from_dict({c: values(c) for c in columns}, on_mixed_types="use_json")
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        raise _fail(key, p, "", f"its rows do not make a table ({_first_line(e)})") from None


def _from_csv(p: Path, key: str) -> _Source:
    """A CSV with a header row, read by pandas as datasets' csv builder does (so numbers
    stay numbers)."""
    import pandas as pd
    from datasets import Dataset

    text = _text(p, key)
    try:
        frame = pd.read_csv(io.StringIO(text)) if text.strip() else pd.DataFrame()
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (pd.errors.ParserError, ValueError) as e:
        msg = _first_line(e).split("C error: ")[-1]
        line = _CSV_LINE.search(msg)
        raise _fail(key, p, f"line {line.group(1)}" if line else "", f"not valid CSV ({msg})") from None
    return _Source(len(frame), [str(c) for c in frame.columns], lambda c: frame[c].tolist(), _row,
                   lambda: Dataset.from_pandas(frame, preserve_index=False))


def _from_parquet(p: Path, key: str) -> _Source:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.table import InMemoryTable

    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as e:
        why = re.sub(r"^Could not open Parquet input source '[^']*': ", "", _first_line(e))
        raise _fail(key, p, "", f"not a readable Parquet file ({why})") from None
    return _arrow_source(p, key, table, lambda: Dataset(InMemoryTable(table)))


def _from_disk(p: Path, key: str) -> _Source:
    """A `datasets.save_to_disk` directory (its "train" split if it holds a DatasetDict)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing files, bad JSON, a damaged .arrow
        raise _fail(key, p, "", f"not a readable datasets.save_to_disk directory ({_disk_fault(p, e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise _fail(key, p, "", f"a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return _arrow_source(p, key, ds.data.table, lambda: ds)


def _disk_fault(p: Path, e: Exception) -> str:
    """Which file of a save_to_disk directory is at fault, where the error does not say."""
    if isinstance(e, FileNotFoundError) and e.filename and Path(e.filename).name != p.name:
        return f"{Path(e.filename).name} is missing"
    if not (p / "dataset_dict.json").is_file():
        missing = [n for n in ("state.json", "dataset_info.json") if not (p / n).is_file()]
        if missing:
            return f"{' and '.join(missing)} missing"
    if isinstance(e, json.JSONDecodeError):
        for f in sorted(p.rglob("*.json")):
            try:
                json.loads(f.read_text())
            except json.JSONDecodeError as bad:
                return f"{f.relative_to(p)}: not valid JSON ({bad.msg})"
    arrows = sorted(p.rglob("*.arrow"))
    return f"{arrows[0].relative_to(p)}: {_first_line(e)}" if len(arrows) == 1 else _first_line(e)


def _arrow_source(p: Path, key: str, table: Any, build: Callable[[], Any]) -> _Source:
    """An Arrow table's rows, its strings checked for UTF-8 in one pass over the data (Arrow
    does not check them on read; Python would fail at the row, at training)."""
    import pyarrow as pa

    try:
        table.validate(full=True)
    except pa.ArrowInvalid as e:
        m = _UTF8_AT.search(str(e))
        if m is None:
            raise _fail(key, p, "", f"damaged ({_first_line(e)})") from None
        col, chunk, index = (int(g) for g in m.groups())
        column = table.column(col)
        where = ""
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            where = _row(sum(len(c) for c in column.chunks[:chunk]) + index)
        raise _fail(key, p, where, f"not UTF-8 (column {table.column_names[col]!r})") from None
    return _Source(table.num_rows, list(table.column_names), lambda c: table.column(c).to_pylist(), _row, build)


