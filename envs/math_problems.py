"""Verifiable math (`env=math`): problems from reasoning-gym generators, answers checked with
math-verify so that equivalent forms count ("0.5", "1/2", "\\frac{1}{2}").

Generators are mixed by weight, each with its own difficulty settings (reasoning-gym's
config keys), e.g. `env.tasks.chain_sum.max_terms=4`. The held-out problems come from one
fixed seed (the same for every run, so seeds are judged on the same problems), the training
problems from the run's seed; training questions that also occur in the held-out set are dropped.

The answer key the shapers cluster on is the normalised final answer (the parsed value
printed canonically), so the divisor shaper counts "12" and "12.0" as one answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Optional

from envs.base import INVALID, Demonstration, Prompt, Score, after_prefix, require, shuffled_cycle

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPEN = re.compile(r"<answer>([^\n<]*)")
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)

INSTRUCTIONS = {
    "answer": "Give only the final answer inside <answer></answer> tags.",
    "boxed": "Give the final answer as \\boxed{...}.",
}


def extract_boxed(text: str) -> list[str]:
    """Contents of each \\boxed{...}, braces balanced."""
    out, i = [], 0
    while (i := text.find("\\boxed{", i)) != -1:
        j, depth = i + len("\\boxed{"), 1
        start = j
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append(text[start:j - 1])
        i = j
    return out


def extract_answer(text: str, fmt: str, strict: bool = True) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """(answer text, its character span) from exactly one tag or boxed expression. Not
    strict: a single unclosed `<answer>` counts up to the end of its line (small models
    often stop or ramble before closing the tag)."""
    if fmt == "answer":
        found = list(_TAG.finditer(text))
        if not found and not strict and text.count("<answer>") == 1:
            found = list(_OPEN.finditer(text))
        if len(found) != 1 or not found[0].group(1).strip():
            return None, None
        return found[0].group(1).strip(), (found[0].start(1), found[0].end(1))
    boxed = extract_boxed(text)
    if len(boxed) != 1 or not boxed[0].strip():
        return None, None
    start = text.find(boxed[0])
    return boxed[0].strip(), (start, start + len(boxed[0]))


def render_answer(answer: str, fmt: str) -> str:
    """An answer written in the env's `answer_format` (the form `extract_answer` reads)."""
    return f"<answer>{answer}</answer>" if fmt == "answer" else f"\\boxed{{{answer}}}"


def parse_math(text: str) -> list:
    """math-verify's parse of a bare answer (expressions and LaTeX both tried)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    body = text if text.lstrip().startswith("$") else f"${text}$"
    return parse(body, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])


def equivalent(gold: str, pred: str) -> bool:
    from math_verify import verify

    g, p = parse_math(gold), parse_math(pred)
    return bool(g and p and verify(g, p))


def normalise(answer: str) -> str:
    """A canonical string for a parsed answer (so 12, 12.0 and 24/2 share a key)."""
    wordy = re.search(r"(?<!\\)\b[A-Za-z]{2,}", answer) is not None  # prose, not an expression
    parsed = [] if wordy else parse_math(answer)
    if not parsed:
        return " ".join(answer.split()).lower()
    value = parsed[0]
    try:
        import sympy

        simple = sympy.nsimplify(value, rational=True) if getattr(value, "is_Float", False) else sympy.simplify(value)
        return str(simple)
    except Exception:
        return str(value)


EVAL_SEED = 7919  # reasoning-gym's seed of every run's held-out problems


@dataclass
class MathEnv:
    tasks: dict[str, Any] = field(default_factory=lambda: {"basic_arithmetic": {"weight": 1.0}})
    train_size: int = 1000
    eval_size: int = 32
    eval_k: int = 4
    seed: int = 0
    answer_format: str = "answer"  # answer: <answer></answer> | boxed: \boxed{}
    think: bool = False  # ask for reasoning inside <think></think> first
    system_prompt: Optional[str] = None
    assistant_prefix: str = "<answer>"
    format_reward: float = 0.0  # added when the answer is well-formed, right or wrong
    strict_format: bool = False  # true: only a closed tag (or boxed) counts as an answer
    name: str = "math"

    @staticmethod
    def check_config(cfg: dict) -> None:
        from reasoning_gym.factory import DATASETS  # ~1 s to import, only for this environment

        tasks = cfg["tasks"]
        require(bool(tasks), "tasks", tasks, "must name at least one reasoning-gym generator")
        for name, opts in tasks.items():
            require(name in DATASETS, f"tasks.{name}", name, "is not a reasoning-gym generator; e.g. "
                    f"basic_arithmetic, chain_sum, countdown, gsm_symbolic (all: {len(DATASETS)})")
            require(opts is None or isinstance(opts, dict), f"tasks.{name}", opts,
                    "must be a group of settings ({weight: 1.0, ...})")
            w = (opts or {}).get("weight", 1.0)
            require(isinstance(w, (int, float)) and w > 0, f"tasks.{name}.weight", w, "must be > 0")
        for k in ("train_size", "eval_size", "eval_k"):
            require(cfg[k] >= 1, k, cfg[k], "must be >= 1")
        require(cfg["answer_format"] in ("answer", "boxed"), "answer_format", cfg["answer_format"],
                "must be one of answer, boxed")

    def __post_init__(self) -> None:
        self.answer_space = None  # unbounded answers
        self.valid_answers = None
        # the held-out set is the same whatever the run's seed (EVAL_SEED), so seeds, and the
        # stages of a recipe run at different seeds, are judged on the same problems; the
        # run's seed draws the training set, from which held-out questions are dropped
        held = self._eval_source = self._dataset(self.eval_size, EVAL_SEED)
        self.eval = list(held)
        asked = {e["question"] for e in self.eval}
        self._train_source = self._dataset(self.train_size, self.seed)
        self.train = [e for e in self._train_source if e["question"] not in asked]
        if not self.train:
            raise ValueError(f"train_size={self.train_size}: every training problem is also a held-out one; "
                             f"raise train_size or make the tasks harder")

    def _dataset(self, size: int, seed: int):
        import reasoning_gym as rg
        from reasoning_gym.composite import DatasetSpec

        specs = []
        for task, opts in self.tasks.items():
            opts = dict(opts or {})
            weight = float(opts.pop("weight", 1.0))
            specs.append(DatasetSpec(name=task, weight=weight, config=opts))
        return rg.create_dataset("composite", size=size, seed=seed, datasets=specs)

    def _prompt(self, split: str, i: int, entry: dict) -> Prompt:
        ask = entry["question"].strip() + "\n" + INSTRUCTIONS[self.answer_format]
        if self.think:
            ask += " First think step by step inside <think></think>."
        messages = [("user", ask)]
        if self.system_prompt is not None:
            messages.insert(0, ("system", self.system_prompt))
        return Prompt(tuple(messages), self.assistant_prefix, key=(split, i))

    def prompts(self, step: int, n: int) -> list[Prompt]:
        """n distinct problems for this step, walking the training set in order."""
        size = len(self.train)
        return [self._prompt("train", (step * n + j) % size, self.train[(step * n + j) % size]) for j in range(n)]

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt("eval", i, e) for i, e in enumerate(self.eval)]

    def demonstration(self, i: int) -> Demonstration:
        """Training problem i answered with the generator's own answer, in the answer format.
        With `think`, a one-line thought first ("<think>", "The answer is A.", "</think>" lines):
        the generators give no worked solution, so it teaches the format, not reasoning. An
        assistant prefix that already opens the answer (think with prefix "<answer>") leaves
        no room for a thought: then the answer alone."""
        answer = str(self.train[i]["answer"]).strip()
        rendered = render_answer(answer, self.answer_format)
        thought = f"<think>\nThe answer is {answer}.\n</think>\n" + rendered
        if self.think and thought.startswith(self.assistant_prefix):
            rendered = thought
        return Demonstration(self._prompt("train", i, self.train[i]),
                             completion=after_prefix(self.assistant_prefix, rendered))

    def demonstrations(self, n: int, seed: int) -> list[Demonstration]:
        """n training-split problems (a seeded shuffle, each used once before any repeats),
        each with the generator's answer (`demonstration`)."""
        return [self.demonstration(i) for i in islice(shuffled_cycle(len(self.train), random.Random(seed)), n)]

    def reference(self, prompt: Prompt) -> str:
        """The generator's answer (samples.md shows it beside the model's)."""
        return str(self.entry(prompt)["answer"])

    def entry(self, prompt: Prompt) -> dict:
        split, i = prompt.key
        return (self.train if split == "train" else self.eval)[i]

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score:
        text = prompt.assistant_prefix + completion
        if self.think and not _THINK.match(text):
            thought_ok = False
        else:
            thought_ok = True
        answer, span = extract_answer(text, self.answer_format, self.strict_format)
        if answer is None:
            return Score(reward=0.0, answer_key=INVALID, exact_format=False)
        entry = self.entry(prompt)
        correct = equivalent(str(entry["answer"]), answer)
        if not correct:  # puzzles with many right answers (countdown) judge themselves
            ds = self._train_source if prompt.key[0] == "train" else self._eval_source
            correct = ds.score_answer(answer, entry) >= 1.0
        exact = finished and thought_ok and extract_answer(text, self.answer_format, True)[0] is not None
        reward = (1.0 if correct else 0.0) + (self.format_reward if exact else 0.0)
        off = len(prompt.assistant_prefix)
        span = (max(span[0] - off, 0), span[1] - off) if span else None
        return Score(reward=reward, answer_key=normalise(answer), exact_format=exact,
                     answer_span=span if span and span[1] > span[0] else None, correct=correct)
