"""An exclusive file lock, waited for up to a deadline (a run folder's, an FFCV beton writer's)."""

from __future__ import annotations

import fcntl
import time


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
