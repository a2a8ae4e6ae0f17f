"""Checkpoints whose durable half runs beside the next training step.

A checkpoint of the default model is 1.6 GB (fp32 weights and AdamW's two moments).
Serializing it is work for this process; making it durable (fsync, then the digest
sidecar, the rename and pruning) is mostly waiting for the disk: measured on 2 cores
(AMD EPYC), ~3.4 s of fsync on top of ~2-3.5 s of torch.save, seven times in the main
job. So the periodic checkpoints are committed on a thread while the next step trains, and
a checkpoint counts only once its commit has finished: the run record's checkpoint step
and the metrics sent to MLflow (never past a durable checkpoint, see Fault tolerance in
the README) move then, on the training thread. A crash before that leaves the temporary
file, which the next start removes, and the previous checkpoint in charge: the same state
as a crash during a synchronous save.

The serialization itself runs on that thread too (torch backend): nothing is copied, because
the weights and the optimizer state do not change until the next optimizer step, and the
learner waits at that point (`wait_written`) if the thread is still reading them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

from runner.checkpoint import Finish


class Saver:
    def __init__(self, save: Callable[[Path, int, dict, int], Finish], directory: Path, keep: int,
                 on_durable: Callable[[int], None]) -> None:
        self._save, self.directory, self.keep, self.on_durable = save, directory, keep, on_durable
        self.last_step = 0  # the newest durable checkpoint's step
        self._pending: Optional[tuple[int, threading.Thread]] = None
        self._outcome: list = []  # the pending commit's path or exception
        self._written = threading.Event()  # clear while the thread still reads the weights
        self._written.set()

    def save(self, step: int, state: dict, wait: bool = True) -> Optional[Path]:
        """Write a checkpoint (after the previous one is durable, so they commit in order);
        with wait=False it is serialized and committed on a thread and `settle` completes
        it later. `state` must not change afterwards (the caller passes a copy)."""
        self.settle()
        finish = self._save(self.directory, step, state, self.keep)
        if wait:
            path = finish(lambda: None)
            self._durable(step)
            return path
        self._outcome = []
        self._written.clear()
        thread = threading.Thread(target=self._finish, args=(finish,), name=f"checkpoint-{step}")
        self._pending = (step, thread)
        thread.start()
        return None

    def _finish(self, finish: Finish) -> None:
        try:
            self._outcome.append(finish(self._written.set))
        except BaseException as e:  # re-raised on the training thread by settle()
            self._outcome.append(e)
        finally:
            self._written.set()

    def wait_written(self) -> None:
        """Called before the optimizer changes the weights or its state in place: blocks
        while a checkpoint on the thread is still reading them (it rarely is: serializing
        takes ~3 s, a step's generation, forward and backward ~8 s)."""
        self._written.wait()

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def settle(self, block: bool = True) -> None:
        """Finish the pending commit's bookkeeping once it is done (waiting for it when
        `block`); a commit that failed raises its CheckpointWriteError here."""
        if self._pending is None:
            return
        step, thread = self._pending
        if not block and thread.is_alive():
            return
        thread.join()
        self._pending = None
        outcome = self._outcome[0] if self._outcome else RuntimeError(f"checkpoint {step}: commit thread ended without a result")
        if isinstance(outcome, BaseException):
            raise outcome
        self._durable(step)

    def _durable(self, step: int) -> None:
        self.last_step = step
        self.on_durable(step)
