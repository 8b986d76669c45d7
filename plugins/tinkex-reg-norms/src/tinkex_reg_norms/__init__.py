"""tinkex-reg-norms: the ``l1``, ``l2`` and ``elastic_net`` regularizers.

Found by tinkex through the ``tinkex`` entry point ``norms``; the math is in
this distribution's README.md.
"""

from __future__ import annotations

from collections.abc import Callable

from tinkex import hookimpl

from .regularizers import L1, L2, ElasticNet

__all__ = ["L1", "L2", "ElasticNet", "tinkex_register_regularizers"]


@hookimpl
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Register ``l1``, ``l2`` and ``elastic_net``."""
    register(L1)
    register(L2)
    register(ElasticNet)
