"""Completions over training: every `tracking.samples_every` steps and the last, that step's rollouts become
rows of one table, `completions.json` in the output dir, in MLflow's table format (what
`MlflowClient.log_table` writes: pandas' "split" JSON) and logged as the run's table artifact,
so the UI's artifact view filters and compares them by step.

The output dir's copy is the source: a resumed run recomputes the steps after its checkpoint,
so appending a step first drops any rows of that step or later (no duplicates, nothing from the
abandoned branch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

TABLE = "completions.json"
COLUMNS = ["step", "group", "prompt", "completion", "reward", "shaped_reward", "answer", "advantage", "finished"]
# MLflow's UI lists an artifact as a table when the run's tag names it so
LOGGED_ARTIFACTS_TAG = ("mlflow.loggedArtifacts", json.dumps([{"path": TABLE, "type": "table"}]))


def prompt_text(prompt) -> str:
    """The prompt's last user message (what distinguishes prompts), cut to 200 characters."""
    users = [c for r, c in getattr(prompt, "messages", ()) if r == "user"]
    text = users[-1] if users else str(prompt)
    return text if len(text) <= 200 else text[:197] + "..."


def rows(step: int, batch, scores: Sequence, shaped: Sequence[float], adv: Sequence[float]) -> list[list]:
    """One row per rollout of the step's training batch, in COLUMNS order."""
    groups = batch.groups.tolist()
    return [[step, int(groups[i]), prompt_text(batch.prompts[i]), batch.completions[i], float(scores[i].reward),
             float(shaped[i]), scores[i].answer_key, float(adv[i]), bool(batch.finished[i])]
            for i in range(len(batch))]


def read(path: Path) -> list[list]:
    """The table's rows. A damaged table (cut, not JSON, other columns) is kept beside it as
    `<name>.damaged-<time>` and the table starts again from this step's rows: a sample log is
    not worth failing a run over, and it is never overwritten as if it had been empty."""
    if not path.exists():
        return []
    try:
        table = json.loads(path.read_text())
        if isinstance(table, dict) and table.get("columns") == COLUMNS and isinstance(table.get("data"), list):
            return [r for r in table["data"] if isinstance(r, list) and r and isinstance(r[0], int)]
        why = "not a completions table of these columns"
    except (OSError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
    import logging
    import time

    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, kept)
    logging.getLogger(__name__).warning("%s was damaged (%s): kept as %s; the table starts again", path, why, kept.name)
    return []


def append(path: Path, step: int, new_rows: list[list]) -> Path:
    """Rows of steps before `step`, then the new ones; written whole and renamed into place,
    so a crash mid-write leaves the previous table."""
    from runner.outdir import write_text_atomic

    kept = [r for r in read(path) if r[0] < step]
    return write_text_atomic(path, json.dumps({"columns": COLUMNS, "data": kept + new_rows}))
