import pytest

from runner.shapers import cluster_sizes, shape


def even_rewards(keys):
    return [1.0 if k in {"2", "4", "6"} else 0.0 for k in keys]


def test_cluster_sizes_are_per_group():
    assert cluster_sizes(["4", "4", "2", "4", "4", "2"], [0, 0, 0, 1, 1, 1]) == [2, 2, 1, 2, 2, 1]


def test_none_is_identity():
    keys = ["4", "4", "4", "4", "4", "2"]
    assert shape("none", even_rewards(keys), keys, [0] * 6) == [1.0] * 6


def test_divisor_on_five_fours_and_a_two():
    keys = ["4", "4", "4", "4", "4", "2"]
    out = shape("divisor", even_rewards(keys), keys, [0] * 6)
    assert out == pytest.approx([0.2] * 5 + [1.0])


def test_divisor_never_rewards_wrong_answers():
    keys = ["3", "4", "4", "5", "5", "invalid"]
    out = shape("divisor", even_rewards(keys), keys, [0] * 6)
    assert out == pytest.approx([0.0, 0.5, 0.5, 0.0, 0.0, 0.0])


def test_bonus_values_from_the_post():
    # N=6: a lone answer gets 6/(5*1) = 1.2 and unanimity gets 6/(5*6) = 0.2
    lone = shape("bonus", [0.0] * 6, ["1", "2", "2", "2", "2", "2"], [0] * 6)
    assert lone[0] == pytest.approx(1.2)
    assert lone[1] == pytest.approx(6 / (5 * 5))
    same = shape("bonus", [0.0] * 6, ["4"] * 6, [0] * 6)
    assert same == pytest.approx([0.2] * 6)


def test_bonus_lets_a_rare_wrong_answer_beat_a_common_right_one():
    keys = ["3", "4", "4", "4", "4", "4"]
    out = shape("bonus", even_rewards(keys), keys, [0] * 6)
    assert out[0] == pytest.approx(1.2)  # wrong but rare
    assert out[1] == pytest.approx(1 + 6 / 25)
    assert out[0] > 0


def test_groups_are_shaped_independently():
    keys = ["2", "2", "4", "4"]
    out = shape("divisor", [1.0] * 4, keys, [0, 1, 0, 1])
    assert out == pytest.approx([1.0] * 4)


def test_unknown_shaper_names_the_key():
    with pytest.raises(ValueError, match="shaper.name"):
        shape("nope", [1.0], ["1"], [0])
