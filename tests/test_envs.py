from pathlib import Path

import pytest
from omegaconf import OmegaConf

from envs import INVALID, parse_answer
from runner.config import validate
from runner.plugins import build_env

CONF = Path(__file__).resolve().parent.parent / "conf"


def make_env(name, **keys):
    """conf/env/<name>.yaml with `keys` on top, through the route every run takes:
    validation against the target's signature, then Hydra's instantiate."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / "env" / f"{name}.yaml"))
    return build_env(validate({"env": {**node, **keys}}).env)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<answer>4</answer>", "4"),
        ("<answer> 4 </answer>", "4"),
        ("<answer>\n6\n</answer> and more text", "6"),
        ("<answer>04</answer>", "4"),
        ("<answer>12</answer>", "12"),
        ("<answer>four</answer>", None),
        ("<answer>4.0</answer>", None),
        ("<answer>-3</answer>", None),
        ("<answer>+3</answer>", None),
        ("<answer>4", None),  # never closed
        ("4</answer>", None),  # never opened
        ("<answer></answer>", None),
        ("<answer>2</answer><answer>4</answer>", None),  # several tags: no hedging
        ("<answer>4<answer>5</answer>", None),
        ("<ANSWER>4</ANSWER>", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def score(name, completion, finished=True, strict=False):
    env = make_env(name, strict_format=strict)
    return env.score(env.prompts(0, 1)[0], completion, finished)


def test_dice_rewards_any_face():
    for face in "123456":
        assert score("dice", f"{face}</answer>").reward == 1.0
    assert score("dice", "7</answer>").reward == 0.0
    assert score("dice", "0</answer>").reward == 0.0


def test_even_dice_rewards_only_even():
    assert [score("even_dice", f"{f}</answer>").reward for f in "123456"] == [0, 1, 0, 1, 0, 1]


def test_answer_keys():
    assert score("even_dice", "3</answer>").answer_key == "3"
    assert score("even_dice", "three</answer>").answer_key == INVALID


def test_strict_format():
    assert score("dice", "4</answer>", strict=True).reward == 1.0
    assert score("dice", "4</answer>", finished=False, strict=True).reward == 0.0  # cut off by length
    assert score("dice", "4</answer> padding", strict=True).reward == 0.0
    assert score("dice", " 4</answer>", strict=True).reward == 0.0
    # without strict the padded one still counts, and exact_format is reported either way
    s = score("dice", "4</answer> padding")
    assert s.reward == 1.0 and not s.exact_format
    assert score("dice", "4</answer>").exact_format


def test_prompt_has_the_prefix_and_optional_system():
    env = make_env("dice")
    p = env.prompts(0, 3)
    assert len(p) == 3 and p[0].assistant_prefix == "<answer>"
    assert p[0].messages == (("user", "roll a dice. output the roll in <answer></answer> tags."),)
    env = make_env("dice", system_prompt="be random", assistant_prefix="")
    assert env.prompts(0, 1)[0].messages[0] == ("system", "be random")
    # with no prefix, the completion itself must contain both tags
    assert env.score(env.prompts(0, 1)[0], "4</answer>", True).reward == 0.0
    assert env.score(env.prompts(0, 1)[0], "<answer>4</answer>", True).reward == 1.0


def test_answer_space_and_valid_answers():
    assert make_env("even_dice").valid_answers == ["2", "4", "6"]
    assert make_env("dice", faces=4).answer_space == ["1", "2", "3", "4"]
