"""runner.reevaluate: a finished run's last checkpoint sampled again, with more samples."""

import json

import pytest

from conftest import run_cli
from runner.reevaluate import main, reevaluate


def test_reevaluate_reads_the_runs_own_config_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    p = run_cli(["model=tiny", "train.steps=2", "train.eval_every=0", "rollout.max_new_tokens=4", "algo.group_size=3",
                 "train.eval_samples=6", f"output_dir={out}", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"],
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    r = reevaluate(out, samples=30, seed=5)
    assert r["step"] == 2 and r["samples"] == 30
    assert sum(r["answers"].values()) == pytest.approx(1.0)
    assert set(r["first_token_prob"]) == {"1", "2", "3", "4", "5", "6"}
    assert r["spread"] is False  # a random tiny model answers nothing valid
    assert json.loads((out / "reevaluate_30.json").read_text())["answers"] == r["answers"]
    again = reevaluate(out, samples=30, seed=5)  # its own seed: the same samples again
    assert again["answers"] == r["answers"]
    assert main([str(out), "--samples", "12"]) == 0 and "n=12" in capsys.readouterr().out


def test_reevaluate_refuses_a_dir_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="not a run's output dir"):
        reevaluate(tmp_path, samples=10, seed=0)


def test_a_run_from_before_env_targets_still_reevaluates():
    from runner.reevaluate import with_target

    old = {"name": "even_dice", "prompt": "roll", "faces": 6, "tasks": {"chain_sum": {}}, "eval_k": 4}
    env = with_target(old)
    assert env["_target_"] == "envs.dice.DiceEnv" and env["even_only"] is True and env["prompt"] == "roll"
    assert "tasks" not in env and "eval_k" not in env
