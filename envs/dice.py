"""Dice environments from the dice post: `dice` rewards any face, `even_dice` only even ones."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

from envs.base import INVALID, Demonstration, Prompt, Score, after_prefix, require

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


def check_demo_weights(weights: Optional[dict[Any, Any]], faces: int) -> None:
    """`demo_weights` names faces 1..faces (keys may arrive as numbers from a YAML or an
    override) with finite weights >= 0 that do not all vanish; None is the uniform default."""
    if weights is None:
        return
    require(isinstance(weights, dict) and bool(weights), "demo_weights", weights,
            "must be a group of face: weight (e.g. {4: 0.5, 2: 0.25, 6: 0.25}) or null")
    for face, w in weights.items():
        require(str(face) in {str(i) for i in range(1, faces + 1)}, "demo_weights key", face,
                f"must be a face 1..{faces}")
        require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                f"demo_weights.{face}", w, "must be a number >= 0")
    require(sum(weights.values()) > 0, "demo_weights", weights, "weights must not all be 0")


@dataclass
class DiceEnv:
    name: str = "dice"
    prompt: str = "roll a dice. output the roll in <answer></answer> tags."
    system_prompt: Optional[str] = None
    assistant_prefix: str = "<answer>"
    strict_format: bool = False
    faces: int = 6
    even_only: bool = False  # true: only even faces earn reward (even_dice)
    # the answer distribution `demonstrations` draws from: face -> weight (any face, also one
    # that earns no reward); None: uniform over valid_answers
    demo_weights: Optional[dict[str, float]] = None

    @staticmethod
    def check_config(cfg: dict) -> None:
        require(cfg["faces"] >= 2, "faces", cfg["faces"], "must be >= 2")
        require(bool(cfg["prompt"].strip()), "prompt", cfg["prompt"],
                "must be a non-empty instruction (the user message every rollout answers)")
        check_demo_weights(cfg.get("demo_weights"), cfg["faces"])

    def __post_init__(self) -> None:
        self.answer_space = [str(i) for i in range(1, self.faces + 1)]
        self.valid_answers = [a for a in self.answer_space if not self.even_only or int(a) % 2 == 0]
        self._valid = set(self.valid_answers)
        messages = [("user", self.prompt)]
        if self.system_prompt is not None:
            messages.insert(0, ("system", self.system_prompt))
        self._prompt = Prompt(tuple(messages), self.assistant_prefix)
        weights = self.demo_weights or {a: 1.0 for a in self.valid_answers}
        self._demo = {str(face): float(w) for face, w in weights.items()}

    def prompts(self, step: int, n: int) -> list[Prompt]:
        return [self._prompt] * n

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score:
        text = prompt.assistant_prefix + completion
        answer = parse_answer(text)
        exact = is_exact_format(text, finished)
        ok = answer in self._valid and (exact or not self.strict_format)
        return Score(reward=1.0 if ok else 0.0, answer_key=answer or INVALID, exact_format=exact,
                     answer_span=answer_span(text, len(prompt.assistant_prefix)))

    def demonstrations(self, n: int, seed: int) -> list[Demonstration]:
        """n answers drawn from `demo_weights` (uniform over the valid faces by default), each
        written in the strict format `<answer>N</answer>` and nothing after, less the prompt's
        assistant prefix. Supervised training on them puts the policy at that distribution
        (e.g. mostly 4s: where the dice post's model started)."""
        rng = random.Random(seed)
        faces = rng.choices(list(self._demo), weights=list(self._demo.values()), k=n)
        return [Demonstration(self._prompt, completion=after_prefix(self.assistant_prefix, f"<answer>{f}</answer>"))
                for f in faces]
