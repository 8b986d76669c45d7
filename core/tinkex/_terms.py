"""One term of a composed loss: what it is, what it must return, and finishing it.

The executor (:mod:`tinkex._executor`) decides where and when a term runs; this
module holds what is the same wherever it runs: the checks on ``(loss,
metrics)``, the term's gradient w.r.t. the logprobs (one ``autograd.grad``), the
in-place-edit check, and the telemetry events of one term.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs
import torch

from . import telemetry
from ._errors import RegularizerError
from ._gradients import GradSum, grad_norm, term_gradient

__all__ = ["Term", "TermContext", "TermFailure", "TermResult", "finish", "safe_str"]


@attrs.frozen
class Term:
    """One term to evaluate: the base loss (weight 1) or an enabled regularizer.

    ``weight`` is the weight of this call: a scheduled weight's value at the call's
    step (the pipeline fills it in per call; :meth:`tinkex.Pipeline._terms_at`).
    """

    index: int
    name: str
    fn: Callable[..., Any]
    weight: float
    is_async: bool
    is_base: bool = False
    timeout: float | None = None  # seconds this term may run; None: no limit

    @property
    def label(self) -> str:
        return "base_loss" if self.is_base else f"regularizer {self.name!r}"


class TermResult(NamedTuple):
    """What one term produced; its gradient itself went into the call's :class:`GradSum`."""

    value: float
    metrics: dict[str, float]
    grad_norm: float | None
    duration_s: float
    #: the base loss's metrics exactly as it returned them, when the SDK drop-ins pass
    #: them on (``TermContext.pass_base_metrics``); ``None`` otherwise
    own_metrics: dict[Any, Any] | None = None


@attrs.frozen
class TermContext:
    """What every term of one call shares."""

    data: Any
    lp_arg: Any
    leaves: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]  # the leaves' version counters before any term ran
    grad_sum: GradSum | None  # None: no gradients wanted
    track_norms: bool
    poll_s: float | None  # the shortest timeout of the call's terms (None: no term has one)
    telemetry: bool
    base_needs_path: bool = False  # a gradient is wanted: the base loss must reach the logprobs
    # the SDK drop-ins: the base loss's metrics go on as returned, as the SDK passes them
    # (NaN, non-numbers and all); only its finite numbers enter the structured output
    pass_base_metrics: bool = False


class TermFailure(Exception):
    """Raised while checking a term's output; becomes a RegularizerError naming the term."""


def safe_str(exc: BaseException) -> str:
    """``type: message`` of any exception, even one whose ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {type(exc).__name__} object>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str, cause: BaseException) -> TermFailure:
    err = TermFailure(message)
    err.__cause__ = cause
    return err


def _check_output(
    term: Term, out: Any, *, lenient_metrics: bool = False
) -> tuple[Any, float, dict[str, float]]:
    """Validate ``(loss, metrics)``; return the loss, its float value and float metrics.

    ``lenient_metrics``: a metric that is not a finite number under a str key is left
    out of the float metrics instead of failing the term (the checks are the same).
    """
    if not isinstance(out, tuple | list) or len(out) != 2:
        size = f" of length {len(out)}" if isinstance(out, tuple | list) else ""
        raise _fail(
            f"{term.label} must return a 2-tuple (loss, metrics), got {type(out).__name__}{size}",
            TypeError(f"bad return type {type(out).__name__}"),
        )
    loss, metrics = out
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise _fail(
                f"{term.label} returned a non-scalar loss of shape {tuple(loss.shape)}; "
                f"reduce it to one number (e.g. .sum() or .mean())",
                ValueError(f"loss shape {tuple(loss.shape)}"),
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise _fail(
                f"{term.label} returned a loss of dtype {loss.dtype}; it must be real",
                TypeError(str(loss.dtype)),
            )
        value = float(loss.item())
    elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        value = float(loss)
    else:
        raise _fail(
            f"{term.label} returned a loss of type {type(loss).__name__}; "
            f"it must be a scalar tensor or a real number",
            TypeError(type(loss).__name__),
        )
    if not math.isfinite(value):
        raise _fail(f"{term.label} returned a non-finite loss ({value})", ValueError(value))
    if not isinstance(metrics, Mapping):
        raise _fail(
            f"{term.label} returned metrics of type {type(metrics).__name__}; "
            f"they must be a mapping of str to number",
            TypeError(type(metrics).__name__),
        )
    clean: dict[str, float] = {}
    for key, raw in metrics.items():
        try:
            clean[key] = _metric_number(term, key, raw)
        except (TermFailure, TypeError, ValueError, OverflowError):
            if not lenient_metrics:
                raise
    return loss, value, clean


def _metric_number(term: Term, key: Any, raw: Any) -> float:
    """One metric as a finite float; a :class:`TermFailure` says what is wrong with it."""
    if not isinstance(key, str):
        raise _fail(
            f"{term.label} returned a metric key {key!r}; keys must be str",
            TypeError(type(key).__name__),
        )
    if isinstance(raw, torch.Tensor) and raw.numel() == 1 and not raw.is_complex():
        number = float(raw.item())
    elif isinstance(raw, numbers.Real):
        number = float(raw)
    else:
        raise _fail(
            f"{term.label} returned a non-numeric metric {key!r}={raw!r}; "
            f"metrics must be numbers or scalar tensors",
            TypeError(type(raw).__name__),
        )
    if not math.isfinite(number):
        raise _fail(
            f"{term.label} returned a non-finite metric {key!r}={number}",
            ValueError(f"{key}={number}"),
        )
    return number


def _check_inputs_untouched(term: Term, ctx: TermContext) -> None:
    """A term that edited the shared logprobs in place (torch's version counter) fails."""
    for i, (leaf, version) in enumerate(zip(ctx.leaves, ctx.versions, strict=True)):
        if leaf._version != version:
            raise _fail(
                f"the logprobs (tensor {i}) were modified in place while {term.label} ran "
                f"(by it, or with parallel=True possibly by a term running at the same "
                f"time: parallel=False names the culprit); terms must not edit their "
                f"inputs (use out-of-place ops such as lp.clamp(...), or clone first). "
                f"The caller's tensors are unchanged.",
                RuntimeError("logprobs modified in place"),
            )


def finish(term: Term, out: Any, ctx: TermContext, started: float) -> TermResult:
    """Validate a term's output and take its gradient (one autograd pass, this thread)."""
    pass_on = ctx.pass_base_metrics and term.is_base
    loss, value, metrics = _check_output(term, out, lenient_metrics=pass_on)
    norm: float | None = None
    if ctx.grad_sum is not None:
        try:
            grads = term_gradient(loss, ctx.leaves)
            # a gradient that reaches the total is checked even when norms are not
            # tracked: a NaN would otherwise reach the weights (or Tinker's service)
            if ctx.track_norms or (ctx.base_needs_path and term.weight != 0):
                norm = grad_norm(grads)
        except Exception as exc:
            raise _fail(
                f"{term.label}: taking its gradient w.r.t. the logprobs failed: {safe_str(exc)}",
                exc,
            ) from exc
        if norm is not None and not math.isfinite(norm):
            raise _fail(
                f"{term.label} has a non-finite gradient w.r.t. the logprobs (norm {norm}); "
                f"look for log/sqrt/division at 0 or overflow in it",
                ValueError(norm),
            )
        if not ctx.track_norms:
            norm = None
        if term.is_base and ctx.base_needs_path and ctx.leaves and all(g is None for g in grads):
            raise _fail(
                "base_loss does not depend on the logprobs (its loss has no autograd path "
                "to them), so it has no gradient to train with; compute it from the "
                "logprobs it is given, without .detach(), .item() or torch.no_grad() "
                "(Tinker's SDK refuses it too: 'element 0 of tensors does not require grad'); "
                "to train on the regularizers alone, return a zero that depends on them, "
                "e.g. (sum(lp.sum() for lp in logprobs) * 0.0, {})",
                ValueError("no gradient path from the base loss to the logprobs"),
            )
    _check_inputs_untouched(term, ctx)
    if ctx.grad_sum is not None:
        ctx.grad_sum.put(term.index, grads)
    own = dict(out[1]) if pass_on else None
    return TermResult(value, metrics, norm, time.perf_counter() - started, own)


# --------------------------------------------------------------------------- events


def start_event(term: Term, ctx: TermContext) -> None:
    if ctx.telemetry and not term.is_base:
        telemetry.emit(
            "debug",
            "regularizer.compute.start",
            regularizer_name=term.name,
            weight=term.weight,
            is_async=term.is_async,
        )


def stop_event(term: Term, ctx: TermContext, result: TermResult) -> None:
    if ctx.telemetry and not term.is_base:
        telemetry.emit(
            "debug",
            "regularizer.compute.stop",
            regularizer_name=term.name,
            weight=term.weight,
            is_async=term.is_async,
            duration_s=result.duration_s,
            value=result.value,
            contribution=term.weight * result.value,
            grad_norm=result.grad_norm,
        )


def exception_event(term: Term, ctx: TermContext, duration: float, error: RegularizerError) -> None:
    if ctx.telemetry and not term.is_base:
        telemetry.emit(
            "error",
            "regularizer.compute.exception",
            regularizer_name=term.name,
            weight=term.weight,
            is_async=term.is_async,
            duration_s=duration,
            error=str(error),
        )
