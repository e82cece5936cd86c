"""Progress bars: tqdm, quiet in log files.

On a terminal a bar redraws up to ten times a second. Written to a file (`arat train ... > log 2>&1`), every redraw
is another stretch of text; there the bars redraw at most every 30 s, and the per-epoch lines carry the record.
`TQDM_MININTERVAL` (tqdm's own setting) overrides either.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_FILE_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), redrawing at most every 30 s where stderr is no terminal."""
    if "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ and not _terminal(sys.stderr):
        kwargs["mininterval"] = LOG_FILE_INTERVAL_S
    return tqdm(iterable, **kwargs)


def _terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False
