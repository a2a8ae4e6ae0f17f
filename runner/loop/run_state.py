"""What a checkpoint holds besides the weights and the optimizer: the run's own state.

Kept as one pair, `snapshot` and `restore`, so that whatever is saved is also restored (a
counter saved but not restored would restart from zero after a resume and break the
"a resumed run equals an uninterrupted one" test in tests/test_faults.py). The weights and
optimizer are the trainer backend's (runner/backend); committing the file is the saver's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.train import Trainer

log = logging.getLogger(__name__)


@dataclass
class History:
    """What the final plot and summary need, kept in checkpoints so a resume has it."""

    train: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    eval: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def snapshot(t: "Trainer") -> dict[str, Any]:
    """The state of the run after step t.step, as plain data (pickled into the checkpoint)."""
    evaluated = t.evaluator.last_step == t.step
    return {
        "history": {"train": t.history.train, "eval": t.history.eval},
        "wall_seconds": t.meter.wall_seconds,
        # the budget projection's inputs: a resumed run near its cap must not project from nothing
        "recent_step_seconds": t.meter.recent_steps,
        "save_seconds": t.save_seconds,
        "entropy_coef": t.learner.adaptive.coef if t.learner.adaptive else None,
        "counters": {"reward_errors": t.collector.reward_errors, "nonfinite_total": t.learner.nonfinite_total,
                     "generated_tokens": t.generated_tokens},
        "final_metrics": t.final_metrics,
        # an evaluation at this step (e.g. the final one) is not run again after a resume
        "evaluated_step": t.evaluator.last_step if evaluated else None,
        "eval_last": t.evaluator.last if evaluated else None,
    }


def restore(t: "Trainer", state: dict[str, Any]) -> None:
    """The inverse of `snapshot`, on a trainer whose model and optimizer are loaded already.
    Checkpoints written before a key existed restore that key's starting value."""
    t.step = t.saver.last_step = state["step"]
    t.history = History(**state["history"])
    t.meter.carry(state.get("wall_seconds", 0.0))
    t.meter.carry_steps(state.get("recent_step_seconds", []))
    t.save_seconds = state.get("save_seconds", 0.0)
    counters = state.get("counters", {})
    t.collector.reward_errors = counters.get("reward_errors", 0)
    t.learner.nonfinite_total = counters.get("nonfinite_total", 0)
    t.generated_tokens = counters.get("generated_tokens", 0)
    if t.learner.adaptive is not None and state.get("entropy_coef") is not None:
        t.learner.adaptive.coef = state["entropy_coef"]
    t.final_metrics = dict(state.get("final_metrics", {}))
    if state.get("evaluated_step") == t.step:
        t.evaluator.last, t.evaluator.last_step = state.get("eval_last"), t.step
    log.info("resumed from step %d", t.step)
