"""Dice environments from the dice post: `dice` rewards any face, `even_dice` only even ones."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from envs.base import INVALID, Prompt, Score, require

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_STRICT = re.compile(r"<answer>(\d+)</answer>")


def parse_answer(text: str) -> Optional[str]:
    """The integer inside exactly one `<answer></answer>` pair, normalised ("04" -> "4").

    Several tags count as no answer: otherwise a policy could hedge by listing every roll.
    Whitespace around the number is tolerated; anything else (words, signs, decimals) is not.
    """
    found = _TAG.findall(text)
    if len(found) != 1:
        return None
    body = found[0].strip()
    if not re.fullmatch(r"\d+", body):
        return None
    return str(int(body))


def answer_span(text: str, offset: int) -> Optional[tuple[int, int]]:
    """[start, end) of the first answer tag's content, shifted by -offset (the prefix)."""
    m = _TAG.search(text)
    if m is None:
        return None
    start, end = max(m.start(1) - offset, 0), m.end(1) - offset
    return (start, end) if end > start else None


def is_exact_format(text: str, finished: bool) -> bool:
    """Exactly `<answer>N</answer>` and then end of text (the model stopped by itself)."""
    return finished and _STRICT.fullmatch(text) is not None


@dataclass
class DiceEnv:
    name: str = "dice"
    prompt: str = "roll a dice. output the roll in <answer></answer> tags."
    system_prompt: Optional[str] = None
    assistant_prefix: str = "<answer>"
    strict_format: bool = False
    faces: int = 6
    even_only: bool = False  # true: only even faces earn reward (even_dice)

    @staticmethod
    def check_config(cfg: dict) -> None:
        require(cfg["faces"] >= 2, "faces", cfg["faces"], "must be >= 2")
        require(bool(cfg["prompt"].strip()), "prompt", cfg["prompt"],
                "must be a non-empty instruction (the user message every rollout answers)")

    def __post_init__(self) -> None:
        self.answer_space = [str(i) for i in range(1, self.faces + 1)]
        self.valid_answers = [a for a in self.answer_space if not self.even_only or int(a) % 2 == 0]
        self._valid = set(self.valid_answers)
        messages = [("user", self.prompt)]
        if self.system_prompt is not None:
            messages.insert(0, ("system", self.system_prompt))
        self._prompt = Prompt(tuple(messages), self.assistant_prefix)

    def prompts(self, step: int, n: int) -> list[Prompt]:
        return [self._prompt] * n

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score:
        text = prompt.assistant_prefix + completion
        answer = parse_answer(text)
        exact = is_exact_format(text, finished)
        ok = answer in self._valid and (exact or not self.strict_format)
        return Score(reward=1.0 if ok else 0.0, answer_key=answer or INVALID, exact_format=exact,
                     answer_span=answer_span(text, len(prompt.assistant_prefix)))
