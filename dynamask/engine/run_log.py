"""The log of a training run: ``OUT/log.txt`` and the console, through Python's ``logging``.

Everything ``dynamask train`` says (the plan, a progress line every ``log_every`` iterations, warnings,
stops, the switch fit's summary, the final metrics) goes to the logger ``dynamask.train``. Rank 0 writes
it to ``log.txt`` (appended to, so a resumed run continues the file; each line timestamped) whether or not
the output is a terminal, and to standard output. While the run's progress bar is shown the progress lines
go to the file only (the bar says the same on the console); with ``--no-progress`` (or where the bar is not
shown) they go to the console too. Console lines are written through ``tqdm.write``, so that they do not
break the bar. Other ranks log nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

LOG_FILE = "log.txt"
LOGGER = "dynamask.train"
PROGRESS = "progress"  # the ``extra`` flag of a progress line: ``log.info(msg, extra={PROGRESS: True})``


class _Console(logging.Handler):
    """Writes to the current ``sys.stdout`` (looked up at each record, as ``print`` does) through
    ``tqdm.write``, which clears and redraws the progress bar around the line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def run_logger(out_dir: str, *, main: bool, to_file: bool, console_progress: bool) -> Iterator[logging.Logger]:
    """The ``dynamask.train`` logger, set up for one run and restored afterwards.

    ``main``: this process speaks (rank 0); ``to_file``: append to ``OUT/log.txt`` (not in a dry run, which
    writes nothing); ``console_progress``: progress lines go to the console too (no progress bar shown)."""
    logger = logging.getLogger(LOGGER)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    for h in saved[2]:
        logger.removeHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the run's own handlers say it once; an application's root logger is left alone
    handlers: list[logging.Handler] = []
    if main:
        console = _Console()
        console.setFormatter(logging.Formatter("%(message)s"))
        if not console_progress:
            console.addFilter(lambda record: not getattr(record, PROGRESS, False))
        handlers.append(console)
        if to_file:
            # delay: the file is created at the first line, so a run refused by its checks leaves none
            file = logging.FileHandler(os.path.join(out_dir, LOG_FILE), mode="a", encoding="utf-8", delay=True)
            file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            handlers.append(file)
    else:
        handlers.append(logging.NullHandler())
    for h in handlers:
        logger.addHandler(h)
    try:
        yield logger
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for h in saved[2]:
            logger.addHandler(h)


def progress_line(row: dict[str, Any], *, total_epochs: int, total_iterations: int, sec_per_iter: float) -> str:
    """A progress line: where the run is, its loss and each term, the lr, the speed and the time left.
    ``row``: a metrics.csv row (epoch, iteration, lr, loss, loss_*, sec_per_iter)."""
    terms = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("loss_"))
    left = max(total_iterations - int(row["iteration"]), 0) * sec_per_iter
    return (f"epoch {row['epoch']}/{total_epochs} iteration {row['iteration']}/{total_iterations}: loss "
            f"{row['loss']:.4f} ({terms}) lr {row['lr']:.3g} {row['sec_per_iter']:.2f} s/it eta {duration(left)}")


def duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
