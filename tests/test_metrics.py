import math

import pytest

from runner.track.metrics import answer_distribution, entropy, tv_to_uniform

SPACE = [str(i) for i in range(1, 7)]


def test_distribution_buckets_out_of_space_as_invalid():
    d = answer_distribution(["1", "1", "7", "invalid"], SPACE)
    assert d["1"] == 0.5 and d["invalid"] == 0.5 and d["2"] == 0.0
    assert sum(d.values()) == pytest.approx(1.0)


def test_entropy():
    assert entropy({"a": 1.0, "b": 0.0}) == 0.0
    assert entropy({"a": 0.5, "b": 0.5}) == pytest.approx(math.log(2))


def test_tv_to_uniform_over_valid():
    valid = ["2", "4", "6"]
    uniform = answer_distribution(["2", "4", "6"], SPACE)
    assert tv_to_uniform(uniform, valid) == pytest.approx(0.0)
    collapsed = answer_distribution(["4"] * 6, SPACE)
    assert tv_to_uniform(collapsed, valid) == pytest.approx(2 / 3)
    all_invalid = answer_distribution(["1", "3"], SPACE)
    assert tv_to_uniform(all_invalid, valid) == pytest.approx(1.0)


def test_answers_outside_the_space_are_told_apart_from_no_answer():
    """`invalid` holds both; answers/other_rate is the share that did answer, outside the space."""
    from types import SimpleNamespace

    from envs import INVALID
    from runner.loop.evaluator import Evaluator

    env = SimpleNamespace(answer_space=[*"123456"], valid_answers=[*"246"])
    ev = Evaluator.__new__(Evaluator)
    ev.env = env
    m = ev.answer_metrics(["2", "7", INVALID, "4", "10"], "answers")
    assert m["answers/frac/invalid"] == pytest.approx(3 / 5) and m["answers/other_rate"] == pytest.approx(2 / 5)
