"""Checkpoint on preemption: SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before a kill).

While `catch_preemption()` is active in the main thread, those signals only set a flag. The trainer
looks at it after every step (on all ranks at once: one rank's signal stops them all), saves
`checkpoints/last` and raises `TrainingPreempted`; `semiseg train` then exits with status
`PREEMPTED_EXIT_STATUS` (75, "temporary failure" in sysexits.h), and `--resume` (or
`train.resume: auto`) continues the run exactly.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from semiseg.errors import SemisegError

PREEMPTED_EXIT_STATUS = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(SemisegError):
    """A preemption signal stopped training after a checkpoint; the message says how to resume."""


class PreemptionFlag:
    """The first preemption signal received (its name), or None."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - the signal module's signature
        self.received = self.received or signal.Signals(signum).name


@contextlib.contextmanager
def catch_preemption() -> Iterator[PreemptionFlag]:
    """Route SIGTERM/SIGUSR1 to a `PreemptionFlag` for the duration; the previous handlers come back after.

    Outside the main thread (where Python cannot install handlers) the flag simply never rises.
    """
    flag = PreemptionFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
