"""One rule for tests that need an outside component (libvirtd, swtpm, a tool):
without it they skip on a developer's machine, and fail under CI=true, where
the project's own set-up must have installed everything."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must have this component: {reason}")
    pytest.skip(reason)


def require(condition: bool, reason: str) -> None:
    if not condition:
        missing(reason)
