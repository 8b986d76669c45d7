"""Running the terms of a composed loss under Trio, from stock Trio parts only.

How one call runs (:func:`run_terms`):

- One nursery. ``parallel=True`` starts every term in it at once;
  ``parallel=False`` awaits one term at a time, in spec order.
- **Async terms** are tasks on the loop, each in a ``trio.CancelScope`` whose
  deadline is its timeout. Their coroutine is driven by
  :func:`_own_grad_mode`, which gives the term a grad mode of its own (on at the
  start) and puts the loop thread's mode back after every step, so a
  ``torch.no_grad()`` held across an ``await`` never reaches another task.
- **Sync terms** run through ``trio.to_thread.run_sync`` after taking a token of
  the call's ``trio.CapacityLimiter(max_concurrency)``. Waiting for the token is
  not timed; the run is, by a shielded ``trio.CancelScope`` whose only deadline
  is the term's own ``timeout``. So:

  * a term whose *own* timeout fires is abandoned (``abandon_on_cancel=True``):
    the call goes on without it; Trio cannot kill the thread;
  * a term still running when a sibling fails (or the caller is cancelled) is
    awaited, never abandoned: the shield keeps the cancellation out and the
    term's own timeout still bounds it. Terms that have not got a worker yet
    never start.

- A failure is recorded with the moment it happened (for a timeout: its
  deadline) and cancels the siblings on Trio's next scheduling pass, so terms
  failing at the same moment are all recorded. The caller gets the earliest
  failure as one :class:`RegularizerError`; equal moments go to spec order.
  Terms that start within ``SAME_START_S`` of the call's start count their time
  from the call's start, so identical terms that hang with the same timeout
  share one deadline and the first in spec order is named.
- ``KeyboardInterrupt``, ``SystemExit`` and other ``BaseException`` s raised by
  a term cancel the siblings and are re-raised as themselves; ``trio.Cancelled``
  raised by a term that nothing cancelled is that term's failure.
- An abandoned thread may still be inside torch when the program ends, which
  aborts the interpreter; at exit tinkex waits a while for such terms
  (:class:`_ThreadsInTerms`).
- Grad mode belongs to the term: each evaluation (its call, ``autograd.grad``,
  the norm) runs with autograd on in the thread that runs it.
"""

from __future__ import annotations

import atexit
import inspect
import math
import numbers
import threading
import time
import types
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import torch
import trio

from . import telemetry
from ._errors import RegularizerError, RegularizerTimeoutError
from ._gradients import GradSum, grad_norm, term_gradient

__all__ = ["Term", "TermResult", "run_terms"]

BASE_LOSS_NAME = "base_loss"

#: Terms starting within this many seconds of the call's start count their
#: timeout from the call's start (so simultaneous identical terms tie exactly).
SAME_START_S = 0.01


@attrs.frozen
class Term:
    """One term to evaluate: the base loss (weight 1) or an enabled regularizer."""

    index: int
    name: str
    fn: Callable[..., Any]
    weight: float
    is_async: bool
    is_base: bool = False

    @property
    def label(self) -> str:
        return "base_loss" if self.is_base else f"regularizer {self.name!r}"


class TermResult(NamedTuple):
    """What one term produced; its gradient itself went into the call's :class:`GradSum`."""

    value: float
    metrics: dict[str, float]
    grad_norm: float | None
    duration_s: float


@attrs.frozen
class _Context:
    data: Any
    lp_arg: Any
    leaves: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]  # the leaves' version counters before any term ran
    grad_sum: GradSum | None  # None: no gradients wanted
    track_norms: bool
    timeout: float | None
    telemetry: bool


class _TermFailure(Exception):
    """Raised while checking a term's output; becomes a RegularizerError naming the term."""


# --------------------------------------------------------------------------- one term


def _safe_str(exc: BaseException) -> str:
    """``type: message`` of any exception, even one whose ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {type(exc).__name__} object>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str, cause: BaseException) -> _TermFailure:
    err = _TermFailure(message)
    err.__cause__ = cause
    return err


def _check_output(term: Term, out: Any) -> tuple[Any, float, dict[str, float]]:
    """Validate ``(loss, metrics)``; return the loss, its float value and float metrics."""
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
        clean[key] = number
    return loss, value, clean


def _check_inputs_untouched(term: Term, ctx: _Context) -> None:
    """A term that edited the shared logprobs in place (torch's version counter) fails."""
    for i, (leaf, version) in enumerate(zip(ctx.leaves, ctx.versions, strict=True)):
        if leaf._version != version:
            raise _fail(
                f"the logprobs (tensor {i}) were modified in place while {term.label} ran; "
                f"terms must not edit their inputs (use out-of-place ops such as "
                f"lp.clamp(...), or clone first). The caller's tensors are unchanged.",
                RuntimeError("logprobs modified in place"),
            )


def _finish(term: Term, out: Any, ctx: _Context, started: float) -> TermResult:
    """Validate a term's output and take its gradient (one autograd pass, this thread)."""
    loss, value, metrics = _check_output(term, out)
    norm: float | None = None
    if ctx.grad_sum is not None:
        try:
            grads = term_gradient(loss, ctx.leaves)
            if ctx.track_norms:
                norm = grad_norm(grads)
        except Exception as exc:
            raise _fail(
                f"{term.label}: taking its gradient w.r.t. the logprobs failed: {_safe_str(exc)}",
                exc,
            ) from exc
        if norm is not None and not math.isfinite(norm):
            raise _fail(f"{term.label} has a non-finite gradient norm ({norm})", ValueError(norm))
    _check_inputs_untouched(term, ctx)
    if ctx.grad_sum is not None:
        ctx.grad_sum.put(term.index, grads)
    return TermResult(value, metrics, norm, time.perf_counter() - started)


class _Pending(NamedTuple):
    """An awaitable returned by a sync-looking ``fn``: finished on the loop."""

    awaitable: Any


def _evaluate_in_thread(
    term: Term, ctx: _Context, started: float, done: list[Any]
) -> TermResult | _Pending:
    """Body of a sync term's worker thread: call it and finish it with autograd on.

    The outcome is also left in ``done``: if the loop was too busy to take it
    before the term's deadline, it is still there to be used. Tracked in
    :data:`_in_threads` while it runs, so exit can wait for it.
    """
    with _in_threads, torch.enable_grad():
        out = term.fn(ctx.data, ctx.lp_arg)
        if not isinstance(out, tuple) and inspect.isawaitable(out):
            out = _Pending(out)
        else:
            out = _finish(term, out, ctx, started)
        done.append(out)
        return out


@types.coroutine
def _own_grad_mode(coro: Any) -> Generator[Any, Any, tuple[Any, float]]:
    """Drive ``coro`` with a grad mode of its own, starting enabled.

    Around each step the term's mode is switched in and the loop thread's mode
    put back, so a ``torch.no_grad()`` held across an ``await`` stays inside the
    term. Returns ``(coro's result, seconds spent inside its steps)``: the time
    the term blocked the event loop.
    """
    mine, blocked, done = True, 0.0, False
    send: Any = None
    error: BaseException | None = None
    while True:
        outer = torch.is_grad_enabled()
        torch.set_grad_enabled(mine)
        t0 = time.perf_counter()
        try:
            yielded = coro.throw(error) if error is not None else coro.send(send)
        except StopIteration as stop:
            done, result = True, stop.value
        finally:
            blocked += time.perf_counter() - t0
            mine = torch.is_grad_enabled()
            torch.set_grad_enabled(outer)
        if done:
            return result, blocked
        try:
            send, error = (yield yielded), None
        except BaseException as exc:  # e.g. a cancellation, delivered into the term
            send, error = None, exc


class _Timeout(Exception):
    """A term ran past its deadline; ``at`` is when (Trio's clock)."""

    def __init__(self, at: float, detail: str) -> None:
        super().__init__(detail)
        self.at = at
        self.detail = detail


# --------------------------------------------------------------------------- telemetry


def _start_event(term: Term, ctx: _Context) -> None:
    if ctx.telemetry and not term.is_base:
        telemetry.emit(
            "debug",
            "regularizer.compute.start",
            regularizer_name=term.name,
            weight=term.weight,
            is_async=term.is_async,
        )


def _stop_event(term: Term, ctx: _Context, result: TermResult) -> None:
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


def _exception_event(term: Term, ctx: _Context, duration: float, error: RegularizerError) -> None:
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


# --------------------------------------------------------------------------- the call


class _Call:
    """State of one :func:`run_terms` call; used on the Trio thread only."""

    def __init__(self, ctx: _Context, max_concurrency: int) -> None:
        self.ctx = ctx
        self.results: dict[int, TermResult] = {}
        self.failures: list[tuple[float, int, RegularizerError]] = []
        self.fatal: BaseException | None = None  # KeyboardInterrupt, SystemExit, ...
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.nursery: trio.Nursery | None = None
        self.t0 = trio.current_time()

    def _record(self, term: Term, at: float, error: RegularizerError, duration: float) -> None:
        """Note a failure; cancel the siblings in the next scheduling batch.

        Deferring the cancellation (a task started now runs in the next batch)
        lets every term that failed at the same moment -- identical deadlines --
        record its failure first, so ties go to spec order.
        """
        _exception_event(term, self.ctx, duration, error)
        self.failures.append((at, term.index, error))
        if self.nursery is not None and len(self.failures) == 1:
            self.nursery.start_soon(self._cancel_siblings)

    async def _cancel_siblings(self) -> None:
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _error(self, term: Term, exc: BaseException) -> RegularizerError:
        if isinstance(exc, _TermFailure):
            err = RegularizerError(term.name, str(exc))
            err.__cause__ = exc.__cause__
        else:
            err = RegularizerError(term.name, f"{term.label} raised {_safe_str(exc)}")
            err.__cause__ = exc
        return err

    def _timeout(self, term: Term, detail: str) -> RegularizerTimeoutError:
        t = self.ctx.timeout
        err = RegularizerTimeoutError(
            term.name,
            f"{term.label} {detail}; raise the pipeline's `timeout` or make the term faster",
            timeout=t,
        )
        err.__cause__ = trio.TooSlowError(f"{term.name} exceeded {t:g}s")
        return err

    def _caught(self, term: Term, exc: BaseException, started: float) -> None:
        """Record what a term raised: a failure, or a BaseException to re-raise as itself."""
        now = trio.current_time()
        if isinstance(exc, trio.Cancelled) and trio.current_effective_deadline() == -math.inf:
            raise exc  # a real cancellation of this task: let Trio unwind it
        if isinstance(exc, Exception | trio.Cancelled):
            self._record(term, now, self._error(term, exc), now - started)
            return
        if self.fatal is None:
            self.fatal = exc
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def run_term(self, term: Term) -> None:
        """Evaluate one term; record its result or failure. Raises only real cancellation."""
        if not term.is_async:
            await self.limiter.acquire()  # the wait for a worker is not timed
        now = trio.current_time()
        # Terms starting together share the call's start, so identical terms share
        # a deadline (and ties go to spec order); a term that starts later -- after
        # waiting for a worker, or behind a term that blocked the loop -- gets its
        # full timeout from its own start.
        start = self.t0 if now - self.t0 < SAME_START_S else now
        try:
            try:
                if self.failures or trio.current_effective_deadline() == -math.inf:
                    return  # a sibling failed, or the call is cancelled: it never starts
                _start_event(term, self.ctx)
                result = await self._evaluate(term, start)
            finally:
                if not term.is_async:
                    self.limiter.release()
        except _Timeout as late:
            error = self._timeout(term, late.detail)
            self._record(term, late.at, error, trio.current_time() - start)
        except BaseException as exc:
            self._caught(term, exc, start)
        else:
            self.results[term.index] = result
            _stop_event(term, self.ctx, result)

    async def _evaluate(self, term: Term, start: float) -> TermResult:
        ctx, timeout = self.ctx, self.ctx.timeout
        deadline = math.inf if timeout is None else start + timeout
        wall = time.perf_counter()
        out: Any = None
        if not term.is_async:
            # Shielded: a sibling's failure (or the caller's cancellation) waits for
            # this thread; only the term's own deadline abandons it.
            done: list[Any] = []
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                out = await trio.to_thread.run_sync(
                    _evaluate_in_thread, term, ctx, wall, done, abandon_on_cancel=True
                )
            if scope.cancelled_caught and done:
                out = done[0]  # it finished in time; the loop was late to look
            elif scope.cancelled_caught:
                raise _Timeout(
                    deadline,
                    f"timed out after {timeout:g}s (its worker thread cannot be killed "
                    f"and was abandoned)",
                )
            if isinstance(out, TermResult):
                return out
            out = out.awaitable
        # an async term, or the awaitable a sync-looking fn returned: on the loop
        with trio.CancelScope(deadline=deadline) as scope:
            result, blocked = await _own_grad_mode(self._on_loop(term, out, wall))
        if scope.cancelled_caught:
            raise _Timeout(deadline, f"timed out after {timeout:g}s")
        if timeout is not None and blocked > timeout:
            raise _Timeout(
                trio.current_time(),
                f"blocked the event loop for {blocked:.3g}s, longer than its timeout of "
                f"{timeout:g}s (an async term must await, not block; a plain def runs "
                f"in a worker thread)",
            )
        return result._replace(duration_s=trio.current_time() - start)

    async def _on_loop(self, term: Term, out: Any, wall: float) -> TermResult:
        if out is None:
            out = term.fn(self.ctx.data, self.ctx.lp_arg)
        if not isinstance(out, tuple) and inspect.isawaitable(out):
            out = await out
        return _finish(term, out, self.ctx, wall)

    async def run(self, terms: Sequence[Term], parallel: bool) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for term in terms:
                    if parallel:
                        nursery.start_soon(self.run_term, term)
                    elif not self.failures and self.fatal is None:
                        await self.run_term(term)
        finally:
            self.nursery = None
        if self.fatal is not None:
            raise self.fatal
        if self.failures:
            raise min(self.failures, key=lambda f: (f[0], f[1]))[2]


async def run_terms(
    terms: Sequence[Term],
    *,
    data: Any,
    lp_arg: Any,
    leaves: tuple[torch.Tensor, ...],
    need_grads: bool,
    track_norms: bool,
    parallel: bool,
    timeout: float | None,
    max_concurrency: int,
    emit_events: bool,
) -> tuple[list[TermResult], list[torch.Tensor] | None]:
    """Evaluate every term once; return their results in order, and the total gradient.

    The total gradient (``None`` unless ``need_grads``) is ``Σ weight · d(term)/d(leaves)``
    per leaf, summed in spec order whatever order the terms finished in.

    Raises:
        RegularizerError: the first term to fail (``RegularizerTimeoutError`` for
            a timeout), with the original error as ``__cause__``.
        BaseException: a ``KeyboardInterrupt``, ``SystemExit`` or other
            non-``Exception`` raised by a term, as itself.
    """
    grad_sum = GradSum([t.weight for t in terms], leaves) if need_grads else None
    ctx = _Context(
        data=data,
        lp_arg=lp_arg,
        leaves=leaves,
        versions=tuple(leaf._version for leaf in leaves),
        grad_sum=grad_sum,
        track_norms=track_norms,
        timeout=timeout,
        telemetry=emit_events,
    )
    call = _Call(ctx, max_concurrency)
    await call.run(terms, parallel)
    results = [call.results[t.index] for t in terms]
    return results, (grad_sum.result() if grad_sum is not None else None)


# --------------------------------------------------------------------------- exit


class _ThreadsInTerms:
    """Counts term evaluations running in worker threads, so exit can wait for them.

    Trio's worker threads are daemon threads. If the interpreter exits while one
    is inside a torch kernel, Python stops it by unwinding it, which C++ cannot
    survive: the process aborts ("terminate called without an active exception").
    A term abandoned on its own timeout may still be running when the program
    ends, so at exit tinkex waits up to ``TINKEX_EXIT_GRACE_S`` seconds (default
    10) for such terms to finish.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wait(self, seconds: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=seconds)


_in_threads = _ThreadsInTerms()


def _grace_s() -> float:
    import os

    try:
        return max(0.0, float(os.environ.get("TINKEX_EXIT_GRACE_S", "10")))
    except ValueError:
        return 10.0


@atexit.register
def _wait_for_abandoned_terms() -> None:
    if not _in_threads.wait(_grace_s()):
        import sys

        print(
            "tinkex: a regularizer abandoned on its timeout is still running at exit; "
            "the interpreter may abort. Give blocking terms their own timeout or make them async.",
            file=sys.stderr,
        )
