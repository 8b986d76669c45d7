"""tinkex-reg-consistency: the ``consistency`` regularizer.

Found by tinkex through the ``tinkex`` entry point ``consistency``; the math is
in this distribution's README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from tinkex import hookimpl

from .regularizers import Consistency

__all__ = ["Consistency", "tinkex_register_regularizers"]


@hookimpl
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Register ``consistency``."""
    register(Consistency)
