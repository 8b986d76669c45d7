"""The pluggy hooks a tinkex plugin can implement.

A plugin module marks its implementations with :data:`tinkex.hookimpl` and is
found through the ``tinkex`` entry-point group. See ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("tinkex")
hookimpl = pluggy.HookimplMarker("tinkex")


@hookspec
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Call ``register(cls)`` once for each regularizer class this plugin provides."""


@hookspec
def tinkex_register_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call ``register(name, factory)`` once for each training backend this plugin provides."""


@hookspec
def tinkex_register_loggers(register: Callable[[str, Callable[[], Any]], None]) -> None:
    """Call ``register(name, factory)`` once for each metrics logger this plugin provides
    (``factory()`` returns a :class:`tinkex.loggers.Logger`)."""


@hookspec
def tinkex_register_schedules(register: Callable[[str, Callable[..., float]], None]) -> None:
    """Call ``register(name, fn)`` once for each weight-schedule kind this plugin provides
    (``fn(step, *, start, end, steps) -> float``; see :func:`tinkex.schedules.register_kind`)."""
