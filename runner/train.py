"""The job around the steps: set-up, evaluation, checkpoints, tracking, the budget and a
clean stop on Ctrl-C, the same for every step kind. What one step does is its kind's
(runner/loop/step_kind.py): the RL step (runner/loop/rl_step.py),

    prompts -> rollouts -> scores -> shaped rewards -> advantages -> loss -> optimizer step

or the supervised one (runner/loop/sft_step.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from runner import outdir
from runner.backend import STOP_CODES, make_backend, rollout_copy, rollout_dtype, sync_rollout_weights  # noqa: F401
from runner.budget import CostMeter
from runner.sweep_ledger import SweepLedger
from runner.config import RunConfig
from runner.loop import ending, run_state, step_kind
from runner.loop.ending import CLEAN_EXIT_REASONS, FINISHED_REASONS  # noqa: F401  (the entry points' exit codes)
from runner.loop.run_state import History
from runner.loop.collector import Collector
from runner.loop.evaluator import Evaluator
from runner.loop.learner import Learner, NonFiniteError  # noqa: F401  (raised through run())
from runner.loop.outputs import log_artifacts, summary
from runner.loop.saver import Saver
from runner.loop.stopping import StepAbandoned, StepStart, StopFlag
from runner.models import load_policy
from runner.plugins import build_env
from runner.rollout.hf import RolloutBatch, make_rollout
from runner.track.run_start import open_run
from runner.track.store import Tracker

log = logging.getLogger(__name__)


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


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device='cuda' but no CUDA device is visible; use trainer.device=cpu or auto")
    return name


class Trainer:
    def __init__(self, cfg: RunConfig, output_dir: Path, meter: Optional[CostMeter] = None,
                 ledger: Optional[SweepLedger] = None, job_id: str = "0"):
        self.cfg = cfg
        self.ledger, self.job_id = ledger, job_id
        self.save_seconds = 0.0  # the last periodic checkpoint's save time (budget projection; checkpointed)
        self.generated_tokens = 0  # rollout tokens sampled so far (FR3E base trajectories included)
        self.output_dir = output_dir
        self.meter = meter or CostMeter(cfg.budget.usd_per_device_hour, cfg.budget.devices)
        self.env = build_env(cfg.env, cfg.seed)
        # what a step does (algo.kind); its data is read and checked before the model loads
        self.kind = step_kind.make(cfg, self.env)
        from runner.models import load_tokenizer

        self.kind.before_weights(lambda: load_tokenizer(cfg.model))
        # the rollout copy lags the weights (a kind that samples only to evaluate refreshes it then)
        self.rollout_stale = False
        # the sampler records log-probs at the loss's temperature: the same distribution the loss computes
        self.rollout = make_rollout(cfg.rollout, cfg.algo.loss_temperature) if cfg.rollout.name == "hf" else None
        self.sampler = self.rollout  # the HF sampling loop itself, whatever wraps it below
        if hasattr(self.env, "new_game"):  # multi-turn: the environment answers between turns
            from runner.rollout.multiturn import MultiTurnRollout

            self.rollout = MultiTurnRollout(self.env, self.rollout)
        self.eval_rollout = self.rollout  # evaluation samples independently, whatever trains
        if cfg.rollout.strategy == "fr3e":
            from runner.rollout.fr3e import FR3ERollout

            f = cfg.rollout.fr3e
            self.rollout = FR3ERollout(self.rollout, f.base_samples, f.anchors, f.percentile, f.merge_adjacent)
        self.history = History()
        self.step = 0
        self.tracker: Optional[Tracker] = None
        self.stop_reason: Optional[str] = None
        self.final_metrics: dict[str, float] = {}
        self.backend = make_backend(cfg)
        self.collector = Collector(cfg, self.env, self.backend, output_dir)
        self.stop = StopFlag()  # fit's, while it runs (signals and the grace period)
        self.saver = Saver(self.backend.save, self.ckpt_dir, cfg.train.keep_checkpoints, self.checkpoint_durable)

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
        self.evaluator = Evaluator(cfg, self.env, self.tok, self.device, self.collector, self.autocast)
        a = cfg.algo
        # frozen copy of the starting policy, before any checkpoint is loaded
        ref = copy.deepcopy(model).eval().requires_grad_(False) if a.kl.coef > 0 else None
        # the trainable parameters only: with model.lora.r > 0, the adapters
        opt = make_adamw([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                         betas=(a.adam_beta1, a.adam_beta2), weight_decay=a.weight_decay)
        self.model, self.opt = self.backend.wrap(model, opt)
        self.learner = Learner(cfg, self.backend, self.tok, self.opt, self.autocast, self.push_weights, ref,
                               before_update=self.before_update)
        problems: list[str] = []
        state = self.backend.load(self.ckpt_dir, problems)
        self.fell_back = outdir.check_loaded(self.output_dir, state, problems, cfg.train.resume)
        if state is not None:
            run_state.restore(self, state)
        if cfg.rollout.name == "vllm":
            self.start_vllm()
        else:
            self.rollout_model = self.backend.rollout_model(self.model, cfg.rollout.dtype, self.device)
            self.sampler.fused(self.rollout_model)  # rollout.kernel=fused on a model it cannot run: refused now
        self.learner.rollout_differs = self.rollout_differs()

    def rollout_differs(self) -> bool:
        """Rollouts sampled by other weights or arithmetic than the training forward's: vLLM,
        a bfloat16 rollout copy of fp32 training, or bf16 autocast in training (algo.is_cap)."""
        if self.cfg.rollout.name == "vllm" or self.cfg.trainer.autocast == "bf16":
            return True
        return next(self.rollout_model.parameters()).dtype != next(self.backend.compute_model.parameters()).dtype

    def start_vllm(self) -> None:
        """A vLLM engine colocated on this rank's GPU, started from the current (maybe
        resumed) policy's weights, written as plain Hugging Face files."""
        from runner.rollout.vllm import VLLMRollout

        import shutil

        # written anew at every start, whole before it gets its name: a copy left by an
        # earlier attempt may be cut (a crash mid-save) and is never read back as it is
        weights = self.output_dir / "launch" / f"vllm_start_rank{self.backend.rank}"
        tmp = weights.with_name(f".{weights.name}.tmp")
        with self.backend.gathered(self.model):
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
            shutil.rmtree(weights, ignore_errors=True)
            os.replace(tmp, weights)
        self.rollout_model = self.model  # generation happens inside vLLM
        self.rollout = self.eval_rollout = VLLMRollout(self.cfg.rollout, str(weights), self.tok,
                                                       self.cfg.seed + self.backend.rank,
                                                       logprob_temperature=self.cfg.algo.loss_temperature)
        self.push_weights(force=True)

    def push_weights(self, force: bool = False) -> None:
        """After an optimizer step: HF rollouts' low-precision copy, or vLLM's weights. A step
        kind that samples only to evaluate, in one process, leaves the copy stale until an
        evaluation needs it (refresh_rollout): the bf16 compute copy is still refreshed,
        since the next step trains on it."""
        if not (force or self.kind.samples_each_step) and self.cfg.trainer.name == "torch" \
                and self.cfg.rollout.name == "hf":
            self.backend.sync_compute(self.model)
            self.rollout_stale = self.rollout_model is not self.backend.compute_model
            return
        self.backend.sync_rollout(self.rollout_model, self.model)
        self.rollout_stale = False
        if self.cfg.rollout.name == "vllm":
            tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
            with self.backend.gathered(self.model):
                self.rollout.on_policy_updated(self.model.named_parameters(), tied, force=force)

    def refresh_rollout(self) -> None:
        """The rollout copy brought up to the weights, where push_weights left it stale."""
        if self.rollout_stale:
            self.backend.sync_rollout(self.rollout_model, self.model)
            self.rollout_stale = False

    def autocast(self):
        """bf16 autocast for forward passes when trainer.autocast=bf16 (weights, optimizer
        state and the loss stay float32); a no-op otherwise."""
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16,
                              enabled=self.cfg.trainer.autocast == "bf16")

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def open_tracking(self, config_yaml: str, parent_run_id: Optional[str] = None,
                      extra_tags: Optional[dict[str, str]] = None, invocation: Optional[dict] = None) -> None:
        """The MLflow run of this output dir, new or resumed (runner.track.run_start)."""
        if not self.backend.is_main:
            self.tracker = NullTracker()
            return
        self.tracker = open_run(self.cfg, self.output_dir, self.step, config_yaml, parent_run_id, extra_tags,
                                invocation, self.fell_back)
        tags = self.kind.tags()  # what the run trains on
        if tags:
            self.tracker.set_tags(tags)
        self.kind.log_inputs(self.tracker)

    # -- one step ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One step of the run's kind (runner/loop/rl_step.py, runner/loop/sft_step.py), with
        the sampling policy's exact answer probabilities before it."""
        probs = self.evaluator.policy_probabilities(self.eval_model, self.step) if self.backend.is_main else {}
        t0 = time.perf_counter()
        m = self.kind.step(self)
        return {**m, **probs, "time/step_s": time.perf_counter() - t0}

    def update(self, batch: RolloutBatch, adv: torch.Tensor, scores: list) -> dict[str, float]:
        """One update of the policy from a batch and its advantages (the learner's)."""
        return self.learner.update(batch, adv, scores, self.step)

    def evaluate(self, samples: Optional[int] = None) -> dict[str, float]:
        self.refresh_rollout()
        m = self.evaluator.evaluate(self.eval_rollout, self.rollout_model, self.eval_model, self.step, samples)
        m.update(self.kind.eval_metrics(self))
        if self.evaluator.last and self.evaluator.last["dist"]:
            self.history.eval.append((self.step, self.evaluator.last["dist"]))
        return m

    @property
    def eval_model(self):
        """The weights evaluation reads exact probabilities from."""
        return self.backend.eval_model(self.model, self.rollout_model)

    # -- persistence ---------------------------------------------------------------------
    def weights_finite(self) -> bool:
        bad = any(not torch.isfinite(p).all() for p in self.model.parameters())
        return not self.backend.agree(int(bad))

    @property
    def last_ckpt_step(self) -> int:
        """The newest checkpoint that is on disk for good (a commit still running does not count)."""
        return self.saver.last_step

    def save_checkpoint(self, wait: bool = True) -> Optional[Path]:
        """This step's checkpoint; wait=False leaves its serialization and commit to a thread (runner/loop/saver.py)."""
        if not self.weights_finite():
            kept = (f"the one at step {self.last_ckpt_step} is kept" if self.saver.last_step or
                    outdir.has_checkpoints(self.output_dir) else "and none exists yet")
            raise NonFiniteError(f"the weights are non-finite after step {self.step} (is algo.lr too large? if "
                                 f"step 1 was already non-finite, check the model's files); this one is "
                                 f"not written, {kept}")
        # a copy: on a thread, the checkpoint is serialized while the next step changes these
        return self.saver.save(self.step, copy.deepcopy(run_state.snapshot(self)), wait)

    def checkpoint_durable(self, step: int) -> None:
        """A checkpoint is on disk for good: the record points at it, MLflow may get its steps."""
        if self.backend.is_main:
            outdir.update_record(self.output_dir, checkpoint_step=step)
        if self.tracker:
            self.tracker.flush(upto_step=step)

    def settle_checkpoint(self) -> None:
        """On the way out after an error: let a checkpoint still committing finish, so the
        run's record and MLflow name the newest one; its own failure is only logged."""
        try:
            self.saver.settle()
        except Exception as e:  # noqa: BLE001 - the error being handled is the one to report
            log.warning("%s", e)

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

    def before_update(self) -> None:
        """The learner is about to step the optimizer: from here this step cannot be abandoned
        (the weights change), and a checkpoint on a thread must be done reading them."""
        self.stop.commit()
        self.saver.wait_written()

    def fit(self, stop: StopFlag) -> str:
        """Train to train.steps; returns why it stopped: completed, budget or a signal name."""
        from tqdm import tqdm

        cfg = self.cfg
        self.stop = stop
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
                # what the next step also does (a periodic checkpoint or evaluation), and the
                # final checkpoint a stop after it writes: the cap holds what the run leaves behind
                periodic = ((self.save_seconds if nxt % cfg.train.checkpoint_every == 0 else 0.0)
                            + (self.evaluator.seconds if self.evaluates_at(nxt) else 0.0) + self.save_seconds)
                budget = self.backend.is_main and self.meter.would_exceed(self.cap(), periodic_seconds=periodic)
                code = self.backend.agree(max(STOP_CODES[stop.reason], STOP_CODES["budget"] if budget else 0))
                if code:
                    return {v: k for k, v in STOP_CODES.items()}[code]
                self.saver.settle(block=False)  # the last periodic checkpoint, once its commit is done
                start = StepStart.capture(self)
                t0 = time.perf_counter()
                self.step += 1
                try:
                    with stop.abandonable():
                        m = self.train_step()
                except StepAbandoned as e:
                    start.restore(self)
                    log.warning("%s: step %d abandoned before its optimizer step; stopping at step %d",
                                e, self.step + 1, self.step)
                    return stop.reason
                t_eval = time.perf_counter()
                if self.evaluates_at(self.step) and self.backend.is_main:  # evaluation needs no other rank
                    m.update(self.evaluate())
                t_eval = time.perf_counter() - t_eval
                m.update(self.meter.metrics())
                if self.ledger is not None:
                    m["cost/sweep_usd"] = self.ledger.charge(self.job_id, self.meter.usd)
                self.tracker.log_metrics(m, self.step)
                self.final_metrics.update(m)
                bar.set_postfix(**self.kind.progress(m), usd=f"{self.meter.usd:.3f}", refresh=False)
                bar.update(1)
                saved = self.step % cfg.train.checkpoint_every == 0
                if saved:
                    t_save = time.perf_counter()
                    self.save_checkpoint(wait=not self.cfg.train.background_commit)
                    self.save_seconds = time.perf_counter() - t_save
                    self.tracker.log_metrics({"time/checkpoint_s": self.save_seconds}, self.step)
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
        """The run's end: final evaluation, checkpoint, export, MLflow status (runner/loop/ending.py)."""
        ending.finish(self, reason)

    def record_end(self, status: str, reason: str, step: int) -> None:
        """How the run ended, in the output dir: a completed run is not run again."""
        if self.backend.is_main:
            try:
                outdir.update_record(self.output_dir, status=status, stop_reason=reason, final_step=step)
            except OSError as e:  # a full disk: the record stays as it was, the run resumes
                log.warning("could not record the run's end in %s: %s", self.output_dir, e)

    def log_artifacts(self) -> None:
        log_artifacts(self.tracker, self.output_dir, self.cfg, self.env, self.history, self.evaluator.last)

    def summary(self) -> str:
        return summary(self)


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
    total = startup + step_s * cfg.train.steps + trainer.evaluator.seconds * evals
    usd = trainer.meter.usd_for(total)
    cap = trainer.cap()
    est = {"startup_s": startup, "step_s": step_s, "eval_s": trainer.evaluator.seconds, "steps": cfg.train.steps,
           "evals": evals, "total_s": total, "device_hours": total * cfg.budget.devices / 3600, "usd": usd,
           "cap_usd": cap, "fits": cap is None or usd <= cap}
    b = cfg.budget
    print(f"estimate ({b.hardware}, {b.devices} device(s) at ${b.usd_per_device_hour:g}/device-hour, "
          f"from {n} timed steps):\n"
          f"  start-up {startup:.1f} s, {step_s:.2f} s/step x {cfg.train.steps} steps, "
          f"{trainer.evaluator.seconds:.1f} s/eval x {evals}\n"
          f"  projected {total / 60:.1f} min, {est['device_hours']:.4f} device-hours, ${usd:.4f}"
          f" -> {'fits' if est['fits'] else 'does NOT fit'} the cap "
          f"{'(none)' if cap is None else f'${cap:.4f}'}")
    if trainer.backend.is_main:  # what a staged recipe's estimate adds up (runner/recipe.py)
        outdir.write_text_atomic(trainer.output_dir / "estimate.json", json.dumps(est, indent=2))
    return est


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that ended the process, with what it left behind (printed by the entry point)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def run(cfg: RunConfig, output_dir: Path, config_yaml: str, meter: Optional[CostMeter] = None,
        ledger: Optional[SweepLedger] = None, job_id: str = "0", parent_run_id: Optional[str] = None,
        extra_tags: Optional[dict[str, str]] = None, invocation: Optional[dict] = None) -> Trainer:
    """Train from scratch or resume from `output_dir`. Leaves the MLflow run with a status
    that says how it ended: FINISHED (completed, cost or token budget), KILLED (signal) or FAILED,
    and the same in the output dir's record (runner.outdir)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("output dir %s (env=%s algo=%s shaper=%s model=%s)", output_dir, cfg.env.name, cfg.algo.name,
             cfg.shaper.name, cfg.model.name)
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, output_dir, meter, ledger, job_id)
        trainer.setup()
        from runner.preflight import record_startup  # what a budget cap must cover (runner/preflight/)
        record_startup(trainer)
        if cfg.budget.estimate_only:
            trainer.estimate = estimate(trainer)
            trainer.stop_reason = "estimate"
            return trainer
        trainer.open_tracking(config_yaml, parent_run_id, extra_tags, invocation)
    except KeyboardInterrupt:
        if trainer is not None and trainer.tracker is not None:
            trainer.tracker.end("KILLED", upto_step=trainer.last_ckpt_step)
            trainer.record_end("KILLED", "interrupted", trainer.last_ckpt_step)
        resumed = f"; the checkpoint at step {trainer.step} is kept" if trainer is not None and trainer.step else ""
        raise Interrupted(f"interrupted during start-up, before any step ran{resumed}; the same command starts again") from None
    if trainer.backend.is_main:
        (output_dir / "config.yaml").write_text(config_yaml)
        if cfg.trainer.name == "deepspeed":  # the JSON DeepSpeed was given, generated from the config
            ds_json = output_dir / "deepspeed_config.json"
            ds_json.write_text(json.dumps(trainer.backend.config, indent=2))
            trainer.tracker.log_artifact(ds_json, "config")
    # a DeepSpeed step is never abandoned: its ranks would have to agree, and its update runs inside backward
    with StopFlag(cfg.train.stop_grace_s if cfg.trainer.name == "torch" else None) as stop:
        try:
            trainer.stop_reason = trainer.fit(stop)
            trainer.finish(trainer.stop_reason)
        except KeyboardInterrupt:
            trainer.settle_checkpoint()
            last = trainer.last_ckpt_step
            trainer.tracker.set_tags({"stop_reason": "interrupted", "final_step": last})
            trainer.tracker.end("KILLED", upto_step=last)
            trainer.record_end("KILLED", "interrupted", last)
            kept = f"the checkpoint at step {last} is kept" if last else "no checkpoint had been written yet"
            raise Interrupted(f"interrupted at step {trainer.step}: {kept}; the MLflow run is marked KILLED "
                              f"(logged up to step {last}); the same command resumes") from None
        except NonFiniteError as e:
            trainer.settle_checkpoint()
            why = str(e)
            try:
                trainer.save_checkpoint()  # only if the weights themselves are finite
                why += f" The checkpoint at step {trainer.step} holds the last finite weights."
            except NonFiniteError as not_saved:
                why += f" {not_saved}."
            trainer.tracker.set_tags({"stop_reason": "nonfinite", "final_step": trainer.step, "error": why[:500]})
            trainer.tracker.end("FAILED")
            trainer.record_end("FAILED", "nonfinite", trainer.step)
            raise NonFiniteError(why) from None
        except BaseException:
            tb = traceback.format_exc()
            trainer.settle_checkpoint()
            try:
                trainer.tracker.set_tags({"stop_reason": "error"})
                trainer.tracker.log_text(tb, "traceback.txt")
                trainer.tracker.end("FAILED", upto_step=trainer.last_ckpt_step)
                trainer.record_end("FAILED", "error", trainer.last_ckpt_step)
            finally:
                raise
    if trainer.backend.is_main:
        print(trainer.summary())
    return trainer
