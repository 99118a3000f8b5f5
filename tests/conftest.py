"""Shared pytest configuration for tvorch's tests."""

from __future__ import annotations

import pytest


# --- golden files (tests/golden/) ---------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        help="rewrite the golden files in tests/golden/ instead of comparing with them",
    )


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))
