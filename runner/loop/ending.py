"""How a run ends, whatever stopped it: the final evaluation (if it is due and fits the
budget), the final checkpoint and export, the cost totals, and the status MLflow and the
output dir's record keep. Kept apart from the loop because every stop (completed, budget,
token budget, a signal) comes through here and must leave the same things behind."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("runner")

# stop reasons of a run that ended as configured (MLflow status FINISHED, exit code 0)
FINISHED_REASONS = ("completed", "budget", "token_budget")
# ... plus a price estimate (no training): the process exits 0 for these
CLEAN_EXIT_REASONS = FINISHED_REASONS + ("estimate",)


def finish(trainer, reason: str) -> None:
    """Final evaluation, checkpoint and artifacts; status FINISHED (completed, or stopped
    by the budget) or KILLED (a signal). Under a budget stop the final evaluation runs only
    if it still fits; the checkpoint is always written."""
    # the last periodic checkpoint counts (and its steps go to MLflow) before the final
    # evaluation logs more metrics at its step: a resume from it evaluates again, so those
    # must not have been sent yet
    trainer.saver.settle()
    t = trainer.cfg.train
    final_n = t.final_eval_samples or t.eval_samples
    eval_fits = not trainer.meter.would_exceed(trainer.cap(),
                                               extra_seconds=trainer.evaluator.seconds * final_n / t.eval_samples or None)
    # train.steps=0 (a recipe's eval stage): the model as it is, evaluated once
    due = (trainer.evaluator.last_step != trainer.step and (trainer.step > 0 or t.steps == 0)
           and trainer.backend.is_main)
    if due and reason in FINISHED_REASONS and (reason != "budget" or eval_fits):
        env = trainer.env
        what = (f"{len(env.eval_prompts())} held-out prompts x env.eval_k={env.eval_k}" if hasattr(env, "eval_prompts")
                else f"{final_n} samples (train.final_eval_samples; lower it for quick looks)")
        log.info("final evaluation: %s", what)  # the bar has closed: say what the wait is
        m = trainer.evaluate(samples=final_n)
        trainer.tracker.log_metrics(m, trainer.step)
        trainer.final_metrics.update(m)
    trainer.save_checkpoint(wait=not t.background_commit)  # committed during the export
    if t.export:  # plain HF weights (LoRA merged), both trainers
        hf = trainer.backend.export_hf(trainer.model, trainer.tok, trainer.output_dir / "hf_model")
        if hf is not None:
            trainer.tracker.set_tags({"hf_model": str(hf)})
    trainer.saver.settle()
    if not trainer.backend.is_main:
        return
    meter = trainer.meter
    if reason == "budget":
        print(f"budget: stopped after step {trainer.step} of {t.steps}: spent ${meter.usd:.4f} of the "
              f"${trainer.cap():.4f} cap; the next step would take ~${meter.usd_for(meter.next_step_seconds()):.4f}",
              file=sys.stderr)
    usd = meter.usd  # one reading: the sweep ledger records the total the run reports
    if trainer.ledger is not None:
        trainer.ledger.finish(trainer.job_id, usd)
    # totals including the final evaluation, as tags: the step's cost metrics are logged already
    trainer.tracker.set_tags({"stop_reason": reason, "final_step": trainer.step,
                              "total_wall_s": f"{meter.wall_seconds:.1f}",
                              "total_device_hours": f"{meter.device_hours:.5f}",
                              "total_usd": f"{usd:.4f}"})
    trainer.log_artifacts()
    status = "FINISHED" if reason in FINISHED_REASONS else "KILLED"
    trainer.tracker.end(status)
    trainer.record_end(status, reason, trainer.step)
    if reason == "completed" and not t.keep_final_checkpoint:
        drop_checkpoints(trainer)


def drop_checkpoints(trainer) -> None:
    """train.keep_final_checkpoint=false: the completed run's checkpoints go, last, once
    everything else it leaves is written; the record says so first, so a crash in between
    still refuses a resume from what is left."""
    import shutil

    from runner import outdir

    try:
        outdir.update_record(trainer.output_dir, checkpoints_dropped=True)
        shutil.rmtree(trainer.ckpt_dir)
    except OSError as e:  # the run is complete either way; the files stay
        print(f"train.keep_final_checkpoint=false: checkpoints not deleted ({e})", file=sys.stderr)
