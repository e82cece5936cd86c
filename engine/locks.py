"""An exclusive file lock, waited for up to a deadline (a run folder's, an FFCV beton writer's)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


def open_for_locking(path: Path) -> int:
    """A descriptor of `path` (created if missing) to flock: read-write where this process may write it, since NFS
    takes an exclusive flock only on a file opened for writing (EBADF on one opened for reading: no lock at all);
    else read-only (another user's lock file, where a local disk still locks it). Raises the OSError of a folder
    where neither opens."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
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
