"""Ctrl-C during training: the first SIGINT lets the current step finish, then the run saves a
checkpoint and stops (``TrainingInterrupted``); a second one stops at once.

Every process of a launch stops after the same step (the processes agree on it after each step,
so the collective checkpoint is written by all of them), whichever of them got the signal.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

import torch
from accelerate import Accelerator


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT after a step, with a checkpoint: ``checkpoint`` is the folder to
    resume from (``training.resume_from``); ``report``: whether this process reports it (the
    main one)."""

    def __init__(self, message: str, checkpoint: Path, report: bool) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.report = report


class StopOnInterrupt:
    """A context manager for the training loop: inside it, the first SIGINT only sets
    ``requested`` (and says so on stderr when ``announce``); SIGINT then raises
    ``KeyboardInterrupt`` again, so a second one stops at once. The previous handler comes back
    on exit. Outside the main thread (where Python delivers signals) it does nothing."""

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.requested = False
        self._previous: object = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._first)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _first(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.announce:
            # os.write, not print: the handler may run in the middle of another write to stderr
            os.write(2, b"\ninterrupt: finishing this step, then saving a checkpoint "
                        b"(interrupt again to stop at once)\n")

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was interrupted (a collective with several processes)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
