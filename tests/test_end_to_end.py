"""`python -m runner` on the tiny model, read back through MlflowClient."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

FAST = ["model=tiny", "train.eval_every=2", "train.eval_samples=8", "train.prompts_per_step=2", "algo.group_size=6",
        "rollout.max_new_tokens=6", "train.checkpoint_every=2"]


def client(tmp_path):
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")


def only_run(c):
    exp = c.get_experiment_by_name("runner")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def steps_of(c, run_id, key):
    return [m.step for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    r = run_cli([*FAST, "train.steps=3", "train.final_eval_samples=40", f"output_dir={tmp / 'out'}"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r


def test_run_logs_config_metrics_and_artifacts(trained):
    tmp, r = trained
    c = client(tmp)
    run = only_run(c)
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("env", "algo", "shaper", "model")} == {
        "env": "even_dice", "algo": "grpo_wide", "shaper": "divisor", "model": "tiny"}
    assert run.data.tags["stop_reason"] == "completed"
    assert run.data.params["algo.group_size"] == "6" and run.data.params["train.steps"] == "3"
    for key in ["reward/raw_mean", "reward/shaped_mean", "answers/frac/2", "answers/frac/invalid",
                "answers/entropy", "answers/tv_uniform_valid", "answers/valid_rate", "format/exact_rate",
                "completion/mean_length", "policy/token_entropy", "train/clip_frac/low",
                "train/clip_frac/high", "train/loss", "train/grad_norm", "time/step_s",
                "throughput/tokens_per_s", "cost/device_hours", "cost/wall_s",
                # why the shaper acts or starves (issue 16), and the zero-advantage skip
                "groups/distinct_rewarded_mean", "groups/multi_rewarded_frac", "shaper/effective_group_frac",
                "policy/prob/min_rewarded", "policy/prob/rewarded_mass", "policy/prob/2", "train/skipped_seq_frac"]:
        assert steps_of(c, run.info.run_id, key) == [1, 2, 3], key
    # the decode steps a batch took: its longest completion, never shorter than the mean
    longest = [m.value for m in c.get_metric_history(run.info.run_id, "completion/max_length")]
    mean_len = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "completion/mean_length")}
    assert len(longest) == 3 and all(1 <= v <= 8 and v == int(v) for v in longest)
    assert all(m.value >= mean_len[m.step] for m in c.get_metric_history(run.info.run_id, "completion/max_length"))
    # the periodic checkpoint (step 2) is timed: what the training thread paid for it
    assert steps_of(c, run.info.run_id, "time/checkpoint_s") == [2]
    assert json.loads((tmp / "out" / "run_state.json").read_text())["checkpoint_step"] == 3
    # the main job's linear lr decay (algo=grpo_wide): 2e-5 x (1, 2/3, 1/3) over 3 steps
    lrs = [v for _, v in sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "train/lr"))]
    assert lrs == pytest.approx([2e-5, 2e-5 * 2 / 3, 2e-5 / 3])
    # evaluation at step 2 (eval_every) and at the end, with exact answer probabilities
    assert steps_of(c, run.info.run_id, "eval/answers/valid_rate") == [2, 3]
    probs = [c.get_metric_history(run.info.run_id, f"eval/prob/{k}")[-1].value for k in "123456"]
    assert all(0 <= p <= 1 for p in probs) and 0 < sum(probs) <= 1
    # the periodic evaluation samples train.eval_samples (8), the final one final_eval_samples (40)
    assert [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "eval/samples")] == [(2, 8), (3, 40)]
    assert "sampled (n=40, T=1)" in r.stdout
    fracs = [c.get_metric_history(run.info.run_id, f"answers/frac/{k}")[0].value for k in [*"123456", "invalid"]]
    assert sum(fracs) == pytest.approx(1.0)
    arts = {a.path for a in c.list_artifacts(run.info.run_id)} | {
        a.path for a in c.list_artifacts(run.info.run_id, "config")}
    assert {"answer_distribution.png", "samples.md", "config/config.yaml"} <= arts
    assert "final policy after 3 steps" in r.stdout and "MLflow:" in r.stdout
    # dice faces are single tokens: exact probabilities shown, and what "invalid" holds is said
    assert "P(first token)" in r.stdout and "invalid: no answer of env.answer_space (1, 2, 3, 4, 5, 6)" in r.stdout
    assert re.search(r"on disk: \d+\.\d\d GB, \d+\.\d\d GB of it checkpoints \(train.keep_final_checkpoint=false", r.stdout)


def test_checkpoint_resumes_into_the_same_run(trained):
    tmp, _ = trained
    out = tmp / "out"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    run_id = json.loads((out / "run_state.json").read_text())["run_id"]
    r = run_cli([*FAST, "train.steps=5", f"output_dir={out}"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    c = client(tmp)
    run = only_run(c)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert steps_of(c, run_id, "reward/raw_mean") == [1, 2, 3, 4, 5]
    assert "resumed from step 3" in (out / "runner.log").read_text()


def test_ctrl_c_checkpoints_and_marks_the_run_killed(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runner", *FAST, "train.steps=500", "train.checkpoint_every=1000",
           f"output_dir={out}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "run_state.json").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    time.sleep(3)  # a few steps in
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 130, err[-3000:]
    c = client(tmp_path)
    run = only_run(c)
    assert run.info.status == "KILLED"
    assert run.data.tags["stop_reason"] == "sigint"
    step = int(run.data.tags["final_step"])
    assert 1 <= step < 500
    assert (out / "checkpoints" / f"ckpt-{step:08d}.pt").exists()
    assert steps_of(c, run.info.run_id, "reward/raw_mean") == list(range(1, step + 1))
