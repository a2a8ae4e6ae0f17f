"""A time limit on reward calls (train.reward_timeout_s): an environment's score, score_batch
or score_game, and through them a dataset's reward functions, in training and evaluation."""

from __future__ import annotations

import signal
import sysconfig
import threading
import time
import traceback
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")
# what the reward clock's watchdog sends the main thread: a real-time signal where there are
# any (no convention gives them a meaning, unlike SIGUSR1 that some schedulers send as a warning)
TIMEOUT_SIGNAL = getattr(signal, "SIGRTMIN", signal.SIGUSR2)


class RewardTimeout(TimeoutError):
    """A reward call that ran past train.reward_timeout_s: a reward error like one that
    raises (train.on_reward_error), its message saying what hung and where."""


class _Expired(BaseException):
    """Raised inside the hung call by the clock's signal handler. A BaseException, so that
    a reward function's own `except Exception` does not swallow it; RewardClock.call turns
    it into RewardTimeout as soon as it is out of the call."""


class RewardClock:
    """Runs each reward call (an environment's score, score_batch or score_game, and through
    them a dataset's reward functions) with a time limit, train.reward_timeout_s (0 or None:
    none). Training and evaluation both score through the collector, so both go through here.

    The call runs on the main thread, where it always ran; a watchdog thread, at the
    deadline, sends the main thread TIMEOUT_SIGNAL, whose handler raises inside the call: a
    Python loop stops at its next bytecode, a blocking sleep, lock or socket read at once
    (the signal interrupts the system call). Why not the other routes:

    - a worker thread, abandoned when its time is up: a scorer that times itself with
      signal.alarm fails in any thread but the main one (math-verify, behind env=math,
      raises "doesn't support threaded environment" there: every rollout would score as an
      error), and the abandoned thread runs on: a spinning reward keeps a core and a share
      of the GIL for the rest of the run, and keeps changing the environment the next
      calls use;
    - SIGALRM or setitimer itself: one such timer per process, and math-verify sets and
      clears it (alarm(0)) inside its own calls, which would cancel ours;
    - a subprocess per call: the environment's state (rows, models, caches) would have to
      be pickled over, or rebuilt, for every call.

    What this cannot stop is a C call that ignores signals and never returns to Python (an
    abandoned thread could leave one behind if it released the GIL, at the costs above;
    train.stop_grace_s cannot stop it either: then only SIGKILL does). Calls made from a
    thread other than the main one run untimed (only the main thread runs signal handlers)."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = float(seconds or 0.0)
        self._cond = threading.Condition()
        self._armed: Optional[tuple[int, float]] = None  # (call, deadline) the watchdog waits for
        self._idle = True  # the watchdog waits with no deadline: the next call must wake it
        self._calls = 0
        self._running: Optional[int] = None  # the call in progress (main thread only)
        self._expired: Optional[int] = None  # the call whose time ran out (set by the watchdog)
        self._watchdog: Optional[threading.Thread] = None

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), or RewardTimeout naming `what` once it has run train.reward_timeout_s."""
        if not self.seconds or threading.current_thread() is not threading.main_thread():
            return fn()
        try:
            return self._timed(fn)
        except _Expired as e:  # also when it lands in _timed's own clean-up: the call took its time
            raise RewardTimeout(f"{what} did not return within train.reward_timeout_s={self.seconds:g} s "
                                f"(stopped in {_where(e)})") from None

    def _timed(self, fn: Callable[[], T]) -> T:
        self._start()
        with self._cond:
            self._calls += 1
            self._running = call = self._calls
            self._armed = (call, time.monotonic() + self.seconds)
            if self._idle:  # a watchdog already waiting for an earlier deadline wakes by itself
                self._cond.notify()
        try:
            return fn()
        finally:
            self._running = None  # first: from here the handler raises nothing
            with self._cond:
                self._armed = None

    def _start(self) -> None:
        """The watchdog thread (a daemon: it never keeps the process from exiting) and the
        signal handler, (re)installed if something else took the signal since."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="reward-clock", daemon=True)
            self._watchdog.start()
        if signal.getsignal(TIMEOUT_SIGNAL) != self._handle:
            signal.signal(TIMEOUT_SIGNAL, self._handle)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {TIMEOUT_SIGNAL})  # a mask inherited from a parent

    def _watch(self) -> None:
        main = threading.main_thread().ident
        with self._cond:
            while True:
                armed = self._armed
                if armed is None:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                    continue
                left = armed[1] - time.monotonic()
                if left > 0:  # later calls only move the deadline later: it is checked again then
                    self._cond.wait(left)
                    continue
                self._armed, self._expired = None, armed[0]
                signal.pthread_kill(main, TIMEOUT_SIGNAL)

    def _handle(self, signum: int, frame: Any) -> None:
        """On the main thread: raise in the call whose time ran out, if it is still running
        (a signal that arrives after it returned, or during a later call, does nothing)."""
        if self._expired is not None and self._expired == self._running:
            self._expired = None
            raise _Expired


def _where(e: BaseException) -> str:
    """Where the timeout found the call: the innermost frame, and the innermost of the user's
    own code (outside the standard library and installed packages) where that is another."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
    if not frames:
        return "?"
    paths = sysconfig.get_paths()
    own = [f for f in frames if not f.filename.startswith((paths["stdlib"], paths["purelib"], paths["platlib"]))]
    shown = [frames[-1]] + [f for f in own[-1:] if f is not frames[-1]]
    return ", called from ".join(f"{f.filename}:{f.lineno} in {f.name}" for f in shown)
