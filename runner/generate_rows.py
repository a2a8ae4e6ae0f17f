"""What a generate stage writes (runner/generate.py is the stage around it): candidates from
the environment's expert or sampled from a model, scored by the environment's own score,
turned into rows of TRL's formats (as runner/loop/sft_step.py `from_rows` reads them back)
and selected by reward, top fraction and duplicates."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from runner.config import ConfigError

if TYPE_CHECKING:
    from runner.generate import GenerateConfig


@dataclass
class Candidate:
    """One sampled or expert example before selection: the prompt, the model's turns (one for
    a single-turn environment), the prompt's group, and whether the model stopped by itself."""

    prompt: Any  # envs.base.Prompt
    turns: tuple[str, ...]
    group: int
    finished: bool = True
    replies: tuple[str, ...] = ()
    reward: float = 0.0
    tokens: int = 0  # what the model generated for it (0: an expert's)


@dataclass
class Selection:
    kept: list[int]
    dropped_reward: int = 0
    dropped_duplicate: int = 0


@dataclass
class Outcome:
    """What a generation made, for the provenance, the metrics and the summary line."""

    rows: list[dict]
    sampled: int
    selection: Selection
    reward_errors: int = 0
    generated_tokens: int = 0  # every sampled candidate's tokens, kept or not: what the data cost

    @property
    def mean_reward(self) -> float:
        return sum(r["reward"] for r in self.rows) / len(self.rows) if self.rows else float("nan")


class NothingKept(RuntimeError):
    """Every row was dropped: no file is written (an SFT stage would have nothing to train on)."""


# -- candidates: the environment's expert, or samples from the model -----------------------

def demonstration_candidates(env, gen: GenerateConfig, seed: int) -> list[Candidate]:
    """The environment's expert examples; its refusal (a ValueError naming its key, as
    check_config's) is one line naming env.<key>."""
    try:
        demos = env.demonstrations(gen.get("n"), seed)
    except ValueError as e:
        raise ConfigError(f"env.{str(e).strip().splitlines()[0]}") from None
    return [Candidate(d.prompt, (d.completion or "",) if d.turns is None else tuple(d.turns), group=i)
            for i, d in enumerate(demos)]


def load_sampler(cfg):
    """(rollout model, tokenizer, device) as the trainer makes them: seeded, the weights the
    rollouts sample from in rollout.dtype (runner.backend.rollout_copy)."""
    import random

    import numpy as np
    import torch

    from runner.backend import rollout_copy
    from runner.models import load_policy
    from runner.train import pick_device

    try:
        device = pick_device(cfg.trainer.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tok = load_policy(cfg.model, device)
    return rollout_copy(model, cfg.rollout.dtype, device).eval(), tok


def make_sampler(cfg, env):
    """The trainer's rollout route without a Trainer: HFRollout, wrapped for a game."""
    from runner.rollout.hf import make_rollout

    rollout = make_rollout(cfg.rollout, cfg.algo.loss_temperature)
    if hasattr(env, "new_game"):
        from runner.rollout.multiturn import MultiTurnRollout

        rollout = MultiTurnRollout(env, rollout)
    return rollout


def turn_texts(batch, tok, row: int) -> tuple[str, ...]:
    """A multi-turn row's model turns as the environment read them: each turn's sampled
    tokens decoded without special tokens (runner/rollout/multiturn.py does the same)."""
    comp = batch.completion_ids[row].tolist()
    turn_of = batch.token_turn[row].tolist()
    turns = max(turn_of, default=-1) + 1
    return tuple(tok.decode([t for t, u in zip(comp, turn_of) if u == n], skip_special_tokens=True)
                 for n in range(turns))


def sampled_candidates(cfg, env, gen: GenerateConfig) -> list[Candidate]:
    """k samples of each of the env's first `prompts` prompts, `batch_prompts` prompts a call."""
    model, tok = load_sampler(cfg)
    rollout = make_sampler(cfg, env)
    prompts = env.prompts(0, gen.get("prompts"))
    k, size = gen.get("k"), gen.get("batch_prompts")
    out: list[Candidate] = []
    for start in range(0, len(prompts), size):
        batch = rollout.generate(model, tok, prompts[start:start + size], k)
        groups = batch.groups.tolist()
        lengths = batch.completion_lengths.tolist()  # counted as a training step counts tokens/generated
        for i in range(len(batch)):
            turns = turn_texts(batch, tok, i) if batch.token_turn is not None else (batch.completions[i],)
            out.append(Candidate(batch.prompts[i], turns, start + groups[i], bool(batch.finished[i]),
                                 tokens=int(lengths[i])))
    return out


# -- scoring: the environment's own, through the trainer's reward clock --------------------

@dataclass
class _Texts:
    """The fields of a RolloutBatch that Collector.score_batch reads, for texts alone."""

    prompts: list
    completions: list[str]
    finished: list[bool]
    episodes: Optional[list] = None


def score(collector, env, cands: list[Candidate]) -> None:
    """Each candidate's reward (and a game's replies), in place: score_game on the replayed
    game, else the env's score_batch or score (runner.loop.collector: timeouts, reward errors)."""
    if hasattr(env, "new_game"):
        from runner.loop.sft_step import play_through  # the SFT stage's own replay

        for c in cands:
            c.replies, game = play_through(env, c.prompt, c.turns)
            c.reward = float(collector.score(c.prompt, "".join(c.turns), c.finished, episode=game).reward)
        return
    scores = collector.score_batch(_Texts([c.prompt for c in cands], [c.turns[0] for c in cands],
                                          [c.finished for c in cands]))
    for c, s in zip(cands, scores):
        c.reward = float(s.reward)


# -- rows: TRL's formats, as sft_step.from_rows reads them -----------------------------------

def first_turn(prefix: str, text: str) -> str:
    """The first turn as written to the file: the text after the assistant prefix, except that
    a text that itself starts with the prefix gets it in front again, since the reader takes
    the prefix off a first turn that starts with it (from_rows); so it always reads back as
    `text`."""
    return prefix + text if prefix and text.startswith(prefix) else text


def row_of(c: Candidate, env) -> dict[str, Any]:
    """A candidate as a JSONL row: prompt/completion (one turn) or messages (a game)."""
    prefix = getattr(env, "assistant_prefix", "") or ""  # what the reader takes off (sft_step.load_examples)
    prompt = [{"role": r, "content": t} for r, t in c.prompt.messages]
    turns = [first_turn(prefix, c.turns[0]), *c.turns[1:]]
    if not hasattr(env, "new_game"):
        return {"prompt": prompt, "completion": turns[0], "reward": c.reward}
    messages = list(prompt)
    for i, turn in enumerate(turns):
        messages.append({"role": "assistant", "content": turn})
        if i < len(c.replies):
            messages.append({"role": "user", "content": c.replies[i]})
    return {"messages": messages, "reward": c.reward}


def row_key(row: dict[str, Any]) -> str:
    """What makes two rows the same example: everything but the reward."""
    return json.dumps({k: v for k, v in row.items() if k != "reward"}, sort_keys=True)


def select(cands: list[Candidate], rows: list[dict], gen: GenerateConfig) -> Selection:
    """Which rows are kept: duplicates dropped first (where dedup), then min_reward, or per
    prompt the best ceil(top_fraction * k) of its distinct rows (ties in sampling order)."""
    sel = Selection(kept=[])
    seen: set[str] = set()
    distinct = []
    for i, row in enumerate(rows):
        key = row_key(row)
        if gen.get("dedup") and key in seen:
            sel.dropped_duplicate += 1
            continue
        seen.add(key)
        distinct.append(i)
    if gen.top_fraction is not None:
        keep = math.ceil(gen.top_fraction * gen.get("k"))
        groups: dict[int, list[int]] = {}
        for i in distinct:
            groups.setdefault(cands[i].group, []).append(i)
        best = {i for idx in groups.values() for i in sorted(idx, key=lambda i: -cands[i].reward)[:keep]}
        sel.kept = [i for i in distinct if i in best]
    elif gen.min_reward is not None:
        sel.kept = [i for i in distinct if cands[i].reward >= gen.min_reward]
    else:
        sel.kept = distinct
    sel.dropped_reward = len(distinct) - len(sel.kept)
    return sel


def make_rows(cfg, env, gen: GenerateConfig, where: Path) -> Outcome:
    """Candidates from the source, scored, turned into rows and selected."""
    from runner.loop.collector import Collector

    cands = (demonstration_candidates(env, gen, cfg.seed) if gen.source == "demonstrations"
             else sampled_candidates(cfg, env, gen))
    collector = Collector(cfg, env, None, where)  # reward errors are logged beside the data file
    score(collector, env, cands)
    rows = [row_of(c, env) for c in cands]
    sel = select(cands, rows, gen)
    return Outcome([rows[i] for i in sel.kept], len(cands), sel, collector.reward_errors,
                   sum(c.tokens for c in cands))
