"""Multi-turn rollouts: the model and the environment take turns until the game ends.

A rollout is a whole episode, kept as token ids that are never re-tokenised: the prompt,
then for each turn the model's sampled tokens (trained on: `completion_mask` 1) and the
environment's reply rendered by the chat template (attended to, never trained on: mask
0). The training forward therefore sees exactly the context the model sampled in.

Each turn samples from every unfinished episode at once (left-padded contexts, the same
lean sampling loop as single-turn rollouts, one sample per context). With eager decode steps
the episodes' KV cache is kept from turn to turn, so a turn prefills only what is new since
the last one (the model's sampled turn and the environment's reply) instead of the whole
episode again: on a 6-turn Wordle game of ~600 tokens that is ~2.3k prefilled tokens an
episode down to ~0.6k. Each turn's new tokens are left-padded to a common width, so an
episode's cache holds masked gaps; positions count only real tokens, as in one long prefill.
(The fused kernel keeps its own cache per call: with it every turn prefills the episode.)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from envs.base import Prompt
from runner.rollout.hf import HFRollout, Prefix, RolloutBatch, eos_token_ids, render

MARK = "\u0394\u0394MARK\u0394\u0394"


def reply_text(tokenizer, prompt: Prompt, reply: str) -> str:
    """What the chat template writes between the end of an assistant turn and the start of
    the next one, around the environment's reply (plus the assistant prefix)."""
    messages = [{"role": r, "content": c} for r, c in prompt.messages]
    messages += [{"role": "assistant", "content": MARK}, {"role": "user", "content": reply}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text[text.index(MARK) + len(MARK):] + prompt.assistant_prefix


class MultiTurnRollout:
    def __init__(self, env, base: HFRollout, reuse_cache: bool = True) -> None:
        self.env = env
        self.base = base
        self.reuse_cache = reuse_cache  # False: every turn prefills the whole episode (the reference)
        self.max_new_tokens = base.max_new_tokens  # per turn

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: Sequence[Prompt], group_size: int,
                 temperature: Optional[float] = None) -> RolloutBatch:
        device = next(model.parameters()).device
        temperature = temperature or self.base.temperature
        eos = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        rows = [p for p in prompts for _ in range(group_size)]
        groups = [i for i in range(len(prompts)) for _ in range(group_size)]
        prompt_ids = [tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in rows]
        games = [self.env.new_game(p) for p in rows]
        comp: list[list[int]] = [[] for _ in rows]
        train: list[list[int]] = [[] for _ in rows]  # 1: model token, 0: environment token
        turn_of: list[list[int]] = [[] for _ in rows]
        was_training = model.training
        model.eval()
        past = None if self.base.fused(model) or not self.reuse_cache else Prefix()
        cached = [0] * len(rows)  # tokens of each episode already in `past`
        playing: list[int] = []  # the episodes `past` holds, in its row order
        try:
            for turn in range(self.env.max_turns):
                active = [i for i, g in enumerate(games) if not g.done]
                if not active:
                    break
                if past is not None and playing and playing != active:
                    past.select([playing.index(i) for i in active])
                ctx = [(prompt_ids[i] + comp[i])[cached[i]:] for i in active]
                width = max(len(c) for c in ctx)
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in ctx], device=device)
                attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctx], device=device)
                toks, _ = self.base._sample_loop(model, ids, attn, 1, eos, pad, temperature, past)
                if past is not None:
                    playing = active
                    for i in active:
                        cached[i] = len(prompt_ids[i]) + len(comp[i])
                for row, i in enumerate(active):
                    sampled = toks[row].tolist()
                    ended = next((j for j, t in enumerate(sampled) if t in eos), None)
                    sampled = sampled[: ended + 1] if ended is not None else sampled
                    comp[i] += sampled
                    train[i] += [1] * len(sampled)
                    turn_of[i] += [turn] * len(sampled)
                    text = tokenizer.decode(sampled, skip_special_tokens=True)
                    reply = self.env.play(games[i], text)
                    if reply is not None:
                        env_ids = between_turns(tokenizer, rows[i], reply, sampled[-1] if ended is not None else None)
                        comp[i] += env_ids
                        train[i] += [0] * len(env_ids)
                        turn_of[i] += [-1] * len(env_ids)
        finally:
            model.train(was_training)
        return assemble(tokenizer, rows, groups, prompt_ids, comp, train, turn_of, device,
                        finished=[g.done for g in games], episodes=games)


def between_turns(tokenizer, prompt: Prompt, reply: str, closed_with: Optional[int]) -> list[int]:
    """The tokens between a model turn and the next: the environment's reply as the chat
    template renders it, plus the assistant prefix. `closed_with`: the end-of-turn token the
    model's turn ended with, whose text the template would otherwise write a second time."""
    between = reply_text(tokenizer, prompt, reply)
    if closed_with is not None:
        eos_text = tokenizer.decode([closed_with])
        between = between[len(eos_text):] if between.startswith(eos_text) else between
    return tokenizer(between, add_special_tokens=False)["input_ids"]


def assemble(tokenizer, rows: Sequence[Prompt], groups: Sequence[int], prompt_ids: list[list[int]],
             comp: list[list[int]], train: list[list[int]], turn_of: Optional[list[list[int]]], device,
             finished: list[bool], episodes: Optional[list] = None) -> RolloutBatch:
    """A batch from token lists: prompts left-padded, completions right-padded; `train` 1 on
    the model's own tokens (the loss's), 0 on the environment's; `turn_of` the model turn of
    each completion token (-1: the environment's), None for single-turn rows. Sampled
    episodes and supervised examples (runner/loop/sft_step.py) are assembled alike."""
    pad = tokenizer.pad_token_id
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in comp))
    input_ids = torch.tensor([[pad] * (P - len(p)) + p + c + [pad] * (C - len(c))
                              for p, c in zip(prompt_ids, comp)], device=device)
    attention = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c))
                              for p, c in zip(prompt_ids, comp)], device=device)
    mask = torch.tensor([m + [0] * (C - len(m)) for m in train], device=device, dtype=torch.bool)
    turns = None if turn_of is None else torch.tensor([t + [-1] * (C - len(t)) for t in turn_of], device=device)
    texts = [tokenizer.decode([t for t, m in zip(c, tm) if m], skip_special_tokens=True)
             for c, tm in zip(comp, train)]
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, completion_mask=mask, prompt_len=P,
        groups=torch.tensor(list(groups), device=device), prompts=list(rows), completions=texts,
        finished=finished, episodes=episodes, token_turn=turns,
    )
