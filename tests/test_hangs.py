"""A reward function that hangs (issue 33, case 7), for real: a user's environment and reward
functions written to tmp_path, real `python -m runner` processes, one real SIGTERM.

- train.reward_timeout_s: a hung call is a reward error (train.on_reward_error), with a warning;
- train.stop_grace_s: one SIGTERM stops a hung step, the previous step is checkpointed, and
  the same command resumes to what an uninterrupted run gives;
- the held-out evaluation counts its reward errors (eval/reward_errors)."""

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from conftest import run_cli
from runner import checkpoint as ckpt
from test_resume import popen

FAST = ["model=tiny", "train.eval_every=0", "train.eval_samples=4", "train.final_eval_samples=4",
        "rollout.max_new_tokens=5", "algo.group_size=3", "train.prompts_per_step=2"]
CALLS_PER_STEP = 3 * 2  # algo.group_size x train.prompts_per_step: DiceEnv scores rollout by rollout

HANG_ENV = '''
import os
import threading
from pathlib import Path

from envs.dice import DiceEnv


class HangingDice(DiceEnv):
    """DiceEnv whose score call number $HANG_CALL (from 1, in this process) never returns:
    it writes ./hung, then spins in Python ($HANG_HOW=spin) or blocks on a lock (else)."""

    calls = 0

    def score(self, prompt, completion, finished):
        HangingDice.calls += 1
        if HangingDice.calls == int(os.environ.get("HANG_CALL", "0")):
            Path("hung").write_text(str(HangingDice.calls))
            if os.environ.get("HANG_HOW") == "spin":
                while True:
                    pass
            threading.Event().wait()
        return super().score(prompt, completion, finished)
'''

HANG_REWARDS = '''
import time


def reward(prompts, completions, hang, **kwargs):
    """TRL's signature; the rows with hang=true (the held-out file's) never return."""
    if any(hang):
        time.sleep(3600)
    return [float("<answer>" in c) for c in completions]
'''


def user_code(tmp_path: Path, name: str, text: str) -> dict:
    """`name`.py in tmp_path; the environment a run needs to import it (and no outer store)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return env


def client(d: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{d / 'mlruns.db'}")


def the_run(c: MlflowClient):
    (run,) = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    return run


def history(c: MlflowClient, run_id: str, key: str) -> list:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def test_a_hung_reward_call_times_out_as_a_reward_error(tmp_path):
    env = user_code(tmp_path, "hang_env", HANG_ENV)
    env.update(HANG_CALL=str(CALLS_PER_STEP + 2), HANG_HOW="spin")  # the 2nd rollout of step 2
    args = [*FAST, "env=dice", "env._target_=hang_env.HangingDice", "train.steps=3", "train.reward_timeout_s=1",
            f"output_dir={tmp_path / 'out'}"]
    r = run_cli(args, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "hung").exists()  # it did hang
    run = the_run(client(tmp_path))
    assert run.info.status == "FINISHED"
    assert history(client(tmp_path), run.info.run_id, "errors/reward_total") == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert run.data.metrics["eval/reward_errors"] == 0.0
    (err,) = [json.loads(x) for x in (tmp_path / "out" / "reward_errors.jsonl").read_text().splitlines()]
    assert err["step"] == 2 and err["error"].startswith(
        "RewardTimeout: hang_env.HangingDice.score did not return within train.reward_timeout_s=1 s")
    assert "hang_env.py" in err["error"] and "in score" in err["error"]  # where it hung
    warned = (tmp_path / "out" / "runner.log").read_text()  # the run's log (also on the console)
    assert "reward function failed on a rollout at step 2 (RewardTimeout: hang_env.HangingDice.score" in warned


def test_one_sigterm_stops_a_hung_step_and_the_run_resumes_as_if_uninterrupted(tmp_path):
    hang_at = 3
    env = user_code(tmp_path, "hang_env", HANG_ENV)
    args = [*FAST, "env=dice", "env._target_=hang_env.HangingDice", "train.steps=5", "train.reward_timeout_s=0",
            "train.stop_grace_s=2", "train.checkpoint_every=100", f"output_dir={tmp_path / 'out'}"]
    ref = tmp_path / "ref"
    ref.mkdir()
    r = run_cli([*args[:-1], f"output_dir={ref / 'out'}"], cwd=ref, env=env, timeout=300)  # never hangs
    assert r.returncode == 0, r.stderr[-3000:]

    hung = {**env, "HANG_CALL": str((hang_at - 1) * CALLS_PER_STEP + 1), "HANG_HOW": "wait"}
    with open(tmp_path / "err.txt", "w") as log:
        p = popen(args, tmp_path, env=hung, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.time() + 180
            while not (tmp_path / "hung").exists() and time.time() < deadline and p.poll() is None:
                time.sleep(0.1)
            assert (tmp_path / "hung").exists(), (tmp_path / "err.txt").read_text()[-3000:]
            time.sleep(0.5)
            t0 = time.time()
            p.send_signal(signal.SIGTERM)  # one, as a scheduler sends it
            p.wait(timeout=120)
            took = time.time() - t0
        finally:
            if p.poll() is None:  # a hung step nothing stopped
                p.kill()
                p.wait()
    err = (tmp_path / "err.txt").read_text()
    assert p.returncode == 130, err[-3000:]
    assert took < 60, took  # the 2 s grace, then the checkpoint, export and MLflow's end
    assert "SIGTERM: stopping after this step" in err
    assert (f"step {hang_at} abandoned before its optimizer step; stopping at step {hang_at - 1}"
            in (tmp_path / "out" / "runner.log").read_text())

    c = client(tmp_path)
    killed = the_run(c)
    assert killed.info.status == "KILLED" and killed.data.tags["stop_reason"] == "sigterm"
    assert killed.data.tags["final_step"] == str(hang_at - 1)
    ckpts = sorted(x.name for x in (tmp_path / "out" / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts == [f"ckpt-{hang_at - 1:08d}.pt"]
    assert [s for s, _ in history(c, killed.info.run_id, "train/loss")] == list(range(1, hang_at))

    r = run_cli(args, cwd=tmp_path, env=env, timeout=300)  # the same command, no hang this time
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {hang_at - 1}" in (tmp_path / "out" / "runner.log").read_text()
    run = the_run(c)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    ref_c = client(ref)
    ref_run = the_run(ref_c)
    for key in ("reward/raw_mean", "train/loss", "policy/token_entropy", "completion/mean_length"):
        got = history(c, run.info.run_id, key)
        assert [s for s, _ in got] == list(range(1, 6)), key  # no duplicates, no gaps
        assert got == history(ref_c, ref_run.info.run_id, key), key  # bit-identical on CPU
    mine, theirs = ckpt.load_latest(tmp_path / "out" / "checkpoints"), ckpt.load_latest(ref / "out" / "checkpoints")
    assert mine["step"] == theirs["step"] == 5
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])


def test_the_held_out_evaluation_counts_its_reward_errors(tmp_path):
    env = user_code(tmp_path, "hang_rewards", HANG_REWARDS)
    rows = [{"prompt": f"say {i}", "hang": False} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "say 9", "hang": True}))
    args = [*FAST, "env=dataset", f"env.path={tmp_path / 'train.jsonl'}", f"env.eval_path={tmp_path / 'eval.jsonl'}",
            "env.reward_funcs=[hang_rewards.reward]", "env.eval_k=2", "train.eval_every=1", "train.steps=2",
            "train.reward_timeout_s=1", f"output_dir={tmp_path / 'out'}"]
    r = run_cli(args, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    c = client(tmp_path)
    run = the_run(c)
    # each evaluation: score_batch times out, then each of its eval_k rollouts on its own
    assert history(c, run.info.run_id, "eval/reward_errors") == [(1, 2.0), (2, 2.0)]
    # the evaluation's errors are its own: training's count stays at its rollouts'
    assert history(c, run.info.run_id, "errors/reward_total") == [(1, 0.0), (2, 0.0)]
    errors = [json.loads(x) for x in (tmp_path / "out" / "reward_errors.jsonl").read_text().splitlines()]
    assert len(errors) == 4 and all("hang_rewards.py" in e["error"] for e in errors)
    warned = (tmp_path / "out" / "runner.log").read_text()
    assert "score_batch failed at step 1 (RewardTimeout: envs.dataset.DatasetEnv.score_batch" in warned


def test_negative_timeouts_are_config_errors(tmp_path):
    for key in ("train.reward_timeout_s", "train.stop_grace_s"):
        r = run_cli([f"{key}=-1"], cwd=tmp_path, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.splitlines()[0].startswith(f"error: {key}=-1.0: must be >= 0 seconds"), r.stderr[-2000:]
