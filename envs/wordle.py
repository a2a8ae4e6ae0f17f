"""Multi-turn Wordle (`env=wordle`), the RL Diary's agent task.

Each turn the model writes a 5-letter guess in `<guess></guess>`; the environment answers
with per-letter feedback in text the model can read and the game so far, for up to
`max_turns` turns. A rollout is a whole game; the loss covers only the model's tokens
(runner/rollout/multiturn.py masks the environment's).

Words: the Wordle answer list that reasoning-gym ships (`reasoning_gym.data.wordle_words`),
used both as secrets (split into train and held-out eval by a fixed shuffle, the same for
every run) and as the allowed guesses. No hub access.

Reward (weights in the config): solved, plus a bonus for each turn left unused; a share
for well-formed, allowed guesses; partial credit from the best feedback seen (greens,
yellows); optional penalties for repeating a guess or guessing a word that contradicts
earlier feedback.

Demonstrations (`demonstrations`, for supervised warm starts) are games of `WordleSolver`
on training secrets: a fixed opening, then always the consistent candidate whose feedback
splits the remaining candidates best (highest entropy).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from envs.base import INVALID, Demonstration, Prompt, Score, after_prefix, require, shuffled_cycle

_GUESS = re.compile(r"<guess>(.*?)</guess>", re.DOTALL | re.IGNORECASE)
_OPEN = re.compile(r"<guess>\s*([A-Za-z]{5})\b", re.IGNORECASE)
GREEN, YELLOW, GRAY = "G", "Y", "."
NAMES = {GREEN: "green", YELLOW: "yellow", GRAY: "gray"}

RULES = ("Let's play Wordle. Guess the secret 5-letter English word in at most {turns} turns. "
         "After each guess you get feedback for every letter: green = right letter, right place; "
         "yellow = the letter is in the word but elsewhere; gray = not in the word (or not that many times). "
         "Write each guess as <guess>word</guess>.")


def feedback(secret: str, guess: str) -> str:
    """Per-letter marks for `guess` against `secret`, repeats handled as Wordle does:
    greens first, then yellows only while the secret still has unmatched copies."""
    secret, guess = secret.lower(), guess.lower()
    marks = [GRAY] * 5
    left: dict[str, int] = {}
    for i, (s, g) in enumerate(zip(secret, guess)):
        if s == g:
            marks[i] = GREEN
        else:
            left[s] = left.get(s, 0) + 1
    for i, g in enumerate(guess):
        if marks[i] != GREEN and left.get(g, 0) > 0:
            marks[i] = YELLOW
            left[g] -= 1
    return "".join(marks)


def feedback_text(guess: str, marks: str) -> str:
    return " ".join(f"{c.upper()}={NAMES[m]}" for c, m in zip(guess, marks))


def knowledge(history: list[tuple[str, str]]) -> str:
    """What all feedback so far says, in the form a small model can use without working it
    out from the per-guess marks: the letters known by position, the letters in the word
    whose place is unknown (with the places ruled out), and the letters not in it.

        Known: _ R _ _ E. In the word, place unknown: A (not 3rd). Not in the word: S L T.
    """
    fixed = ["_"] * 5
    present: dict[str, set[int]] = {}
    counted: set[str] = set()
    for guess, marks in history:
        for i, (c, m) in enumerate(zip(guess, marks)):
            if m == GREEN:
                fixed[i] = c.upper()
            elif m == YELLOW:
                present.setdefault(c, set()).add(i)
        counted |= {c for c, m in zip(guess, marks) if m != GRAY}
    for guess, marks in history:  # a gray copy of a letter that is in the word: not there either
        for i, (c, m) in enumerate(zip(guess, marks)):
            if m == GRAY and c in present:
                present[c].add(i)
    absent = sorted({c for g, marks in history for c, m in zip(g, marks) if m == GRAY} - counted)
    placed = {c.lower() for c in fixed if c != "_"}
    loose = [f"{c.upper()} (not {', '.join(_ORDINAL[i] for i in sorted(places))})"
             for c, places in sorted(present.items()) if c not in placed]
    parts = [f"Known: {' '.join(fixed)}."]
    if loose:
        parts.append(f"In the word, place unknown: {', '.join(loose)}.")
    if absent:
        parts.append(f"Not in the word: {' '.join(c.upper() for c in absent)}.")
    return " ".join(parts)


EVAL_SEED = 0  # the split of the word list into held-out and training secrets, for every run
_ORDINAL = ("1st", "2nd", "3rd", "4th", "5th")
FEEDBACK_FORMATS = ("marks", "summary")


def consistent(guess: str, history: list[tuple[str, str]]) -> bool:
    """Whether `guess` could still be the secret given every (guess, marks) so far."""
    return all(feedback(guess, g) == m for g, m in history)


class WordleSolver:
    """Plays hard-mode Wordle over `words`: every guess is a word that could still be the
    secret (consistent with all feedback so far), chosen as the one whose feedback splits the
    remaining candidates best: the least sum of n*log(n) over the feedback buckets (sizes n),
    i.e. the most expected information; ties broken by the caller's rng. On reasoning-gym's
    2315 words with the opening "slate" it wins 99.7% of games within 6 turns, in 3.52 turns
    on average (a random consistent guess after the same opening: 99.2%, 3.80 turns); the
    losses are families like _ound, _atch (tests/test_demonstrations.py).

    Speed: the opening's buckets are computed once; the best guesses for a candidate set are
    cached (the same set recurs across secrets); with more than `search_limit` candidates
    only that many guesses, drawn by the rng, are scored (only met without the fixed opening)."""

    OPENING = "slate"

    def __init__(self, words: list[str], opening: str = OPENING, search_limit: int = 300) -> None:
        self.words = sorted(set(words))
        self.search_limit = search_limit
        self._best: dict[tuple[str, ...], list[str]] = {}
        self.opening = opening if opening in self.words else self.best_guess(self.words, random.Random(0))
        self._after: dict[str, dict[str, list[str]]] = {}  # an opening's buckets, computed once each

    def after(self, opening: str) -> dict[str, list[str]]:
        if opening not in self._after:
            self._after[opening] = self.split(opening, self.words)
        return self._after[opening]

    @staticmethod
    def split(guess: str, candidates: list[str]) -> dict[str, list[str]]:
        """The candidates grouped by the feedback `guess` would get if each were the secret."""
        buckets: dict[str, list[str]] = {}
        for c in candidates:
            buckets.setdefault(feedback(c, guess), []).append(c)
        return buckets

    @staticmethod
    def spread(guess: str, candidates: list[str]) -> float:
        """Sum of n*log(n) over the buckets of `guess`: lower means more information."""
        return sum(n * math.log(n) for n in Counter(feedback(c, guess) for c in candidates).values())

    def best_guess(self, candidates: list[str], rng: random.Random) -> str:
        """The candidate with the least `spread` over `candidates` (one of the tied best)."""
        if len(candidates) > self.search_limit:  # too many to score all: a sample of guesses
            scored = {g: self.spread(g, candidates) for g in rng.sample(candidates, self.search_limit)}
            return min(scored, key=scored.__getitem__)
        key = tuple(candidates)
        if key not in self._best:
            scored = {g: self.spread(g, candidates) for g in candidates}
            low = min(scored.values())
            self._best[key] = sorted(g for g, v in scored.items() if v == low)
        return rng.choice(self._best[key])

    def solve(self, secret: str, rng: random.Random, max_turns: int = 6, opening: Optional[str] = None) -> list[str]:
        """The solver's guesses for `secret`, up to max_turns, from `opening` (None: its own);
        the last is the secret when it solved in time."""
        opening = opening or self.opening
        guesses, history = [opening], []
        while guesses[-1] != secret and len(guesses) < max_turns:
            history.append((guesses[-1], feedback(secret, guesses[-1])))
            if len(history) == 1:
                candidates = self.after(opening).get(history[0][1], [])
            else:
                candidates = [c for c in candidates if consistent(c, history[-1:])]
            if not candidates:  # a secret outside the word list: nothing consistent is left
                break
            guesses.append(self.best_guess(candidates, rng))
        return guesses


REWARD_WEIGHTS = {"solve": 1.0, "turn_bonus": 0.1, "format": 0.1, "partial": 0.2, "repeat": 0.0, "inconsistent": 0.0}


@dataclass
class Game:
    secret: str
    turns: list[dict] = field(default_factory=list)  # guess (or None), valid, marks, repeat, consistent
    done: bool = False
    solved: bool = False

    @property
    def history(self) -> list[tuple[str, str]]:
        return [(t["guess"], t["marks"]) for t in self.turns if t["valid"]]


@dataclass
class WordleEnv:
    # secrets and allowed guesses; None: reasoning-gym's Wordle list (5-letter words)
    words: Optional[list[str]] = None
    eval_size: int = 32  # held-out secrets, each played eval_k times at evaluation
    eval_k: int = 4
    seed: int = 0
    max_turns: int = 6
    assistant_prefix: str = "<guess>"
    system_prompt: Optional[str] = None
    # solve, turn_bonus (per unused turn when solved), format (x share of well-formed allowed
    # guesses), partial (x (greens + 0.5 yellows) / 5 of the best guess), repeat and
    # inconsistent (penalties per such guess); keys left out keep their defaults
    reward_weights: dict[str, float] = field(default_factory=lambda: dict(REWARD_WEIGHTS))
    # marks: each reply is the guess's per-letter marks and the game so far; summary: also what
    # all the feedback says (letters known by place, present elsewhere, absent: `knowledge`)
    feedback_format: str = "marks"
    # demonstrations' first guesses: the solver's own ("slate") for every game, or drawn
    # from this many of the best openings by the solver's information score (1: "slate" only)
    demo_openings: int = 1
    name: str = "wordle"

    @staticmethod
    def check_config(cfg: dict) -> None:
        require(1 <= cfg["max_turns"] <= 20, "max_turns", cfg["max_turns"], "must be in 1..20")
        require(cfg["eval_size"] >= 1, "eval_size", cfg["eval_size"], "must be >= 1")
        require(cfg["eval_k"] >= 1, "eval_k", cfg["eval_k"], "must be >= 1")
        require(cfg["feedback_format"] in FEEDBACK_FORMATS, "feedback_format", cfg["feedback_format"],
                f"must be one of {', '.join(FEEDBACK_FORMATS)}")
        require(isinstance(cfg["demo_openings"], int) and 1 <= cfg["demo_openings"] <= 256, "demo_openings",
                cfg["demo_openings"], "must be an integer in 1..256")
        for k, v in cfg["reward_weights"].items():
            require(k in REWARD_WEIGHTS, "reward_weights key", k, f"must be one of {', '.join(REWARD_WEIGHTS)}")
            require(isinstance(v, (int, float)) and v >= 0, f"reward_weights.{k}", v, "must be a number >= 0")

    def __post_init__(self) -> None:
        if self.words is None:
            from reasoning_gym.data.wordle_words import wordle_words

            self.words = sorted({w.lower() for w in wordle_words if len(w) == 5})
        for k, v in {**REWARD_WEIGHTS, **self.reward_weights}.items():
            setattr(self, f"w_{k}", float(v))
        self.answer_space = None
        self.valid_answers = None
        self.allowed = set(self.words)
        # the held-out secrets are the same whatever the run's seed (EVAL_SEED), so seeds, and
        # the stages of a recipe run at different seeds, are judged on the same games and never
        # train on each other's held-out words; the run's seed orders the training secrets
        order = list(self.words)
        random.Random(EVAL_SEED).shuffle(order)
        self.eval_secrets = order[: self.eval_size]
        self.train_secrets = order[self.eval_size:]
        random.Random(self.seed).shuffle(self.train_secrets)

    # -- demonstrations --------------------------------------------------------------------
    @property
    def solver(self) -> WordleSolver:
        """The solver over this env's words, built on first use (its caches are kept)."""
        if getattr(self, "_solver", None) is None:
            self._solver = WordleSolver(self.words)
        return self._solver

    def solve(self, secret: str, rng: random.Random, opening: Optional[str] = None) -> list[str]:
        """The solver's guesses for `secret` within this env's max_turns."""
        return self.solver.solve(secret, rng, self.max_turns, opening)

    def openings(self) -> list[str]:
        """The demonstrations' first guesses: the solver's own, then the next best words by its
        information score over all words (`demo_openings` of them), so SFT does not teach
        one opening to every game (a policy that always opens the same way gives a shaper
        over openings nothing to spread)."""
        if self.demo_openings == 1:
            return [self.solver.opening]
        if getattr(self, "_openings", None) is None:
            # scoring every word takes ~30 s: score the words richest in common letters
            freq = Counter(c for w in self.words for c in set(w))
            rich = sorted(self.words, key=lambda w: (-sum(freq[c] for c in set(w)), w))[:max(64, 4 * self.demo_openings)]
            scored = sorted(rich, key=lambda w: (self.solver.spread(w, self.words), w))
            rest = [w for w in scored if w != self.solver.opening]
            self._openings = [self.solver.opening, *rest[:self.demo_openings - 1]]
        return self._openings

    def turn_text(self, guess: str) -> str:
        """A guess as the model writes it after each turn's assistant prefix (`play` reads
        prefix + this): "crane</guess>" with the default prefix "<guess>"."""
        return after_prefix(self.assistant_prefix, f"<guess>{guess}</guess>")

    def demonstrations(self, n: int, seed: int) -> list[Demonstration]:
        """n solver games on training secrets (a seeded shuffle, each secret once before any
        repeats), only games the solver won within max_turns; the turns are the model's
        texts, the replies come from replaying them through `new_game`/`play`."""
        rng = random.Random(seed)
        out: list[Demonstration] = []
        misses = 0  # lost games since the last won one
        for i in shuffled_cycle(len(self.train_secrets), rng):
            if len(out) >= n:
                break
            secret = self.train_secrets[i]
            openings = self.openings()
            guesses = self.solve(secret, rng, openings[0] if len(openings) == 1 else rng.choice(openings))
            if guesses[-1] != secret:
                misses += 1
                # two passes' worth of draws hold every secret at least once: none was won
                if misses >= 2 * len(self.train_secrets):
                    raise ValueError(f"max_turns={self.max_turns}: the solver wins no training game")
                continue
            misses = 0
            out.append(Demonstration(self._prompt("train", i), turns=tuple(map(self.turn_text, guesses))))
        return out

    # -- prompts ---------------------------------------------------------------------------
    def _prompt(self, split: str, i: int) -> Prompt:
        messages = [("user", RULES.format(turns=self.max_turns) + " Your first guess?")]
        if self.system_prompt is not None:
            messages.insert(0, ("system", self.system_prompt))
        return Prompt(tuple(messages), self.assistant_prefix, key=(split, i))

    def prompts(self, step: int, n: int) -> list[Prompt]:
        size = len(self.train_secrets)
        return [self._prompt("train", (step * n + j) % size) for j in range(n)]

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt("eval", i) for i in range(len(self.eval_secrets))]

    def reference(self, prompt: Prompt) -> str:
        """The secret (samples.md shows it beside the game)."""
        return self.secret(prompt)

    def secret(self, prompt: Prompt) -> str:
        split, i = prompt.key
        return (self.train_secrets if split == "train" else self.eval_secrets)[i]

    # -- the game --------------------------------------------------------------------------
    def new_game(self, prompt: Prompt) -> Game:
        return Game(self.secret(prompt))

    def parse_guess(self, text: str) -> Optional[str]:
        found = _GUESS.findall(text)
        word = found[0].strip().lower() if len(found) == 1 else None
        if word is None and not found:  # the tag left open: take a 5-letter word right after it
            m = _OPEN.search(text)
            word = m.group(1).lower() if m else None
        return word if word and re.fullmatch(r"[a-z]{5}", word) else None

    def play(self, game: Game, turn_text: str) -> Optional[str]:
        """Apply one model turn; the environment's reply, or None when the game is over."""
        guess = self.parse_guess(self.assistant_prefix + turn_text)
        valid = guess is not None and guess in self.allowed
        turn = {"guess": guess, "valid": valid, "marks": None, "repeat": False, "consistent": True}
        if valid:
            turn["repeat"] = any(t["guess"] == guess for t in game.turns)
            turn["consistent"] = consistent(guess, game.history)
            turn["marks"] = feedback(game.secret, guess)
        game.turns.append(turn)
        if valid and guess == game.secret:
            game.done = game.solved = True
            return None
        if len(game.turns) >= self.max_turns:
            game.done = True
            return None
        if not valid:
            why = "not a 5-letter word in <guess></guess> tags" if guess is None else f"'{guess}' is not in the word list"
            reply = f"Invalid guess ({why}); it still costs a turn."
        else:
            reply = f"{guess.upper()}: {feedback_text(guess, turn['marks'])}"
        lines = [f"{t['guess'].upper()}: {feedback_text(t['guess'], t['marks'])}" for t in game.turns if t["valid"]]
        if self.feedback_format == "summary" and game.history:
            lines.append(knowledge(game.history))
        left = self.max_turns - len(game.turns)
        return f"{reply}\nSo far:\n" + "\n".join(lines) + f"\n{left} turn(s) left. Next guess?"

    def score_game(self, game: Game) -> Score:
        n = max(len(game.turns), 1)
        valid = [t for t in game.turns if t["valid"]]
        reward = self.w_format * len(valid) / n
        if game.solved:
            reward += self.w_solve + self.w_turn_bonus * (self.max_turns - len(game.turns))
        elif valid:
            best = max(t["marks"].count(GREEN) + 0.5 * t["marks"].count(YELLOW) for t in valid)
            reward += self.w_partial * best / 5
        reward -= self.w_repeat * sum(t["repeat"] for t in valid)
        reward -= self.w_inconsistent * sum(not t["consistent"] for t in valid)
        opening = game.turns[0]["guess"] if game.turns and game.turns[0]["valid"] else None
        # shapers cluster on the opening guess: the diversity question for this environment
        return Score(reward=reward, answer_key=opening or INVALID, exact_format=len(valid) == len(game.turns),
                     correct=game.solved)

    def score(self, prompt: Prompt, completion: str, finished: bool) -> Score:
        """A single-turn reading (used only if a game was not played turn by turn)."""
        game = self.new_game(prompt)
        self.play(game, completion)
        return self.score_game(game)

    def game_metrics(self, games: list[Game], prefix: str) -> dict[str, float]:
        from collections import Counter

        from runner.track.metrics import entropy

        n = max(len(games), 1)
        solved = [g for g in games if g.solved]
        turns = [t for g in games for t in g.turns]
        later = [t for g in games for t in [u for u in g.turns if u["valid"]][1:]]
        openings = Counter(g.turns[0]["guess"] if g.turns and g.turns[0]["valid"] else INVALID for g in games)
        m = {f"{prefix}/solve_rate": len(solved) / n,
             f"{prefix}/turns_to_solve": sum(len(g.turns) for g in solved) / len(solved) if solved else float(self.max_turns + 1),
             f"{prefix}/invalid_guess_rate": sum(not t["valid"] for t in turns) / max(len(turns), 1),
             f"{prefix}/repeat_rate": sum(t["repeat"] for t in turns) / max(len(turns), 1),
             # of the valid guesses after a game's first valid one: could still be the secret given the
             # feedback before them (whether the model *uses* the feedback; 1.0 for the solver)
             f"{prefix}/consistent_rate": sum(t["consistent"] for t in later) / len(later) if later else 0.0,
             f"{prefix}/opening_entropy": entropy({k: v / n for k, v in openings.items()}),
             f"{prefix}/opening_distinct": float(len(openings)),
             f"{prefix}/opening_top_share": openings.most_common(1)[0][1] / n if openings else 0.0}
        return m
