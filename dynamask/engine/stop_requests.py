"""Stopping a training run cleanly: SIGINT / SIGTERM, its time limit, its iteration cap.

A signal only sets a flag: the loop acts on it at the next step boundary, after which it writes a checkpoint,
so that an interrupted run resumes exactly (:func:`dynamask.engine.train.train`). Under DDP every process
must stop at the same step, so the reasons are agreed over all of them (:meth:`StopRequests.agreed_reason`).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch

from dynamask.engine import distributed as dist_utils


class StopRequests:
    """SIGINT / SIGTERM set a flag that the loop acts on at the next step boundary; a second SIGINT raises.

    A context manager: the handlers are installed on entry (in the main thread only, where Python allows
    them) and the previous ones put back on exit.
    """

    def __init__(self) -> None:
        self.reason: str | None = None  # the signal's name, once one came
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed_reason(self, *, iteration: int, start: float, time_limit: float | None, max_iters: int | None,
                      device: torch.device) -> str | None:
        """Why to stop after this step, agreed by every process (they all stop at the same step boundary):
        a signal (here or in another process), ``time_limit`` seconds since ``start`` (``time.monotonic``),
        or ``max_iters`` reached by ``iteration``; None: go on."""
        late = time_limit is not None and time.monotonic() - start > time_limit
        signalled, over_time = dist_utils.all_reduce_max([float(self.reason is not None), float(late)], device)
        if signalled or over_time:
            return (self.reason or "signal in another process") if signalled else "time limit"
        if max_iters is not None and iteration >= max_iters:
            return "max_iters"
        return None
