"""Folder locks (mmedagent/locks.py): one process at a time on an evaluation, recipe or training folder."""

import os

import pytest

from mmedagent import locks


def test_a_second_holder_is_refused_with_the_first_ones_process(tmp_path):
    first = locks.take_lock(tmp_path / ".lock")
    with pytest.raises(locks.FolderInUse) as refused:
        locks.take_lock(tmp_path / ".lock")
    assert refused.value.holder == f"process {os.getpid()}"
    first.close()
    locks.take_lock(tmp_path / ".lock").close()  # free again once closed


def test_a_lock_file_removed_by_its_holder_as_it_lets_go_is_not_the_one_locked(tmp_path, monkeypatch):
    """A holder that removes its lock file at the end (training) lets go between our open and our lock:
    we would hold a lock on a file no one else can see, and a third process would lock a new one."""
    path = tmp_path / ".train.lock"
    path.write_text("process 1")
    real, calls = locks.fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:
            path.unlink()  # the holder removes the file we just opened, and lets go
        return real(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    lock = locks.take_lock(path)
    assert len(calls) == 2 and os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
    with pytest.raises(locks.FolderInUse):  # a third process now sees our lock
        monkeypatch.setattr(locks.fcntl, "flock", real)
        locks.take_lock(path)
    lock.close()


def test_holding_removes_its_file_when_asked_and_raises_the_callers_error(tmp_path):
    with locks.holding(tmp_path / "out" / ".lock", lambda holder: KeyError(holder), remove=True):
        with pytest.raises(KeyError, match="process"):
            with locks.holding(tmp_path / "out" / ".lock", lambda holder: KeyError(holder)):
                pass
    assert not (tmp_path / "out" / ".lock").exists() and (tmp_path / "out").is_dir()
