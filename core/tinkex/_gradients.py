"""Gradients of the composed loss with respect to the logprobs.

The path of the data: the caller's logprobs become detached *leaf* tensors (the
caller's tensors are never modified, nor is their graph touched); each term is
evaluated once on them; its gradient comes from one ``torch.autograd.grad`` on
that single evaluation; the total gradient is the weighted sum of the term
gradients (no extra backward pass); norms are L2 over every logprob element,
computed in float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ._errors import SpecError

__all__ = ["Leaves", "grad_norm", "prepare_leaves", "term_gradient", "weighted_sum"]

Grads = tuple[torch.Tensor | None, ...]


@attrs.frozen
class Leaves:
    """The leaf tensors terms see, and how to give results back the caller's shape.

    Attributes:
        tensors: one leaf per logprob tensor, requiring grad.
        arg: what terms receive: a single tensor, or a list/tuple like the input.
        originals: the caller's tensors (for device/dtype of returned gradients).
    """

    tensors: tuple[torch.Tensor, ...]
    arg: Any
    originals: tuple[torch.Tensor, ...]
    single: bool

    def restructure(self, grads: Sequence[torch.Tensor]) -> Any:
        """Put per-leaf gradients back into the caller's structure, devices and dtypes."""
        out = [
            g
            if (g.device == o.device and g.dtype == o.dtype)
            else g.to(device=o.device, dtype=o.dtype)
            for g, o in zip(grads, self.originals)
        ]
        if self.single:
            return out[0]
        return type(self.arg)(out) if isinstance(self.arg, tuple) else out


def parse_device(device: Any) -> torch.device | None:
    """``None`` or a ``torch.device`` from a string/device; SpecError when invalid."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SpecError(
            f"device must be e.g. 'cpu', 'cuda', 'cuda:1', 'mps' or a torch.device, got {device!r}"
        ) from exc


def prepare_leaves(logprobs: Any, device: torch.device | None) -> Leaves:
    """Detached leaf copies of ``logprobs`` (one tensor or a sequence), moved to ``device``.

    Raises:
        SpecError: ``logprobs`` is not a floating-point tensor or a sequence of them.
    """
    single = isinstance(logprobs, torch.Tensor)
    if single:
        originals: tuple[torch.Tensor, ...] = (logprobs,)
    elif isinstance(logprobs, Sequence) and not isinstance(logprobs, (str, bytes)):
        originals = tuple(logprobs)
    else:
        raise SpecError(
            f"logprobs must be a tensor or a sequence of tensors (one per datum), got {type(logprobs).__name__}"
        )
    leaves = []
    for i, t in enumerate(originals):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise SpecError(f"logprobs[{i}] must be a floating-point tensor, got {what}")
        leaf = t.detach()
        if device is not None and leaf.device != device:
            leaf = leaf.to(device)
        leaves.append(leaf.requires_grad_(True))
    if single:
        arg: Any = leaves[0]
    elif isinstance(logprobs, tuple):
        arg = tuple(leaves)
    else:
        arg = list(leaves)
    return Leaves(tensors=tuple(leaves), arg=arg, originals=originals, single=single)


def term_gradient(loss: Any, leaves: tuple[torch.Tensor, ...]) -> Grads:
    """d(loss)/d(leaves) from the single evaluation; ``None`` where there is no path."""
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return (None,) * len(leaves)
    return torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_norm(grads: Grads) -> float:
    """L2 norm over every element of ``grads`` (``None`` entries count as 0)."""
    present = [g for g in grads if g is not None]
    if not present:
        return 0.0
    if len(present) == 1:
        g = present[0]
        return float(torch.linalg.vector_norm(g, dtype=_norm_dtype(g.dtype)))
    total = 0.0
    by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in present:
        by_key.setdefault((g.device, _norm_dtype(g.dtype)), []).append(g)
    for (_, dtype), group in by_key.items():
        if any(t.dtype != dtype for t in group):
            group = [t.to(dtype) for t in group]
        norms = torch._foreach_norm(group)
        total += float(torch.linalg.vector_norm(torch.stack(norms).to(torch.float64))) ** 2
    return math.sqrt(total)


def weighted_sum(
    term_grads: Sequence[Grads], weights: Sequence[float], leaves: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    """Per leaf, the sum over terms of ``weight * grad`` (zeros where no term depends on it).

    Uses torch's ``_foreach`` kernels: one call per term, not one per leaf, which
    matters with one logprob tensor per datum.
    """
    acc: list[torch.Tensor | None] = [None] * len(leaves)
    for grads, w in zip(term_grads, weights):
        if w == 0:
            continue
        present = [j for j, g in enumerate(grads) if g is not None]
        if not present:
            continue
        fresh = [j for j in present if acc[j] is None]
        if fresh:  # a new tensor (autograd may hand out expanded views: never write into those)
            for j, t in zip(fresh, torch._foreach_mul([grads[j] for j in fresh], w)):
                acc[j] = t
        fresh_set = set(fresh)
        rest = [j for j in present if j not in fresh_set]
        if rest:
            torch._foreach_add_([acc[j] for j in rest], [grads[j] for j in rest], alpha=w)
    return [a if a is not None else torch.zeros_like(leaf) for a, leaf in zip(acc, leaves)]
