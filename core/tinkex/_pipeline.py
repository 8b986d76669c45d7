"""Composing a loss: spec -> executor -> gradients -> output.

:class:`Pipeline` validates its specs once; :func:`compute_loss` and
:func:`compose_loss` are one-shot conveniences over it.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
import trio

from . import telemetry
from ._devices import parse_device
from ._errors import RegularizerError, SpecError
from ._executor import BASE_LOSS_NAME, run_terms
from ._gradients import Leaves, grad_norm, prepare_leaves
from ._terms import Term, TermResult
from ._types import (
    BaseLossOutput,
    ComposedLoss,
    CustomLossOutput,
    RegularizerOutput,
    RegularizerSpec,
    _accepts_two_positional,
    check_step,
    infer_is_async,
)

__all__ = ["DEFAULT_TIMEOUT", "Pipeline", "compose_loss", "compute_loss", "drop_in_metrics"]


class _DefaultTimeout(float):
    """A default ``timeout``: a float of its own type, so a pipeline can tell it from a
    timeout the caller gave (the SDK drop-ins leave the base loss unbounded then)."""

    __slots__ = ()


#: The default per-term ``timeout`` in seconds (30.0). In :meth:`Pipeline.as_loss_fn`
#: and ``TrainingClient.forward_backward_custom`` it bounds only the regularizers: the
#: base loss runs without a limit (as in Tinker's SDK) unless a ``timeout`` is given.
DEFAULT_TIMEOUT: float = _DefaultTimeout(30.0)


def drop_in_metrics(
    output: CustomLossOutput, own_metrics: Mapping[Any, Any] | None = None
) -> dict[Any, Any]:
    """The metrics of the SDK drop-ins (:meth:`Pipeline.as_loss_fn`, ``forward_backward_custom``).

    The base loss's own metrics first, under their own keys, unchanged (a recipe that
    logs or filters ``accuracy`` or ``dpo_loss`` keeps working), then every key of
    :meth:`CustomLossOutput.flat_metrics`. Where a base-loss key equals one of
    tinkex's, the base loss keeps the plain key and tinkex's value moves to
    ``tinkex/<key>``.

    Args:
        output: the composed output.
        own_metrics: the base loss's metrics as it returned them (the drop-ins pass
            them on as the SDK does, a NaN or a non-number included); default
            ``output.base_loss.custom``, its finite numbers.
    """
    own = output.base_loss.custom if own_metrics is None else own_metrics
    out = dict(own)
    for key, value in output.flat_metrics().items():
        name = key
        while name in own:
            name = f"tinkex/{name}"
        out[name] = value
    return out


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        seconds = math.nan
    else:
        try:
            seconds = float(timeout)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise SpecError(
            f"timeout must be a finite number of seconds > 0 (or None for no limit), got {timeout!r}"
        )
    return float(timeout)


def _check_max_concurrency(value: Any) -> int:
    if value is None:
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(
            f"max_concurrency must be an int >= 1 (or None for the CPU count), got {value!r}"
        )
    return value


def _check_lengths(data: Any, leaves: Leaves) -> None:
    """One logprob tensor (or one row of a 2-D tensor) per datum, checked before any term runs."""
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        return  # data is whatever the caller passes; only a sequence of data is checked
    if leaves.single:
        if leaves.tensors[0].dim() != 2:
            return  # one 1-D tensor: a single datum's logprobs, or a flat layout of the caller's
        count, what = leaves.tensors[0].shape[0], "rows in the 2-D logprobs tensor"
    else:
        count, what = len(leaves.tensors), "logprob tensors"
    if count != len(data):
        raise SpecError(
            f"got {len(data)} data but {count} {what}; pass one logprob tensor per datum "
            f"(in the same order)"
        )


class Pipeline:
    """A base loss plus weighted regularizers, validated once and run many times.

    Args:
        base_loss_fn: ``fn(data, logprobs) -> (loss, metrics)``, sync or async; weight 1,
            reported under the name ``"base_loss"``.
        regularizers: :class:`RegularizerSpec` items (``enabled=False`` ones are skipped).
        track_grad_norms: also compute each term's gradient norm w.r.t. the logprobs
            and the total gradient norm.
        parallel: run terms concurrently (``True``) or one at a time in spec order.
            Both give the same numbers.
        timeout: seconds each term may run (``None``: no limit). In :meth:`as_loss_fn`
            the base loss runs without a limit unless ``timeout`` is given (Tinker's
            SDK has none); the default, :data:`DEFAULT_TIMEOUT`, then bounds only the
            regularizers.
        max_concurrency: worker threads for sync terms (default: the CPU count).
        device: move the logprobs there before the terms see them ("cpu", "cuda",
            "mps", a ``torch.device``); gradients come back on the caller's devices.

    A regularizer whose weight is a :class:`tinkex.schedules.Schedule` takes the
    schedule's value at the ``step`` each call is given (``compute(..., step=s)``):
    outputs report that weight, and a call without a step is a ``SpecError`` naming
    the regularizer. A pipeline without scheduled weights ignores ``step`` (beyond
    checking it).

    Raises:
        SpecError: a non-callable base loss, an item that is not a RegularizerSpec,
            duplicate names, the reserved name ``"base_loss"``, or a bad option.
    """

    def __init__(
        self,
        base_loss_fn: Callable[..., Any],
        *,
        regularizers: Iterable[RegularizerSpec] = (),
        track_grad_norms: bool = False,
        parallel: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_concurrency: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not callable(base_loss_fn):
            raise SpecError(
                f"base_loss_fn must be callable as fn(data, logprobs), got {base_loss_fn!r}"
            )
        if _accepts_two_positional(base_loss_fn) is False:
            raise SpecError(
                f"base_loss_fn must accept two positional arguments (data, logprobs), "
                f"got {base_loss_fn!r} with signature {inspect.signature(base_loss_fn)}"
            )
        if isinstance(regularizers, (RegularizerSpec, str, bytes)) or not isinstance(
            regularizers, Iterable
        ):
            raise SpecError(
                f"regularizers must be a list of RegularizerSpec, got {type(regularizers).__name__}"
            )
        specs = list(regularizers)
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            if not isinstance(spec, RegularizerSpec):
                raise SpecError(
                    f"regularizers[{i}] must be a RegularizerSpec (or built with tinkex.regularizer()), "
                    f"got {spec!r} ({type(spec).__name__})"
                )
            if spec.name == BASE_LOSS_NAME:
                raise SpecError(
                    f"regularizers[{i}] uses the reserved name {BASE_LOSS_NAME!r}; pick another name"
                )
            if spec.name in seen:
                raise SpecError(
                    f"duplicate regularizer name {spec.name!r}; names must be unique (use name=...)"
                )
            seen.add(spec.name)
        for flag, value in (("track_grad_norms", track_grad_norms), ("parallel", parallel)):
            if not isinstance(value, bool):
                raise SpecError(f"{flag} must be a bool, got {value!r}")
        self.base_loss_fn = base_loss_fn
        self.regularizers: tuple[RegularizerSpec, ...] = tuple(specs)
        self.track_grad_norms = track_grad_norms
        self.parallel = parallel
        self.timeout = _check_timeout(timeout)
        self.max_concurrency = _check_max_concurrency(max_concurrency)
        self.device = parse_device(device)
        self._enabled = tuple(s for s in specs if s.enabled)
        base_async = infer_is_async(base_loss_fn)
        # a scheduled weight is filled in per call (_terms_at); the rest is built once
        regs = tuple(
            Term(
                i + 1,
                s.name,
                s.fn,
                math.nan if s.is_scheduled else float(s.weight),
                s.runs_async,
                timeout=self.timeout,
            )
            for i, s in enumerate(self._enabled)
        )
        self._scheduled: tuple[tuple[int, RegularizerSpec], ...] = tuple(
            (i + 1, s) for i, s in enumerate(self._enabled) if s.is_scheduled
        )
        self._terms = (
            Term(0, BASE_LOSS_NAME, base_loss_fn, 1.0, base_async, True, self.timeout),
            *regs,
        )
        # the SDK drop-ins: the user's own base loss is unbounded unless a timeout was given
        drop_in_timeout = None if isinstance(timeout, _DefaultTimeout) else self.timeout
        self._drop_in_terms = (
            Term(0, BASE_LOSS_NAME, base_loss_fn, 1.0, base_async, True, drop_in_timeout),
            *regs,
        )

    def __repr__(self) -> str:
        names = ", ".join(
            f"{s.name}={s.weight}" if s.is_scheduled else f"{s.name}={s.weight:g}"
            for s in self._enabled
        )
        return f"Pipeline(base_loss={getattr(self.base_loss_fn, '__name__', self.base_loss_fn)!r}, regularizers=[{names}])"

    @property
    def is_scheduled(self) -> bool:
        """Whether an enabled regularizer has a scheduled weight (calls then need ``step``)."""
        return bool(self._scheduled)

    def weights(self, step: int | None = None) -> dict[str, float]:
        """The weight of each enabled regularizer at the 1-based ``step``, in spec order.

        Raises:
            SpecError: as :meth:`compute` for a missing or bad ``step``.
        """
        terms = self._terms_at(step, drop_in=False)
        return {t.name: t.weight for t in terms[1:]}

    def _terms_at(self, step: Any, *, drop_in: bool) -> tuple[Term, ...]:
        """The terms of a call at ``step``: the prebuilt ones, scheduled weights filled in.

        Raises:
            SpecError: ``step`` is not None or an int >= 1, or a scheduled weight has
                no step (naming the regularizer) or no valid value there.
        """
        terms = self._drop_in_terms if drop_in else self._terms
        step = check_step(step)
        if not self._scheduled:
            return terms
        weights = {index: spec.weight_at(step) for index, spec in self._scheduled}
        return tuple(
            attrs.evolve(t, weight=weights[t.index]) if t.index in weights else t for t in terms
        )

    async def compute(
        self, data: Any, logprobs: Any, *, step: int | None = None
    ) -> CustomLossOutput:
        """Evaluate every term once and return the structured output.

        Args:
            data: passed to every term as given.
            logprobs: a floating tensor or a sequence of them (one per datum).
            step: the 1-based optimizer step, an int >= 1; required when a weight is
                a schedule (its value at ``step`` is the weight used and reported).

        Raises:
            RegularizerError: a term failed (``.name`` says which; ``"base_loss"``
                for the base loss); ``RegularizerTimeoutError`` for a timeout.
            SpecError: ``logprobs`` is not a floating tensor or a sequence of them;
                a bad ``step``, or none for a scheduled weight (before any term runs).
        """
        terms = self._terms_at(step, drop_in=False)
        output, *_ = await self._run(data, logprobs, terms, need_total_grad=False)
        return output

    async def compose(self, data: Any, logprobs: Any, *, step: int | None = None) -> ComposedLoss:
        """Like :meth:`compute`, plus the total loss and d(loss_total)/d(logprobs).

        The gradient has the structure, devices and dtypes of ``logprobs``: a fused
        training step calls ``lp.backward(grads)``, a linearized (Tinker) step uses
        ``weights = -grads``. ``step`` is as in :meth:`compute`.
        """
        terms = self._terms_at(step, drop_in=False)
        composed, _ = await self._compose(data, logprobs, terms)
        return composed

    async def _drop_in(
        self,
        data: Any,
        logprobs: Any,
        *,
        step: int | None = None,
        terms: tuple[Term, ...] | None = None,
    ) -> tuple[ComposedLoss, dict[Any, Any]]:
        """:meth:`compose` as the SDK drop-ins run it; also returns their metrics.

        The base loss runs without a timeout unless the pipeline was given one, and
        its metrics go on as it returned them (:func:`drop_in_metrics`), as the SDK
        passes them: a NaN or non-numeric metric is not an error here (only its
        finite numbers enter ``output.base_loss.custom``). ``terms``: those of
        ``_terms_at(step, drop_in=True)``, when the caller resolved them already.
        """
        if terms is None:
            terms = self._terms_at(step, drop_in=True)
        composed, own = await self._compose(data, logprobs, terms, drop_in=True)
        return composed, drop_in_metrics(composed.output, own)

    async def _compose(
        self, data: Any, logprobs: Any, terms: tuple[Term, ...], *, drop_in: bool = False
    ) -> tuple[ComposedLoss, dict[Any, Any] | None]:
        output, leaves, total, own = await self._run(
            data, logprobs, terms, need_total_grad=True, drop_in=drop_in
        )
        first = leaves.originals[0] if leaves.originals else None
        loss = torch.tensor(
            output.loss_total,
            dtype=first.dtype if first is not None else torch.float32,
            device=first.device if first is not None else None,
        )
        return ComposedLoss(output=output, loss=loss, logprob_grads=leaves.restructure(total)), own

    def as_loss_fn(
        self, step: int | None = None
    ) -> Callable[[Any, Any], tuple[torch.Tensor, dict[str, float]]]:
        """A synchronous ``(data, logprobs) -> (loss, metrics)`` for Tinker's SDK.

        ``step`` (1-based, an int >= 1) fixes the step whose scheduled weights the
        returned function uses; a pipeline with a scheduled weight needs it, so a
        training loop makes one per step: ``pipeline.as_loss_fn(step=s)``. A missing
        or bad ``step`` is a ``SpecError`` here, before anything runs.

        Plugs straight into ``tinker.TrainingClient.forward_backward_custom``: the
        returned loss has the composed total as its value and back-propagates
        exactly d(loss_total)/d(logprobs) into the caller's logprob tensors
        (``loss = Σ (lp · g).sum()`` shifted to the total's value, with ``g`` the
        composed gradient). ``metrics`` is :func:`drop_in_metrics`: the base loss's
        own metric keys unchanged, plus :meth:`CustomLossOutput.flat_metrics`.

        As in the SDK, the base loss runs without a time limit unless the pipeline
        was given a ``timeout``, and a base loss with no autograd path to the
        logprobs is an error (``RegularizerError`` naming ``"base_loss"``).

        Each call runs its own ``trio.run``, so call it from a plain thread (as the
        SDK does), not from inside a running Trio loop: there, use
        ``await pipeline.compose(...)``.
        """
        run = functools.partial(self._drop_in, terms=self._terms_at(step, drop_in=True))

        def loss_fn(data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
            try:
                trio.current_time()  # raises RuntimeError outside a Trio run
            except RuntimeError:
                pass
            else:
                raise RuntimeError(
                    "Pipeline.as_loss_fn() was called from inside a running Trio loop; "
                    "use `await pipeline.compose(data, logprobs)` there instead"
                )
            composed, metrics = trio.run(run, data, logprobs)
            tensors = [logprobs] if isinstance(logprobs, torch.Tensor) else list(logprobs)
            grads = (
                [composed.logprob_grads]
                if isinstance(logprobs, torch.Tensor)
                else list(composed.logprob_grads)
            )
            # sum(lp * g) in float64, skipping g == 0: a masked -inf logprob times a zero
            # gradient would be NaN, a float16 sum can overflow, and the loss's value must
            # be the total exactly (the SDK reports it as loss:sum); the gradient is g
            surrogate = sum(
                (
                    torch.where(g != 0, lp.double() * g.detach().double(), 0.0).sum()
                    for lp, g in zip(tensors, grads, strict=True)
                ),
                torch.zeros((), dtype=torch.float64),
            )
            total = composed.output.loss_total
            if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
                loss = surrogate - surrogate.detach() + total
            else:
                loss = torch.tensor(total, dtype=torch.float64)
            return loss, metrics

        loss_fn.__name__ = "tinkex_composed_loss"
        loss_fn.__doc__ = f"Composed loss of {self!r} (from Pipeline.as_loss_fn())."
        return loss_fn

    async def _run(
        self,
        data: Any,
        logprobs: Any,
        terms: tuple[Term, ...],
        *,
        need_total_grad: bool,
        drop_in: bool = False,
    ) -> tuple[CustomLossOutput, Leaves, Any, dict[Any, Any] | None]:
        emit_events = telemetry.enabled()
        reg_count = len(self._enabled)
        if emit_events:
            telemetry.emit(
                "debug",
                "custom_loss.start",
                regularizer_count=reg_count,
                track_grad_norms=self.track_grad_norms,
            )
        t0 = trio.current_time()
        try:
            leaves = prepare_leaves(logprobs, self.device)
            _check_lengths(data, leaves)
            if need_total_grad and not leaves.tensors:
                raise SpecError(
                    "got no logprob tensors (an empty batch): there is nothing to take a "
                    "gradient of; pass at least one datum and its logprobs"
                )
            # Grad mode is not set here: each term runs with autograd on in the
            # thread (or task) that runs it; the caller's mode is left alone.
            results, total = await run_terms(
                terms,
                data=data,
                lp_arg=leaves.arg,
                leaves=leaves.tensors,
                need_grads=need_total_grad or self.track_grad_norms,
                track_norms=self.track_grad_norms,
                parallel=self.parallel,
                max_concurrency=self.max_concurrency,
                emit_events=emit_events,
                base_needs_path=need_total_grad,
                pass_base_metrics=drop_in,
            )
            output = self._output(terms, results, total)
        except (RegularizerError, SpecError) as exc:
            if emit_events:
                telemetry.emit(
                    "error",
                    "custom_loss.exception",
                    duration_s=trio.current_time() - t0,
                    error=str(exc),
                )
            raise
        if emit_events:
            telemetry.emit(
                "debug",
                "custom_loss.stop",
                duration_s=trio.current_time() - t0,
                loss_total=output.loss_total,
                regularizer_total=output.regularizer_total,
                regularizer_count=reg_count,
            )
        return output, leaves, total, results[0].own_metrics

    def _output(
        self,
        terms: tuple[Term, ...],
        results: list[TermResult],
        total: list[torch.Tensor] | None,
    ) -> CustomLossOutput:
        base, regs = results[0], results[1:]
        track = self.track_grad_norms
        reg_outputs: dict[str, RegularizerOutput] = {}
        for term, r in zip(terms[1:], regs, strict=True):
            reg_outputs[term.name] = RegularizerOutput(
                name=term.name,
                value=r.value,
                weight=term.weight,
                contribution=term.weight * r.value,
                grad_norm=r.grad_norm if track else None,
                grad_norm_weighted=term.weight * r.grad_norm
                if track and r.grad_norm is not None
                else None,
                custom=r.metrics,
            )
        regularizer_total = math.fsum(o.contribution for o in reg_outputs.values())
        return CustomLossOutput(
            loss_total=base.value + regularizer_total,
            base_loss=BaseLossOutput(
                value=base.value, grad_norm=base.grad_norm if track else None, custom=base.metrics
            ),
            regularizers=reg_outputs,
            regularizer_total=regularizer_total,
            total_grad_norm=grad_norm(tuple(total)) if track and total is not None else None,
        )


async def compute_loss(
    data: Any,
    logprobs: Any,
    base_loss_fn: Callable[..., Any],
    *,
    regularizers: Iterable[RegularizerSpec] = (),
    track_grad_norms: bool = False,
    parallel: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_concurrency: int | None = None,
    device: str | torch.device | None = None,
    step: int | None = None,
) -> CustomLossOutput:
    """Compose ``base_loss_fn`` with weighted ``regularizers`` and evaluate it once.

    ``loss_total = base + Σ weight_i · value_i``. See :class:`Pipeline` for the
    arguments; each term is evaluated exactly once, concurrently unless
    ``parallel=False``. ``step`` is the 1-based optimizer step (an int >= 1): a
    weight that is a :class:`tinkex.schedules.Schedule` takes its value there, and
    is then required.

    Raises:
        SpecError: invalid specs or options, a bad ``step`` or none for a scheduled
            weight, before anything runs.
        RegularizerError: a term failed; ``.name`` names it, ``__cause__`` is the
            original error. ``RegularizerTimeoutError`` for a timeout.
    """
    pipeline = Pipeline(
        base_loss_fn,
        regularizers=regularizers,
        track_grad_norms=track_grad_norms,
        parallel=parallel,
        timeout=timeout,
        max_concurrency=max_concurrency,
        device=device,
    )
    return await pipeline.compute(data, logprobs, step=step)


async def compose_loss(
    data: Any,
    logprobs: Any,
    base_loss_fn: Callable[..., Any],
    *,
    regularizers: Iterable[RegularizerSpec] = (),
    track_grad_norms: bool = False,
    parallel: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_concurrency: int | None = None,
    device: str | torch.device | None = None,
    step: int | None = None,
) -> ComposedLoss:
    """Like :func:`compute_loss`, and also return the loss and d(loss_total)/d(logprobs).

    Returns:
        ComposedLoss: ``output`` (CustomLossOutput), ``loss`` (0-d tensor) and
        ``logprob_grads`` (same structure as ``logprobs``), which is what a
        training step needs.
    """
    pipeline = Pipeline(
        base_loss_fn,
        regularizers=regularizers,
        track_grad_norms=track_grad_norms,
        parallel=parallel,
        timeout=timeout,
        max_concurrency=max_concurrency,
        device=device,
    )
    return await pipeline.compose(data, logprobs, step=step)
