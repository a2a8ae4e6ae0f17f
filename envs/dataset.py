"""An environment from a dataset file and reward functions: the route for a user's own task.

Prompts come from a JSONL/JSON/Parquet/CSV file or a `datasets.save_to_disk` directory, a
column holding either a string (one user message) or a chat (a list of {role, content}),
rendered with the model's chat template. Rewards come from functions named by import path,
with TRL's signature, so TRL users' reward functions work unchanged:

    def my_reward(prompts, completions, **columns) -> list[float]: ...

`prompts` holds the dataset's prompt values, `completions` the completions (strings, or
[{"role": "assistant", "content": ...}] for chat prompts, as in TRL), and every other column
of the rows comes as a keyword list (`answer=[...]`). Several functions are summed with
`reward_weights`; a None from a function means "does not apply" and counts as 0. The answer
key the shapers cluster on comes from `answer_key` (an import path, `(text) -> str | None`),
by default the normalised final answer.

The file is read once, when the env is built, and every row checked (`load_rows`): the
preflight builds it, so a bad file (JSON that does not parse, bytes that are not UTF-8, no
rows, no prompt column, an empty prompt, a damaged Parquet file or save_to_disk directory)
is exit 2 with one line naming the key, the file and the line or row, before any model loads.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from envs.base import INVALID, Prompt, Score, require
from envs.data_files import _abs, load_rows  # noqa: F401  (load_rows: also the public loader)
from runner.config import ConfigError
from runner.plugins import import_object

EVAL_SEED = 0  # the shuffle that picks the held-out rows (without eval_path), for every run
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def final_answer(text: str) -> Optional[str]:
    """The last <answer></answer> body, else the last \\boxed{}, else the last number;
    lower-cased, whitespace-folded, trailing period dropped, "12.0" -> "12"."""
    for pattern in (_ANSWER, _BOXED, _NUMBER):
        found = pattern.findall(text)
        if found:
            s = " ".join(found[-1].split()).lower().rstrip(".")
            try:
                x = float(s.replace(",", ""))
                return str(int(x)) if x.is_integer() else repr(x)
            except ValueError:
                return s or None
    return None


@dataclass
class DatasetEnv:
    path: str  # a .jsonl/.json/.parquet/.csv file or a datasets.save_to_disk directory
    reward_funcs: list[str]  # import paths of reward(prompts, completions, **columns) -> list[float]
    reward_weights: Optional[list[float]] = None  # one per function; null: all 1
    prompt_column: str = "prompt"
    eval_path: Optional[str] = None  # held-out rows; null: eval_size rows of path, the same for every seed
    eval_size: int = 16
    eval_k: int = 4  # samples per held-out prompt: accuracy, pass@k, maj@k
    answer_key: Optional[str] = None  # import path of (text) -> str | None; null: final_answer
    success_threshold: float = 1.0  # a rollout is "correct" (accuracy, pass@k) at this reward or more
    system_prompt: Optional[str] = None
    assistant_prefix: str = ""  # prefilled text of the answer; rewards see it as part of the completion
    shuffle: bool = True  # training prompts in an order seeded by the run's seed; held-out rows drawn by a fixed one
    seed: int = 0
    name: str = "dataset"

    @staticmethod
    def check_config(cfg: dict) -> None:
        for key in ("path", "eval_path"):
            p = cfg[key]
            if p is None:
                continue
            path = Path(p).expanduser()
            require(path.exists(), key, p, "does not exist (paths are relative to the directory you run in)")
            require(path.is_dir() or path.suffix.lower() in FORMATS, key, p,
                    f"must be a {', '.join(FORMATS)} file or a datasets.save_to_disk directory")
        require(len(cfg["reward_funcs"]) >= 1, "reward_funcs", cfg["reward_funcs"], "must name at least one function")
        for i, f in enumerate(cfg["reward_funcs"]):
            require(callable(import_object(f, f"reward_funcs[{i}]")), f"reward_funcs[{i}]", f, "is not a function")
        w = cfg["reward_weights"]
        require(w is None or len(w) == len(cfg["reward_funcs"]), "reward_weights", w,
                f"must have one weight per reward function ({len(cfg['reward_funcs'])})")
        if cfg["answer_key"] is not None:
            require(callable(import_object(cfg["answer_key"], "answer_key")), "answer_key", cfg["answer_key"],
                    "is not a function")
        require(cfg["eval_size"] >= 1, "eval_size", cfg["eval_size"], "must be >= 1")
        require(cfg["eval_k"] >= 1, "eval_k", cfg["eval_k"], "must be >= 1")

    def __post_init__(self) -> None:
        self.answer_space = None  # unbounded answers
        self.valid_answers = None
        self.funcs = [import_object(f, "env.reward_funcs") for f in self.reward_funcs]
        self.weights = [float(w) for w in (self.reward_weights or [1.0] * len(self.funcs))]
        self.key_fn = import_object(self.answer_key, "env.answer_key") if self.answer_key else final_answer
        # every row is read and checked here: a bad file is a ConfigError (exit 2) at the preflight
        rows = load_rows(self.path, "env.path", self.prompt_column)
        order = list(range(len(rows)))
        if self.eval_path:
            held = load_rows(self.eval_path, "env.eval_path", self.prompt_column)
            train, heldout = order, (held, list(range(len(held))))
        else:
            if len(order) <= self.eval_size:
                raise ConfigError(f"env.eval_size={self.eval_size}: {_abs(self.path)} has only {len(order)} rows "
                                  f"and at least one must be left to train on; hold out fewer or give env.eval_path")
            if self.shuffle:  # the held-out rows are the same for every seed: seeds are judged alike
                random.Random(EVAL_SEED).shuffle(order)
            train, heldout = order[:-self.eval_size], (rows, order[-self.eval_size:])
        if self.shuffle:  # the run's seed orders the training rows
            random.Random(self.seed).shuffle(train)
        self.splits = {"train": (rows, train), "eval": heldout}

    # -- prompts ---------------------------------------------------------------------------
    def reference(self, prompt: Prompt) -> Optional[str]:
        """The row's `answer` column, where it has one (samples.md shows it beside the model's)."""
        value = self.row(prompt).get("answer")
        return None if value is None else str(value)

    def row(self, prompt: Prompt) -> dict:
        split, i = prompt.key
        rows, order = self.splits[split]
        return rows[order[i]]

    def _prompt(self, split: str, i: int) -> Prompt:
        rows, order = self.splits[split]
        value = rows[order[i]][self.prompt_column]
        if isinstance(value, str):
            messages = [("user", value)]
        else:  # a chat: [{"role": ..., "content": ...}, ...]
            messages = [(m["role"], m["content"]) for m in value]
        if self.system_prompt is not None and messages[0][0] != "system":
            messages.insert(0, ("system", self.system_prompt))
        return Prompt(tuple(messages), self.assistant_prefix, key=(split, i))

    def prompts(self, step: int, n: int) -> list[Prompt]:
        size = len(self.splits["train"][1])
        return [self._prompt("train", (step * n + j) % size) for j in range(n)]

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt("eval", i) for i in range(len(self.splits["eval"][1]))]

    # -- rewards ---------------------------------------------------------------------------
    def score_batch(self, prompts: list[Prompt], completions: list[str], finished: list[bool]) -> list[Score]:
        rows = [self.row(p) for p in prompts]
        texts = [p.assistant_prefix + c for p, c in zip(prompts, completions)]
        chat = not isinstance(rows[0][self.prompt_column], str)
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != self.prompt_column}
        given = [r[self.prompt_column] for r in rows]
        comps = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        parts: dict[str, list[float]] = {}
        total = [0.0] * len(texts)
        for fn, w in zip(self.funcs, self.weights):
            values = list(fn(prompts=given, completions=comps, **columns))
            if len(values) != len(texts):
                raise ValueError(f"{fn.__name__} returned {len(values)} rewards for {len(texts)} completions")
            vals = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
            parts[fn.__name__] = vals
            total = [t + w * v for t, v in zip(total, vals)]
        out = []
        for i, (text, done) in enumerate(zip(texts, finished)):
            key = self.key_fn(text)
            out.append(Score(reward=total[i], answer_key=key if key else INVALID, exact_format=bool(done and key),
                             correct=total[i] >= self.success_threshold,
                             components={k: v[i] for k, v in parts.items()}))
        return out

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score:
        return self.score_batch([prompt], [completion], [finished])[0]
