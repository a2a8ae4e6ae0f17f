"""Data generation as a stage (runner/generate.py): the file it writes is read back by the SFT
stage (sft.data=FILE) as the environment's own examples, token for token; rejection sampling
keeps and drops rows by the environment's own score and drops duplicates; the provenance
describes the file; the MLflow run has the file as its dataset input; bad requests are one
line and exit 2 before any model loads; the same command again does nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.base import Prompt
from envs.dice import DiceEnv
from runner import generate as g
from runner import generate_rows as gr
from runner.digests import file_sha256
from runner.loop import sft_step

ROOT = Path(__file__).resolve().parent.parent
DICE_WEIGHTS = "env.demo_weights={4: 0.5, 2: 0.25, 5: 0.25}"  # an odd face: some demonstrations earn nothing


class ParityDice(DiceEnv):
    """Dice whose reward is 1 for a completion of even length: a random tiny model earns it
    about half the time, so rejection sampling has rows to keep and rows to drop."""

    def score(self, prompt, completion, finished):
        s = super().score(prompt, completion, finished)
        return type(s)(reward=float(len(completion) % 2 == 0), answer_key=s.answer_key, exact_format=s.exact_format)


class NoDemoDice(DiceEnv):
    demonstrations = None  # an environment without an expert


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module's in-process runs (a new SQLite store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="module")
def tok():
    from runner.config import validate
    from runner.models import load_tokenizer

    tiny = {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}
    return load_tokenizer(validate({"model": tiny}).model)


def run(store: str, overrides: list[str], **keys) -> dict:
    """generate() in-process with these overrides and generate keys."""
    cfg = g.compose(["model=tiny", f"tracking.uri={store}", "tracking.system_metrics=false", *overrides])
    return g.generate(cfg, g.GenerateConfig(**keys), command="test")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_back(path: Path, overrides: list[str]):
    """(the SFT stage's examples from the file, the environment) as `algo=sft sft.data=FILE` reads them."""
    from runner.plugins import build_env

    cfg = g.compose([*overrides, f"sft.data={path}"])
    env = build_env(cfg.env, cfg.seed)
    return sft_step.load_examples(cfg, env)[0], env


@pytest.mark.parametrize("env", [["env=even_dice", DICE_WEIGHTS], ["env=wordle", "env.eval_size=8"]])
def test_demonstrations_read_back_as_the_envs_own_examples(tmp_path, store, tok, env):
    out = tmp_path / "demo.jsonl"
    prov = run(store, env, source="demonstrations", n=24, out=str(out))
    examples, built = read_back(out, env)
    expected = sft_step.from_demonstrations(built, built.demonstrations(24, 0))
    assert len(examples) == prov["rows"] == 24 and sft_step.digest(examples) == sft_step.digest(expected)
    for got, want in zip(examples, expected):  # what the model trains on: the same tokens and the same loss mask
        a, _ = sft_step.encode(tok, got, 4096, False, "file")
        b, _ = sft_step.encode(tok, want, 4096, False, "demo")
        assert (a.prompt_ids, a.comp, a.train, a.turn_of) == (b.prompt_ids, b.comp, b.train, b.turn_of)
    if env[0] == "env=wordle":
        assert all("messages" in r and r["reward"] > 1 for r in rows(out))  # every solver game is won
        assert any(len(e.turns) > 1 for e in examples)
    else:  # the rewards are the environment's own: the 5s earn nothing
        even = [r["completion"] in ("2</answer>", "4</answer>") for r in rows(out)]
        assert [r["reward"] for r in rows(out)] == [float(e) for e in even] and 0 < sum(even) < 24
        assert prov["mean_reward"] == pytest.approx(sum(even) / 24)


def test_a_first_turn_that_repeats_the_prefix_reads_back_unchanged():
    env = DiceEnv()
    for text in ("4</answer>", "<answer>4</answer>", ""):
        c = gr.Candidate(env.prompts(0, 1)[0], (text,), group=0)

        class _Rows(list):
            column_names = ["prompt", "completion", "reward"]

        (ex,) = sft_step.from_rows(_Rows([gr.row_of(c, env)]), env.assistant_prefix, None, "mem")
        assert ex.turns == (text,)


def rejection(store: str, out: Path, *extra: str, **keys) -> dict:
    over = ["env=dice", "env._target_=test_generate.ParityDice", "rollout.max_new_tokens=3", *extra]
    return run(store, over, source="rejection", prompts=4, k=8, out=str(out), **keys)


def test_rejection_keeps_rows_by_the_environments_own_score(tmp_path, store):
    env = ParityDice()
    every = rejection(store, tmp_path / "all.jsonl", min_reward=0.0, dedup=False)
    assert every["rows"] == every["sampled"] == 32 and every["dropped"] == {"reward": 0, "duplicate": 0}
    every_rows = rows(tmp_path / "all.jsonl")
    prompt = env.prompts(0, 1)[0]
    rescored = [env.score(prompt, r["completion"], True).reward for r in every_rows]
    assert [r["reward"] for r in every_rows] == rescored and 0 < sum(rescored) < 32
    best = rejection(store, tmp_path / "best.jsonl", min_reward=1.0, dedup=False)
    kept = rows(tmp_path / "best.jsonl")
    assert kept == [r for r in every_rows if r["reward"] >= 1.0]  # the same seeded samples, the rewarded ones
    assert best["rows"] + best["dropped"]["reward"] == best["sampled"] == 32
    assert best["kept_frac"] == pytest.approx(len(kept) / 32) and best["mean_reward"] == 1.0


def test_rejection_drops_duplicates(tmp_path, store):
    cold = ["rollout.temperature=0.05"]  # nearly greedy: many samples repeat
    raw = rejection(store, tmp_path / "raw.jsonl", *cold, min_reward=0.0, dedup=False)
    distinct = {gr.row_key(r) for r in rows(tmp_path / "raw.jsonl")}
    deduped = rejection(store, tmp_path / "dedup.jsonl", *cold, min_reward=0.0)  # dedup: rejection's default
    assert raw["sampled"] == deduped["sampled"] == 32 and len(distinct) < 32
    assert deduped["rows"] == len(distinct) and deduped["dropped"]["duplicate"] == 32 - len(distinct)
    assert len({gr.row_key(r) for r in rows(tmp_path / "dedup.jsonl")}) == deduped["rows"]


def test_top_fraction_keeps_each_prompts_best_distinct_rows():
    p = Prompt((("user", "q"),))
    cands = [gr.Candidate(p, (t,), group, reward=r) for group, t, r in
             [(0, "a", 0.1), (0, "b", 0.9), (0, "b", 0.9), (0, "c", 0.5), (1, "d", 0.0), (1, "e", 0.2), (1, "f", 0.7),
              (1, "g", 0.7)]]
    rows_ = [gr.row_of(c, DiceEnv(assistant_prefix="")) for c in cands]
    sel = gr.select(cands, rows_, g.GenerateConfig(source="rejection", k=4, top_fraction=0.5))
    assert [cands[i].turns[0] for i in sel.kept] == ["b", "c", "f", "g"]  # the duplicate b counts once
    assert sel.dropped_duplicate == 1 and sel.dropped_reward == 3


def test_a_game_sampled_from_the_model_is_written_as_a_conversation(tmp_path, store, tok):
    out = tmp_path / "w.jsonl"
    over = ["env=wordle", "env.eval_size=8", "env.max_turns=3", "rollout.max_new_tokens=6"]
    prov = run(store, over, source="rejection", prompts=2, k=2, min_reward=0.0, dedup=False, out=str(out))
    examples, env = read_back(out, over)
    assert prov["rows"] == len(examples) == 4
    for i, (row, ex) in enumerate(zip(rows(out), examples)):  # max_turns turns, the env's replies between them
        assert len(ex.turns) == 3 and len(ex.replies) == 2 and all("turn(s) left" in r for r in ex.replies)
        game = env.new_game(env.prompts(0, 2)[i // 2])  # rows in sampling order: k=2 games of each prompt
        for turn in ex.turns:
            env.play(game, turn)
        assert env.score_game(game).reward == pytest.approx(row["reward"])


def test_provenance_and_the_mlflow_run_describe_the_file(tmp_path, store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    recipes = client.create_experiment("recipes", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(recipes).info.run_id  # a recipe's parent run
    out = tmp_path / "d.jsonl"
    res = run(store, ["env=even_dice", DICE_WEIGHTS, "seed=3", f"tracking.parent_run_id={parent}",
                      "++tracking.tags={stage: data}"], source="demonstrations", n=16, out=str(out))
    prov = json.loads((tmp_path / "d.jsonl.provenance.json").read_text())
    assert prov["sha256"] == file_sha256(out) == res["sha256"] and prov["rows"] == len(rows(out)) == 16
    assert prov["source"] == "demonstrations" and prov["seed"] == 3 and prov["env"]["name"] == "even_dice"
    assert prov["env"]["config"]["demo_weights"] == {"4": 0.5, "2": 0.25, "5": 0.25}
    assert prov["generate"] == {"n": 16, "min_reward": None, "dedup": False} and prov["command"] == "test"
    assert prov["created"] and "runner_commit" in prov
    r = client.get_run(prov["mlflow"]["run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["runner.stage_kind"] == "generate"
    assert r.data.tags["mlflow.parentRunId"] == parent and r.data.tags["stage"] == "data"
    assert r.data.metrics["generate/rows"] == 16 and r.data.metrics["generate/kept_frac"] == 1.0
    assert r.data.metrics["generate/mean_reward"] == pytest.approx(prov["mean_reward"])
    (inp,) = r.inputs.dataset_inputs
    assert inp.dataset.digest == prov["sha256"][:32] and json.loads(inp.dataset.profile)["num_rows"] == 16
    assert json.loads(inp.dataset.source)["uri"] == out.resolve().as_uri()
    assert sorted(a.path for a in client.list_artifacts(r.info.run_id)) == ["d.jsonl", "d.jsonl.provenance.json"]


def refused(capsys, args: list[str], *words: str) -> None:
    assert g.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and all(w in err for w in words), err


def test_bad_requests_are_one_line_and_exit_2_before_any_model_loads(tmp_path, store, capsys, monkeypatch):
    import runner.models

    def no_model(*a, **k):
        raise AssertionError("a model was loaded for a refused request")

    monkeypatch.setattr(runner.models, "load_policy", no_model)
    base = ["model=tiny", f"tracking.uri={store}", "generate.source=rejection", "generate.min_reward=1",
            f"generate.out={tmp_path / 'x.jsonl'}"]
    refused(capsys, [*base, "generate.temperature=2"], "generate.temperature", "unknown key")
    refused(capsys, [*base, "generate.k=0"], "generate.k=0", ">= 1")
    refused(capsys, [*base, "generate.k=two"], "generate.k='two'")
    refused(capsys, [*base, "generate.top_fraction=0.5"], "generate.min_reward", "generate.top_fraction", "not both")
    refused(capsys, [*base[:4], f"generate.out={tmp_path / 'no' / 'x.jsonl'}"], "does not exist")
    refused(capsys, [*base[:2], "generate.source=rejection", f"generate.out={tmp_path / 'x.jsonl'}"],
            "generate.min_reward=R", "generate.top_fraction=F")
    refused(capsys, [*base[:2], "generate.source=demonstrations", "generate.k=4", base[4]],
            "generate.k=4", "only with generate.source=rejection")
    refused(capsys, [*base[:2], "env=dice", "env._target_=test_generate.NoDemoDice", "generate.source=demonstrations",
                     f"generate.out={tmp_path / 'x.jsonl'}"], "has no demonstrations", "generate.source=rejection")
    refused(capsys, [*base, "env=nope"], "env")
    refused(capsys, [*base, "rollout.temperature=-1"], "rollout.temperature")
    existing = tmp_path / "mine.jsonl"
    existing.write_text("{}\n")
    refused(capsys, [*base[:4], f"generate.out={existing}"], "exists", "generate.overwrite=true")
    assert existing.read_text() == "{}\n" and not (tmp_path / "x.jsonl").exists()


def test_the_same_command_again_does_nothing_and_overwrite_replaces(tmp_path, store, capsys):
    out = tmp_path / "d.jsonl"
    args = ["env=even_dice", f"tracking.uri={store}", "generate.source=demonstrations", "generate.n=8",
            f"generate.out={out}"]
    assert g.main(args) == 0
    first = json.loads((tmp_path / "d.jsonl.provenance.json").read_text())
    stamp = out.stat().st_mtime_ns
    assert g.main(args) == 0 and "already generated" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == stamp
    assert g.main([*args, "seed=1"]) == 2 and "seed differ" in capsys.readouterr().err  # another request
    assert g.main([*args, "seed=1", "generate.overwrite=true"]) == 0
    again = json.loads((tmp_path / "d.jsonl.provenance.json").read_text())
    assert again["seed"] == 1 and again["sha256"] == file_sha256(out)
    assert again["mlflow"]["run_id"] != first["mlflow"]["run_id"]
    out.write_text(out.read_text() + out.read_text())  # edited since: no longer the request's file
    assert g.main([*args, "seed=1"]) == 2 and "changed since it was made" in capsys.readouterr().err


def test_the_command_line(tmp_path):
    """`python -m runner.generate` itself: the summary line, then "already generated" on a re-run."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [sys.executable, "-m", "runner.generate", "env=wordle", "env.eval_size=8", "generate.source=demonstrations",
            "+generate.n=4", "generate.out=w.jsonl"]
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (line,) = first.stdout.strip().splitlines()
    assert line.startswith("generated 4 rows (100.0% of 4 kept") and str(tmp_path / "w.jsonl") in line
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.startswith("already generated"), second.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert len(c.search_runs([c.get_experiment_by_name("runner").experiment_id])) == 1


def test_the_commands_own_primary_config_is_composed(tmp_path, store):
    """A recipe run from a sweep file (`--config-dir sweeps --config-name NAME`) hands both to
    its generate stage: NAME is the primary config, conf/ is searched for the rest."""
    (tmp_path / "my_study.yaml").write_text("defaults:\n  - config\n  - _self_\nseed: 3\nenv:\n  eval_size: 8\n")
    overrides, node, config_dir, config_name = g.split_args(
        ["--config-dir", str(tmp_path), "--config-name", "my_study", "env=wordle", "generate.n=2"])
    assert (config_dir, config_name, node) == (str(tmp_path), "my_study", {"n": 2})
    cfg = g.compose(["model=tiny", f"tracking.uri={store}", *overrides], config_dir, config_name)
    assert cfg.seed == 3 and cfg.env.eval_size == 8 and cfg.env.name == "wordle"
    with pytest.raises(g.ConfigError):
        g.split_args(["--config-name"])
