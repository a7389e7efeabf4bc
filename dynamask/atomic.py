"""Files a run writes whole or not at all, with the permissions the user's umask asks for.

A file is written to a temporary file in its destination's folder, flushed to disk and renamed over the
destination (``os.replace``), so a failure or a kill at any point leaves the earlier file whole. ``mkstemp``
creates its file with mode 0600 whatever the umask; :func:`publish_mode` sets the mode an ordinary ``open``
would have given (``0o666 & ~umask``) before the rename, so that a checkpoint is as readable by the user's
group as the rest of the run folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO


def current_umask() -> int:
    """The process's umask. Read from /proc where the kernel shows it (no change of process state);
    elsewhere set and restored at once, the only portable way."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def write_atomic(path: str, write: Callable[[IO[bytes]], object], *, suffix: str = ".tmp") -> str:
    """Calls ``write(f)`` on a temporary binary file beside ``path``, then renames it to ``path`` with
    :func:`publish_mode`'s permissions. The temporary file is removed if anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, publish_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text_atomic(path: str, text: str) -> str:
    """:func:`write_atomic` for a UTF-8 text file."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")), suffix=os.path.splitext(path)[1] or ".tmp")
