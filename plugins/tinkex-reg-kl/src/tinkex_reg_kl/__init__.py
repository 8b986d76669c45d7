"""tinkex-reg-kl: the ``kl`` regularizer.

Found by tinkex through the ``tinkex`` entry point ``kl``; the math is in this
distribution's README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from tinkex import hookimpl

from .regularizers import KL

__all__ = ["KL", "tinkex_register_regularizers"]


@hookimpl
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Register ``kl``."""
    register(KL)
