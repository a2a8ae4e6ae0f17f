"""The contract between environments and the runner (DESIGN.md, "Parts and their contracts")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

INVALID = "invalid"


@dataclass(frozen=True)
class Prompt:
    """Chat messages plus text prefilled at the start of the assistant turn."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    assistant_prefix: str = ""
    # Where the environment keeps what it needs to score this prompt (a problem's split and
    # index, a Wordle secret's index); None for environments with one fixed prompt.
    key: Optional[tuple] = None


@dataclass(frozen=True)
class Score:
    reward: float
    # What group-aware shapers cluster on (the rolled number for dice); INVALID when
    # nothing could be parsed.
    answer_key: str
    exact_format: bool
    # Character span [start, end) of the answer inside the completion text, where one was
    # found: what `algo.entropy.scope=answer` rewards entropy on.
    answer_span: Optional[tuple[int, int]] = None
    # Whether the answer is right, where that is more than "reward > 0" (math, Wordle).
    correct: Optional[bool] = None


class Environment(Protocol):
    name: str
    # Answers the metrics chart, in display order (for dice 1..6); None when unbounded.
    answer_space: Optional[Sequence[str]]
    # The subset that earns reward; the ideal policy is uniform over these.
    valid_answers: Optional[Sequence[str]]

    def prompts(self, step: int, n: int) -> list[Prompt]: ...

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score: ...
