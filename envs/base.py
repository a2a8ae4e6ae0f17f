"""The contract between environments and the runner: the public interface a user's
environment implements (README, "Write your own environment"; DESIGN.md, "Parts and their
contracts").

An environment is built by its config's `_target_` (a class or a function) from the config's
other keys; its parameters are its schema (runner/plugins.py). It must have:

- `name`, `answer_space`, `valid_answers` (None where answers are unbounded);
- `prompts(step, n)`: the n prompts of a training step (each is sampled algo.group_size times);
- `score(prompt, completion, finished)`: a Score per rollout.

and may have:

- `check_config(cfg: dict)` (a static or class method): raise ValueError("key=value: rule") for
  a bad setting; the runner reports it as `env.key=...` before any model loads;
- `score_batch(prompts, completions, finished)`: a Score per rollout for a whole batch at
  once (a reward model, a batched verifier); used instead of `score` where present;
- `eval_prompts()` and `eval_k`: a held-out set, each prompt sampled eval_k times at
  evaluation (accuracy, pass@k, maj@k);
- `new_game(prompt)`, `score_game(game)`, `game_metrics(games, prefix)`: multi-turn episodes
  (envs/wordle.py is the example);
- `reference(prompt)`: the right answer as text, where the environment knows one (shown in
  samples.md beside the model's);
- `metrics(scores, prefix)`: extra metrics of its own over a batch's Scores;
- `demonstrations(n, seed)`: n expert examples (`Demonstration`) for supervised warm starts
  (the SFT stage, the data-generation stage): for dice a target answer distribution, for
  math the generator's answers, for Wordle a solver's games.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence

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
    # The reward's parts where it is a sum (a dataset env's reward functions): logged as
    # reward/<part> means, as TRL logs each reward function.
    components: Optional[dict[str, float]] = None


@dataclass(frozen=True)
class Demonstration:
    """One expert example: the prompt as the environment gives it, and what the model should
    write after the prompt's assistant prefix. Single-turn: `completion` is that text (what
    `score` is handed). Multi-turn (a game): `turns` are the model's turns in order, each as
    the model would write it; the environment's replies between them are not stored but made
    again by replaying the turns through `new_game`/`play`, so a supervised model sees
    exactly the replies RL rollouts see. Exactly one of the two is given."""

    prompt: Prompt
    completion: Optional[str] = None
    turns: Optional[tuple[str, ...]] = None


def after_prefix(prefix: str, text: str) -> str:
    """For `demonstrations`: what the model writes after the assistant prefix so that its turn
    reads `text` (an expert's whole answer, e.g. "<answer>4</answer>"). The prefix is cut off
    where `text` starts with it ("<answer>" -> "4</answer>"); a prefix that is not the start of
    `text` (e.g. "Answer: ") stays in front of all of `text`."""
    return text[len(prefix):] if text.startswith(prefix) else text


def shuffled_cycle(size: int, rng: random.Random) -> Iterator[int]:
    """For `demonstrations`: indices 0..size-1 in a fresh `rng` order each pass, forever, so n
    examples repeat a training item only once all of them are used."""
    if size < 1:
        raise ValueError(f"size={size}: no training items to draw demonstrations from")
    while True:
        order = list(range(size))
        rng.shuffle(order)
        yield from order


def require(cond: bool, key: str, value: object, rule: str) -> None:
    """For `check_config`: a ValueError whose text names the key, as the runner's own errors do."""
    if not cond:
        raise ValueError(f"{key}={value!r}: {rule}")


class Environment(Protocol):
    name: str
    # Answers the metrics chart, in display order (for dice 1..6); None when unbounded.
    answer_space: Optional[Sequence[str]]
    # The subset that earns reward; the ideal policy is uniform over these.
    valid_answers: Optional[Sequence[str]]

    def prompts(self, step: int, n: int) -> list[Prompt]: ...

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score: ...
