"""Gradients of the composed loss with respect to the logprobs.

The path of the data: the caller's logprobs are copied into *leaf* tensors once per
call (the caller's tensors are never modified, nor is their graph touched); each term is
evaluated once on them; its gradient comes from one ``torch.autograd.grad`` on
that single evaluation; the total gradient is the weighted sum of the term
gradients (no extra backward pass); norms are L2 over every logprob element,
computed in float32 (or float64 for float64 inputs).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ._errors import SpecError

__all__ = ["GradSum", "Leaves", "grad_norm", "prepare_leaves", "term_gradient"]

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
            for g, o in zip(grads, self.originals, strict=True)
        ]
        if self.single:
            return out[0]
        return type(self.arg)(out) if isinstance(self.arg, tuple) else out


def prepare_leaves(logprobs: Any, device: torch.device | None) -> Leaves:
    """Leaf copies of ``logprobs`` (one tensor or a sequence), moved to ``device``.

    The copies are taken once per call and shared by every term: the caller's
    tensors are never modified, whatever a term does to its input.

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
    for i, t in enumerate(originals):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise SpecError(f"logprobs[{i}] must be a floating-point tensor, got {what}")
    leaves = []
    # outside inference mode, so the copies can require grad and keep a version
    # counter even when the caller runs under torch.inference_mode()
    with torch.inference_mode(False):
        for t in originals:
            leaf = (
                t.detach().to(device=device, copy=True)
                if device is not None
                else t.detach().clone()
            )
            leaves.append(leaf.requires_grad_(True))
    if single:
        arg: Any = leaves[0]
    elif isinstance(logprobs, tuple):
        arg = tuple(leaves)
    else:
        arg = list(leaves)
    return Leaves(tensors=tuple(leaves), arg=arg, originals=originals, single=single)


def term_gradient(loss: Any, leaves: tuple[torch.Tensor, ...]) -> Grads:
    """d(loss)/d(leaves) from the single evaluation; ``None`` where there is no path.

    ``retain_graph=True``: terms may share part of a graph (one softmax of the
    logprobs cached for several terms); freeing it in the first term's backward
    would break the next. The graph goes when the term's loss does, right after.
    """
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return (None,) * len(leaves)
    if loss.dim() != 0:
        loss = loss.reshape(())
    return torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: From this many elements, a float32/float64 norm is taken with BLAS ``dot`` (about
#: 2x faster than ``vector_norm`` on CPU); below it, one ``vector_norm`` call is cheaper.
DOT_NORM_MIN_NUMEL = 1 << 15


def _norm_of(g: torch.Tensor) -> float:
    """L2 norm of one tensor, accumulated in float32 (float64 for float64)."""
    if (
        g.dtype in (torch.float32, torch.float64)
        and g.numel() >= DOT_NORM_MIN_NUMEL
        and g.is_contiguous()
    ):
        flat = g.view(-1)
        return math.sqrt(float(torch.dot(flat, flat)))
    return float(torch.linalg.vector_norm(g, dtype=_norm_dtype(g.dtype)))


def grad_norm(grads: Grads) -> float:
    """L2 norm over every element of ``grads`` (``None`` entries count as 0)."""
    present = [g for g in grads if g is not None]
    if not present:
        return 0.0
    if len(present) == 1:
        return _norm_of(present[0])
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


class GradSum:
    """``Σ weight_i · grads_i`` over terms ``i = 0..n-1``, always added in index order.

    Terms finish in any order and on any thread; :meth:`put` hands over one
    term's gradients, and every prefix of terms that is complete is folded into
    the sum at once (so gradients are freed as early as possible), under a lock.
    Adding in index order makes the result bit-for-bit independent of timing:
    parallel and sequential runs give the same total.

    The first contribution to a leaf is a new tensor (``weight * grad``): autograd
    may hand out expanded views or tensors it shares, which are never written into.
    """

    def __init__(self, weights: Sequence[float], leaves: tuple[torch.Tensor, ...]) -> None:
        self._weights = tuple(weights)
        self._leaves = leaves
        self._acc: list[torch.Tensor | None] = [None] * len(leaves)
        self._pending: dict[int, Grads] = {}
        self._next = 0
        self._lock = threading.Lock()

    def put(self, index: int, grads: Grads) -> None:
        """Hand over term ``index``'s gradients (``None`` entries: no path to that leaf)."""
        with self._lock:
            self._pending[index] = grads
            while self._next in self._pending:
                self._add(self._pending.pop(self._next), self._weights[self._next])
                self._next += 1

    def result(self) -> list[torch.Tensor]:
        """The sum per leaf (zeros where no term depends on it); every term must be in."""
        with self._lock:
            if self._next != len(self._weights):
                missing = [
                    i for i in range(self._next, len(self._weights)) if i not in self._pending
                ]
                raise RuntimeError(f"GradSum.result(): no gradients yet for term(s) {missing}")
            return [
                a if a is not None else torch.zeros_like(leaf)
                for a, leaf in zip(self._acc, self._leaves, strict=True)
            ]

    def _add(self, grads: Grads, w: float) -> None:
        if w == 0:
            return
        acc = self._acc
        if len(grads) == 1:  # one logprob tensor: plain kernels, no _foreach overhead
            g = grads[0]
            if g is None:
                return
            if acc[0] is None:
                acc[0] = torch.mul(g, w)
            else:
                acc[0].add_(g, alpha=w)
            return
        present = [j for j, g in enumerate(grads) if g is not None]
        fresh = [j for j in present if acc[j] is None]
        if fresh:
            for j, t in zip(fresh, torch._foreach_mul([grads[j] for j in fresh], w), strict=True):
                acc[j] = t
        fresh_set = set(fresh)
        rest = [j for j in present if j not in fresh_set]
        if rest:
            torch._foreach_add_([acc[j] for j in rest], [grads[j] for j in rest], alpha=w)
