"""Sending tracking records off the training thread.

A store that is slow or locked (SQLite held by another writer answers "database is locked"
only after its 5 s busy timeout, per attempt) must not stall training. The training loop's
`flush()` calls only post a request here; one worker thread sends. Requests that arrive
while a send is in flight are coalesced into one: the worker sends up to the furthest step
asked for (None, everything, wins).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

_IDLE = object()  # no request waiting


class BackgroundSender:
    """Runs `send(upto_step)` on a daemon thread whenever `request(upto_step)` was called."""

    def __init__(self, send: Callable[[Optional[int]], bool], name: str = "mlflow-sender"):
        self._send = send
        self._cv = threading.Condition()
        self._want: object = _IDLE
        self._busy = False  # a send is in flight
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def request(self, upto_step: Optional[int]) -> None:
        with self._cv:
            if self._want is _IDLE:
                self._want = upto_step
            elif self._want is not None:
                self._want = None if upto_step is None else max(self._want, upto_step)
            self._cv.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait until every request so far was handled (sent, or failed); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._want is _IDLE and not self._busy, timeout)

    def close(self) -> None:
        """Wait for the send in flight (if any) and stop; requests still waiting are dropped:
        the caller sends everything itself afterwards."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._want is _IDLE and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                upto, self._want = self._want, _IDLE
                self._busy = True
            try:
                self._send(upto)
            except Exception:  # the send guards the store; this keeps the thread alive regardless
                log.exception("tracking sender: unexpected error (records stay in the spool)")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
