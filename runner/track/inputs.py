"""A data file as an MLflow dataset input: what a stage wrote (runner/generate.py) or read
(an SFT stage's `sft.data`), listed under the run's Datasets in MLflow with its name, where
it lies, its row count and schema, and a digest of its bytes.

The file is described, not copied (MLflow's MetaDataset over a local file source): the data
itself goes to the run as an artifact, and its full SHA-256 is in the dataset's profile, so
the run that made a file and the runs that trained on it can be matched by digest. MLflow's
own `from_pandas` is not used: it hashes a DataFrame, and chat columns (lists of messages)
are not hashable there, and it would read the whole file into memory again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

# MLflow keeps a dataset digest in a 36-character column: the SHA-256's first 32 hex digits
DIGEST_CHARS = 32


def chat_type():
    """A column of chat messages ([{role, content}, ...]) in MLflow's schema types."""
    from mlflow.types.schema import Array, DataType, Object, Property

    return Array(Object([Property("role", DataType.string), Property("content", DataType.string)]))


def _column_type(value: Any):
    from mlflow.types.schema import DataType

    if isinstance(value, bool):
        return DataType.boolean
    if isinstance(value, int):
        return DataType.long
    if isinstance(value, float):
        return DataType.double
    if isinstance(value, str):
        return DataType.string
    if isinstance(value, list) and value and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in value):
        return chat_type()
    return None


def rows_schema(rows: Sequence[dict]):
    """The schema of JSON rows as their first row has them (None for no rows, or a column
    of a kind the schema types do not name): what MLflow shows as the dataset's columns."""
    from mlflow.types.schema import ColSpec, Schema

    if not rows:
        return None
    cols = []
    for name, value in rows[0].items():
        tp = _column_type(value)
        if tp is None:
            return None
        cols.append(ColSpec(tp, name))
    return Schema(cols)


def file_dataset(path: Path, sha256: str, rows: int, schema=None, name: Optional[str] = None):
    """The `mlflow.entities.Dataset` of a local file: source its file:// URI, digest the
    start of its SHA-256, profile its row count and whole SHA-256."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset

    path = Path(path).resolve()
    d = MetaDataset(LocalArtifactDatasetSource(path.as_uri()), name=name or path.name, digest=sha256[:DIGEST_CHARS],
                    schema=schema).to_dict()
    return Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                   schema=d.get("schema"), profile=json.dumps({"num_rows": rows, "sha256": sha256}))


def log_file_input(client, run_id: str, path: Path, sha256: str, rows: int, context: str, schema=None) -> None:
    """Log the file as a dataset input of `run_id`; `context` is MLflow's dataset context tag
    (e.g. "generated", "training"), shown beside the dataset in the run's page."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ds = file_dataset(path, sha256, rows, schema)
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])
