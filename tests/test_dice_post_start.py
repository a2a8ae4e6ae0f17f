"""The dice post from the post's own starting point (make reproduce START=post): the SFT'd
start runs and exports, the sweep's jobs start from that export, every recipe of the sweep
is judged by a claim of the report, and the gibberish claim's rule."""

import yaml

from conftest import CONF, ROOT, only_run, run_cli
from runner.track import report

SWEEP = ROOT / "sweeps" / "reproduce_dice_post_start.yaml"


def test_the_start_runs_once_and_the_sweep_jobs_start_from_its_export(tmp_path):
    start = tmp_path / "start"
    fast = ["model=tiny", "train.eval_every=0", "train.final_eval_samples=16", "tracking.system_metrics=false",
            "rollout.max_new_tokens=6"]
    args = ["recipe=dice_post_start", *fast, "train.steps=2", "sft.demonstrations=64", "sft.eval_size=8",
            f"output_dir={start}"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (start / "hf_model" / "config.json").exists()
    run, metrics = only_run(tmp_path)
    assert run.data.params["algo.kind"] == "sft" and "eval/exact_format_rate" in metrics
    assert "eval/prob/4" in metrics  # the target is judged on exact first-token probabilities
    again = run_cli(args, cwd=tmp_path)  # make reproduce START=post a second time: nothing re-runs
    assert again.returncode == 0 and "already" in again.stderr, again.stderr[-2000:]
    # one job of the sweep, as the sweep file composes it, from the start's export
    job = run_cli(["--config-dir", str(SWEEP.parent), "--config-name", SWEEP.stem, f"model.path={start / 'hf_model'}",
                   "recipe=even_dice_entropy_high", "seed=1", *fast[1:], "train.steps=1", "train.checkpoint_every=1",
                   f"output_dir={tmp_path / 'job'}", f"tracking.uri=sqlite:///{tmp_path / 'job.db'}"], cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'job.db'}")
    (jr,) = c.search_runs([e.experiment_id for e in c.search_experiments()])
    p = jr.data.params
    assert p["model.path"] == str(start / "hf_model") and p["algo.entropy.coef"] == "0.1" and p["env.name"] == "even_dice"


def test_the_sweep_without_the_start_is_one_line(tmp_path):
    r = run_cli(["--config-dir", str(SWEEP.parent), "--config-name", SWEEP.stem, "recipe=dice_grpo",
                 f"output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[0].startswith("error: model.path=None"), r.stderr


def test_every_recipe_of_the_start_sweep_is_judged_by_a_claim():
    recipes = yaml.safe_load(SWEEP.read_text())["hydra"]["sweeper"]["params"]["recipe"].split(",")
    assert len(recipes) == 8 and all((CONF / "recipe" / f"{r}.yaml").exists() for r in recipes)
    assert all(report._claim_for(r) is not None for r in recipes)


def _run(final):
    return report.RunSummary(recipe="even_dice_entropy_high", seed="0", final=final, valid_rate=0.0, entropy=0.0,
                             tv=1.0, length_first=5.0, length_last=24.0, length_curve=[], dist_curve=[],
                             argmax_switches=0)


def test_gibberish_is_half_the_final_samples_unparsed():
    claim = report.CLAIMS["even_dice_entropy_high"]
    blank = {a: 0.0 for a in report.ANSWERS}
    gib = _run({**blank, "invalid": 0.6, "4": 0.4})
    odd = _run({**blank, "3": 0.6, "4": 0.4})  # wrong answers are not gibberish: they are answers
    fine = _run({**blank, "invalid": 0.49, "2": 0.51})
    verdict, _, passing = report.judge(claim, [gib, gib, gib, gib, odd])
    assert (verdict, passing) == ("reproduced", 4)
    assert report.judge(claim, [fine, odd])[0] == "not reproduced"
