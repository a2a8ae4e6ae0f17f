"""Plug-in points: a user's environment, dataset and reward functions, shaper, clusterer and
algorithm preset, named from config with no edit of this package."""

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import run_cli
from envs import INVALID
from runner.config import ConfigError, validate
from runner.plugins import build_env, parameters

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "arithmetic"
DICE = {"_target_": "envs.dice.DiceEnv", "name": "dice"}
TINY_RUN = ["model=tiny", "train.steps=2", "train.eval_every=0", "rollout.max_new_tokens=6", "algo.group_size=3",
            "train.prompts_per_step=2", "train.eval_samples=6"]


def error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate(raw)
    return str(e.value)


def example_env(**keys):
    node = {"_target_": "envs.dataset.DatasetEnv", "path": str(EXAMPLE / "problems.jsonl"),
            "reward_funcs": ["examples.arithmetic.rewards.correct", "examples.arithmetic.rewards.formatted"],
            "reward_weights": [1.0, 0.1], "assistant_prefix": "<answer>", "eval_size": 8, **keys}
    return build_env(validate({"env": node}).env, seed=3)


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
    """Import paths like examples.arithmetic.rewards resolve from the directory a run starts
    in; the tests start from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))


# -- environments: the schema is the target's signature ------------------------------------

def test_env_keys_are_the_targets_parameters():
    msg = error({"env": {**DICE, "tasks": {}}})
    assert msg.startswith("env.tasks: unknown key; allowed keys in env (envs.dice.DiceEnv): name, prompt,")
    assert "faces" in msg and "even_only" in msg and "tasks" not in msg.split(":", 2)[2]
    assert error({"env": {**DICE, "faces": "six"}}) == "env.faces='six': expected an integer"
    assert error({"env": {**DICE, "faces": 1}}) == "env.faces=1: must be >= 2"  # the env's own check_config
    assert error({"env": {**DICE, "seed": 3}}).startswith("env.seed: set by the runner")
    assert error({"env": {"name": "dice"}}).startswith("env._target_: missing;")
    assert error({"env": {"_target_": "envs.nope.Env"}}).startswith("env._target_='envs.nope.Env': cannot be imported")


def test_settings_keep_defaults_and_round_trip_as_params():
    from runner.config import flatten, to_dict

    cfg = validate({"env": {**DICE, "faces": 4}})
    flat = flatten(to_dict(cfg))
    assert flat["env._target_"] == "envs.dice.DiceEnv" and flat["env.faces"] == 4 and flat["env.even_only"] is False
    env = build_env(cfg.env, seed=1)
    assert env.name == "dice" and env.answer_space == ["1", "2", "3", "4"]


def test_signature_schema_for_functions_and_kwargs():
    def make(words: list[str], turns: int = 3, **extra):
        return None

    params, any_key = parameters(make)
    assert any_key and params["words"].required and params["turns"].default == 3


def test_math_and_wordle_checks_moved_into_their_envs():
    m = {"_target_": "envs.math_problems.MathEnv", "name": "math"}
    assert error({"env": {**m, "tasks": {"nope": {}}}}).startswith("env.tasks.nope='nope': is not a reasoning-gym")
    assert error({"env": {**m, "answer_format": "latex"}}).startswith("env.answer_format='latex': must be one of")
    w = {"_target_": "envs.wordle.WordleEnv", "name": "wordle"}
    assert error({"env": {**w, "reward_weights": {"solv": 1.0}}}).startswith("env.reward_weights key='solv'")
    assert error({"env": {**w, "max_turns": 0}}) == "env.max_turns=0: must be in 1..20"


# -- the dataset environment and TRL-signature reward functions ------------------------------

def test_dataset_env_config_errors_name_the_key():
    d = {"_target_": "envs.dataset.DatasetEnv", "name": "dataset"}
    assert error({"env": {**d, "path": None, "reward_funcs": ["x.y"]}}) == \
        "env.path: required by envs.dataset.DatasetEnv and not set"
    assert error({"env": {**d, "path": "/nope.jsonl", "reward_funcs": ["x.y"]}}).startswith(
        "env.path='/nope.jsonl': does not exist")
    good = str(EXAMPLE / "problems.jsonl")
    assert error({"env": {**d, "path": good, "reward_funcs": ["examples.arithmetic.rewards.nope"]}}).startswith(
        "env.reward_funcs[0]='examples.arithmetic.rewards.nope': cannot be imported")
    assert error({"env": {**d, "path": good, "reward_funcs": "examples.arithmetic.rewards.correct"}}).startswith(
        "env.reward_funcs='examples.arithmetic.rewards.correct': expected a list")
    assert error({"env": {**d, "path": good, "reward_funcs": ["examples.arithmetic.rewards.correct"],
                          "reward_weights": [1.0, 2.0]}}).startswith("env.reward_weights=[1.0, 2.0]: must have one")


def test_dataset_env_prompts_rewards_and_held_out_split():
    env = example_env()
    train = {env.row(p)["prompt"] for s in range(10) for p in env.prompts(s, 4)}
    held = [env.row(p)["prompt"] for p in env.eval_prompts()]
    assert len(held) == 8 and len(train) == 40 and not train & set(held)
    p = env.prompts(0, 1)[0]
    assert p.assistant_prefix == "<answer>" and p.messages[0][0] == "user" and "What is" in p.messages[0][1]
    right = env.row(p)["answer"]
    scores = env.score_batch([p, p, p], [f"{right}</answer>", "999</answer>", "no idea"], [True, True, False])
    assert [s.reward for s in scores] == pytest.approx([1.1, 0.1, 0.0])  # correct + 0.1 x formatted
    assert [s.correct for s in scores] == [True, False, False]
    assert scores[0].answer_key == right and scores[2].answer_key == INVALID
    assert scores[1].components == {"correct": 0.0, "formatted": 1.0}


def test_dataset_env_chat_prompts_get_trl_conversational_completions(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"say {w}"}],
             "word": w} for w in ("red", "green", "blue", "cyan")]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "chat_rewards.py").write_text(textwrap.dedent('''
        def said(prompts, completions, word, **kwargs):
            assert isinstance(prompts[0], list) and prompts[0][0]["role"] == "system"
            return [float(w in c[0]["content"]) if c[0]["role"] == "assistant" else None
                    for c, w in zip(completions, word)]
    '''))
    sys.path.insert(0, str(tmp_path))
    try:
        node = {"_target_": "envs.dataset.DatasetEnv", "path": str(tmp_path / "chat.jsonl"),
                "reward_funcs": ["chat_rewards.said"], "eval_size": 1, "shuffle": False}
        env = build_env(validate({"env": node}).env)
        p = env.prompts(0, 1)[0]
        assert p.messages == (("system", "be brief"), ("user", "say red"))
        assert [s.reward for s in env.score_batch([p, p], ["red!", "blue"], [True, True])] == [1.0, 0.0]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("chat_rewards", None)


def test_dataset_env_reads_a_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]).save_to_disk(tmp_path / "ds")
    env = example_env(path=str(tmp_path / "ds"), eval_size=2)
    assert len(env.eval_prompts()) == 2 and env.row(env.prompts(0, 1)[0])["prompt"].startswith("q")


# -- shapers, clusterers, algorithm presets ------------------------------------------------

def test_a_users_shaper_and_clusterer_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_shaping.py").write_text(textwrap.dedent('''
        def squash(rewards, keys, groups):
            return [r / 2 for r in rewards]

        def by_parity(keys, completions, groups, threshold):
            return ["even" if k.isdigit() and int(k) % 2 == 0 else "odd" for k in keys]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    from runner.algo.clustering import cluster_keys
    from runner.algo.shapers import shape

    cfg = validate({"env": DICE, "shaper": {"name": "squash", "_target_": "my_shaping.squash",
                                           "cluster": "my_shaping.by_parity"}})
    assert shape(cfg.shaper.name, [1.0, 0.0], ["2", "x"], [0, 0], cfg.shaper._target_) == [0.5, 0.0]
    keys = cluster_keys(cfg.shaper.cluster, ["2", "4", "3"], ["", "", ""], [0, 0, 0])
    assert shape("divisor", [1.0, 1.0, 1.0], keys, [0, 0, 0]) == [0.5, 0.5, 1.0]
    assert error({"env": DICE, "shaper": {"name": "x", "_target_": "my_shaping.nope"}}).startswith(
        "shaper._target_='my_shaping.nope': cannot be imported")
    assert error({"env": DICE, "shaper": {"cluster": "fuzzy"}}).startswith("shaper.cluster='fuzzy': must be one of")
    assert error({"env": DICE, "shaper": {"name": "rarity"}}).startswith("shaper.name='rarity': must be one of")


def test_a_users_shaper_is_named_after_its_function_and_a_wrong_signature_is_refused(tmp_path, monkeypatch):
    (tmp_path / "my_shaping2.py").write_text(textwrap.dedent('''
        def halve(rewards, keys, groups):
            return [r / 2 for r in rewards]

        def a_reward(prompts, completions, **kwargs):
            return [0.0] * len(completions)

        def two_args(keys, completions):
            return keys
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    # a shaper YAML that extends divisor's (name: divisor) and only sets _target_
    assert validate({"env": DICE, "shaper": {"name": "divisor", "_target_": "my_shaping2.halve"}}).shaper.name == "halve"
    assert validate({"env": DICE, "shaper": {"name": "mine", "_target_": "my_shaping2.halve"}}).shaper.name == "mine"
    assert error({"env": DICE, "shaper": {"_target_": "my_shaping2.a_reward"}}).startswith(
        "shaper._target_='my_shaping2.a_reward': is not a function (rewards, keys, groups) -> shaped rewards")
    assert error({"env": DICE, "shaper": {"cluster": "my_shaping2.two_args"}}).startswith(
        "shaper.cluster='my_shaping2.two_args': is not a function (keys, completions, groups, threshold)")


def test_a_users_env_without_a_name_and_a_refused_command_leaves_nothing(tmp_path):
    """A user's env YAML with no `name:` used to break Hydra's output-dir interpolation (a
    144-line traceback): it is named by its target now. And a refused command, given no
    output_dir, leaves no directory behind."""
    conf = tmp_path / "conf"
    (conf / "env").mkdir(parents=True)
    (conf / "shaper").mkdir()
    (conf / "env" / "mine.yaml").write_text("_target_: envs.dice.DiceEnv\nfaces: 6\n")
    (conf / "shaper" / "mine.yaml").write_text("defaults:\n  - divisor\n  - _self_\n_target_: my_shaping3.halve\n")
    (tmp_path / "my_shaping3.py").write_text("def halve(rewards, keys, groups):\n    return [r / 2 for r in rewards]\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    p = run_cli(["--config-dir", str(conf), "env=mine", "shaper=mine", *TINY_RUN, "train.steps=1",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "final evaluation: 960 samples (train.final_eval_samples" in p.stdout + p.stderr  # the bar has gone
    (made,) = (tmp_path / "outputs").iterdir()
    assert made.name.startswith("dice-halve-")  # the env's own default name, the shaper's function
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for bad in (["trainer.device=cuda"], ["shaper._target_=my_shaping3.nope"], ["algo.lr=-1"]):
        p = run_cli([*TINY_RUN, *bad], cwd=fresh, env=env)
        assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr[-2000:]
        assert not any(fresh.iterdir()), (bad, list(fresh.rglob("*")))


def test_any_algorithm_preset_name_is_a_label():
    assert validate({"env": DICE, "algo": {"name": "my_grpo", "clip_high": 0.28}}).algo.name == "my_grpo"


# -- end to end: the example from the command line, and an installed package's env ---------

def test_example_dataset_env_trains_from_the_command_line(tmp_path):
    p = run_cli(["--config-dir", "examples/arithmetic/conf", "env=arithmetic", "shaper=none", *TINY_RUN,
                 "env.eval_size=2", "env.eval_k=2", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
                 f"output_dir={tmp_path / 'out'}"], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = c.search_runs([c.get_experiment_by_name("runner").experiment_id])[0]
    m, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and params["env.name"] == "arithmetic"
    assert params["env._target_"] == "envs.dataset.DatasetEnv"
    assert {"reward/correct", "reward/formatted", "eval/accuracy", "eval/pass_at_2"} <= set(m)
    assert 0.0 <= m["reward/formatted"] <= 1.0


def test_an_installed_packages_env_is_found_by_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "coinflip").mkdir(parents=True)
    (site / "coinflip" / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from envs.base import Prompt, Score, require

        @dataclass
        class CoinEnv:
            sides: int = 2
            name: str = "coin"

            @staticmethod
            def check_config(cfg):
                require(cfg["sides"] >= 2, "sides", cfg["sides"], "must be >= 2")

            def __post_init__(self):
                self.answer_space = [str(i) for i in range(1, self.sides + 1)]
                self.valid_answers = self.answer_space

            def prompts(self, step, n):
                return [Prompt((("user", "flip a coin: 1 or 2"),), "<answer>")] * n

            def score(self, prompt, completion, finished):
                key = completion.split("<")[0].strip()
                ok = key in self.valid_answers
                return Score(reward=float(ok), answer_key=key if ok else "invalid", exact_format=ok)

            def metrics(self, scores, prefix):  # its own metrics, without touching the loop
                return {f"{prefix}/heads": sum(s.answer_key == "1" for s in scores) / len(scores)}
    '''))
    dist = site / "coinflip-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: coinflip\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[runner.envs]\ncoin = coinflip:CoinEnv\n")
    env = {"PYTHONPATH": str(site)}
    t0 = time.time()
    bad = run_cli(["env=coin", "env.sides=1", "model=tiny"], cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2 and "env.sides=1: must be >= 2" in bad.stderr.splitlines()[0]
    assert time.time() - t0 < 60 and not (tmp_path / "mlruns.db").exists()
    unknown = run_cli(["env=coin", "+env.faces=6", "model=tiny"], cwd=tmp_path, env=env, timeout=120)
    assert "env.faces: unknown key; allowed keys in env (coinflip.CoinEnv): name, sides" in unknown.stderr
    p = run_cli(["env=coin", *TINY_RUN, "shaper=divisor"], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    from conftest import only_run

    run, m = only_run(tmp_path)
    assert run.data.params["env._target_"] == "coinflip.CoinEnv" and "answers/valid_rate" in m
    assert 0.0 <= m["env/heads"] <= 1.0 and 0.0 <= m["eval/env/heads"] <= 1.0


def test_annotations_beyond_the_schemas_types_are_checked(tmp_path, monkeypatch):
    (tmp_path / "typed_env.py").write_text(textwrap.dedent('''
        from typing import Literal, Optional, Union

        def make(mode: Literal["fast", "slow"] = "fast", sizes: list[int] = (1,), limit: Optional[Union[int, str]] = None,
                 table: dict[str, float] = None, name: str = "typed"):
            return None
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    t = {"_target_": "typed_env.make"}
    assert error({"env": {**t, "mode": "medium"}}) == "env.mode='medium': must be one of fast, slow"
    assert error({"env": {**t, "sizes": [1, "two"]}}) == "env.sizes[1]='two': expected an integer"
    assert error({"env": {**t, "limit": [3]}}) == "env.limit=[3]: expected a string or an integer or null"
    assert error({"env": {**t, "table": [1.0]}}) == "env.table=[1.0]: expected a group of keys"
    s = validate({"env": {**t, "sizes": [2, 3], "limit": "all"}}).env
    assert (s.name, s.mode, s.sizes, s.limit) == ("typed", "fast", [2, 3], "all")
