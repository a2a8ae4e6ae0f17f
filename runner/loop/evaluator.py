"""Evaluation: what the policy answers now, sampled at temperature 1 and, where answers are
finite single tokens, read exactly from one forward pass."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch

from envs import INVALID
from runner.track.metrics import answer_distribution, entropy, mean, pass_at_k, tv_to_uniform
from runner.rollout.hf import render


def other_rate(keys: list[str], space) -> float:
    """The share of answers that were read but are not in the answer space: part of the
    `invalid` bucket, told apart from completions with no answer at all."""
    return sum(k != INVALID and k not in space for k in keys) / max(len(keys), 1)


class Evaluator:
    """`evaluate` samples `train.eval_samples` completions of the environment's prompt (or
    `eval_k` of each held-out prompt where the environment has a held-out set); the last
    evaluation's samples, step and duration are kept for the summary, the artifacts and the
    budget's projection."""

    def __init__(self, cfg, env, tok, device: str, scorer, autocast: Callable[[], AbstractContextManager]) -> None:
        self.cfg, self.env, self.tok, self.device = cfg, env, tok, device
        self.scorer = scorer  # the collector: the same scoring (and reward-error policy) as training
        self.autocast = autocast
        self.last: Optional[dict[str, Any]] = None
        self.seconds = 0.0
        self.last_step = -1

    # -- answer distributions --------------------------------------------------------------

    def answer_dist(self, keys: list[str]) -> dict[str, float]:
        space = self.env.answer_space or sorted(set(keys) - {INVALID})
        return answer_distribution(keys, space)

    def answer_metrics(self, keys: list[str], prefix: str) -> dict[str, float]:
        dist = self.answer_dist(keys)
        valid = self.env.valid_answers or []
        m = {f"{prefix}/frac/{k}": v for k, v in dist.items()}
        m[f"{prefix}/entropy"] = entropy(dist)
        m[f"{prefix}/valid_rate"] = sum(dist.get(k, 0.0) for k in valid)
        if self.env.answer_space:  # inside `invalid`: answers read but outside the space ("7" on a die)
            m[f"{prefix}/other_rate"] = other_rate(keys, self.env.answer_space)
        if valid:
            m[f"{prefix}/tv_uniform_valid"] = tv_to_uniform(dist, valid)
        return m

    @torch.no_grad()
    def answer_probabilities(self, model, prompt) -> dict[str, float]:
        """P(first answer token) after the prompt and prefix, for each answer in the space.
        Exact for single-token answers (the dice faces are)."""
        space = self.env.answer_space
        if not space:
            return {}
        first = {}
        for a in space:
            ids = self.tok.encode(a, add_special_tokens=False)
            if len(ids) != 1:
                return {}
            first[a] = ids[0]
        enc = self.tok(render(self.tok, prompt), return_tensors="pt", add_special_tokens=False).to(self.device)
        was_training = model.training
        model.eval()
        logits = model(**enc, logits_to_keep=1, use_cache=False).logits[0, -1].float()
        model.train(was_training)
        p = torch.softmax(logits, -1)
        return {a: p[i].item() for a, i in first.items()}

    def policy_probabilities(self, model, step: int) -> dict[str, float]:
        """The sampling policy's exact first-answer-token probabilities before this step's
        rollouts (finite single-token answers only): an answer far below 1/G is rarely in a
        group, so the shaper cannot lift it; `policy/prob/min_rewarded` shows that starvation."""
        if not self.env.answer_space:
            return {}
        probs = self.answer_probabilities(model, self.env.prompts(step, 1)[0])
        if not probs:
            return {}
        m = {f"policy/prob/{k}": v for k, v in probs.items()}
        valid = [probs[k] for k in (self.env.valid_answers or []) if k in probs]
        if valid:
            m["policy/prob/min_rewarded"] = min(valid)
            m["policy/prob/rewarded_mass"] = sum(valid)
        return m

    def env_metrics(self, scores: list) -> dict[str, float]:
        """An environment's own metrics (`metrics(scores, prefix)`), under eval/env/."""
        return dict(self.env.metrics(scores, "eval/env")) if hasattr(self.env, "metrics") else {}

    # -- evaluation --------------------------------------------------------------------------
    def score(self, batch) -> tuple[list, float]:
        """The batch's scores by the collector's route (train.reward_timeout_s and
        train.on_reward_error as in training) and how many of them were reward errors: the
        evaluation's own count (eval/reward_errors), taken back out of the training one, so
        errors/reward_total counts training rollouts only (reward_errors.jsonl holds both)."""
        before = self.scorer.reward_errors
        scores = self.scorer.score_batch(batch)
        errors = self.scorer.reward_errors - before
        self.scorer.reward_errors = before
        return scores, float(errors)

    def evaluate(self, rollout, rollout_model, model, step: int, samples: Optional[int] = None) -> dict[str, float]:
        """`model` answers the exact probabilities, `rollout` samples from `rollout_model`:
        `samples` completions of a one-prompt environment (default train.eval_samples);
        held-out sets sample env.eval_k per problem. `seconds` is kept per periodic sample
        count, so a larger final evaluation does not inflate the budget's projection."""
        n = samples or self.cfg.train.eval_samples
        t_start = time.perf_counter()
        m = (self._heldout(rollout, rollout_model) if hasattr(self.env, "eval_prompts")
             else self._one_prompt(rollout, rollout_model, model, step, n))
        elapsed = time.perf_counter() - t_start
        self.seconds = elapsed * self.cfg.train.eval_samples / n if not hasattr(self.env, "eval_prompts") else elapsed
        self.last_step = step
        m["time/eval_s"] = elapsed
        return m

    def _one_prompt(self, rollout, rollout_model, model, step: int, n: int) -> dict[str, float]:
        env = self.env
        prompt = env.prompts(step, 1)[0]
        with self.autocast():
            batch = rollout.generate(rollout_model, self.tok, [prompt], n, temperature=1.0)
        scores, errors = self.score(batch)
        keys = [s.answer_key for s in scores]
        m = self.answer_metrics(keys, "eval/answers")
        m["eval/samples"] = float(len(scores))
        m["eval/reward_mean"] = sum(s.reward for s in scores) / len(scores)
        m["eval/reward_errors"] = errors
        m["eval/exact_format_rate"] = sum(s.exact_format for s in scores) / len(scores)
        m["eval/mean_length"] = batch.completion_lengths.float().mean().item()
        m.update(self.env_metrics(scores))
        probs = self.answer_probabilities(model, prompt)
        if probs:
            m.update({f"eval/prob/{k}": v for k, v in probs.items()})
            dist = dict(probs)
            dist[INVALID] = max(0.0, 1.0 - sum(probs.values()))
            m["eval/prob/answer_mass"] = sum(probs.values())
            if env.valid_answers:
                m["eval/prob/tv_uniform_valid"] = tv_to_uniform(dist, env.valid_answers)
        self.last = {"dist": self.answer_dist(keys), "other": m.get("eval/answers/other_rate", 0.0),
                     "probs": probs, "scores": scores,
                     "completions": batch.completions, "prompt": prompt, "step": step, "samples": n}
        return m

    @torch.no_grad()
    def _heldout(self, rollout, rollout_model) -> dict[str, float]:
        """Environments with a held-out set (math, Wordle, datasets): env.eval_k samples per
        problem at T=1; accuracy, unbiased pass@k (Chen et al. 2021) and maj@k (the most
        frequent answer key, ties to the first seen)."""
        env, k = self.env, self.env.eval_k
        prompts = env.eval_prompts()
        # in chunks of ~train.eval_rows rollouts: 200 Wordle games at once would hold ~140k
        # tokens of KV cache and prefill activations (GBs)
        chunk = max(1, self.cfg.train.eval_rows // k)
        scores, errors, completions, lengths, episodes, rows = [], 0.0, [], [], [], []
        for i in range(0, len(prompts), chunk):
            with self.autocast():
                batch = rollout.generate(rollout_model, self.tok, prompts[i:i + chunk], k, temperature=1.0)
            s, e = self.score(batch)
            scores += s
            errors += e
            completions += batch.completions
            lengths += batch.completion_lengths.tolist()
            episodes += batch.episodes or []
            rows += batch.prompts
        per: list[list] = [scores[i * k:(i + 1) * k] for i in range(len(prompts))]
        m: dict[str, float] = {}
        m["eval/accuracy"] = mean([float(bool(s.correct)) for s in scores])
        m[f"eval/pass_at_{k}"] = mean([pass_at_k(k, sum(bool(s.correct) for s in ss), k) for ss in per])
        m["eval/pass_at_1"] = mean([pass_at_k(k, sum(bool(s.correct) for s in ss), 1) for ss in per])
        maj = []
        for ss in per:
            keys = [s.answer_key for s in ss if s.answer_key != INVALID]
            top = max(keys, key=keys.count) if keys else None
            maj.append(float(any(s.correct and s.answer_key == top for s in ss)) if top else 0.0)
        m[f"eval/maj_at_{k}"] = mean(maj)
        m["eval/format_rate"] = mean([float(s.answer_key != INVALID) for s in scores])
        m["eval/reward_mean"] = mean([s.reward for s in scores])
        m["eval/reward_errors"] = errors
        m["eval/mean_length"] = mean([float(x) for x in lengths])
        m["eval/samples"] = float(len(scores))  # the n of the card's standard error
        if episodes:
            m.update(env.game_metrics(episodes, "eval/game"))
        m.update(self.env_metrics(scores))
        self.last = {"dist": {}, "probs": {}, "scores": scores, "completions": completions,
                     "prompt": prompts[0], "prompts": rows}
        return m
