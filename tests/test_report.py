"""The dice-post report on a fabricated MLflow store (real SQLite), and every dice recipe
for 2 steps on the tiny model."""

import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from conftest import CONF
from runner.config import validate
from runner.track.report import ANSWERS, report
from runner.train import run

DICE_RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml") if "usd" not in p.stem and "dice" in p.stem)


def fake_run(c, exp, parent, recipe, seed, final, lengths, train_curve):
    r = c.create_run(exp, tags={"recipe": recipe, "mlflow.parentRunId": parent})
    ms = [Metric(f"eval/answers/frac/{a}", final.get(a, 0.0), 0, 10) for a in ANSWERS]
    valid = sum(final.get(a, 0.0) for a in ("2", "4", "6") if recipe.startswith("even")) if recipe.startswith("even") \
        else sum(final.get(a, 0.0) for a in "123456")
    ms += [Metric("eval/answers/valid_rate", valid, 0, 10), Metric("eval/answers/entropy", 1.0, 0, 10),
           Metric("eval/answers/tv_uniform_valid", final.get("tv", 0.5), 0, 10)]
    ms += [Metric("completion/mean_length", v, 0, s + 1) for s, v in enumerate(lengths)]
    for s, top in enumerate(train_curve):
        ms += [Metric(f"answers/frac/{a}", 1.0 if a == top else 0.0, 0, s + 1) for a in ANSWERS]
    c.log_batch(r.info.run_id, metrics=ms, params=[Param("seed", str(seed))], tags=[RunTag("x", "y")])
    c.set_terminated(r.info.run_id, "FINISHED")


def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("runner")
    parent = c.create_run(exp, tags={"runner.track.sweep": "parent"}).info.run_id
    return uri, c, exp, parent


def test_report_table_and_verdicts(tmp_path):
    uri, c, exp, parent = store(tmp_path)
    flat = [5.0] * 6
    for seed, top in ((0, 0.95), (1, 0.97)):  # collapsed onto 1
        fake_run(c, exp, parent, "dice_grpo", seed, {"1": top, "2": 1 - top}, flat, ["2"] * 6)
    fake_run(c, exp, parent, "dice_entropy", 0, {"1": 0.4, "2": 0.3, "3": 0.3}, [5, 5, 5, 9, 10, 11], ["2"] * 6)
    fake_run(c, exp, parent, "dice_entropy_strict", 0, {"1": 0.4, "2": 0.3, "3": 0.3}, flat, ["2"] * 6)
    fake_run(c, exp, parent, "even_dice_entropy", 0, {"4": 0.6, "6": 0.4}, flat, ["4"] * 6 + ["6"] * 6 + ["4"] * 6)
    fake_run(c, exp, parent, "even_dice_bonus", 0, {"2": 0.3, "4": 0.3, "6": 0.3, "3": 0.1}, flat, ["2"] * 6)
    fake_run(c, exp, parent, "even_dice_divisor", 0, {"2": 0.33, "4": 0.33, "6": 0.34, "tv": 0.01}, flat, ["2"] * 6)
    fake_run(c, exp, parent, "even_dice_divisor_g48", 0, {"2": 0.3, "4": 0.3, "6": 0.3, "1": 0.1}, flat, ["2"] * 6)
    # an unfinished run is ignored
    c.create_run(exp, tags={"recipe": "dice_grpo", "mlflow.parentRunId": parent})

    text, verdicts = report(uri, parent, out=tmp_path / "rep")
    assert verdicts == {
        "dice_grpo": "reproduced",
        "dice_entropy": "reproduced",  # top 0.4 of the valid mass, length 5 -> 10
        "dice_entropy_strict": "reproduced",
        "even_dice_entropy": "reproduced",  # 4 -> 6 -> 4 in blocks, never 2
        "even_dice_bonus": "reproduced",  # 3 answers >= 0.05, 0.1 on odd answers
        "even_dice_divisor": "reproduced",
        "even_dice_divisor_g48": "reproduced",  # the post's claim at another group size (invalid 0.1 <= 0.1)
    }
    row = next(line for line in text.splitlines() if line.startswith("| dice_grpo |"))
    assert "| 2 | 0.96±0.01 | 0.04±0.01 |" in row  # two seeds: mean and spread
    assert "| 2/2 |" in row  # seeds passing
    assert "## Verdict rules" in text and "valid final samples" in text and "## Per seed" in text
    assert (tmp_path / "rep" / "report.md").read_text() == text
    assert (tmp_path / "rep" / "answer_distribution_by_recipe.png").exists()
    arts = {a.path for a in c.list_artifacts(parent)}
    assert {"report.md", "answer_distribution_by_recipe.png", "completion_length_entropy.png"} <= arts


def test_not_reproduced_when_the_outcome_differs(tmp_path):
    uri, c, exp, parent = store(tmp_path)
    fake_run(c, exp, parent, "even_dice_divisor", 0, {"2": 1.0, "tv": 0.67}, [5.0] * 3, ["2"] * 3)
    fake_run(c, exp, parent, "dice_grpo", 0, {"1": 0.3, "2": 0.3, "3": 0.4}, [5.0] * 3, ["2"] * 3)
    _, verdicts = report(uri, parent, out=tmp_path / "rep")
    assert verdicts == {"even_dice_divisor": "not reproduced", "dice_grpo": "not reproduced"}


def test_verdicts_count_seeds_not_means(tmp_path):
    """Three spread seeds and two collapsed ones average to a near-uniform mean; per seed
    that is 3/5, under the 4/5 that "reproduced" needs."""
    uri, c, exp, parent = store(tmp_path)
    for seed in range(3):
        fake_run(c, exp, parent, "even_dice_divisor", seed, {"2": 0.34, "4": 0.33, "6": 0.33}, [5.0] * 3, ["2"] * 3)
    fake_run(c, exp, parent, "even_dice_divisor", 3, {"2": 1.0}, [5.0] * 3, ["2"] * 3)
    fake_run(c, exp, parent, "even_dice_divisor", 4, {"6": 1.0}, [5.0] * 3, ["6"] * 3)
    text, verdicts = report(uri, parent, out=tmp_path / "rep")
    assert verdicts == {"even_dice_divisor": "partly"}
    assert "| 3/5 |" in next(line for line in text.splitlines() if line.startswith("| even_dice_divisor |"))


def test_rules_never_pass_vacuously(tmp_path):
    """A run that is all invalid neither 'avoids length growth' nor 'misses an even answer',
    and invalid samples are not the diversity a temperature or entropy claim is about."""
    uri, c, exp, parent = store(tmp_path)
    invalid = {"invalid": 1.0}
    fake_run(c, exp, parent, "dice_entropy_strict", 0, invalid, [5.0] * 6, ["invalid"] * 6)
    fake_run(c, exp, parent, "even_dice_entropy", 0, invalid, [5.0] * 6, ["invalid"] * 6)
    fake_run(c, exp, parent, "dice_grpo_temp15", 0, {"1": 0.3, "invalid": 0.7}, [5.0] * 6, ["1"] * 6)
    fake_run(c, exp, parent, "dice_entropy", 0, {"1": 0.1, "2": 0.1, "invalid": 0.8}, [5, 5, 5, 9, 10, 11], ["1"] * 6)
    text, verdicts = report(uri, parent, out=tmp_path / "rep")
    assert verdicts["dice_entropy_strict"] == "not reproduced"
    assert verdicts["even_dice_entropy"] == "not reproduced"
    assert verdicts["dice_grpo_temp15"] == "not reproduced"  # 70% invalid: neither collapse nor diversity
    assert verdicts["dice_entropy"] == "partly"  # length grows; "less collapse" cannot be judged
    assert "diversity: n/j; no growth: n/j" in text


def test_leader_switches_need_a_smoothed_margin():
    from runner.track.report import leader_switches

    def curve(tops):
        return [(i, {a: float(a == t) for a in ("2", "4", "6")}) for i, t in enumerate(tops)]

    assert leader_switches(curve(["4", "6"] * 10), ["2", "4", "6"]) == 0  # step-to-step noise
    assert leader_switches(curve(["4"] * 8 + ["6"] * 8 + ["4"] * 8), ["2", "4", "6"]) == 2
    assert leader_switches([], ["2", "4", "6"]) == 0


@pytest.mark.parametrize("recipe", DICE_RECIPES)
def test_every_dice_recipe_runs_two_steps_on_the_tiny_model(tmp_path, recipe):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=[
            f"recipe={recipe}", "model=tiny", "train.steps=2", "train.eval_samples=4", "rollout.max_new_tokens=6",
            f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
    t = run(cfg, tmp_path / "out", "{}", extra_tags={"recipe": recipe})
    assert t.stop_reason == "completed"
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(t.tracker.run_id).data.tags["recipe"] == recipe
