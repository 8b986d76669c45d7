"""tinkex-reg-entropy: the ``entropy`` regularizer.

Found by tinkex through the ``tinkex`` entry point ``entropy``; the math is in
this distribution's README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from tinkex import hookimpl

from .regularizers import Entropy

__all__ = ["Entropy", "tinkex_register_regularizers"]


@hookimpl
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Register ``entropy``."""
    register(Entropy)
