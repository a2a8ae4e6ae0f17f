"""The supervised step kind (algo=sft): a step trains on a batch of examples instead of rollouts.

Everything else is the RL job's: the output dir, checkpoints and resume, MLflow, the budget,
signals, the environment's own evaluation and the export. The update is the learner's too:
an example is a RolloutBatch row whose completion is the example's text, its advantage is 1
and the loss is runner/algo/loss.py at clip_mode=nll, so the loss is the mean negative
log-likelihood of the completion tokens, with the same micro-batches, shared-prefix and
padding-free passes, LoRA and DeepSpeed paths as RL's.

What the model sees is what it sees at RL time: prompts get the chat template and the
environment's assistant prefix (the completion is what follows the prefix), a game's turns
are separated by the environment's replies as the multi-turn rollout renders them, and
those replies carry no loss (TRL's completion_only_loss / assistant-only loss).

The examples come from `sft.data` (TRL's formats, read and checked by envs/data_files.py) or
the environment's `demonstrations(n, seed)`. Step s trains on a fixed slice of a seeded
per-epoch order, so a resumed run trains on exactly the examples an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from envs.base import Demonstration, Prompt
from runner.config import ConfigError
from runner.loop.step_kind import StepKind
from runner.rollout.hf import RolloutBatch, render
from runner.rollout.multiturn import assemble, between_turns


@dataclass(frozen=True)
class Example:
    """One supervised example: the prompt, and the model's text after its assistant prefix
    (single-turn), or its turns with what comes between them (a game's replies)."""

    prompt: Prompt
    turns: tuple[str, ...]
    replies: tuple[str, ...] = ()  # len(turns) - 1 texts between the turns; () for one turn


@dataclass
class Encoded:
    prompt_ids: list[int]
    comp: list[int]
    train: list[int]  # 1: the model's token (in the loss), 0: the environment's
    turn_of: Optional[list[int]]


# -- where examples come from ----------------------------------------------------------------

def play_through(env, prompt: Prompt, turns) -> tuple[tuple[str, ...], Any]:
    """(the environment's replies between the turns, the finished game): a game's turns
    replayed through new_game/play, so its replies are exactly the ones RL rollouts see
    (a demonstration's here, a sampled game's in runner.generate)."""
    game, replies = env.new_game(prompt), []
    for turn in turns[:-1]:
        reply = env.play(game, turn)
        replies.append(reply if reply is not None else "")
    env.play(game, turns[-1])
    return tuple(replies), game


def from_demonstrations(env, demos: list[Demonstration]) -> list[Example]:
    """The environment's own examples; a game's replies are made by replaying its turns."""
    out = []
    for d in demos:
        if d.turns is None:
            out.append(Example(d.prompt, (d.completion or "",)))
            continue
        replies, _ = play_through(env, d.prompt, d.turns)
        out.append(Example(d.prompt, tuple(d.turns), replies))
    return out


def _messages(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [("user", value)]
    return [(m["role"], m["content"]) for m in value]


def from_rows(rows, prefix: str, system_prompt: Optional[str], where: str) -> list[Example]:
    """TRL's dataset formats: `prompt` + `completion` columns (each a string or messages), or
    a `messages` conversation (the prompt is what precedes the first assistant message; later
    user messages are the replies between turns). A completion that starts with the
    environment's assistant prefix has it taken off (the prompt ends with it)."""
    cols = set(rows.column_names)
    out = []
    for i, row in enumerate(rows):
        if "messages" in cols and "completion" not in cols:
            msgs = _messages(row["messages"])
            first = next((j for j, (r, _) in enumerate(msgs) if r == "assistant"), None)
            if first is None:
                raise ConfigError(f"sft.data: {where} row {i + 1}: the conversation has no assistant message")
            prompt_msgs, rest = msgs[:first], msgs[first:]
        elif {"prompt", "completion"} <= cols:
            prompt_msgs = _messages(row["prompt"])
            c = row["completion"]
            rest = [("assistant", c)] if isinstance(c, str) else _messages(c)
        else:
            raise ConfigError(f"sft.data: {where} has columns {', '.join(sorted(cols))}; give prompt and completion "
                              f"columns, or a messages column (TRL's formats)")
        while rest and rest[-1][0] != "assistant":
            rest = rest[:-1]  # a trailing user message has nothing to learn from
        turns = [c for r, c in rest if r == "assistant"]
        replies = [c for r, c in rest if r != "assistant"]
        if not turns or len(replies) != len(turns) - 1:
            raise ConfigError(f"sft.data: {where} row {i + 1}: assistant and user messages must alternate after "
                              f"the prompt")
        if system_prompt is not None and not any(r == "system" for r, _ in prompt_msgs):
            prompt_msgs.insert(0, ("system", system_prompt))
        turns[0] = turns[0][len(prefix):] if prefix and turns[0].startswith(prefix) else turns[0]
        out.append(Example(Prompt(tuple(prompt_msgs), prefix), tuple(turns), tuple(replies)))
    return out


def load_examples(cfg, env) -> tuple[list[Example], str]:
    """(examples, where they came from) for the run's config; refused in one line when there
    is nothing to train on. Called before the model loads."""
    f = cfg.sft
    if f.data:
        from envs.data_files import load_rows

        rows = load_rows(f.data, "sft.data")
        prefix = getattr(env, "assistant_prefix", "") or ""
        return from_rows(rows, prefix, getattr(env, "system_prompt", None), str(Path(f.data).resolve())), \
            f"file {Path(f.data).resolve()}"
    if not callable(getattr(env, "demonstrations", None)):
        raise ConfigError(f"algo=sft: env {cfg.env.name!r} has no demonstrations(n, seed) and sft.data is null; "
                          f"give sft.data=FILE (prompt/completion or messages rows)")
    demos = env.demonstrations(f.demonstrations, cfg.seed)
    return from_demonstrations(env, demos), f"{len(demos)} demonstrations of env {cfg.env.name} (seed {cfg.seed})"


def digest(examples: list[Example]) -> str:
    """What the run trained on, as one SHA-256 (tagged on the run: a resume on other data shows)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt.messages, e.prompt.assistant_prefix, e.turns, e.replies]).encode())
    return h.hexdigest()


# -- examples as token rows ----------------------------------------------------------------

def encode(tok, ex: Example, max_length: int, truncate: bool, where: str) -> tuple[Encoded, bool]:
    """Token ids as RL rollouts have them: the rendered prompt, then each turn's tokens and
    the end-of-turn token (trained on), then the environment's reply (not); returns whether
    it was cut to max_length."""
    prompt_ids = tok(render(tok, ex.prompt), add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    comp: list[int] = []
    train: list[int] = []
    turn_of: list[int] = []
    for t, text in enumerate(ex.turns):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [eos]
        comp += ids
        train += [1] * len(ids)
        turn_of += [t] * len(ids)
        if t < len(ex.replies):
            env_ids = between_turns(tok, ex.prompt, ex.replies[t], eos)
            comp += env_ids
            train += [0] * len(env_ids)
            turn_of += [-1] * len(env_ids)
    cut = len(comp) > max_length
    if cut and not truncate:
        raise ConfigError(f"sft.max_length={max_length}: {where} has {len(comp)} completion tokens; raise "
                          f"sft.max_length, or pass sft.truncation=truncate to cut such examples (counted)")
    if cut:
        comp, train, turn_of = comp[:max_length], train[:max_length], turn_of[:max_length]
    multi = len(ex.turns) > 1
    return Encoded(prompt_ids, comp, train, turn_of if multi else None), cut


class SFTData:
    """The run's examples, split into training and held-out ones, and the batch of each step."""

    def __init__(self, cfg, env) -> None:
        self.cfg = cfg
        self.examples, self.source = load_examples(cfg, env)
        f = cfg.sft
        world = cfg.trainer.num_procs if cfg.trainer.name == "deepspeed" else 1
        if f.batch_size % world:
            raise ConfigError(f"sft.batch_size={f.batch_size}: must split evenly over trainer.num_procs={world} "
                              f"ranks (each trains on its share of a step's examples)")
        if len(self.examples) <= f.eval_size:
            raise ConfigError(f"sft.eval_size={f.eval_size}: {self.source} holds {len(self.examples)} examples and "
                              f"at least one must be left to train on; hold out fewer or give more data")
        order = list(range(len(self.examples)))
        random.Random(cfg.seed).shuffle(order)
        self.heldout = order[:f.eval_size]
        self.train = order[f.eval_size:]
        self.digest = digest(self.examples)
        self.encoded: list[Encoded] = []
        self.truncated = 0

    def tokenize(self, tok) -> None:
        """Every example's tokens, once (after the tokenizer loads); a too-long one is refused
        or cut as sft.truncation says."""
        f = self.cfg.sft
        self.tok = tok
        self.encoded = []
        for i, ex in enumerate(self.examples):
            enc, cut = encode(tok, ex, f.max_length, f.truncation == "truncate", f"example {i + 1} of {self.source}")
            self.encoded.append(enc)
            self.truncated += int(cut)

    def rows_for(self, step: int) -> list[int]:
        """The examples of step `step` (1-based): consecutive slices of a seeded order that is
        shuffled anew each epoch, so any step's batch is known without state."""
        b, n = self.cfg.sft.batch_size, len(self.train)
        out = []
        for k in range((step - 1) * b, step * b):
            epoch, j = divmod(k, n)
            order = list(self.train)
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            out.append(order[j])
        return out

    def epoch(self, step: int) -> float:
        return step * self.cfg.sft.batch_size / len(self.train)

    def batch(self, rows: list[int], device) -> RolloutBatch:
        """The rows as one batch, grouped by prompt (the shared-prefix forward runs each prompt once)."""
        encs = [self.encoded[i] for i in rows]
        keys = [tuple(e.prompt_ids) for e in encs]
        group_of = {k: g for g, k in enumerate(dict.fromkeys(keys))}
        multi = any(e.turn_of is not None for e in encs)
        turn_of = [e.turn_of if e.turn_of is not None else [0] * len(e.comp) for e in encs] if multi else None
        return assemble(self.tok, [self.examples[i].prompt for i in rows], [group_of[k] for k in keys],
                        [e.prompt_ids for e in encs], [e.comp for e in encs], [e.train for e in encs], turn_of,
                        device, finished=[True] * len(rows))


class SFTStep(StepKind):
    """The supervised step kind: its examples are read and checked when the job is made
    (before the model loads), tokenized with the tokenizer alone (a too-long example is
    refused before the weights load), and a step trains on the slice rows_for(step)."""

    # only evaluations sample: the rollout copy is refreshed just before one (runner/train.py)
    samples_each_step = False

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.algo.clip_mode != "nll":
            raise ConfigError(f"algo.clip_mode={cfg.algo.clip_mode!r}: must be nll with algo.kind=sft (the "
                              f"supervised loss: -logp of the example's tokens)")

    def __init__(self, cfg, env) -> None:
        super().__init__(cfg, env)
        self.data = SFTData(cfg, env)

    def before_weights(self, load_tokenizer) -> None:
        self.data.tokenize(load_tokenizer())

    def tags(self) -> dict[str, Any]:
        d = self.data  # a resume on other data shows as a changed digest
        return {"sft.data": d.source, "sft.examples": len(d.examples), "sft.data_sha256": d.digest,
                "sft.truncated": d.truncated}

    def log_inputs(self, tracker) -> None:
        """sft.data as the run's training dataset (a file generated by an earlier stage is
        matched to the run that made it by its SHA-256, runner/track/inputs.py)."""
        path = self.cfg.sft.data
        if not path:
            return
        from envs.data_files import load_rows
        from runner.digests import tree_sha256
        from runner.track.inputs import rows_schema

        rows = load_rows(path, "sft.data")  # read once already, before the model loaded (kept in memory)
        tracker.log_input(Path(path), tree_sha256(Path(path)), len(rows), "training",
                          rows_schema([rows[0]]) if len(rows) else None)

    def step(self, t) -> dict[str, float]:
        """This rank's share of the step's examples (under DeepSpeed the learner normalises by
        whole-batch counts over the ranks), advantage 1, the learner's update."""
        data = self.data
        t0 = time.perf_counter()
        batch = data.batch(t.backend.my_prompts(data.rows_for(t.step)), t.device)
        m = t.update(batch, torch.ones(len(batch), device=t.device), [])
        tokens = t.backend.all_sum([float(batch.completion_mask.sum().item())])[0]
        return {**m, "sft/loss": m["train/loss"], "sft/tokens": tokens, "sft/epoch": data.epoch(t.step),
                "sft/truncated_total": float(data.truncated), "time/train_s": time.perf_counter() - t0}

    @torch.no_grad()
    def eval_metrics(self, t) -> dict[str, float]:
        """Mean negative log-likelihood of the held-out examples' trained-on tokens."""
        from runner.algo.forward import sequence_logprobs

        data = self.data
        if not data.heldout:
            return {}
        total, count = 0.0, 0.0
        b = max(1, data.cfg.sft.batch_size)
        model = t.eval_model  # what evaluations read (under ZeRO-3: the gathered copy; rank 0 alone runs this)
        was_training = model.training
        model.eval()  # no dropout (LoRA's) in a measurement
        try:
            for i in range(0, len(data.heldout), b):
                batch = data.batch(data.heldout[i:i + b], t.device)
                with t.autocast():
                    logp, _ = sequence_logprobs(model, batch, t.cfg.trainer.shared_prefix, 1.0,
                                                t.cfg.trainer.padding_free)
                mask = batch.completion_mask
                total += float(-(logp * mask).sum())
                count += float(mask.sum())
        finally:
            model.train(was_training)
        return {"eval/sft_loss": total / max(count, 1.0), "eval/sft_tokens": count}

    def progress(self, m: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{m['sft/loss']:.3f}", "epoch": f"{m['sft/epoch']:.2f}"}
