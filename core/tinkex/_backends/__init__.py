"""Training backends: where a :class:`tinkex.TrainingClient` runs its forward and backward passes.

Two are built in, registered as the plugin ``tinkex._backends._plugin``:

- ``local`` (:mod:`tinkex._backends.local`): a transformers causal LM in this process.
- ``tinker`` (:mod:`tinkex._backends.tinker`): the Tinker service through the official SDK.

Other packages add backends with the ``tinkex_register_backends`` hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .._config import AdamParams

__all__ = ["Backend", "FusedBackend", "missing_members"]


@runtime_checkable
class Backend(Protocol):
    """What a :class:`tinkex.TrainingClient` needs of a backend: the linearized step.

    ``forward`` returns detached per-datum target-token logprobs; ``forward_backward``
    runs a built-in loss (``"cross_entropy"``) forward and backward, accumulating
    parameter gradients, and returns the logprobs and Tinker-style metrics.
    """

    name: str
    step: int
    tokenizer: Any

    async def forward(self, data: Sequence[Any]) -> list[torch.Tensor]: ...

    async def forward_backward(
        self, data: Sequence[Any], loss_fn: str
    ) -> tuple[list[torch.Tensor], dict[str, float]]: ...

    async def optim_step(self, params: AdamParams) -> dict[str, float]: ...

    async def save_state(self, path: str) -> str: ...

    async def load_state(self, path: str) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class FusedBackend(Backend, Protocol):
    """A backend that can also keep the forward graph: ``mode="fused"`` works on it.

    ``forward_graph`` returns an object with ``logprobs`` (detached, per datum),
    ``await backward(grads)`` (back-propagates d(loss)/d(logprobs) once) and
    ``discard()``.
    """

    async def forward_graph(self, data: Sequence[Any]) -> Any: ...


def missing_members(backend: Any, protocol: type = Backend) -> list[str]:
    """The members of ``protocol`` that ``backend`` lacks (empty: it conforms)."""
    names = [n for n in dir(protocol) if not n.startswith("_")]
    names += list(getattr(protocol, "__annotations__", {}))
    return sorted({n for n in names if not hasattr(backend, n)})
