import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the `tiny` preset, seeded."""
    import torch

    from runner.config import validate
    from runner.models import load_policy

    cfg = validate({"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}})
    torch.manual_seed(0)
    return load_policy(cfg.model, "cpu")


def run_cli(args, cwd, timeout=600, env=None):
    """Run `python -m runner ARGS` in `cwd`; returns the CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.pop("MLFLOW_TRACKING_URI", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


def only_run(cwd):
    """The one MLflow run a CLI job in `cwd` made (local SQLite store), and its metrics."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'mlruns.db'}")
    runs = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0], runs[0].data.metrics
