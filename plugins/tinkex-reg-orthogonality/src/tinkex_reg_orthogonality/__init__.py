"""tinkex-reg-orthogonality: the ``orthogonality`` regularizer.

Found by tinkex through the ``tinkex`` entry point ``orthogonality``; the math
is in this distribution's README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from tinkex import hookimpl

from .regularizers import Orthogonality

__all__ = ["Orthogonality", "tinkex_register_regularizers"]


@hookimpl
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Register ``orthogonality``."""
    register(Orthogonality)
