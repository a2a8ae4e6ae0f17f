"""The first half of a step: prompts -> rollouts -> scores -> shaped rewards."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from envs import INVALID, Score
from runner.algo.loss import overlong_penalty
from runner.algo.clustering import cluster_keys, clusters_per_group
from runner.rollout.hf import RolloutBatch, concat, select
from runner.algo.shapers import shape
from runner.loop.reward_clock import RewardClock, RewardTimeout  # noqa: F401  (RewardTimeout: what a timeout raises)

log = logging.getLogger("runner.train")


@dataclass
class Collected:
    """One step's rollouts: every round sampled (for metrics) and the kept training batch."""

    sampled: list = field(default_factory=list)  # (batch, scores, shaped) per round
    batch: Optional[RolloutBatch] = None
    scores: list = field(default_factory=list)
    shaped: list = field(default_factory=list)
    dropped_groups: int = 0
    rounds: int = 0
    clusters: list = field(default_factory=list)  # mean clusters per group, per round
    unshaped: list = field(default_factory=list)  # per round: the rewards shaper=none would give
    fr3e: list = field(default_factory=list)  # FR3E metrics per round


class Collector:
    """Samples this rank's groups, scores them with the environment and shapes their rewards
    on whole groups. A reward function that raises, or runs past train.reward_timeout_s,
    costs that one rollout (reward 0, counted in `reward_errors`, its text kept in
    reward_errors.jsonl), not the run, unless train.on_reward_error=fail."""

    def __init__(self, cfg, env, backend, output_dir: Path) -> None:
        self.cfg, self.env, self.backend, self.output_dir = cfg, env, backend, output_dir
        self.clock = RewardClock(cfg.train.reward_timeout_s)
        self._env_name = f"{type(env).__module__}.{type(env).__qualname__}"
        self.reward_errors = 0
        self.step = 0  # the step being collected (for the reward-error log)

    def collect(self, rollout, model, tok, step: int) -> Collected:
        """With dynamic sampling, groups whose shaped rewards are all equal (zero advantage,
        no signal) are dropped and more are sampled, up to max_rounds; metrics describe every
        rollout sampled, training uses the kept ones."""
        cfg, env, bk = self.cfg, self.env, self.backend
        self.step = step
        ds = cfg.algo.dynamic_sampling
        want = cfg.train.prompts_per_step
        mine = len(bk.my_prompts(list(range(want))))  # groups this rank trains on
        c = Collected()
        kept: list[RolloutBatch] = []
        n_kept = 0
        fr3e = cfg.rollout.strategy == "fr3e"
        limit = mine if ds.enabled else float("inf")  # fr3e alone keeps every group with signal
        for _ in range(ds.max_rounds if ds.enabled else 1):
            c.rounds += 1
            batch = rollout.generate(model, tok, bk.my_prompts(env.prompts(step, want)),
                                     bk.my_group_size(cfg.algo.group_size))
            scores = self.score_batch(batch)
            groups = batch.groups.tolist()
            # group-aware shaping sees whole groups, gathered across ranks where they are split
            res = bk.on_whole_groups(self.shape_groups, [s.reward for s in scores],
                                     [(s.answer_key, x) for s, x in zip(scores, batch.completions)], groups)
            shaped = [v for v, _ in res]
            unshaped = [s.reward for s in scores]  # what shaper=none would pass on (mechanism metrics)
            c.clusters.append(clusters_per_group([k for _, k in res], groups))
            if cfg.algo.overlong.enabled:
                o = cfg.algo.overlong
                pen = overlong_penalty(batch.completion_lengths.cpu(), cfg.rollout.max_new_tokens, o.buffer, o.penalty)
                shaped = [r + p for r, p in zip(shaped, pen.tolist())]
                unshaped = [r + p for r, p in zip(unshaped, pen.tolist())]
            c.sampled.append((batch, scores, shaped))
            c.unshaped.append(unshaped)
            if fr3e:
                c.fr3e.append(fr3e_metrics(rollout.last, batch, scores))
            if not ds.enabled and not fr3e:
                kept, c.scores, c.shaped = [batch], scores, shaped
                break
            rows = []
            for g in sorted(set(groups)):
                idx = [i for i, x in enumerate(groups) if x == g]
                if n_kept < limit and max(shaped[i] for i in idx) > min(shaped[i] for i in idx):
                    rows += idx
                    n_kept += 1
                else:
                    c.dropped_groups += 1
            if rows:
                kept.append(select(batch, rows))
                c.scores += [scores[i] for i in rows]
                c.shaped += [shaped[i] for i in rows]
            if n_kept >= limit:
                break
        c.batch = concat(kept, tok.pad_token_id) if kept else None
        return c

    def shape_groups(self, rewards: list, keys_and_texts: list, groups: list) -> list[tuple[float, str]]:
        """(shaped reward, cluster key) per rollout, on whole groups: the clusterer decides
        which rollouts give the same answer, the shaper counts them."""
        sh = self.cfg.shaper
        keys = cluster_keys(sh.cluster, [k for k, _ in keys_and_texts], [t for _, t in keys_and_texts], groups,
                            sh.threshold)
        return list(zip(shape(sh.name, rewards, keys, groups, sh._target_), keys))

    def score_batch(self, batch: RolloutBatch) -> list[Score]:
        if batch.episodes is not None:
            return [self.score(p, x, f, episode=e)
                    for p, x, f, e in zip(batch.prompts, batch.completions, batch.finished, batch.episodes)]
        if hasattr(self.env, "score_batch"):  # the environment scores a whole batch at once
            try:
                scores = self.clock.call(f"{self._env_name}.score_batch", lambda: list(
                    self.env.score_batch(batch.prompts, batch.completions, batch.finished)))
                if len(scores) != len(batch.completions):
                    raise ValueError(f"score_batch returned {len(scores)} scores for {len(batch.completions)} rollouts")
                return scores
            except Exception as e:
                if self.cfg.train.on_reward_error == "fail":
                    raise
                log.warning("score_batch failed at step %d (%s: %s); scoring rollout by rollout",
                            self.step, type(e).__name__, e)
        return [self.score(p, x, f) for p, x, f in zip(batch.prompts, batch.completions, batch.finished)]

    def score(self, prompt, completion: str, finished: bool, episode: Any = None) -> Score:
        try:
            if episode is not None:
                return self.clock.call(f"{self._env_name}.score_game", lambda: self.env.score_game(episode))
            return self.clock.call(f"{self._env_name}.score", lambda: self.env.score(prompt, completion, finished))
        except Exception as e:
            if self.cfg.train.on_reward_error == "fail":
                raise
            self.reward_errors += 1
            rec = {"step": self.step, "error": f"{type(e).__name__}: {e}", "completion": completion}
            with open(self.output_dir / "reward_errors.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log.warning("reward function failed on a rollout at step %d (%s); reward 0 (train.on_reward_error=zero)",
                        self.step, rec["error"])
            return Score(reward=0.0, answer_key=INVALID, exact_format=False)


def fr3e_metrics(stats, batch: RolloutBatch, scores: list) -> dict[str, float]:
    """Anchors, their entropy, the value of a prefix (mean reward of its continuations)
    by how deep into the base trajectory it branched, and the tokens it took."""
    m = {"fr3e/anchors_per_trajectory": stats.anchors_per_trajectory, "fr3e/anchor_entropy": stats.anchor_entropy,
         "fr3e/base_tokens": float(stats.base_tokens), "fr3e/branch_tokens": float(stats.branch_tokens),
         "fr3e/generated_tokens": float(stats.base_tokens + stats.branch_tokens)}
    groups = batch.groups.tolist()
    values: dict[int, list[float]] = {}
    for g, s in zip(groups, scores):
        values.setdefault(g, []).append(s.reward)
    by_depth: dict[int, list[float]] = {}
    for g, depth in enumerate(stats.anchor_depth):
        if g in values:
            by_depth.setdefault(min(int(depth * 4), 3), []).append(sum(values[g]) / len(values[g]))
    for q, v in by_depth.items():
        m[f"fr3e/value_depth_q{q + 1}"] = sum(v) / len(v)
    return m
