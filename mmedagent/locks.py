"""An exclusive lock on a working folder (an evaluation's ``--out``, a recipe's ``OUT``): a second process
started on the same folder (a second terminal, a requeued job) is refused instead of writing beside the first."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class FolderInUse(RuntimeError):
    """Another process holds the lock; ``holder`` says which ("process 1234")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_lock(path: Path) -> IO[str]:
    """Hold an exclusive lock on the file ``path`` (made if missing), which then names this process;
    :class:`FolderInUse` if another process holds it. Closing the returned file releases the lock (as
    the process's end does, however it ends)."""
    lock = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a running process"
        lock.close()
        raise FolderInUse(holder) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()}")
    lock.flush()
    return lock
