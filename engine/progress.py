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


class _LogFileBar(tqdm):
    """A bar in a log file: a new postfix or description waits for the next timed redraw (tqdm redraws at once by
    default: the loss shown every log interval redrew the bar each time), and tqdm's monitor thread, which forces
    a redraw `maxinterval` (10 s) after the last one, waits as long as the bar's own interval."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_postfix_str(self, s="", refresh=False):
        super().set_postfix_str(s, refresh=refresh)

    def set_description(self, desc=None, refresh=False):
        super().set_description(desc, refresh=refresh)


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), redrawing at most every 30 s where stderr is no terminal, and first drawn 30 s in."""
    if "mininterval" in kwargs or "TQDM_MININTERVAL" in os.environ or _terminal(sys.stderr):
        return tqdm(iterable, **kwargs)
    kwargs["mininterval"] = LOG_FILE_INTERVAL_S
    kwargs.setdefault("maxinterval", LOG_FILE_INTERVAL_S)
    # nothing drawn before the first interval: a bar shorter than it (an epoch on a GPU) writes nothing, where its
    # first and last draws had glued "\repoch 3/100: 0%|...|\r   \r" before each epoch's line (`grep ^epoch log`
    # found none)
    kwargs.setdefault("delay", LOG_FILE_INTERVAL_S)
    # a bar that did draw ends on a line of its own, its last state, so that the line printed after it (an epoch's)
    # starts at the left: cleared instead (leave=False), that line followed the bar's carriage returns
    kwargs["leave"] = True
    return _LogFileBar(iterable, **kwargs)


def _terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def close_bars() -> None:
    """Close every open bar (a command ending on an error inside an epoch or an evaluation): its line is cleared (in
    a log file: ended, its last state kept), so the error line that follows starts at the left, not after the bar."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
