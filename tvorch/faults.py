"""Fault injection: ``TVORCH_CRASH_AT=STEP`` kills tvorch at a named step.

It exists only for the fault-injection tests (tests/integration/test_faults.py),
which kill a launch with SIGKILL after each of its steps and check that the
next command loses nothing. Unset, as everywhere else, a crash point costs one
dict lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(step: str) -> None:
    """Die here like ``kill -9`` (no cleanup, no ``finally``) if TVORCH_CRASH_AT is STEP."""
    if os.environ.get("TVORCH_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
