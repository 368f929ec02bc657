"""An exclusive lock on a working folder (an evaluation's ``--out``, a recipe's ``OUT``, a training
``--output_dir``): a second process started on the same folder (a second terminal, a requeued job) is
refused instead of writing beside the first."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
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
    the process's end does, however it ends). A lock file removed by its holder as it let go is made
    anew, so the lock is always on the file at ``path``."""
    for _ in range(100):
        lock = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a running process"
            lock.close()
            raise FolderInUse(holder) from None
        try:
            same = os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        lock.close()  # locked a file its holder had just removed: lock the one at the path now
    else:
        raise FolderInUse("a process that keeps replacing the lock file")
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()}")
    lock.flush()
    return lock


@contextlib.contextmanager
def holding(path: Path, refused: Callable[[str], Exception], remove: bool = False) -> Iterator[None]:
    """Hold the lock file ``path`` (its folder made if missing) for the ``with`` block; ``refused(holder)``
    is raised if another process holds it. ``remove``: delete the lock file at the end (a folder that is
    shared, such as a trained model, keeps no lock file; :func:`take_lock` makes it anew)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = take_lock(path)
    except FolderInUse as e:
        raise refused(e.holder) from None
    try:
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        lock.close()
