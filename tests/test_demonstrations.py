"""Environments' `demonstrations(n, seed)`: expert examples for the SFT and data-generation
stages. Each built-in environment's examples must be what its own scorer rewards (dice in
the strict format at the asked-for distribution, math right answers, Wordle won games that
replay through `new_game`/`play`), drawn from the training split, and reproducible by seed."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from typing import Callable

import pytest

from envs.base import Demonstration, Prompt, Score
from envs.wordle import WordleEnv, consistent
from runner.config import ConfigError, validate
from runner.plugins import build_env
from test_envs import make_env

MATH_TASKS = {"basic_arithmetic": {"weight": 1.0, "min_terms": 2, "max_terms": 3},
              "chain_sum": {"weight": 1.0}, "countdown": {"weight": 1.0}}


def math_env(**keys):
    """conf/env/math.yaml, a small training set (and countdown, whose answers are judged by
    its own scorer rather than by equality), through the route a run takes."""
    return make_env("math", **{"train_size": 40, "eval_size": 8, "tasks": MATH_TASKS, **keys})


ENVS: dict[str, Callable] = {
    "dice": lambda: make_env("dice"),
    "even_dice": lambda: make_env("even_dice", demo_weights={"4": 0.5, "1": 0.1, "2": 0.1, "3": 0.1, "5": 0.1, "6": 0.1}),
    "math": lambda: math_env(),
    "wordle": lambda: make_env("wordle"),
}


def key_of(d: Demonstration) -> tuple:
    """What a demonstration says, comparable across calls."""
    return d.prompt, d.completion, d.turns


# -- every environment ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENVS))
def test_same_seed_same_demonstrations_other_seed_other(name):
    """The SFT stage and the data-generation stage must be able to make the same data again."""
    env = ENVS[name]()
    a, b, c = env.demonstrations(30, 1), env.demonstrations(30, 1), env.demonstrations(30, 2)
    assert [key_of(d) for d in a] == [key_of(d) for d in b]
    assert [key_of(d) for d in a] != [key_of(d) for d in c]


@pytest.mark.parametrize("name", list(ENVS))
def test_n_is_respected_and_the_global_rng_untouched(name):
    """Exactly n examples, one of completion/turns each, and no draw from the global RNG
    (other seeded streams of the run must not shift because demonstrations were made)."""
    env = ENVS[name]()
    random.seed(123)
    before = random.getstate()
    for n in (0, 1, 7):
        demos = env.demonstrations(n, 0)
        assert len(demos) == n
        assert all((d.completion is None) != (d.turns is None) for d in demos)
    assert random.getstate() == before


class UserEnv:
    """A user's single-turn environment written before `demonstrations` existed."""

    name, answer_space, valid_answers = "user", None, None

    def prompts(self, step: int, n: int) -> list[Prompt]:
        return [Prompt((("user", "say hi"),))] * n

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score:
        return Score(reward=float(completion == "hi"), answer_key=completion, exact_format=finished)


def test_an_environment_without_demonstrations_still_builds():
    """The method is optional: an environment that lacks it validates, builds and scores."""
    env = build_env(validate({"env": {"_target_": "test_demonstrations.UserEnv"}}).env)
    assert not hasattr(env, "demonstrations")
    assert env.score(env.prompts(0, 1)[0], "hi", True).reward == 1.0


# -- dice -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dice", "even_dice"])
@pytest.mark.parametrize("prefix,strict", [("<answer>", False), ("", True), ("<answer>", True)])
def test_dice_demonstrations_are_strict_answers_scored_by_the_env_rule(name, prefix, strict):
    """Completions are exactly `<answer>N</answer>` after the prefix; the env's own score reads
    N back, in the strict format, and rewards it as the env's rule says (even_dice: odd 0)."""
    every_face = {str(f): 1.0 for f in range(1, 7)}
    env = make_env(name, assistant_prefix=prefix, strict_format=strict, demo_weights=every_face)
    demos = env.demonstrations(200, 0)
    assert {d.completion for d in demos} == {f"<answer>{f}</answer>"[len(prefix):] for f in range(1, 7)}
    for d in demos:
        s = env.score(d.prompt, d.completion, True)
        assert d.prompt.assistant_prefix + d.completion == f"<answer>{s.answer_key}</answer>"
        assert s.exact_format
        assert s.reward == (0.0 if name == "even_dice" and int(s.answer_key) % 2 else 1.0)


@pytest.mark.parametrize("name,weights,expected", [
    ("even_dice", {"4": 0.5, "1": 0.1, "2": 0.1, "3": 0.1, "5": 0.1, "6": 0.1}, None),
    ("dice", {4: 3, 6: 1, 1: 0}, None),  # numbers as keys (a YAML's {4: 3}), a zero weight
    ("even_dice", None, {"2": 1 / 3, "4": 1 / 3, "6": 1 / 3}),  # null: uniform over valid_answers
    ("dice", None, {str(f): 1 / 6 for f in range(1, 7)}),
])
def test_dice_demonstrations_follow_the_weights(name, weights, expected):
    """Over 6000 draws each face's share is within 4 standard errors of its weight."""
    env = make_env(name, demo_weights=weights)
    if expected is None:
        total = sum(weights.values())
        expected = {str(f): w / total for f, w in weights.items()}
    n = 6000
    counts = Counter(env.score(d.prompt, d.completion, True).answer_key for d in env.demonstrations(n, 7))
    assert set(counts) == {f for f, p in expected.items() if p > 0}
    for face, p in expected.items():
        se = math.sqrt(p * (1 - p) / n)
        assert abs(counts[face] / n - p) <= 4 * se + 1e-12, (face, counts[face] / n, p)


@pytest.mark.parametrize("weights,message", [
    ({"7": 1.0}, "env.demo_weights key='7': must be a face 1..6"),
    ({"0": 1.0}, "env.demo_weights key='0': must be a face 1..6"),
    ({"4": -0.5}, "env.demo_weights.4=-0.5: must be a number >= 0"),
    ({"4": "a lot"}, "env.demo_weights.4='a lot': must be a number >= 0"),
    ({"4": float("inf")}, "env.demo_weights.4=inf: must be a number >= 0"),
    ({"2": 0, "4": 0.0}, "env.demo_weights={'2': 0, '4': 0.0}: weights must not all be 0"),
    ({}, "env.demo_weights={}: must be a group of face: weight"),
])
def test_dice_demo_weights_are_checked_before_a_run(weights, message):
    with pytest.raises(ConfigError) as e:
        make_env("dice", demo_weights=weights)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_even_dice_accepts_weights_on_faces_it_does_not_reward():
    """Issue 35 starts the policy where the dice post's model started (mostly 4, some odd)."""
    env = make_env("even_dice", demo_weights={"3": 1.0})
    assert {env.score(d.prompt, d.completion, True).reward for d in env.demonstrations(20, 0)} == {0.0}


# -- math -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", [
    {},  # <answer></answer>, prefix "<answer>"
    {"answer_format": "boxed", "assistant_prefix": ""},
    {"think": True, "assistant_prefix": ""},
    {"think": True, "assistant_prefix": "", "answer_format": "boxed", "format_reward": 0.5, "strict_format": True},
    # the prefix already opens the answer: no room for a thought, so never the exact format
    # under the env's rule (its config says: think with assistant_prefix ""), still correct
    {"think": True, "format_reward": 0.5},
])
def test_math_demonstrations_are_right_answers_on_training_prompts(keys):
    """Every example is scored correct (reward 1 plus any format reward) by the env itself,
    in the exact format, on a prompt `prompts()` hands out, never a held-out one."""
    env = math_env(**keys)
    exact = not (env.think and env.assistant_prefix)
    train = set(env.prompts(0, env.train_size))
    held_out = set(env.eval_prompts())
    demos = env.demonstrations(env.train_size, 3)
    assert len({d.prompt for d in demos}) == env.train_size  # each problem once before repeats
    for d in demos:
        assert d.prompt in train and d.prompt not in held_out
        s = env.score(d.prompt, d.completion, True)
        assert s.correct and s.exact_format == exact, (d.prompt.messages[-1][1], d.completion, s)
        assert s.reward == pytest.approx(1.0 + env.format_reward * exact)
        if keys.get("think") and env.assistant_prefix == "":
            assert d.completion.startswith("<think>")


# -- Wordle -----------------------------------------------------------------------------------
def replay(env: WordleEnv, demo: Demonstration):
    """The demonstration's game, made again through the env's own new_game/play."""
    game = env.new_game(demo.prompt)
    for j, turn in enumerate(demo.turns):
        reply = env.play(game, turn)
        assert (reply is None) == (j == len(demo.turns) - 1), (demo.turns, j, reply)
    return game


@pytest.mark.parametrize("prefix", ["<guess>", ""])
def test_wordle_demonstrations_replay_to_valid_won_games_on_training_secrets(prefix):
    """Each turn is written as the model writes it after the prefix; replayed, every guess is
    an allowed word, consistent with the feedback before it, never repeated, and the game is
    won within max_turns on a training secret."""
    env = make_env("wordle", assistant_prefix=prefix)
    demos = env.demonstrations(200, 5)
    for d in demos:
        assert d.prompt.key[0] == "train" and env.secret(d.prompt) in env.train_secrets
        assert all(prefix + t == f"<guess>{env.parse_guess(prefix + t)}</guess>" for t in d.turns)
        game = replay(env, d)
        for k, t in enumerate(game.turns):
            assert t["valid"] and t["consistent"] and not t["repeat"], (d.turns, k)
            assert consistent(t["guess"], game.history[:k])
        s = env.score_game(game)
        assert game.solved and s.correct and s.exact_format and len(game.turns) <= env.max_turns
        assert s.reward == pytest.approx(env.w_solve + env.w_format + env.w_turn_bonus * (env.max_turns - len(game.turns)))
    assert len({env.secret(d.prompt) for d in demos}) == len(demos)  # no secret twice in one pass


@pytest.mark.parametrize("eval_size", [32, 1500])
def test_wordle_solver_wins_99_percent_of_held_out_secrets(eval_size):
    """On every held-out secret (the default 32, and a 1500-word held-out split for a rate
    that means something), played directly: at least 99% won within 6 turns, and in few
    turns: a random consistent guess after the same opening also wins ~99% but takes ~3.8
    turns on average, the best split ~3.5."""
    env = make_env("wordle", eval_size=eval_size)
    rng = random.Random(0)
    start = time.perf_counter()
    games = [env.solve(secret, rng) for secret in env.eval_secrets]
    seconds = time.perf_counter() - start
    won = [g for g, secret in zip(games, env.eval_secrets) if g[-1] == secret]
    rate, mean_turns = len(won) / len(games), sum(map(len, won)) / len(won)
    lost = [s for g, s in zip(games, env.eval_secrets) if g[-1] != s]
    summary = f"solve rate {rate:.4f} ({len(won)}/{len(games)}), mean turns {mean_turns:.3f}, {seconds:.2f}s, lost {lost}"
    print(summary)
    assert rate >= 0.99 and all(len(g) <= env.max_turns for g in games), summary
    assert mean_turns <= 3.65, summary
    assert seconds < 10, summary


def test_wordle_demonstrations_say_so_when_no_game_can_be_won():
    """With one turn only the opening word can be won: a clear error, not an endless search,
    when that word is held out; otherwise every example is that one-turn game."""
    env = make_env("wordle", max_turns=1, eval_size=1000)
    if env.solver.opening in env.eval_secrets:
        with pytest.raises(ValueError, match="max_turns=1: the solver wins no training game"):
            env.demonstrations(3, 0)
    else:
        assert {d.turns for d in env.demonstrations(3, 0)} == {(env.turn_text(env.solver.opening),)}


def test_wordle_demonstrations_open_with_several_good_words_when_asked():
    """env.demo_openings=8: the solver's "slate" and the next seven best openings by its own
    information score, each drawn often; every game still replays to a won, consistent game."""
    one = make_env("wordle")
    assert {d.turns[0] for d in one.demonstrations(40, 0)} == {one.turn_text("slate")}
    env = make_env("wordle", demo_openings=8)
    openings = env.openings()
    assert len(set(openings)) == 8 and openings[0] == "slate"
    demos = env.demonstrations(200, 0)
    counts = Counter(d.turns[0] for d in demos)
    assert set(counts) == {env.turn_text(w) for w in openings} and max(counts.values()) <= 0.25 * len(demos)
    for d in demos[:50]:
        game = replay(env, d)
        assert game.solved and all(t["consistent"] and not t["repeat"] for t in game.turns)
