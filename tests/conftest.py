"""Shared fixtures for the core test suite.

Kept deliberately small. Every test runs with:

- the plugin environment variables (``TINKEX_LOAD_PLUGINS``,
  ``TINKEX_DISABLE_PLUGINS``, ``TINKEX_STRICT_PLUGINS``) unset, so a developer's
  shell cannot change what the tests see;
- structlog reset to its defaults afterwards, so a test that configures logging
  (``tinkex.telemetry.configure``) does not leak into the next one.

Tests that register plugins in-process use :mod:`tinkex.testing`, which resets
the plugin registry itself; ``fresh_plugins`` is there for tests that change the
environment and want a clean registry on both sides.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from tinkex.testing import PLUGIN_ENV_VARS as _PLUGIN_ENV


@pytest.fixture(autouse=True)
def _isolate_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in _PLUGIN_ENV:
        monkeypatch.delenv(var, raising=False)
    yield
    structlog.reset_defaults()


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """Forget the loaded plugins before and after the test."""
    from tinkex._plugins import reset_plugins

    reset_plugins()
    yield
    reset_plugins()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: builds venvs or runs subprocesses (seconds); runs by default, `-m 'not slow'` skips",
    )
