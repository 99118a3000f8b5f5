"""A one-line progress bar for hashing big files, shown to people only.

Hashing a multi-GiB image takes seconds; an operator at a terminal should see
it move. Logs and pipes (JSON output, the daemon, the hook) get nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from time import monotonic
from typing import TextIO

# Smaller files hash in well under a second here: no bar.
MIN_SIZE = 256 * 1024 * 1024
MIN_INTERVAL_S = 0.1  # at most 10 redraws a second


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def progress_for(
    path: str | os.PathLike[str], stream: TextIO | None = None
) -> Callable[[int, int], None] | None:
    """A ``progress(done, total)`` callback for hashing PATH, drawing on STREAM (stderr), or None.

    None unless STREAM is a terminal and PATH has at least MIN_SIZE bytes;
    None too if PATH cannot be stat'ed (hashing it will say why). The line is
    redrawn in place with ``\\r`` and ended with a newline once all is hashed.
    """
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        return None
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    if size < MIN_SIZE:
        return None
    name = os.path.basename(path)
    started = monotonic()
    last_drawn: float | None = None
    width = 0
    finished = False

    def draw(done: int, total: int) -> None:
        nonlocal last_drawn, width, finished
        now = monotonic()
        complete = done >= total
        if finished or (not complete and last_drawn is not None and now - last_drawn < MIN_INTERVAL_S):
            return
        elapsed = now - started
        rate = f"{done / elapsed / 1e9:.1f} GB/s" if elapsed > 0 else "- GB/s"
        percent = done * 100 // total if total else 100
        line = f"hashing {name} {percent:3d}% {_gib(done)}/{_gib(total)} {rate}"
        out.write("\r" + line.ljust(width) + ("\n" if complete else ""))
        out.flush()
        last_drawn, width, finished = now, len(line), complete

    return draw


def tell(line: str, stream: TextIO | None = None) -> None:
    """One line for a person waiting at a terminal on something slow (a reference VM's boot); else nothing."""
    out = sys.stderr if stream is None else stream
    if out.isatty():
        out.write(line + "\n")
        out.flush()
