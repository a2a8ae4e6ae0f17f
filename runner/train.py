"""The training loop: the flow of one step from DESIGN.md, plus evaluation, checkpoints,
tracking and a clean stop on Ctrl-C.

    prompts -> rollouts -> scores -> shaped rewards -> advantages -> loss -> optimizer step
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from envs import INVALID, Score
from runner import checkpoint as ckpt
from runner import host
from runner.backend import STOP_CODES, make_backend, rollout_copy, rollout_dtype, sync_rollout_weights  # noqa: F401
from runner.algorithms import (AdaptiveEntropy, BatchNorm, LossConfig, advantages, lr_factor, overlong_penalty,
                               policy_loss, top_entropy_mask)
from runner.budget import CostMeter, SweepLedger
from runner.config import RunConfig, flatten, to_dict
from runner.forward import length_buckets, sequence_logprobs
from runner.metrics import answer_distribution, entropy, group_mechanics, tv_to_uniform
from runner.models import load_policy
from runner.plugins import build_env
from runner.rollout import (RolloutBatch, completion_extents, concat, make_rollout, render, select, span_token_mask,
                            trim_completions)
from runner.clustering import cluster_keys, clusters_per_group
from runner.shapers import shape
from runner.tracking import Tracker

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
# stop reasons of a run that ended as configured (MLflow status FINISHED, exit code 0)
FINISHED_REASONS = ("completed", "budget", "token_budget")
# ... plus a price estimate (no training): the process exits 0 for these
CLEAN_EXIT_REASONS = FINISHED_REASONS + ("estimate",)


def make_adamw(params, **kw) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and CUDA,
    float32): ~7x faster than the per-tensor loop for 135M parameters on 2 cores, same math."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


class NullTracker:
    """What ranks other than 0 log to: everything is accepted and dropped (rank 0 logs the
    whole job's metrics, gathered from every rank)."""

    uri = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row (train.max_nonfinite_steps)."""


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second one
    interrupts at once (the last checkpoint is still there)."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "sigint" if signum == signal.SIGINT else "sigterm"
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to abort now)", file=sys.stderr)


@dataclass
class History:
    """What the final plot and summary need, kept in checkpoints so a resume has it."""

    train: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    eval: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device='cuda' but no CUDA device is visible; use trainer.device=cpu or auto")
    return name


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: RunConfig, output_dir: Path, meter: Optional[CostMeter] = None,
                 ledger: Optional[SweepLedger] = None, job_id: str = "0"):
        self.cfg = cfg
        self.ledger, self.job_id = ledger, job_id
        self.eval_seconds = 0.0
        self.save_seconds = 0.0  # the last periodic checkpoint's save time (budget projection)
        self.last_eval_step = -1
        self.last_ckpt_step = 0
        self.reward_errors = 0
        self.nonfinite_streak = self.nonfinite_total = 0
        self.generated_tokens = 0  # rollout tokens sampled so far (FR3E base trajectories included)
        self.output_dir = output_dir
        self.meter = meter or CostMeter(cfg.budget.usd_per_device_hour, cfg.budget.devices)
        self.env = build_env(cfg.env, cfg.seed)
        self.rollout = make_rollout(cfg.rollout) if cfg.rollout.name == "hf" else None  # vllm: in setup
        if hasattr(self.env, "new_game"):  # multi-turn: the environment answers between turns
            from runner.multiturn import MultiTurnRollout

            self.rollout = MultiTurnRollout(self.env, self.rollout)
        self.eval_rollout = self.rollout  # evaluation samples independently, whatever trains
        if cfg.rollout.strategy == "fr3e":
            from runner.fr3e import FR3ERollout

            f = cfg.rollout.fr3e
            self.rollout = FR3ERollout(self.rollout, f.base_samples, f.anchors, f.percentile, f.merge_adjacent)
        a = cfg.algo
        self.loss_cfg = LossConfig.from_algo(a)
        e = a.entropy
        self.adaptive = AdaptiveEntropy(e.coef, e.target, e.delta, e.coef_min, e.coef_max) if e.adaptive else None
        self.ref_model = None
        self.history = History()
        self.step = 0
        self.tracker: Optional[Tracker] = None
        self.last_eval: Optional[dict[str, Any]] = None
        self.stop_reason: Optional[str] = None
        self.final_metrics: dict[str, float] = {}
        self.backend = make_backend(cfg)

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        self.device = pick_device(cfg.trainer.device)
        torch.manual_seed(cfg.seed)
        import random

        import numpy as np

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        model, self.tok = load_policy(cfg.model, self.device)
        a = cfg.algo
        if a.kl.coef > 0:  # frozen copy of the starting policy, before any checkpoint is loaded
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        opt = make_adamw(model.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2),
                         weight_decay=a.weight_decay)
        self.model, self.opt = self.backend.wrap(model, opt)
        state = self.backend.load(self.ckpt_dir)
        if state is not None:
            self.step = self.last_ckpt_step = state["step"]
            self.history = History(**state["history"])
            self.meter.carry(state.get("wall_seconds", 0.0))
            for k, v in state.get("counters", {}).items():
                setattr(self, k, v)
            if self.adaptive is not None and "entropy_coef" in state:
                self.adaptive.coef = state["entropy_coef"]
            log.info("resumed from step %d", self.step)
        if cfg.rollout.name == "vllm":
            self.start_vllm()
        else:
            self.rollout_model = self.backend.rollout_model(self.model, cfg.rollout.dtype, self.device)

    def start_vllm(self) -> None:
        """A vLLM engine colocated on this rank's GPU, started from the current (maybe
        resumed) policy's weights, written once as plain Hugging Face files."""
        from runner.rollout_vllm import VLLMRollout

        weights = self.output_dir / "launch" / f"vllm_start_rank{self.backend.rank}"
        with self.backend.gathered(self.model):
            if not weights.exists():
                self.model.save_pretrained(weights)
                self.tok.save_pretrained(weights)
        self.rollout_model = self.model  # generation happens inside vLLM
        self.rollout = self.eval_rollout = VLLMRollout(self.cfg.rollout, str(weights), self.tok,
                                                       self.cfg.seed + self.backend.rank)
        self.push_weights(force=True)

    def push_weights(self, force: bool = False) -> None:
        """After an optimizer step: HF rollouts' low-precision copy, or vLLM's weights."""
        self.backend.sync_rollout(self.rollout_model, self.model)
        if self.cfg.rollout.name == "vllm":
            tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
            with self.backend.gathered(self.model):
                self.rollout.on_policy_updated(self.model.named_parameters(), tied, force=force)

    def autocast(self):
        """bf16 autocast for forward passes when trainer.autocast=bf16 (weights, optimizer
        state and the loss stay float32); a no-op otherwise."""
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16,
                              enabled=self.cfg.trainer.autocast == "bf16")

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def open_tracking(self, config_yaml: str, parent_run_id: Optional[str] = None,
                      extra_tags: Optional[dict[str, str]] = None) -> None:
        """A new MLflow run, or the same run again when this output dir has one (its id is
        in run_state.json, or, if MLflow was down so far, its creation is still spooled)."""
        cfg = self.cfg
        if not self.backend.is_main:
            self.tracker = NullTracker()
            return
        state_path = self.output_dir / STATE_FILE
        prior = json.loads(state_path.read_text()) if state_path.exists() else {}

        def remember(run_id: str) -> None:
            _write_json(state_path, {"run_id": run_id, "tracking_uri": self.tracker.uri,
                                     "experiment": cfg.tracking.experiment})

        self.tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, self.output_dir, on_run_created=remember)
        same_store = prior.get("tracking_uri") in (None, self.tracker.uri)
        spooled_create = any(o["op"] == "create" for o in self.tracker._ops)
        if same_store and (prior.get("run_id") or spooled_create):
            self.tracker.resume(prior.get("run_id"), upto_step=self.step)
            self.tracker.log_text(config_yaml, f"config/resumed_at_step_{self.step}.yaml")
            return
        tags = {
            "env": cfg.env.name,
            "algo": cfg.algo.name,
            "shaper": cfg.shaper.name,
            "model": cfg.model.name,
            "output_dir": str(self.output_dir),
            "omp_wait_policy": f"{host.POLICY.get('omp_wait_policy')} ({host.POLICY.get('why')})",
            "malloc": host.POLICY.get("malloc", ""),
            **(extra_tags or {}),
        }
        name = cfg.tracking.run_name or f"{cfg.env.name}-{cfg.algo.name}-{cfg.shaper.name}-s{cfg.seed}"
        self.tracker.start(name, tags, parent_run_id=parent_run_id)
        self.tracker.log_params(flatten(to_dict(cfg)))
        self.tracker.log_text(config_yaml, "config/config.yaml")

    # -- one step ------------------------------------------------------------------------
    def collect(self) -> "Collected":
        """Sample, score and shape groups. With dynamic sampling, groups whose shaped rewards
        are all equal (zero advantage, no signal) are dropped and more are sampled, up to
        max_rounds; metrics describe every rollout sampled, training uses the kept ones."""
        cfg, env = self.cfg, self.env
        ds = cfg.algo.dynamic_sampling
        want = cfg.train.prompts_per_step
        mine = len(self.backend.my_prompts(list(range(want))))  # groups this rank trains on
        c = Collected()
        kept: list[RolloutBatch] = []
        n_kept = 0
        bk = self.backend
        fr3e = cfg.rollout.strategy == "fr3e"
        limit = mine if ds.enabled else float("inf")  # fr3e alone keeps every group with signal
        for _ in range(ds.max_rounds if ds.enabled else 1):
            c.rounds += 1
            batch = self.rollout.generate(self.rollout_model, self.tok, bk.my_prompts(env.prompts(self.step, want)),
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
                c.fr3e.append(self.fr3e_metrics(self.rollout.last, batch, scores))
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
        c.batch = concat(kept, self.tok.pad_token_id) if kept else None
        return c

    def fr3e_metrics(self, stats, batch: RolloutBatch, scores: list) -> dict[str, float]:
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
                scores = list(self.env.score_batch(batch.prompts, batch.completions, batch.finished))
                if len(scores) != len(batch.completions):
                    raise ValueError(f"score_batch returned {len(scores)} scores for {len(batch.completions)} rollouts")
                return scores
            except Exception as e:
                if self.cfg.train.on_reward_error == "fail":
                    raise
                log.warning("score_batch raised at step %d (%s: %s); scoring rollout by rollout",
                            self.step, type(e).__name__, e)
        return [self.score(p, x, f) for p, x, f in zip(batch.prompts, batch.completions, batch.finished)]

    def score(self, prompt, completion: str, finished: bool, episode: Any = None) -> Score:
        """env.score, except that a reward function that raises costs that one rollout
        (reward 0, counted, its text kept in reward_errors.jsonl), not the run, unless
        train.on_reward_error=fail."""
        try:
            if episode is not None:
                return self.env.score_game(episode)
            return self.env.score(prompt, completion, finished)
        except Exception as e:
            if self.cfg.train.on_reward_error == "fail":
                raise
            self.reward_errors += 1
            rec = {"step": self.step, "error": f"{type(e).__name__}: {e}", "completion": completion}
            with open(self.output_dir / "reward_errors.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log.warning("reward function raised on a rollout at step %d (%s); reward 0", self.step, rec["error"])
            return Score(reward=0.0, answer_key=INVALID, exact_format=False)

    def train_step(self) -> dict[str, float]:
        cfg, bk = self.cfg, self.backend
        probs = self.policy_probabilities()  # the policy that samples this step's rollouts
        t0 = time.perf_counter()
        with self.autocast():
            c = self.collect()
        if cfg.rollout.name == "vllm":
            self.rollout.sleep()  # free vLLM's GPU memory for the update
        t_gen = time.perf_counter()
        if bk.all_true(c.batch is None):  # dynamic sampling found no group with any signal anywhere
            train_m = {"train/skipped": 1.0}
        else:
            batch, shaped, scores = c.batch, c.shaped, c.scores
            if batch is None:
                # other ranks have groups to learn from and every rank must take part in the
                # update's collectives: this rank trains on its last round with zero advantage
                batch, scores, shaped = c.sampled[-1]
                adv = torch.zeros(len(batch))
            else:
                a = cfg.algo
                adv = torch.tensor(bk.on_whole_groups(
                    lambda r, _k, g: advantages(torch.tensor(r), torch.tensor(g), a.scale_rewards, a.adv_clip,
                                                a.baseline).tolist(),
                    shaped, [None] * len(shaped), batch.groups.tolist()))
            train_m = self.update(batch, adv.to(self.device), scores)
        t_end = time.perf_counter()

        # every rank's rollouts, for metrics (a group split over ranks is one group again)
        rec = {"rounds": [([s.reward for s in sc], sh, [s.answer_key for s in sc], [s.exact_format for s in sc],
                           b.completion_lengths.float().cpu().tolist(), list(b.finished), b.groups.tolist(), un)
                          for (b, sc, sh), un in zip(c.sampled, c.unshaped)],
               "dropped": c.dropped_groups, "n_rounds": c.rounds, "rank": bk.rank, "clusters": c.clusters,
               "distinct_correct": self.distinct_correct(c),
               "correct": [bool(s.correct) for _, sc, _ in c.sampled for s in sc if s.correct is not None],
               "episodes": [e for b, _, _ in c.sampled for e in (b.episodes or [])], "fr3e": c.fr3e,
               "components": [s.components for _, sc, _ in c.sampled for s in sc if s.components]}
        recs = bk.gather_objects(rec)
        rows = [row for r in recs for rd in r["rounds"] for row in zip(*rd[:6])]
        raw, shaped_all, keys, exact, lengths, finished = (list(x) for x in zip(*rows))
        groups: dict[tuple, list[tuple]] = {}  # (raw, shaped, unshaped, key) per rollout of each whole group
        for r in recs:
            for i, rd in enumerate(r["rounds"]):
                owner = r["rank"] if bk.group_placement == "local" else -1
                for raw_r, sh, key, g, un in zip(rd[0], rd[1], rd[2], rd[6], rd[7]):
                    groups.setdefault((owner, i, g), []).append((raw_r, sh, un, key))
        zero_var = sum(max(x[1] for x in v) == min(x[1] for x in v) for v in groups.values()) / max(len(groups), 1)
        # what generation cost this step, every rank and sampling round: the completions, plus
        # FR3E's base trajectories (its branches' shared prefixes are counted there, once)
        generated = sum(lengths) + sum(f.get("fr3e/base_tokens", 0.0) for r in recs for f in r["fr3e"])
        self.generated_tokens += int(generated)
        m: dict[str, float] = {
            "reward/raw_mean": sum(raw) / len(raw),
            "reward/shaped_mean": sum(shaped_all) / len(shaped_all),
            "format/exact_rate": sum(exact) / len(exact),
            "completion/mean_length": sum(lengths) / len(lengths),
            "completion/finished_rate": sum(finished) / len(finished),
            "groups/zero_variance_frac": zero_var,
            "groups/dropped": float(sum(r["dropped"] for r in recs)),
            "groups/sampling_rounds": float(max(r["n_rounds"] for r in recs)),
            "groups/clusters_mean": _mean([x for r in recs for x in r["clusters"]]),
            **self.mechanism_metrics(groups),
            **{k: _mean([f[k] for r in recs for f in r["fr3e"] if k in f])
               for k in sorted({k for r in recs for f in r["fr3e"] for k in f})},
            "time/step_s": t_end - t0,
            "time/generate_s": t_gen - t0,
            "time/train_s": t_end - t_gen,
            "throughput/tokens_per_s": sum(lengths) / (t_end - t0),
            "tokens/generated": float(generated),
            "tokens/generated_total": float(self.generated_tokens),
            **probs,
            **train_m,
        }
        m["errors/reward_total"] = bk.all_sum([self.reward_errors])[0]
        corrects = [x for r in recs for x in r["distinct_correct"]]
        if corrects:  # environments that judge right and wrong (math, Wordle)
            m["groups/distinct_correct_mean"] = _mean(corrects)
            m["reward/accuracy"] = _mean([float(x) for r in recs for x in r["correct"]])
        parts = [p for r in recs for p in r["components"]]
        for k in sorted({k for p in parts for k in p}):  # a summed reward's parts (env=dataset)
            m[f"reward/{k}"] = _mean([p[k] for p in parts if k in p])
        episodes = [e for r in recs for e in r["episodes"]]
        if episodes:
            m.update(self.env.game_metrics(episodes, "game"))
        if self.env.answer_space:  # finite answers: their distribution is the story
            m.update(self.answer_metrics(keys, "answers"))
            self.history.train.append((self.step, self.answer_dist(keys)))
        else:
            m["answers/distinct_per_step"] = float(len(set(keys) - {INVALID}))
            m["answers/valid_rate"] = sum(k != INVALID for k in keys) / len(keys)
        return m

    def mechanism_metrics(self, groups: dict[tuple, list[tuple]]) -> dict[str, float]:
        """Why a shaper acts or not: distinct rewarded answers per group, and the fraction of
        groups whose advantages the shaper changed against shaper=none (with group-std
        scaling the divisor changes none in a group holding at most one rewarded answer)."""
        a = self.cfg.algo

        def adv(r: list[float]) -> list[float]:
            return advantages(torch.tensor(r), torch.zeros(len(r), dtype=torch.long), a.scale_rewards, a.adv_clip,
                              a.baseline).tolist()

        mech = [group_mechanics([x[0] for x in v], [x[1] for x in v], [x[2] for x in v], [x[3] for x in v], adv)
                for v in groups.values()]
        if not mech:
            return {}
        return {"groups/distinct_rewarded_mean": _mean([float(d) for d, _ in mech]),
                "groups/multi_rewarded_frac": _mean([float(d >= 2) for d, _ in mech]),
                "shaper/effective_group_frac": _mean([float(ch) for _, ch in mech])}

    @torch.no_grad()
    def policy_probabilities(self) -> dict[str, float]:
        """The sampling policy's exact first-answer-token probabilities before this step's
        rollouts (finite single-token answers only): an answer far below 1/G is rarely in a
        group, so the shaper cannot lift it; `policy/prob/min_rewarded` shows that starvation."""
        if not self.env.answer_space or not self.backend.is_main:
            return {}
        probs = self.answer_probabilities(self.env.prompts(self.step, 1)[0])
        if not probs:
            return {}
        m = {f"policy/prob/{k}": v for k, v in probs.items()}
        valid = [probs[k] for k in (self.env.valid_answers or []) if k in probs]
        if valid:
            m["policy/prob/min_rewarded"] = min(valid)
            m["policy/prob/rewarded_mass"] = sum(valid)
        return m

    @staticmethod
    def distinct_correct(c: "Collected") -> list[int]:
        """Per group: how many different correct completions (texts) it holds; empty where the
        environment does not judge correctness. One right answer reached by several paths
        counts several times: the diversity that matters once accuracy is high."""
        out = []
        for b, sc, _ in c.sampled:
            if not sc or sc[0].correct is None:
                continue
            by: dict[int, set] = {}
            for g, s, text in zip(b.groups.tolist(), sc, b.completions):
                by.setdefault(g, set())
                if s.correct:
                    by[g].add(" ".join(text.split()))
            out += [len(v) for v in by.values()]
        return out

    def update(self, batch: RolloutBatch, adv: torch.Tensor, scores: list) -> dict[str, float]:
        """num_iterations passes over the batch, each one optimizer step; the batch is cut into
        the backend's micro-batches, each normalised by whole-batch counts (all ranks), so
        their gradients add up to the full batch's."""
        a, bk = self.cfg.algo, self.backend
        lr = a.lr * lr_factor(a.lr_schedule, max(self.step, 1), self.cfg.train.steps, a.warmup_steps)
        for g in getattr(self.opt, "param_groups", []):  # set before any backward: DeepSpeed steps inside it
            g["lr"] = lr
        mask = batch.completion_mask
        tokens, seqs = bk.all_sum([mask.sum().item(), len(batch)])
        norm = BatchNorm(tokens=max(tokens, 1.0), seqs=seqs, max_len=float(self.cfg.rollout.max_new_tokens))
        entropy_mask = None
        if a.entropy.scope == "answer":
            entropy_mask = span_token_mask(self.tok, batch.completion_ids, [s.answer_span for s in scores]) & mask
        chunks = [rows for rows in bk.micro_batches(len(batch)) if rows]
        if self.skips_zero_advantage():
            # a rollout with advantage exactly 0 adds exactly 0 to the policy-gradient term (the
            # batch counts in `norm` still include it): no forward or backward for it. Each
            # micro-batch keeps one row, so every rank runs the same passes and the optimizer
            # still steps (Adam's momentum moves the weights even on a zero gradient).
            a_list = adv.tolist()
            chunks = [[i for i in rows if a_list[i] != 0.0] or rows[:1] for rows in chunks]
        kept = sum(len(rows) for rows in chunks)
        if self.buckets_by_length(batch):
            ext = completion_extents(batch)
            chunks = [b for rows in chunks for b in length_buckets(rows, ext, overhead=batch.prompt_len + 8.0)]
        whole = list(range(len(batch)))
        micro = [(rows, trim_completions(batch if rows == whole else select(batch, rows))) for rows in chunks]
        ref_logp: list = [None] * len(micro)
        if self.ref_model is not None:
            with torch.no_grad(), self.autocast():
                ref_logp = [sequence_logprobs(self.ref_model, mb, self.cfg.trainer.shared_prefix, a.loss_temperature)[0]
                            for _, mb in micro]
        old_logp: list = [None] * len(micro)
        loss_cfg = self.loss_cfg
        out: dict[str, float] = {}
        timing = {"time/forward_s": 0.0, "time/backward_s": 0.0, "time/optimizer_s": 0.0}
        ent_sums = [0.0, 0.0]  # the sampling policy's token entropy over every micro-batch
        for it in range(a.num_iterations):
            bk.zero_grad()
            finite, loss_sum, stat_sums = True, 0.0, {}
            for j, (rows, mb) in enumerate(micro):
                t0 = time.perf_counter()
                idx = torch.as_tensor(rows, device=mask.device)
                mb_mask = mb.completion_mask  # mask[idx] without the columns trimmed off
                width = mb_mask.shape[1]
                mb_emask = None if entropy_mask is None else entropy_mask[idx][:, :width]
                with self.autocast():
                    logp, ent = sequence_logprobs(bk.compute_model, mb, self.cfg.trainer.shared_prefix, a.loss_temperature)
                if old_logp[j] is None:  # the policy that sampled: this first forward, detached
                    old_logp[j] = logp.detach()
                    ent_sums[0] += (ent.detach() * mb_mask).sum().item()
                    ent_sums[1] += mb_mask.sum().item()
                    if j == 0:
                        loss_cfg = self._entropy_stats(ent, mb_mask, mb_emask, out)
                        if mb.token_turn is not None:  # multi-turn: the policy's entropy per turn
                            for t in sorted(set(mb.token_turn[mb.token_turn >= 0].tolist())):
                                out[f"policy/entropy_turn{t + 1}"] = ent.detach()[mb.token_turn == t].mean().item()
                pg_mask = top_entropy_mask(ent, mb_mask, a.top_entropy_quantile)
                loss, stats = policy_loss(logp, old_logp[j], adv[idx], mb_mask, ent, loss_cfg, norm, pg_mask=pg_mask,
                                          entropy_mask=mb_emask, ref_logp=ref_logp[j])
                t1 = time.perf_counter()
                ok = bk.all_true(bool(torch.isfinite(loss)))
                if ok:
                    bk.backward(loss * bk.loss_scale)
                finite = finite and ok
                loss_sum += loss.item() if ok else float("nan")
                for k, v in stats.items():  # kl is a share of the batch's (sums up), the rest are means
                    stat_sums[k] = stat_sums.get(k, 0.0) + v.item() / (1 if k == "kl" else len(micro) * bk.world)
                t2 = time.perf_counter()
                timing["time/forward_s"] += t1 - t0
                timing["time/backward_s"] += t2 - t1
            t2 = time.perf_counter()
            if finite:
                grad_norm, stepped = bk.step(a.max_grad_norm)
                finite = stepped
                if stepped:
                    self.push_weights()
            else:  # never let a NaN/inf reach the weights (or a checkpoint)
                bk.zero_grad()
                grad_norm = torch.tensor(float("nan"))
            self.count_nonfinite(finite)
            timing["time/optimizer_s"] += time.perf_counter() - t2
            # each rank's loss is its share of the global loss; their mean is the global loss
            keys = list(stat_sums)
            reduced = bk.all_sum([loss_sum] + [stat_sums[k] for k in keys])
            out.update({"train/loss": reduced[0], "train/grad_norm": float(grad_norm)})
            out.update({f"train/{k}": v for k, v in zip(keys, reduced[1:])})
            if it == 0 and len(micro) > 1:  # over the whole batch, not the first micro-batch
                tot = bk.all_sum(ent_sums)
                out["policy/token_entropy"] = tot[0] / tot[1] if tot[1] else 0.0
        if self.adaptive is not None:
            self.adaptive.update(out["policy/token_entropy"])
            out["train/entropy_coef_next"] = self.adaptive.coef
        out["train/adv_abs_mean"] = bk.all_sum([adv.abs().sum().item()])[0] / max(seqs, 1.0)
        out["train/skipped_seq_frac"] = 1.0 - bk.all_sum([kept])[0] / max(seqs, 1.0)
        out["train/nonfinite_total"] = float(self.nonfinite_total)
        out["train/lr"] = lr
        out.update(timing)
        return out

    def skips_zero_advantage(self) -> bool:
        """Rows with zero advantage can be left out of the training passes only where nothing
        but the policy-gradient term needs them: no entropy bonus, no KL, and no top-entropy
        token selection (its quantile is taken over the whole batch)."""
        a = self.cfg.algo
        return (self.cfg.trainer.skip_zero_advantage and a.entropy.coef == 0 and not a.entropy.adaptive
                and a.kl.coef == 0 and a.top_entropy_quantile >= 1.0)

    def buckets_by_length(self, batch: RolloutBatch) -> bool:
        """Training passes cut by completion length (runner/forward.length_buckets): plain torch
        only (DeepSpeed counts its micro-batches), single-turn, and no term computed per pass
        over the whole batch (top-entropy quantile, the adaptive entropy coefficient)."""
        a = self.cfg.algo
        return (self.cfg.trainer.name == "torch" and self.cfg.trainer.length_buckets and batch.token_turn is None
                and a.top_entropy_quantile >= 1.0 and not a.entropy.adaptive)

    def _entropy_stats(self, ent: torch.Tensor, mask: torch.Tensor, emask: Optional[torch.Tensor],
                       out: dict[str, float]) -> LossConfig:
        """Token entropy of the sampling policy (all ranks' first micro-batch: the whole batch
        unless gradients are accumulated), logged and fed to the adaptive coefficient."""
        e = ent.detach()
        m = mask.bool()
        sums = [e[m].sum().item(), m.sum().item()]
        if emask is not None:
            em = emask.bool()
            sums += [e[em].sum().item(), em.sum().item()]
        sums = self.backend.all_sum(sums)
        token_entropy = sums[0] / sums[1] if sums[1] else 0.0
        out["policy/token_entropy"] = token_entropy
        if emask is not None:
            out["policy/answer_entropy"] = sums[2] / sums[3] if sums[3] else 0.0
        loss_cfg = self.loss_cfg
        if self.adaptive is not None:
            loss_cfg = dataclasses.replace(self.loss_cfg, entropy_coef=self.adaptive.effective(token_entropy))
        out["train/entropy_coef"] = loss_cfg.entropy_coef
        return loss_cfg

    def count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)", self.step,
                    self.nonfinite_streak)
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_streak} updates in a row had a non-finite loss or gradient (step {self.step}); "
                f"stopping (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}). The weights and the "
                f"checkpoint are from the last finite update: try a lower algo.lr or algo.max_grad_norm.")

    # -- metrics -------------------------------------------------------------------------
    def answer_dist(self, keys: list[str]) -> dict[str, float]:
        space = self.env.answer_space or sorted(set(keys) - {INVALID})
        return answer_distribution(keys, space)

    def answer_metrics(self, keys: list[str], prefix: str) -> dict[str, float]:
        dist = self.answer_dist(keys)
        valid = self.env.valid_answers or []
        m = {f"{prefix}/frac/{k}": v for k, v in dist.items()}
        m[f"{prefix}/entropy"] = entropy(dist)
        m[f"{prefix}/valid_rate"] = sum(dist.get(k, 0.0) for k in valid)
        if valid:
            m[f"{prefix}/tv_uniform_valid"] = tv_to_uniform(dist, valid)
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Sample eval_samples completions at T=1; where answers are finite, also read the
        policy's exact first-answer-token probabilities from one forward pass."""
        cfg, env = self.cfg, self.env
        t_start = time.perf_counter()
        if hasattr(env, "eval_prompts"):
            return self.evaluate_heldout(t_start)
        prompt = env.prompts(self.step, 1)[0]
        with self.autocast():
            batch = self.eval_rollout.generate(self.rollout_model, self.tok, [prompt], cfg.train.eval_samples,
                                          temperature=1.0)
        errors_before = self.reward_errors
        scores = self.score_batch(batch)
        keys = [s.answer_key for s in scores]
        m = self.answer_metrics(keys, "eval/answers")
        m["eval/reward_mean"] = sum(s.reward for s in scores) / len(scores)
        m["eval/reward_errors"] = float(self.reward_errors - errors_before)
        m["eval/exact_format_rate"] = sum(s.exact_format for s in scores) / len(scores)
        m["eval/mean_length"] = batch.completion_lengths.float().mean().item()
        probs = self.answer_probabilities(prompt)
        if probs:
            m.update({f"eval/prob/{k}": v for k, v in probs.items()})
            dist = dict(probs)
            dist[INVALID] = max(0.0, 1.0 - sum(probs.values()))
            m["eval/prob/answer_mass"] = sum(probs.values())
            if env.valid_answers:
                m["eval/prob/tv_uniform_valid"] = tv_to_uniform(dist, env.valid_answers)
        self.history.eval.append((self.step, self.answer_dist(keys)))
        self.last_eval = {"dist": self.answer_dist(keys), "probs": probs, "scores": scores,
                          "completions": batch.completions, "prompt": prompt}
        self.eval_seconds = time.perf_counter() - t_start
        self.last_eval_step = self.step
        m["time/eval_s"] = self.eval_seconds
        return m

    @torch.no_grad()
    def evaluate_heldout(self, t_start: float) -> dict[str, float]:
        """Environments with a held-out set (math, Wordle): env.eval_k samples per problem at
        T=1; accuracy, unbiased pass@k (Chen et al. 2021) and maj@k (the most frequent
        answer key, ties to the first seen)."""
        from runner.metrics import pass_at_k

        env, k = self.env, self.env.eval_k
        prompts = env.eval_prompts()
        with self.autocast():
            batch = self.eval_rollout.generate(self.rollout_model, self.tok, prompts, k, temperature=1.0)
        scores = self.score_batch(batch)
        per: list[list] = [scores[i * k:(i + 1) * k] for i in range(len(prompts))]
        m: dict[str, float] = {}
        m["eval/accuracy"] = _mean([float(bool(s.correct)) for s in scores])
        m[f"eval/pass_at_{k}"] = _mean([pass_at_k(k, sum(bool(s.correct) for s in ss), k) for ss in per])
        m["eval/pass_at_1"] = _mean([pass_at_k(k, sum(bool(s.correct) for s in ss), 1) for ss in per])
        maj = []
        for ss in per:
            keys = [s.answer_key for s in ss if s.answer_key != INVALID]
            top = max(keys, key=keys.count) if keys else None
            maj.append(float(any(s.correct and s.answer_key == top for s in ss)) if top else 0.0)
        m[f"eval/maj_at_{k}"] = _mean(maj)
        m["eval/format_rate"] = _mean([float(s.answer_key != INVALID) for s in scores])
        m["eval/mean_length"] = batch.completion_lengths.float().mean().item()
        if batch.episodes is not None:
            m.update(env.game_metrics(batch.episodes, "eval/game"))
        self.last_eval = {"dist": {}, "probs": {}, "scores": scores, "completions": batch.completions,
                          "prompt": prompts[0], "prompts": batch.prompts}
        self.eval_seconds = time.perf_counter() - t_start
        self.last_eval_step = self.step
        m["time/eval_s"] = self.eval_seconds
        return m

    def answer_probabilities(self, prompt) -> dict[str, float]:
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
        model = self.backend.eval_model(self.model, self.rollout_model)
        was_training = model.training
        model.eval()
        logits = model(**enc, logits_to_keep=1, use_cache=False).logits[0, -1].float()
        model.train(was_training)
        p = torch.softmax(logits, -1)
        return {a: p[i].item() for a, i in first.items()}

    # -- persistence ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {
            "history": {"train": self.history.train, "eval": self.history.eval},
            "wall_seconds": self.meter.wall_seconds,
            "entropy_coef": self.adaptive.coef if self.adaptive else None,
            "counters": {"reward_errors": self.reward_errors, "nonfinite_total": self.nonfinite_total,
                         "generated_tokens": self.generated_tokens},
        }
        path = self.backend.save(self.ckpt_dir, self.step, state, self.cfg.train.keep_checkpoints)
        self.last_ckpt_step = self.step
        if self.tracker:
            self.tracker.flush(upto_step=self.step)
        return path

    # -- the loop ------------------------------------------------------------------------
    def cap(self) -> Optional[float]:
        """What this job may spend in all: its own cap, and within a sweep with a shared cap,
        no more than the sweep cap minus what the other jobs have spent."""
        caps = [c for c in (self.cfg.budget.cap_usd,) if c is not None]
        if self.ledger is not None:
            caps.append(self.ledger.cap_usd - self.ledger.others_spent(self.job_id))
        return min(caps) if caps else None

    def evaluates_at(self, step: int) -> bool:
        """A periodic evaluation after this step (the last step's is the final evaluation)."""
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def fit(self, stop: StopFlag) -> str:
        """Train to train.steps; returns why it stopped: completed, budget or a signal name."""
        from tqdm import tqdm

        cfg = self.cfg
        total = cfg.train.steps
        cap_tokens = cfg.train.max_generated_tokens
        bar = tqdm(total=total, initial=self.step, desc=f"{cfg.env.name}/{cfg.shaper.name}",
                   unit="step", dynamic_ncols=True, file=sys.stderr, disable=not self.backend.is_main)
        try:
            while self.step < total:
                # the same count on every rank (summed over gathered rollouts): all stop together;
                # checked first, so a stopped run resumed with the same budget stops again at once
                if cap_tokens is not None and self.generated_tokens >= cap_tokens:
                    return "token_budget"
                # every rank stops at the same step: a signal on any rank, the budget on rank 0
                nxt = self.step + 1
                periodic = ((self.save_seconds if nxt % cfg.train.checkpoint_every == 0 else 0.0)
                            + (self.eval_seconds if self.evaluates_at(nxt) else 0.0))
                budget = self.backend.is_main and self.meter.would_exceed(self.cap(), periodic_seconds=periodic)
                code = self.backend.agree(max(STOP_CODES[stop.reason], STOP_CODES["budget"] if budget else 0))
                if code:
                    return {v: k for k, v in STOP_CODES.items()}[code]
                t0 = time.perf_counter()
                self.step += 1
                m = self.train_step()
                t_eval = time.perf_counter()
                if self.evaluates_at(self.step) and self.backend.is_main:  # evaluation needs no other rank
                    m.update(self.evaluate())
                t_eval = time.perf_counter() - t_eval
                m.update(self.meter.metrics())
                if self.ledger is not None:
                    m["cost/sweep_usd"] = self.ledger.charge(self.job_id, self.meter.usd)
                self.tracker.log_metrics(m, self.step)
                self.final_metrics.update(m)
                bar.set_postfix(reward=f"{m['reward/raw_mean']:.2f}", H=f"{m.get('answers/entropy', 0.0):.2f}",
                                valid=f"{m['answers/valid_rate']:.2f}", usd=f"{self.meter.usd:.3f}", refresh=False)
                bar.update(1)
                saved = self.step % cfg.train.checkpoint_every == 0
                if saved:
                    t_save = time.perf_counter()
                    self.save_checkpoint()
                    self.save_seconds = time.perf_counter() - t_save
                elif self.step % cfg.tracking.flush_every == 0:
                    # metrics past the last checkpoint wait for the next one (a crash would
                    # recompute those steps); this sends the rest and retries if offline
                    self.tracker.flush(upto_step=self.last_ckpt_step)
                # the step alone: evaluations and checkpoints are projected on their own
                self.meter.record_step(time.perf_counter() - t0 - t_eval - (self.save_seconds if saved else 0.0))
            return "completed"
        finally:
            bar.close()

    def finish(self, reason: str) -> None:
        """Final evaluation, checkpoint and artifacts; status FINISHED (completed, or stopped
        by the budget) or KILLED (a signal). Under a budget stop the final evaluation runs
        only if it still fits; the checkpoint is always written."""
        eval_fits = not self.meter.would_exceed(self.cap(), extra_seconds=self.eval_seconds or None)
        due = self.last_eval_step != self.step and self.step > 0 and self.backend.is_main
        if due and reason in FINISHED_REASONS and (reason != "budget" or eval_fits):
            m = self.evaluate()
            self.tracker.log_metrics(m, self.step)
            self.final_metrics.update(m)
        self.save_checkpoint()
        if self.cfg.trainer.name == "deepspeed" and self.cfg.trainer.export_hf:
            hf = self.backend.export_hf(self.model, self.tok, self.output_dir / "hf_model")
            self.tracker.set_tags({"hf_model": str(hf)})
        if not self.backend.is_main:
            return
        if reason == "budget":
            print(f"budget: stopped after step {self.step} of {self.cfg.train.steps}: spent ${self.meter.usd:.4f} "
                  f"of the ${self.cap():.4f} cap; the next step would take ~${self.meter.usd_for(self.meter.next_step_seconds()):.4f}",
                  file=sys.stderr)
        if self.ledger is not None:
            self.ledger.finish(self.job_id, self.meter.usd)
        # totals including the final evaluation, as tags: the step's cost metrics are logged already
        self.tracker.set_tags({"stop_reason": reason, "final_step": self.step,
                               "total_wall_s": f"{self.meter.wall_seconds:.1f}",
                               "total_device_hours": f"{self.meter.device_hours:.5f}",
                               "total_usd": f"{self.meter.usd:.4f}"})
        self.log_artifacts()
        self.tracker.end("FINISHED" if reason in FINISHED_REASONS else "KILLED")

    def log_artifacts(self) -> None:
        from runner.plots import distribution_over_steps

        art = self.output_dir / "artifacts"
        art.mkdir(parents=True, exist_ok=True)
        if self.history.train:
            keys = list(self.history.train[-1][1].keys())
            plot = distribution_over_steps(self.history.train, self.history.eval, keys,
                                           self.env.valid_answers or keys, art / "answer_distribution.png",
                                           f"{self.cfg.env.name} / {self.cfg.shaper.name}")
            self.tracker.log_artifact(plot)
        if (self.output_dir / "reward_errors.jsonl").exists():
            self.tracker.log_artifact(self.output_dir / "reward_errors.jsonl")
        if self.last_eval:
            rows = ["| # | completion | answer | reward |", "|---|---|---|---|"]
            ev = self.last_eval
            for i, (c, s) in enumerate(zip(ev["completions"], ev["scores"])):
                if i >= self.cfg.train.sample_table_rows:
                    break
                text = (ev["prompt"].assistant_prefix + c).replace("|", "\\|").replace("\n", "\\n")
                rows.append(f"| {i} | `{text}` | {s.answer_key} | {s.reward:g} |")
            table = "\n".join(rows) + "\n"
            (art / "samples.md").write_text(table)
            self.tracker.log_artifact(art / "samples.md")

    def summary(self) -> str:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        env = self.env
        ev = self.last_eval or {"dist": {}, "probs": {}}
        valid = env.valid_answers or []
        t = Table(title=f"final policy after {self.step} steps: {self.cfg.env.name}, shaper={self.cfg.shaper.name}")
        if not env.answer_space:  # held-out evaluation (math, Wordle): its metrics
            t.add_column("held-out evaluation")
            t.add_column("value", justify="right")
            for k, v in sorted(self.final_metrics.items()):
                if k.startswith("eval/") and k != "eval/reward_errors":
                    t.add_row(k[5:], f"{v:.3f}")
            return self._summary_text(t)
        t.add_column("answer")
        t.add_column(f"sampled (n={self.cfg.train.eval_samples}, T=1)", justify="right")
        t.add_column("P(first token)", justify="right")
        t.add_column("ideal", justify="right")
        for k, v in ev["dist"].items():
            ideal = 1 / len(valid) if k in valid else 0.0
            p = ev["probs"].get(k)
            t.add_row(k, f"{v:.3f}", "" if p is None else f"{p:.3f}", f"{ideal:.3f}")
        return self._summary_text(t)

    def _summary_text(self, t) -> str:
        from io import StringIO

        from rich.console import Console

        buf = StringIO()
        console = Console(file=buf, width=100)
        console.print(t)
        console.print(f"MLflow: {self.tracker.run_url()}  (`make ui` to browse)")
        console.print(f"output: {self.output_dir}   wall {self.meter.wall_seconds:.0f} s, "
                      f"{self.meter.device_hours:.4f} device-h, ${self.meter.usd:.4f}")
        return buf.getvalue()


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else 0.0


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


def estimate(trainer: Trainer) -> dict[str, float]:
    """Time a few warm-up steps and one evaluation; project the configured run's time and
    cost. Nothing is logged or checkpointed."""
    cfg = trainer.cfg
    n = cfg.budget.estimate_steps
    startup = trainer.meter.wall_seconds
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.step += 1
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / (n - 1) if n > 1 else times[0]  # the first step is a warm-up
    trainer.evaluate()
    evals = (cfg.train.steps - 1) // cfg.train.eval_every + 1 if cfg.train.eval_every else 1
    total = startup + step_s * cfg.train.steps + trainer.eval_seconds * evals
    usd = trainer.meter.usd_for(total)
    cap = trainer.cap()
    est = {"startup_s": startup, "step_s": step_s, "eval_s": trainer.eval_seconds, "steps": cfg.train.steps,
           "evals": evals, "total_s": total, "device_hours": total * cfg.budget.devices / 3600, "usd": usd,
           "cap_usd": cap, "fits": cap is None or usd <= cap}
    b = cfg.budget
    print(f"estimate ({b.hardware}, {b.devices} device(s) at ${b.usd_per_device_hour:g}/device-hour, "
          f"from {n} timed steps):\n"
          f"  start-up {startup:.1f} s, {step_s:.2f} s/step x {cfg.train.steps} steps, "
          f"{trainer.eval_seconds:.1f} s/eval x {evals}\n"
          f"  projected {total / 60:.1f} min, {est['device_hours']:.4f} device-hours, ${usd:.4f}"
          f" -> {'fits' if est['fits'] else 'does NOT fit'} the cap "
          f"{'(none)' if cap is None else f'${cap:.4f}'}")
    return est


def run(cfg: RunConfig, output_dir: Path, config_yaml: str, meter: Optional[CostMeter] = None,
        ledger: Optional[SweepLedger] = None, job_id: str = "0", parent_run_id: Optional[str] = None,
        extra_tags: Optional[dict[str, str]] = None) -> Trainer:
    """Train from scratch or resume from `output_dir`. Leaves the MLflow run with a status
    that says how it ended: FINISHED (completed, cost or token budget), KILLED (signal) or FAILED."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("output dir %s (env=%s algo=%s shaper=%s model=%s)", output_dir, cfg.env.name, cfg.algo.name,
             cfg.shaper.name, cfg.model.name)
    trainer = Trainer(cfg, output_dir, meter, ledger, job_id)
    trainer.setup()
    if cfg.budget.estimate_only:
        trainer.estimate = estimate(trainer)
        trainer.stop_reason = "estimate"
        return trainer
    trainer.open_tracking(config_yaml, parent_run_id, extra_tags)
    if trainer.backend.is_main:
        (output_dir / "config.yaml").write_text(config_yaml)
        if cfg.trainer.name == "deepspeed":  # the JSON DeepSpeed was given, generated from the config
            ds_json = output_dir / "deepspeed_config.json"
            ds_json.write_text(json.dumps(trainer.backend.config, indent=2))
            trainer.tracker.log_artifact(ds_json, "config")
    with StopFlag() as stop:
        try:
            trainer.stop_reason = trainer.fit(stop)
            trainer.finish(trainer.stop_reason)
        except KeyboardInterrupt:
            trainer.tracker.set_tags({"stop_reason": "interrupted", "final_step": trainer.last_ckpt_step})
            trainer.tracker.end("KILLED", upto_step=trainer.last_ckpt_step)
            raise
        except NonFiniteError as e:
            trainer.save_checkpoint()  # the weights are the last finite ones
            trainer.tracker.set_tags({"stop_reason": "nonfinite", "final_step": trainer.step, "error": str(e)[:500]})
            trainer.tracker.end("FAILED")
            raise
        except BaseException:
            tb = traceback.format_exc()
            try:
                trainer.tracker.set_tags({"stop_reason": "error"})
                trainer.tracker.log_text(tb, "traceback.txt")
                trainer.tracker.end("FAILED", upto_step=trainer.last_ckpt_step)
            finally:
                raise
    if trainer.backend.is_main:
        print(trainer.summary())
    return trainer
