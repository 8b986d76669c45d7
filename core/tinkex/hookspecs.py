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
