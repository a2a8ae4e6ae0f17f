import pytest

from runner.algo.shapers import cluster_sizes, shape


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


def _group_adv(rewards, scale="group"):
    import torch

    from runner.algo.loss import advantages

    return advantages(torch.tensor(rewards), torch.zeros(len(rewards), dtype=torch.long), scale).tolist()


def test_divisor_is_undone_by_the_std_in_a_group_with_one_rewarded_answer():
    """[2, 2, inv, 1, inv, inv] on even_dice: the divisor halves both 2s, the std scales it
    back; +-1.414 / -0.707 under none and divisor alike (DESIGN.md, the divisor notes)."""
    keys = ["2", "2", "invalid", "1", "invalid", "invalid"]
    r = even_rewards(keys)
    none, div = _group_adv(shape("none", r, keys, [0] * 6)), _group_adv(shape("divisor", r, keys, [0] * 6))
    assert div == pytest.approx(none, rel=1e-3)  # equal but for the std's epsilon (ADV_EPS)
    assert none == pytest.approx([1.414, 1.414, -0.707, -0.707, -0.707, -0.707], abs=1e-3)


def test_divisor_acts_once_a_group_holds_two_rewarded_answers():
    keys = ["2", "2", "4", "1", "invalid", "invalid"]
    r = even_rewards(keys)
    none, div = _group_adv(shape("none", r, keys, [0] * 6)), _group_adv(shape("divisor", r, keys, [0] * 6))
    assert div[2] > div[0]  # the lone 4 beats the pair of 2s
    assert none[2] == pytest.approx(none[0])
    # without std scaling the divisor changes even a one-answer group (it only rescales it)
    keys1 = ["2", "2", "invalid", "1", "invalid", "invalid"]
    r1 = even_rewards(keys1)
    assert _group_adv(shape("divisor", r1, keys1, [0] * 6), "none") != pytest.approx(_group_adv(r1, "none"))


def test_group_mechanics_on_hand_made_groups():
    from runner.track.metrics import group_mechanics

    def adv(r):
        return _group_adv(r)

    one = ["2", "2", "invalid", "1", "invalid", "invalid"]
    two = ["2", "2", "4", "1", "invalid", "invalid"]
    all_same = ["4"] * 6
    for keys, distinct, changed in ((one, 1, False), (two, 2, True), (all_same, 1, False)):
        r = even_rewards(keys)
        assert group_mechanics(r, shape("divisor", r, keys, [0] * 6), r, keys, adv) == (distinct, changed)
    # the bonus changes a one-answer group's advantages (the odd 1 gains from being rare)
    r = even_rewards(one)
    assert group_mechanics(r, shape("bonus", r, one, [0] * 6), r, one, adv) == (1, True)
    nothing = ["invalid"] * 6
    assert group_mechanics([0.0] * 6, [0.0] * 6, [0.0] * 6, nothing, adv) == (0, False)
