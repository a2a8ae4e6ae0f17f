"""Fault injection on the tiny model: kill -9, corrupt checkpoints, SIGTERM, a raising
reward function, NaN losses, an unreachable MLflow. Outcomes read back with MlflowClient."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from runner import checkpoint as ckpt
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

import runner.loop.learner as learner_mod
import runner.train as train_mod
from conftest import CONF, run_cli
from envs import DiceEnv
from runner.config import validate
from runner.track.store import sync

FAST = ["model=tiny", "train.eval_every=0", "train.eval_samples=4", "rollout.max_new_tokens=5", "algo.group_size=3",
        "train.prompts_per_step=2", "shaper=bonus", "algo.entropy.coef=0.1"]


def client(d):
    return MlflowClient(f"sqlite:///{d / 'mlruns.db'}")


def the_run(c):
    runs = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    assert len(runs) == 1
    return runs[0]


def history(c, run_id, key):
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def weights(path):
    return ckpt.read(path)["model"]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = [*FAST, "train.steps=16", "train.checkpoint_every=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    r = run_cli([*args, f"output_dir={a / 'out'}"], cwd=a)
    assert r.returncode == 0, r.stderr[-2000:]

    p = subprocess.Popen([sys.executable, "-m", "runner", *args, f"output_dir={b / 'out'}"], cwd=b,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (b / "out" / "checkpoints" / "ckpt-00000008.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -9
    c = client(b)
    killed = the_run(c)
    assert killed.info.status == "RUNNING"  # nobody could tell MLflow: that is what kill -9 is
    logged = [s for s, _ in history(c, killed.info.run_id, "reward/raw_mean")]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= 12  # only up to a checkpoint

    r = run_cli([*args, f"output_dir={b / 'out'}"], cwd=b)  # the same command again
    assert r.returncode == 0, r.stderr[-2000:]
    run = the_run(c)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    ref = client(a)
    ref_run = the_run(ref)
    for key in ("reward/raw_mean", "train/loss", "policy/token_entropy", "answers/entropy"):
        got = history(c, run.info.run_id, key)
        assert [s for s, _ in got] == list(range(1, 17)), key  # no duplicates, no gaps
        assert got == history(ref, ref_run.info.run_id, key), key  # bit-identical on CPU
    wa, wb = weights(a / "out/checkpoints/ckpt-00000016.pt"), weights(b / "out/checkpoints/ckpt-00000016.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupt_or_truncated_checkpoint_falls_back_to_the_previous(tmp_path):
    args = [*FAST, "train.checkpoint_every=2", "train.keep_checkpoints=3", f"output_dir={tmp_path / 'out'}"]
    assert run_cli([*args, "train.steps=6"], cwd=tmp_path).returncode == 0
    ck = tmp_path / "out" / "checkpoints"
    six, four = ck / "ckpt-00000006.pt", ck / "ckpt-00000004.pt"
    six.write_bytes(six.read_bytes()[: six.stat().st_size // 2])  # truncated
    data = bytearray(four.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: caught by the SHA-256
    four.write_bytes(bytes(data))
    r = run_cli([*args, "train.steps=8"], cwd=tmp_path)
    assert r.returncode == 2 and "would log steps 3-6 twice" in r.stderr  # MLflow holds steps 1-6
    r = run_cli([*args, "train.steps=8", "train.resume=force"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log_text = (tmp_path / "out" / "runner.log").read_text()
    assert "ckpt-00000006.pt is unreadable" in log_text
    assert "ckpt-00000004.pt is unreadable" in log_text and "SHA-256" in log_text
    assert "resumed from step 2" in log_text
    assert (ck / "ckpt-00000008.pt").exists()


def test_sigterm_checkpoints_and_marks_killed(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "runner", *FAST, "train.steps=100000", f"output_dir={out}"],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "run_state.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    run = the_run(client(tmp_path))
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "sigterm"
    step = int(run.data.tags["final_step"])
    assert (out / "checkpoints" / f"ckpt-{step:08d}.pt").exists()
    assert [s for s, _ in history(client(tmp_path), run.info.run_id, "train/loss")] == list(range(1, step + 1))


def in_process(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=[*FAST, f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
                                                    *overrides]))
    return cfg


def test_a_raising_reward_costs_one_rollout(tmp_path, monkeypatch):
    real = DiceEnv.score
    calls = {"n": 0}

    def flaky(self, prompt, completion, finished):
        calls["n"] += 1
        if calls["n"] % 4 == 0:
            raise ValueError("reward service hiccup")
        return real(self, prompt, completion, finished)

    monkeypatch.setattr(DiceEnv, "score", flaky)
    t = train_mod.run(in_process(tmp_path, "train.steps=3"), tmp_path / "out", "{}")
    run = client(tmp_path).get_run(t.tracker.run_id)
    assert run.info.status == "FINISHED"
    errors = [json.loads(x) for x in (tmp_path / "out" / "reward_errors.jsonl").read_text().splitlines()]
    # training rollouts, then the final evaluation's
    assert len(errors) == run.data.metrics["errors/reward_total"] + run.data.metrics["eval/reward_errors"]
    assert run.data.metrics["errors/reward_total"] > 0
    assert "reward service hiccup" in errors[0]["error"] and "completion" in errors[0]
    arts = {a.path for a in client(tmp_path).list_artifacts(t.tracker.run_id)}
    assert "reward_errors.jsonl" in arts


def test_a_raising_reward_fails_fast_when_asked(tmp_path, monkeypatch):
    def broken(self, *a):
        raise ValueError("broken reward")

    monkeypatch.setattr(DiceEnv, "score", broken)
    with pytest.raises(ValueError, match="broken reward"):
        train_mod.run(in_process(tmp_path, "train.steps=3", "train.on_reward_error=fail"), tmp_path / "out", "{}")
    run = the_run(client(tmp_path))
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "error"
    assert "traceback.txt" in {a.path for a in client(tmp_path).list_artifacts(run.info.run_id)}


def nan_on(steps):
    real = learner_mod.policy_loss

    def patched(*a, **k):
        loss, stats = real(*a, **k)
        return (loss * float("nan") if patched.trainer_step() in steps else loss), stats

    return patched


def test_nan_loss_skips_the_update_and_stops_after_a_streak(tmp_path, monkeypatch):
    holder = {}
    real_update = train_mod.Trainer.update

    def update(self, *a, **k):
        holder["t"] = self
        return real_update(self, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "update", update)
    patched = nan_on({2})
    patched.trainer_step = lambda: holder["t"].step
    monkeypatch.setattr(learner_mod, "policy_loss", patched)
    t = train_mod.run(in_process(tmp_path, "train.steps=3"), tmp_path / "out", "{}")
    c = client(tmp_path)
    assert c.get_run(t.tracker.run_id).info.status == "FINISHED"
    assert [v for _, v in history(c, t.tracker.run_id, "train/nonfinite_total")] == [0.0, 1.0, 1.0]

    patched = nan_on(set(range(2, 100)))
    patched.trainer_step = lambda: holder["t"].step
    monkeypatch.setattr(learner_mod, "policy_loss", patched)
    d = tmp_path / "streak"
    with pytest.raises(train_mod.NonFiniteError, match="2 updates in a row"):
        train_mod.run(in_process(d.parent, "train.steps=10", "train.max_nonfinite_steps=2",
                                 "tracking.experiment=streak"), d, "{}")
    runs = c.search_runs([c.get_experiment_by_name("streak").experiment_id])
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["stop_reason"] == "nonfinite"
    w = weights(sorted((d / "checkpoints").glob("*.pt"))[-1])
    assert all(torch.isfinite(v).all() for v in w.values())


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_mlflow_loses_nothing(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=[*FAST, f"tracking.uri={uri}", "train.steps=4",
                                                    "train.checkpoint_every=2"]))
    t = train_mod.run(cfg, tmp_path / "out", "{}")
    assert t.stop_reason == "completed" and t.step == 4  # training went on
    spool = tmp_path / "out" / "mlflow_spool.jsonl"
    ops = [json.loads(x) for x in spool.read_text().splitlines()]
    assert ops[0]["op"] == "create" and sorted({o["step"] for o in ops if o["op"] == "metrics"}) == [1, 2, 3, 4]
    # later (or elsewhere): send it all
    target = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert sync(tmp_path / "out", target)
    c = client(tmp_path)
    run = the_run(c)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    assert [s for s, _ in history(c, run.info.run_id, "reward/raw_mean")] == [1, 2, 3, 4]
    assert run.data.params["train.steps"] == "4"
    assert not spool.read_text().strip()


def test_non_finite_weights_before_any_checkpoint_name_none(tmp_path):
    """The message once cited "the one at step 0 is kept" where no checkpoint existed."""
    t = train_mod.Trainer(in_process(tmp_path, "train.steps=3"), tmp_path / "out")
    t.setup()
    with torch.no_grad():
        next(t.model.parameters())[0, 0] = float("nan")
    with pytest.raises(train_mod.NonFiniteError) as e:
        t.save_checkpoint()
    assert "none exists yet" in str(e.value) and "is kept" not in str(e.value)
    assert not (tmp_path / "out" / "checkpoints").exists()
