"""An exclusive file lock, waited for up to a deadline (a run folder's, an FFCV beton writer's)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


def open_for_locking(path: Path) -> int:
    """A descriptor of `path` (created if missing) to flock: read-write where this process may write it, since NFS
    takes an exclusive flock only on a file opened for writing (EBADF on one opened for reading: no lock at all);
    else read-only (another user's lock file, where a local disk still locks it). Raises the OSError of a folder
    where neither opens."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # (and a read-only mount's existing file, EROFS)
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return os.open(path, os.O_RDONLY)


def flock_within(fd: int, wait_s: float, poll_s: float = 0.2) -> bool:
    """Take an exclusive flock on `fd`, polling up to `wait_s` while another holds it: True once taken, False when
    the wait ran out. A filesystem without file locks (ENOLCK, EOPNOTSUPP: NFS without lockd) raises its OSError."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)


@contextlib.contextmanager
def held_if_possible(path: Path, wait_s: float) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for the block, waited for up to `wait_s`: the block runs
    unlocked where the lock cannot be had (not taken in time: a holder stopped or hung; a folder or filesystem that
    takes no lock, NFS without lockd, another user's lock file there) as it would without one."""
    try:
        fd = open_for_locking(path)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # ENOLCK, EOPNOTSUPP: no file locks here
            flock_within(fd, wait_s)
        yield
    finally:
        os.close(fd)  # releases the lock
