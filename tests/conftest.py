"""Shared pytest configuration for tvorch's tests."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `package` install and remove the Debian package, which
    replaces the node's hook while they run: they go after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("package") is not None)


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
