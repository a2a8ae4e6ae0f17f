"""Staged recipes (runner/recipe.py) on the tiny model: eval -> SFT -> RL with a parent run, a
child per stage and a card; the handoff of exported weights; kill -9 in the second stage
and the same command again. Real processes, a real SQLite store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT

COMMON = ["model=tiny", "train.eval_every=0", "train.eval_samples=8", "train.final_eval_samples=8",
          "tracking.system_metrics=false"]
SFT = ("[train.steps=4, sft.batch_size=8, sft.eval_size=8, sft.demonstrations=64, algo.lr=1e-3, "
       "'env.demo_weights={4: 0.5, 2: 0.25, 6: 0.25}']")


def recipe(tmp_path: Path, name: str, stages: str, metric: str = "eval/prob/tv_uniform_valid") -> Path:
    conf = tmp_path / "conf" / "recipe"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / f"{name}.yaml").write_text(f"# @package _global_\nstages:\n{stages}\ncard:\n  metric: {metric}\n"
                                       f"  higher_is_better: false\n")
    return tmp_path / "conf"


def command(conf: Path, name: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runner", "--config-dir", str(conf), f"recipe={name}", *COMMON,
            f"output_dir={out}", *extra]


def runs(d: Path):
    c = MlflowClient(f"sqlite:///{d / 'mlruns.db'}")
    return c, c.search_runs([c.get_experiment_by_name("runner").experiment_id])


def stage_runs(c, all_runs, parent: str) -> dict:
    return {r.data.tags["runner.stage"]: r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent}


def test_eval_sft_rl_recipe_runs_end_to_end_with_a_card(tmp_path):
    conf = recipe(tmp_path, "staged", f"  - {{name: base, kind: eval}}\n  - {{name: sft, kind: sft, overrides: {SFT}}}\n"
                                      f"  - {{name: rl, kind: rl, overrides: [train.steps=3, algo.group_size=6]}}")
    out = tmp_path / "out"
    r = subprocess.run(command(conf, "staged", out), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c, all_runs = runs(tmp_path)
    (parent,) = [x for x in all_runs if x.data.tags.get("runner.recipe") == "staged"]
    assert parent.info.status == "FINISHED"
    kids = stage_runs(c, all_runs, parent.info.run_id)
    assert set(kids) == {"base", "sft", "rl"} and all(k.info.status == "FINISHED" for k in kids.values())
    assert [kids[s].data.tags["runner.stage_kind"] for s in ("base", "sft", "rl")] == ["eval", "sft", "rl"]
    assert kids["sft"].data.params["algo.kind"] == "sft" and kids["base"].data.params["train.steps"] == "0"
    assert "eval/prob/tv_uniform_valid_n" in kids["rl"].data.metrics
    # the handoff: each stage after the first starts from the previous one's export
    assert kids["sft"].data.params["model.path"] == str(out / "0-base" / "hf_model")
    assert kids["rl"].data.params["model.path"] == str(out / "1-sft" / "hf_model")
    card = (out / "recipe_card.md").read_text()
    assert "| 2 | rl | rl | FINISHED |" in card and "Verdict" in card and (out / "recipe_card.png").stat().st_size > 0
    assert "recipe_card.md" in {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_a_stage_starts_from_exactly_the_previous_stages_weights(tmp_path):
    from safetensors.torch import load_file

    from runner import checkpoint as ckpt

    conf = recipe(tmp_path, "handoff", f"  - {{name: sft, kind: sft, overrides: {SFT}}}\n  - {{name: after, kind: eval}}")
    out = tmp_path / "out"
    r = subprocess.run(command(conf, "handoff", out), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_file(out / "0-sft" / "hf_model" / "model.safetensors")
    started = ckpt.read(out / "1-after" / "checkpoints" / "ckpt-00000000.pt")["model"]
    assert set(exported) <= set(started)
    assert all(torch.equal(exported[k], started[k]) for k in exported)


def test_kill_9_in_the_second_stage_then_the_same_command_resumes_it(tmp_path):
    conf = recipe(tmp_path, "long", "  - {name: base, kind: eval}\n  - {name: sft, kind: sft, overrides: "
                                    "[train.steps=24, train.checkpoint_every=4, sft.batch_size=4, sft.eval_size=4, "
                                    "sft.demonstrations=64]}")
    out = tmp_path / "out"
    p = subprocess.Popen(command(conf, "long", out), cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = out / "1-sft" / "checkpoints" / "ckpt-00000008.pt.sha256"
    deadline = time.time() + 300
    while not ckpt.exists():
        assert time.time() < deadline and p.poll() is None, "the second stage never reached its checkpoint"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the recipe and its stage's job
    p.wait()
    c, before = runs(tmp_path)
    base_before = [x for x in before if x.data.tags.get("runner.stage") == "base"]
    r = subprocess.run(command(conf, "long", out), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished" in r.stderr  # the first stage is not run again
    c, after = runs(tmp_path)
    (parent,) = [x for x in after if x.data.tags.get("runner.recipe") == "long"]
    kids = stage_runs(c, after, parent.info.run_id)
    assert len([x for x in after if x.data.tags.get("runner.stage") == "base"]) == len(base_before) == 1
    assert len([x for x in after if x.data.tags.get("runner.stage") == "sft"]) == 1  # resumed into the same run
    sft = kids["sft"]
    assert sft.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(sft.info.run_id, "sft/loss")) == list(range(1, 25))


def test_a_bad_stage_is_refused_before_anything_runs(tmp_path):
    conf = recipe(tmp_path, "bad", "  - {name: base, kind: pretrain}")
    r = subprocess.run(command(conf, "bad", tmp_path / "out"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "stages[0].kind" in r.stderr.strip().splitlines()[0]
    assert not (tmp_path / "out" / "0-base").exists()
    # a bad override in the last stage: refused before the first stage runs
    conf = recipe(tmp_path, "late", "  - {name: base, kind: eval}\n  - {name: rl, kind: rl, overrides: [algo.lr=-1]}")
    r = subprocess.run(command(conf, "late", tmp_path / "out2"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    first = r.stderr.strip().splitlines()[0]
    assert r.returncode == 2 and "stages[1] (rl): algo.lr=-1" in first, r.stderr[-2000:]
    conf = recipe(tmp_path, "typo", "  - {name: base, kind: eval, overrides: [train.stepz=3]}")
    r = subprocess.run(command(conf, "typo", tmp_path / "out3"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "stages[0] (base)" in r.stderr.strip().splitlines()[0], r.stderr[-2000:]
    assert not (tmp_path / "out2" / "0-base").exists() and not (tmp_path / "out3" / "0-base").exists()


def test_estimate_only_prices_every_stage_and_the_total(tmp_path):
    conf = recipe(tmp_path, "priced", f"  - {{name: base, kind: eval}}\n  - {{name: sft, kind: sft, overrides: {SFT}}}")
    out = tmp_path / "out"
    r = subprocess.run(command(conf, "priced", out, "budget.estimate_only=true", "budget.estimate_steps=2",
                               "budget.cap_usd=5"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    import json
    import re

    per = [json.loads((out / "estimate" / d / "estimate.json").read_text())["usd"] for d in ("0-base", "1-sft")]
    total = float(re.search(r"total .* \$([0-9.]+) -> fits the \$5 cap", lines[-1]).group(1))
    assert abs(total - sum(per)) < 1e-3 and any(l.strip().startswith("sft") for l in lines)
    assert not (out / "0-base").exists() and not (tmp_path / "mlruns.db").exists()  # nothing trained or logged


def test_a_sweep_over_the_rl_seed_shares_the_stages_before_it(tmp_path):
    """Two jobs at once that reach the shared first stage together: one runs it, the other
    waits for it (it was refused as a second process on the stage's dir), then each runs its
    own RL stage. (Sequential jobs share the same way: the second finds the stages finished.)"""
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    conf = recipe(tmp_path, "shared", f"  - {{name: base, kind: eval}}\n  - {{name: sft, kind: sft, overrides: {SFT}}}\n"
                                      f"  - {{name: rl, kind: rl, overrides: [train.steps=2, algo.group_size=6]}}")
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "runner", "-m", "--config-dir", str(conf), "recipe=shared", *COMMON,
                        "+stage_overrides.rl=choice(['seed=1'],['seed=2'])", f"hydra.sweep.dir={sweep}", *launcher],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (sweep / "stages").iterdir() if p.is_dir())
    assert stages == ["0-base", "1-sft", "2-rl", "2-rl"]  # base and SFT once, RL per seed
    c, all_runs = runs(tmp_path)
    rl = [x for x in all_runs if x.data.tags.get("runner.stage") == "rl"]
    assert sorted(x.data.params["seed"] for x in rl) == ["1", "2"]
    assert len([x for x in all_runs if x.data.tags.get("runner.stage") == "sft"]) == 1
    for job in ("0", "1"):  # each job's card has all three stages, the shared ones included
        card = (sweep / job / "recipe_card.md").read_text()
        assert all(f"| {i} | {s} |" in card for i, s in enumerate(("base", "sft", "rl"))), card


def test_generate_then_sft_then_rl_and_the_same_command_again(tmp_path):
    conf = recipe(tmp_path, "gen", "  - {name: data, kind: generate, overrides: [generate.source=demonstrations, "
                                   "generate.n=64, 'env.demo_weights={4: 0.5, 2: 0.25, 6: 0.25}']}\n"
                                   "  - {name: sft, kind: sft, overrides: [train.steps=3, sft.batch_size=8, "
                                   "sft.eval_size=8, algo.lr=1e-3]}\n"
                                   "  - {name: rl, kind: rl, overrides: [train.steps=2, algo.group_size=6]}")
    out = tmp_path / "out"
    r = subprocess.run(command(conf, "gen", out), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    c, all_runs = runs(tmp_path)
    (parent,) = [x for x in all_runs if x.data.tags.get("runner.recipe") == "gen"]
    kids = stage_runs(c, all_runs, parent.info.run_id)
    assert set(kids) == {"data", "sft", "rl"} and kids["data"].data.tags["runner.stage_kind"] == "generate"
    assert kids["sft"].data.params["sft.data"] == str(out / "0-data" / "data.jsonl")
    assert kids["sft"].data.tags["sft.examples"] == "64"
    r = subprocess.run(command(conf, "gen", out), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already generated" in r.stdout + r.stderr and r.stderr.count("already finished") == 2
    c, again = runs(tmp_path)
    assert len(again) == len(all_runs)  # nothing ran twice


def test_a_recipe_token_budget_counts_the_generate_stage_and_caps_the_rl_stage(tmp_path):
    """train.max_generated_tokens on a recipe is the whole recipe's sampling budget: the
    tokens rejection sampling drew (kept or not) count against it, the RL stage gets what is
    left and stops at it (RFT then RL against RL alone at equal generated tokens)."""
    conf = recipe(tmp_path, "rft", "  - {name: data, kind: generate, overrides: [generate.source=rejection, "
                                   "generate.prompts=2, generate.k=4, generate.top_fraction=0.5]}\n"
                                   "  - {name: sft, kind: sft, overrides: [train.steps=2, sft.batch_size=2, "
                                   "sft.eval_size=1, algo.lr=1e-3]}\n"
                                   "  - {name: rl, kind: rl, overrides: [train.steps=20, algo.group_size=6]}")
    out = tmp_path / "out"
    budget = 100
    r = subprocess.run(command(conf, "rft", out, "rollout.max_new_tokens=6", f"train.max_generated_tokens={budget}"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    prov = json.loads((out / "0-data" / "data.jsonl.provenance.json").read_text())
    sampled = prov["generated_tokens"]
    assert 8 <= sampled <= 8 * 6  # 2 prompts x 4 samples of 1-6 tokens
    c, all_runs = runs(tmp_path)
    (parent,) = [x for x in all_runs if x.data.tags.get("runner.recipe") == "rft"]
    kids = stage_runs(c, all_runs, parent.info.run_id)
    assert kids["data"].data.metrics["tokens/generated_total"] == sampled
    rl = kids["rl"]
    assert f"train.max_generated_tokens={budget - sampled}" in rl.data.tags["command"]
    assert rl.data.tags["stop_reason"] == "token_budget" and int(rl.data.params["train.max_generated_tokens"]) == budget - sampled
    used = rl.data.metrics["tokens/generated_total"]
    assert budget - sampled <= used < budget - sampled + 6 * 6  # stops at the first step that reaches it


def test_the_math_rft_arms_compose_and_every_stage_validates():
    """The three arms of RFT against RL on math: every stage's config checked as the recipe
    checks it before its first stage runs (no model loads)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from runner.config import validate
    from runner.recipe import check_stages

    kinds = {"math_rft_rl": ["eval", "generate", "sft", "rl"], "math_rft": ["eval", "generate", "sft"],
             "math_rl": ["eval", "rl"]}
    for name, expected in kinds.items():
        overrides = [f"recipe={name}", "train.max_generated_tokens=200000"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = validate(compose("config", overrides=overrides))
            assert [st.kind for st in cfg.stages] == expected and cfg.env.name == "math"
            assert cfg.card.metric == "eval/accuracy" and cfg.card.higher_is_better
            check_stages(cfg, overrides)
