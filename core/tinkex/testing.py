"""Helpers for testing tinkex plugins in-process, without installing them.

A plugin registered here behaves exactly like an installed distribution of that
name: it is listed by ``tinkex plugins list``, the allow/deny lists apply to
it, a hook that raises makes it broken, and its regularizers are found by
:func:`tinkex.regularizer`. Leaving the ``with`` block unregisters it and
resets the registry. Typical use in a plugin's own tests::

    import pytest
    import tinkex
    import tinkex.testing
    import my_plugin

    @pytest.fixture
    def registered():
        with tinkex.testing.register_plugin(my_plugin, name="tinkex-reg-mine"):
            yield

    def test_builds(registered):
        spec = tinkex.regularizer("mine", weight=0.5)
        assert spec.name == "mine"
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import _plugins
from ._plugins import check_regularizer_class, reset_plugins
from .hookspecs import hookimpl

__all__ = [
    "check_regularizer_class",
    "register_plugin",
    "register_regularizers",
    "reset_plugins",
]


@contextmanager
def register_plugin(
    plugin: object, *, name: str = "tinkex-test-plugin", version: str | None = "0.0.0"
) -> Iterator[object]:
    """Register ``plugin`` as if it were an installed distribution called ``name``.

    Args:
        plugin: a module, or an instance of a class, with functions marked
            ``@tinkex.hookimpl``.
        name: the distribution name it is listed under (several plugins may share one).
        version: the version it is listed with.

    Yields:
        ``plugin`` itself.

    The registry is reset on entry and on exit, so lookups inside the block see
    the plugin and lookups after it do not.
    """
    entry = (name, version, plugin)
    _plugins._in_process.append(entry)
    reset_plugins()
    try:
        yield plugin
    finally:
        for i, item in enumerate(_plugins._in_process):
            if item is entry:
                del _plugins._in_process[i]
                break
        reset_plugins()


class _RegistersClasses:
    """A plugin object whose hooks register fixed classes and backends."""

    def __init__(self, classes: tuple[Any, ...], backends: dict[str, Any]) -> None:
        self._classes = classes
        self._backends = backends

    @hookimpl
    def tinkex_register_regularizers(self, register: Any) -> None:
        for cls in self._classes:
            register(cls)

    @hookimpl
    def tinkex_register_backends(self, register: Any) -> None:
        for backend_name, factory in self._backends.items():
            register(backend_name, factory)

    def __repr__(self) -> str:
        names = [getattr(c, "name", c) for c in self._classes] + list(self._backends)
        return f"<test plugin registering {', '.join(map(str, names))}>"


@contextmanager
def register_regularizers(
    *classes: type,
    name: str = "tinkex-test-plugin",
    version: str | None = "0.0.0",
    backends: dict[str, Any] | None = None,
) -> Iterator[object]:
    """Register regularizer classes (and optionally backends) under a test distribution.

    A shortcut for :func:`register_plugin` with a plugin object whose hooks call
    ``register(cls)`` for each class and ``register(name, factory)`` for each
    backend. Contract violations make that distribution broken, as they would
    for an installed plugin (check them directly with :func:`check_regularizer_class`).

    Args:
        *classes: the regularizer classes.
        name: the distribution name they are listed under.
        version: the version they are listed with.
        backends: backend name -> factory.

    Yields:
        the plugin object.
    """
    with register_plugin(
        _RegistersClasses(classes, dict(backends or {})), name=name, version=version
    ) as p:
        yield p
