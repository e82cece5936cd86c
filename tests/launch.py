"""Subprocesses that start their own children (torchrun's workers), ended as a whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def run_group(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own: on a timeout (or the test
    interrupted) the whole process group is killed, not only the launcher (subprocess.run's kill left torchrun's
    workers running on, orphaned, holding the cores the rest of the suite needs)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # (all gone already: the original error stands)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
