"""Reward functions for the arithmetic example, in TRL's signature: the prompts, the
completions, and every other column of the dataset's rows as a keyword (`answer` here)."""

import re

_TAG = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


def correct(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the number in <answer></answer> is the row's answer."""
    out = []
    for text, want in zip(completions, answer):
        m = _TAG.search(text)
        out.append(1.0 if m and m.group(1) == str(want) else 0.0)
    return out


def formatted(prompts, completions, **kwargs) -> list[float]:
    """1 for a closed <answer>number</answer> tag, right or wrong: a small shaping term."""
    return [1.0 if _TAG.search(text) else 0.0 for text in completions]
