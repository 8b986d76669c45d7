"""The built-in backend plugin: registers ``local`` and ``tinker``.

The factories import their backend modules lazily, so loading the plugin
manager (``tinkex plugins list``, ``tinkex --help``) never imports torch,
transformers or the Tinker SDK.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl

__all__ = ["create_local", "create_tinker", "tinkex_register_backends"]


async def create_local(**kwargs: Any) -> Any:
    """Create a :class:`tinkex._backends.local.LocalBackend` (see its ``create`` for the arguments)."""
    from .local import LocalBackend

    return await LocalBackend.create(**kwargs)


async def create_tinker(**kwargs: Any) -> Any:
    """Create a :class:`tinkex._backends.tinker.TinkerBackend` (see its ``create`` for the arguments)."""
    from .tinker import TinkerBackend

    return await TinkerBackend.create(**kwargs)


@hookimpl
def tinkex_register_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register the built-in ``local`` and ``tinker`` backends."""
    register("local", create_local)
    register("tinker", create_tinker)
