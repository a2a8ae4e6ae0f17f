"""Stopping on a signal: the first SIGINT/SIGTERM stops after the current step, a second
aborts at once, and a step still hung train.stop_grace_s after the first is abandoned before
its optimizer step, with what it changed put back (StepStart)."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from runner.checkpoint import rng_state, set_rng_state

if TYPE_CHECKING:
    from runner.train import Trainer


class StepAbandoned(KeyboardInterrupt):
    """The step in progress had not finished train.stop_grace_s after the first stop signal,
    and its optimizer step had not begun: raised in it by StopFlag, caught by the loop, which
    stops at the previous step. A KeyboardInterrupt, as the second signal's is: a reward
    function's `except Exception` lets it through."""


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second one
    interrupts at once (the last checkpoint is still there). A step that has not finished
    `grace_s` after the first signal (a hung reward function; one SIGTERM is all a scheduler
    sends before SIGKILL) is abandoned if it is still `abandonable`: the timer sends the
    main thread the same signal again, and the handler raises StepAbandoned there instead
    of KeyboardInterrupt. Past the step's optimizer step (`commit`) it runs to its end."""

    def __init__(self, grace_s: Optional[float] = None) -> None:
        self.reason: Optional[str] = None
        self.grace_s = grace_s  # None: wait for the step however long it takes
        self._old: dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None
        self._grace_over = False  # set by the timer thread just before its signal
        self._abandonable = False  # main thread only

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cancel()  # before the handlers go: the timer's signal must never reach the old ones
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """The block (one step) may be abandoned from the grace timer until `commit`."""
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False
            if self.reason is not None:
                self._cancel()  # the step the grace was for is over: the loop stops here

    def commit(self) -> None:
        """The optimizer is about to change the weights: the step can no longer be abandoned."""
        self._abandonable = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._grace_over:  # the timer's own signal
            self._grace_over = False
            if self._abandonable:
                self._abandonable = False
                raise StepAbandoned(f"{signal.Signals(signum).name}: the step had not finished "
                                    f"train.stop_grace_s={self.grace_s:g} s later")
            return  # past its optimizer step: it finishes, as without a grace period
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "sigint" if signum == signal.SIGINT else "sigterm"
        grace = (f"; a step not done in {self.grace_s:g} s is abandoned and the previous one kept"
                 if self.grace_s is not None else "")
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to abort now{grace})",
              file=sys.stderr)
        if self.grace_s is not None:
            self._timer = threading.Timer(self.grace_s, self._expire, (signum, threading.main_thread().ident))
            self._timer.daemon = True
            self._timer.start()

    def _expire(self, signum: int, main: int) -> None:
        """On the timer thread: wake the main thread, even from a blocking call, with the same signal."""
        self._grace_over = True
        signal.pthread_kill(main, signum)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()  # a signal it sent is handled before this returns
            self._timer = None


@dataclass
class StepStart:
    """What a step changes besides the weights, as it was when the step began: put back when
    the step is abandoned before its optimizer step, so the checkpoint the stop then writes is
    the previous step's own and a resume from it equals an uninterrupted run
    (tests/test_hangs.py). Whatever train_step changes that a checkpoint holds belongs here."""

    step: int
    rng: dict  # the RNG streams the step's sampling drew from
    reward_errors: int
    nonfinite_total: int
    entropy_coef: Optional[float]
    generated_tokens: int
    history_len: int

    @classmethod
    def capture(cls, t: "Trainer") -> "StepStart":
        return cls(t.step, rng_state(), t.collector.reward_errors, t.learner.nonfinite_total,
                   t.learner.adaptive.coef if t.learner.adaptive else None, t.generated_tokens, len(t.history.train))

    def restore(self, t: "Trainer") -> None:
        t.step = self.step
        set_rng_state(self.rng)
        t.collector.reward_errors, t.learner.nonfinite_total = self.reward_errors, self.nonfinite_total
        if t.learner.adaptive is not None:
            t.learner.adaptive.coef = self.entropy_coef
        t.generated_tokens = self.generated_tokens
        del t.history.train[self.history_len:]
