"""The recipe card (runner.track.card): the success rule on hand-made numbers, the page it
renders, and the card rebuilt by the CLI from a real SQLite MLflow store."""

import os
import subprocess
import sys

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from runner.track.card import (Card, StageResult, card_verdict, improvement, plot, references, render,
                               totals, verdict)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stage(name, kind, metric, index, status="FINISHED", **kw):
    return StageResult(name=name, kind=kind, metric=metric, index=index, status=status, **kw)


def three(base, sft, rl, rl_status="FINISHED", sft_status="FINISHED"):
    return (stage("eval_base", "eval", base, 0), stage("sft", "sft", sft, 2, sft_status),
            stage("rl", "rl", rl, 3, rl_status))


# -- the rule ---------------------------------------------------------------------------

def test_improvement_is_signed_by_direction_and_undefined_at_zero():
    assert improvement(0.55, 0.50) == pytest.approx(0.10)
    assert improvement(0.45, 0.50) == pytest.approx(-0.10)
    assert improvement(0.45, 0.50, higher_is_better=False) == pytest.approx(0.10)  # lower: less is better
    assert improvement(0.55, 0.50, higher_is_better=False) == pytest.approx(-0.10)
    assert improvement(-0.9, -1.0) == pytest.approx(0.10)  # negative reference: divided by |ref|
    assert improvement(0.3, 0.0) is None
    assert improvement(0.0, 0.0, higher_is_better=False) is None


def test_exactly_ten_percent_over_sft_is_a_success():
    v = verdict(*three(0.30, 0.50, 0.55))  # +10.0% over SFT (0.1000...09 in floats), +83% over base
    assert v.outcome == "success"
    assert v.reason == "success: RL +83.3% over base and +10.0% over SFT >= 10%"


def test_the_boundary_holds_against_float_noise_and_just_below_fails():
    # (0.30 - 0.27) / 0.30 is 0.0999999999999999 in floats: still exactly 10%
    assert verdict(*three(0.30, 0.30, 0.27), higher_is_better=False).outcome == "success"
    v = verdict(*three(0.50, 0.50, 0.549))
    assert v.outcome == "failure"
    assert v.reason == "failure: RL +9.8% over base, +9.8% over SFT, each < 10%"


def test_over_base_or_over_sft_either_suffices():
    assert verdict(*three(0.30, 0.60, 0.40)).outcome == "success"  # +33% over base, -33% over SFT
    assert verdict(*three(0.50, 0.30, 0.40)).outcome == "success"  # the reverse


def test_lower_is_better_metric():
    base, sft, rl = three(0.40, 0.30, 0.33)  # e.g. a distance: RL worse than SFT, 17.5% better than base
    v = verdict(base, sft, rl, higher_is_better=False)
    assert v.outcome == "success" and v.reason == "success: RL +17.5% over base >= 10%"
    v = verdict(*three(0.30, 0.30, 0.28), higher_is_better=False)
    assert v.outcome == "failure" and "+6.7% over base" in v.reason
    v = verdict(*three(0.30, 0.30, 0.36), higher_is_better=False)  # higher is worse here
    assert v.outcome == "failure" and "-20.0% over SFT" in v.reason


def test_a_base_that_scores_zero():
    base, sft, rl = three(0.0, 0.50, 0.52)
    v = verdict(base, sft, rl)  # undefined over base; +4% over SFT decides
    assert v.outcome == "failure"
    assert v.reason == "failure: RL +4.0% over SFT < 10%; undefined (the base scores 0): +0.52 absolute"
    assert verdict(base, stage("sft", "sft", 0.50, 2), stage("rl", "rl", 0.60, 3)).outcome == "success"
    v = verdict(base, None, rl)  # nothing left to judge against
    assert v.outcome == "not judgeable"
    assert "undefined (the base scores 0): +0.52 absolute" in v.reason
    assert verdict(base, stage("sft", "sft", 0.0, 2), rl).outcome == "not judgeable"


def test_no_sft_stage_is_judged_against_the_base_only():
    base, rl = stage("eval_base", "eval", 0.30, 0), stage("rl", "rl", 0.34, 1)
    v = verdict(base, None, rl)
    assert v.outcome == "success" and [c.ref for c in v.comparisons] == ["base"]
    assert verdict(base, None, stage("rl", "rl", 0.32, 1)).outcome == "failure"


def test_failed_or_missing_rl_gives_no_verdict():
    base, sft, rl = three(0.30, 0.50, 0.90, rl_status="FAILED")
    v = verdict(base, sft, rl)
    assert v.outcome == "no verdict" and v.reason == "no verdict: the RL stage `rl` is FAILED"
    assert len(v.comparisons) == 2  # still shown
    assert verdict(base, sft, None).outcome == "no verdict"
    assert verdict(base, sft, stage("rl", "rl", None, 3)).outcome == "no verdict"


def test_a_failed_sft_stage_does_not_count():
    v = verdict(*three(0.50, 0.20, 0.52, sft_status="FAILED"))  # +160% over a failed SFT: not counted
    assert v.outcome == "failure" and v.reason == "failure: RL +4.0% over base < 10%"


def test_references_take_the_last_of_each_kind_and_the_base_before_training():
    stages = [stage("eval_base", "eval", 0.3, 0), stage("generate", "generate", None, 1),
              stage("sft_a", "sft", 0.4, 2), stage("sft_b", "sft", 0.45, 3), stage("rl_a", "rl", 0.1, 4, "FAILED"),
              stage("rl_b", "rl", 0.5, 5, "FAILED"), stage("eval_final", "eval", 0.5, 6)]
    base, sft, rl = references(stages)
    assert (base.name, sft.name, rl.name) == ("eval_base", "sft_b", "rl_b")


# -- the page ---------------------------------------------------------------------------

def example_card(parent_run_id=""):
    return Card(recipe="math_sft_rl", metric_name="eval/accuracy", higher_is_better=True, machine="test box",
                parent_run_id=parent_run_id, stages=[
                    StageResult("eval_base", "eval", 0.30, n=200, stderr=None, usd=0.0125, wall_s=42.0,
                                command="python -m runner.eval model=smollm2 seed=0", seed="0", index=0),
                    StageResult("sft", "sft", 0.50, n=200, stderr=0.035, usd=0.25, wall_s=1800.0,
                                command="python -m runner.sft data=gen.jsonl seed=0", seed="0", index=1),
                    StageResult("rl", "rl", 0.55, n=200, stderr=0.0352, usd=1.5, wall_s=5400.5,
                                command="python -m runner env=math seed=1", seed="1", index=2)])


def test_render_states_and_applies_the_rule_and_totals_add_up():
    card = example_card()
    text = render(card)
    assert "OR over the SFT model" in text and "boundary included" in text
    assert "**success: RL +83.3% over base and +10.0% over SFT >= 10%**" in text
    usd, wall, no_usd, no_wall = totals(card.stages)
    assert usd == pytest.approx(0.0125 + 0.25 + 1.5) and wall == pytest.approx(42.0 + 1800.0 + 5400.5)
    assert "- cost: $1.7625 over 3 stages" in text
    assert "- wall time: 2h 00m 43s (7242.5 s, stages summed)" in text
    assert "- machine: test box" in text
    assert "| 0 | eval_base | eval | FINISHED | 0.3 ± 0.0324 (n=200, binomial) | $0.0125 | 42.0 s | 0 |" in text
    assert "| 2 | rl | rl | FINISHED | 0.55 ± 0.0352 (n=200) | $1.5000 | 1h 30m 01s | 1 |" in text
    for s in card.stages:
        assert s.command in text


def test_render_words_the_undefined_case():
    card = Card("r", "eval/game/solve_rate", True, [stage("eval_base", "eval", 0.0, 0, usd=0.1),
                                                     stage("rl", "rl", 0.2, 1, wall_s=5.0)])
    text = render(card)
    assert "undefined (the base scores 0): +0.2 absolute" in text
    assert "**not judgeable:" in text
    assert "(1 without a cost)" in text and "(1 without a wall time)" in text


def test_render_marks_a_failed_rl_stage():
    card = Card("r", "eval/accuracy", True, list(three(0.3, 0.4, 0.5, rl_status="FAILED")))
    text = render(card)
    assert "not counted: `rl` is FAILED" in text and "**no verdict: the RL stage `rl` is FAILED**" in text


def test_plot_is_a_png(tmp_path):
    p = plot(example_card(), tmp_path / "card.png")
    assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    odd = Card("r", "eval/prob/tv_uniform_valid", False, [stage("eval_base", "eval", 0.0, 0),
                                                          stage("rl", "rl", None, 1, "RUNNING")])
    assert plot(odd, tmp_path / "odd.png").read_bytes()[:8] == PNG_MAGIC


# -- from MLflow, through the CLI -------------------------------------------------------

def log_stage(c, exp, parent, s: StageResult, metric):
    tags = {"mlflow.parentRunId": parent, "runner.stage": s.name, "runner.stage_index": str(s.index),
            "runner.stage_kind": s.kind, "total_usd": str(s.usd), "total_wall_s": str(s.wall_s),
            "command": s.command}
    rid = c.create_run(exp, tags=tags).info.run_id
    ms = [Metric(metric, 0.01, 0, 0), Metric(metric, s.metric, 0, 7), Metric(f"{metric}_n", s.n, 0, 7)]
    if s.stderr is not None:
        ms.append(Metric(f"{metric}_stderr", s.stderr, 0, 7))
    c.log_batch(rid, metrics=ms, params=[Param("seed", s.seed)])
    c.set_terminated(rid, s.status)


def cli(args, cwd):
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "runner.track.card", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_rebuilds_the_card_from_a_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("runner", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = c.create_run(exp, tags={"runner.recipe": "math_sft_rl", "runner.card_metric": "eval/accuracy",
                                     "runner.card_higher_is_better": "true"}).info.run_id
    expected = example_card(parent)
    for s in expected.stages:
        log_stage(c, exp, parent, s, "eval/accuracy")
    c.log_batch(c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id,
                tags=[RunTag("note", "not a stage")])  # ignored: no runner.stage tag
    r = cli(["--parent", parent, "--uri", uri, "--out", str(tmp_path / "card"), "--machine", "test box"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "card" / "recipe_card.md").read_text()
    # run ids are not on the page: the rebuilt card renders exactly as the hand-made one
    assert md == render(expected)
    assert "**success: RL +83.3% over base and +10.0% over SFT >= 10%**" in md
    assert (tmp_path / "card" / "recipe_card.png").read_bytes()[:8] == PNG_MAGIC
    assert {a.path for a in c.list_artifacts(parent)} >= {"recipe_card.md", "recipe_card.png"}
    assert card_verdict(expected).outcome == "success"


def test_cli_exits_2_without_a_parent_or_stages(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("runner", artifact_location=(tmp_path / "mlartifacts").as_uri())
    lonely = c.create_run(exp, tags={"runner.recipe": "r", "runner.card_metric": "eval/accuracy"}).info.run_id
    r = cli(["--parent", "0" * 32, "--uri", uri], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no parent run" in r.stderr
    r = cli(["--parent", lonely, "--uri", uri], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no stage children" in r.stderr
    assert not (tmp_path / "recipe_card.md").exists()


def test_write_warns_when_the_store_cannot_take_the_card(tmp_path, capsys):
    from runner.track.card import write

    md, png = write(example_card("0" * 32), tmp_path / "out", f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    assert md.read_text() == render(example_card("0" * 32)) and png.read_bytes()[:8] == PNG_MAGIC
    assert "warning: could not log the recipe card" in capsys.readouterr().err
