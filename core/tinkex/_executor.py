"""Running the terms of a composed loss under Trio.

How terms run:

- Async terms are awaited as Trio tasks on the loop.
- Sync terms run off the Trio thread, in worker threads ("lanes"). A lane is one
  thread from Trio's thread cache (``trio.lowlevel.start_thread_soon``) draining
  a shared queue of sync terms, so a batch of cheap terms costs one thread hop per
  lane, not one per term. ``parallel=True`` allows up to
  ``min(max_concurrency, number of sync terms)`` lanes. With large logprobs
  (``LANE_WORK_THRESHOLD`` elements or more) they all start at once; with small
  ones a single lane starts, and another is added whenever every lane has been
  busy on one term for ``GROW_AFTER_S`` (a term blocked on I/O or a lock), so
  tiny terms do not fight over the GIL while slow or blocking terms still
  overlap. ``parallel=False`` runs one term at a time in spec order (sync terms
  still in a lane, so timeouts hold and the loop stays responsive).
- One watcher per call (``_Run._watch_lanes``, on the loop) sleeps until a lane
  posts something with ``TrioToken.run_sync_soon`` -- a failure, or its exit --
  or until the next timeout or growth check is due. Successful terms post
  nothing.
- ``timeout`` bounds each term's own run, starting when the term starts (not
  while it waits for a free lane).
- Each term's gradient goes into a :class:`GradSum` as soon as it is taken,
  which adds it in spec order (so the total does not depend on timing).
- The first term to fail (raise, time out, or return something unusable)
  cancels its siblings; the caller gets one :class:`RegularizerError` naming it
  (ties in time: spec order), never an ExceptionGroup.

Trio cannot kill a thread. A sync term that times out (or is still running when
a sibling fails) is *abandoned*: the caller gets the error at once, and the
thread finishes that one term in the background, starts no other and returns to
Trio's thread cache; nothing it computes is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import numbers
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs
import torch
import trio

from . import telemetry
from ._errors import RegularizerError, RegularizerTimeoutError
from ._gradients import GradSum, grad_norm, term_gradient

__all__ = ["Term", "TermResult", "run_terms"]

BASE_LOSS_NAME = "base_loss"

#: Logprob elements from which every lane starts at once: below it, a term is a few
#: microseconds of torch and lanes would mostly fight over the GIL.
LANE_WORK_THRESHOLD = 1 << 16
#: A new lane is added when every running lane has been on one term this long.
GROW_AFTER_S = 0.002


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
    """What one term produced: its value, metrics and (when asked) gradient norm.

    The term's gradient itself goes straight into the run's :class:`GradSum`.
    (A NamedTuple, not attrs: one is built per term per call, on the hot path.)
    """

    value: float
    metrics: dict[str, float]
    grad_norm: float | None
    duration_s: float


@attrs.frozen
class _Context:
    data: Any
    lp_arg: Any
    leaves: tuple[torch.Tensor, ...]
    grad_sum: GradSum | None  # None: no gradients wanted
    track_norms: bool
    timeout: float | None
    telemetry: bool


class _TermFailure(Exception):
    """Raised inside a term's evaluation; becomes a RegularizerError naming the term."""


# --------------------------------------------------------------------------- one term


def _check_output(term: Term, out: Any) -> tuple[Any, float, dict[str, float]]:
    """Validate ``(loss, metrics)``; return the loss, its float value and float metrics."""
    if (type(out) is not tuple and not isinstance(out, list)) or len(out) != 2:
        raise _TermFailure(
            f"{term.label} must return a 2-tuple (loss, metrics), got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
        ) from TypeError(f"bad return type {type(out).__name__}")
    loss, metrics = out
    if isinstance(loss, torch.Tensor):
        if loss.dim() != 0 and loss.numel() != 1:
            raise _TermFailure(
                f"{term.label} returned a non-scalar loss of shape {tuple(loss.shape)}; "
                f"reduce it to one number (e.g. .sum() or .mean())"
            ) from ValueError(f"loss shape {tuple(loss.shape)}")
        if not loss.is_floating_point() and (loss.is_complex() or loss.dtype == torch.bool):
            raise _TermFailure(
                f"{term.label} returned a loss of dtype {loss.dtype}; it must be real"
            ) from (TypeError(str(loss.dtype)))
        value = float(loss.item())
    elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        value = float(loss)
    else:
        raise _TermFailure(
            f"{term.label} returned a loss of type {type(loss).__name__}; it must be a scalar tensor or a real number"
        ) from TypeError(type(loss).__name__)
    if not math.isfinite(value):
        raise _TermFailure(f"{term.label} returned a non-finite loss ({value})") from ValueError(
            f"loss is {value}"
        )
    if type(metrics) is not dict and not isinstance(metrics, Mapping):
        raise _TermFailure(
            f"{term.label} returned metrics of type {type(metrics).__name__}; they must be a mapping of str to number"
        ) from TypeError(type(metrics).__name__)
    if not metrics:
        return loss, value, {}
    clean: dict[str, float] = {}
    for key, raw in metrics.items():
        if not isinstance(key, str):
            raise _TermFailure(
                f"{term.label} returned a metric key {key!r}; keys must be str"
            ) from TypeError(type(key).__name__)
        if isinstance(raw, torch.Tensor) and raw.numel() == 1 and not raw.is_complex():
            number = float(raw.item())
        elif isinstance(raw, numbers.Real):
            number = float(raw)
        else:
            raise _TermFailure(
                f"{term.label} returned a non-numeric metric {key!r}={raw!r}; metrics must be numbers or scalar tensors"
            ) from TypeError(type(raw).__name__)
        if not math.isfinite(number):
            raise _TermFailure(
                f"{term.label} returned a non-finite metric {key!r}={number}"
            ) from ValueError(f"{key}={number}")
        clean[key] = number
    return loss, value, clean


def _finish(term: Term, out: Any, ctx: _Context, started: float) -> TermResult:
    """Validate a term's output and take its gradient (one autograd pass, in this thread).

    Runs with autograd enabled (the caller makes sure). The gradient is handed
    to the run's :class:`GradSum` at once; only its norm is kept.
    """
    loss, value, metrics = _check_output(term, out)
    norm: float | None = None
    if ctx.grad_sum is not None:
        try:
            grads = term_gradient(loss, ctx.leaves)
            if ctx.track_norms:
                norm = grad_norm(grads)
        except Exception as exc:
            raise _TermFailure(
                f"{term.label}: taking its gradient w.r.t. the logprobs failed: {type(exc).__name__}: {exc}"
            ) from exc
        if norm is not None and not math.isfinite(norm):
            raise _TermFailure(
                f"{term.label} has a non-finite gradient norm ({norm})"
            ) from ValueError(f"grad norm {norm}")
        ctx.grad_sum.put(term.index, grads)
    return TermResult(
        value=value,
        metrics=metrics,
        grad_norm=norm,
        duration_s=time.perf_counter() - started,
    )


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


def _exception_event(term: Term, ctx: _Context, duration: float, error: BaseException) -> None:
    if ctx.telemetry and not term.is_base:
        telemetry.emit(
            "error",
            "regularizer.compute.exception",
            regularizer_name=term.name,
            weight=term.weight,
            is_async=term.is_async,
            duration_s=duration,
            error=_describe_error(error),
        )


def _describe_error(error: BaseException) -> str:
    if isinstance(error, RegularizerError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _as_regularizer_error(term: Term, exc: BaseException) -> RegularizerError:
    if isinstance(exc, _TermFailure):
        err = RegularizerError(term.name, str(exc))
        err.__cause__ = exc.__cause__
        return err
    err = RegularizerError(term.name, f"{term.label} raised {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


# --------------------------------------------------------------------------- jobs


class _Job:
    """A sync term travelling through a lane. Written by the lane's thread only."""

    __slots__ = ("error", "out", "reported", "result", "t_start", "term")

    def __init__(self, term: Term) -> None:
        self.term = term
        self.t_start = 0.0  # time.perf_counter() when the term started
        self.result: TermResult | None = None
        self.out: Any = None  # an awaitable returned by a sync-looking fn
        self.error: BaseException | None = None
        self.reported = False  # set on the Trio thread once its failure is recorded


class _Lane:
    """One worker thread draining the shared queue; ``current`` is the job it runs now."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: _Job | None = None


def _execute_in_thread(job: _Job, ctx: _Context) -> None:
    """Run one sync term in a lane (autograd is on: the lane turned it on)."""
    term = job.term
    _start_event(term, ctx)
    started = job.t_start
    try:
        out = term.fn(ctx.data, ctx.lp_arg)
        if type(out) is not tuple and inspect.isawaitable(out):
            job.out = out  # awaited on the Trio thread
            return
        result = _finish(term, out, ctx, started)
    except BaseException as exc:  # reported on the Trio side; a lane must never die silently
        job.error = exc
        _exception_event(term, ctx, time.perf_counter() - started, exc)
        return
    job.result = result
    _stop_event(term, ctx, result)


async def _cancel(scope: trio.CancelScope) -> None:
    scope.cancel()


def _unfinished(job: _Job) -> bool:
    return job.result is None and job.error is None and job.out is None


def _post(token: trio.lowlevel.TrioToken, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(trio.RunFinishedError):  # the caller has gone; nobody to tell
        token.run_sync_soon(fn, *args)


def _report_lane_exit(ref: weakref.ref[_Run], outcome: Any) -> None:
    """On the Trio thread: tell the run (if its call is still waiting) that a lane is done."""
    run = ref()
    if run is not None:
        run._lane_exited(outcome)


def _lane_body(lane: _Lane, jobs: deque[_Job], run: _Run) -> None:
    """Worker-thread body: run queued sync jobs one after another until none is left.

    The loop is told nothing about jobs that succeed (no per-term wake-up). A
    failure stops the lane at once and is reported with its exit (see
    :meth:`_Run._start_lane`); an awaitable to finish is posted right away.
    """
    ctx = run.ctx
    grad_was = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # grad mode is per thread: never inherit a caller's no_grad
    try:
        while not run.stop.is_set():
            try:
                job = jobs.popleft()
            except IndexError:
                return
            job.t_start = time.perf_counter()
            lane.current = job
            _execute_in_thread(job, ctx)
            lane.current = None
            if job.error is not None:
                run.stop.set()
                run.failed_jobs.append(job)  # reported to the loop as the lane exits
                return
            if job.out is not None:
                _post(run.token, run.spawn_awaitable, job)
    finally:
        torch.set_grad_enabled(grad_was)  # worker threads are reused by Trio's thread cache


# --------------------------------------------------------------------------- the run


class _Run:
    """State shared by one call: results, the first failure, and the lanes of a group.

    Everything but the jobs' own fields and ``failed_jobs`` is read and written
    on the Trio thread; lanes talk to it through ``TrioToken.run_sync_soon``.
    """

    def __init__(self, terms: Sequence[Term], ctx: _Context) -> None:
        self.ctx = ctx
        self.results: list[TermResult | None] = [None] * len(terms)
        self.failures: list[tuple[float, int, RegularizerError]] = []
        self.stop = threading.Event()
        self.nursery: trio.Nursery | None = None
        self.token = trio.lowlevel.current_trio_token()
        self.lanes: list[_Lane] = []
        self.live_lanes = 0
        self.lane_crash: BaseException | None = None
        self.failed_jobs: deque[_Job] = deque()  # appended by lanes, read on the loop
        self.wake: trio.Event | None = None
        self.cancelling = False

    def _poke(self) -> None:
        """Wake :meth:`_watch_lanes` (on the Trio thread)."""
        if self.wake is not None:
            self.wake.set()

    def fail(self, term: Term, error: RegularizerError) -> None:
        """Record a failure and cancel the siblings.

        The cancellation is deferred to the loop's next batch (a new task runs
        there), so terms failing at the same instant -- two timeouts with one
        deadline -- are all recorded, and the tie goes to spec order.
        """
        self.failures.append((trio.current_time(), term.index, error))
        self.stop.set()
        self._poke()
        if self.nursery is not None and not self.cancelling:
            self.cancelling = True
            self.nursery.start_soon(_cancel, self.nursery.cancel_scope)

    def timeout_error(self, term: Term) -> RegularizerTimeoutError:
        t = self.ctx.timeout
        err = RegularizerTimeoutError(
            term.name,
            f"{term.label} timed out after {t:g}s; raise the pipeline's `timeout` or make the term faster"
            + ("" if term.is_async else " (its worker thread cannot be killed and was abandoned)"),
            timeout=t,
        )
        err.__cause__ = trio.TooSlowError(f"{term.name} exceeded {t:g}s")
        return err

    async def run_async(self, term: Term, job: _Job | None = None) -> None:
        """Run an async term on the loop; with ``job``, finish the awaitable a lane got back."""
        ctx = self.ctx
        if job is None:
            _start_event(term, ctx)
        started = time.perf_counter() if job is None else job.t_start
        t0 = trio.current_time()
        try:
            with trio.move_on_after(math.inf if ctx.timeout is None else ctx.timeout) as scope:
                out = term.fn(ctx.data, ctx.lp_arg) if job is None else job.out
                if inspect.isawaitable(out):
                    out = await out
                result = _finish(term, out, ctx, started)
                # on the loop, durations follow Trio's clock (virtual under a MockClock)
                self.results[term.index] = result = result._replace(
                    duration_s=trio.current_time() - t0
                )
        except Exception as exc:
            self._report(term, _as_regularizer_error(term, exc), trio.current_time() - t0)
            return
        if scope.cancelled_caught:
            self._report(term, self.timeout_error(term), trio.current_time() - t0)
            return
        _stop_event(term, ctx, result)

    def _report(self, term: Term, error: RegularizerError, duration: float) -> None:
        _exception_event(term, self.ctx, duration, error)
        self.fail(term, error)

    def thread_failed(self, job: _Job) -> None:
        """On the Trio thread: record that ``job`` raised or returned garbage (once)."""
        if not job.reported and job.error is not None:
            job.reported = True  # the thread already emitted the exception event
            self.fail(job.term, _as_regularizer_error(job.term, job.error))

    def spawn_awaitable(self, job: _Job) -> None:
        """On the Trio thread: a sync-looking fn returned an awaitable; finish it as a task."""
        if self.nursery is not None:
            self.nursery.start_soon(self.run_async, job.term, job)

    def _lane_exited(self, outcome: Any) -> None:
        """On the Trio thread: a lane's thread is done (``outcome`` of its body)."""
        self.live_lanes -= 1
        while self.failed_jobs:
            self.thread_failed(self.failed_jobs.popleft())
        error = getattr(outcome, "error", None)
        if error is not None and self.lane_crash is None:
            self.lane_crash = error  # a bug in the lane itself: re-raised by run_group
            self.stop.set()
        self._poke()

    def _start_lane(self, queue: deque[_Job]) -> None:
        """Start a lane: a thread from Trio's cache running :func:`_lane_body`.

        No task and no ``to_thread`` machinery: the lane posts its exit (and
        failures) back with ``run_sync_soon``, which wakes :meth:`_watch_lanes`.
        The thread runs in a copy of the caller's context (structlog contextvars
        reach the events it emits), like ``trio.to_thread.run_sync``.
        """
        lane = _Lane()
        self.lanes.append(lane)
        self.live_lanes += 1
        context = contextvars.copy_context()
        token = self.token
        # Once the lane reports its exit, its thread must hold nothing of this run:
        # the loop may finish the call -- and the program may end -- while the thread
        # is still unwinding, and a tensor freed in a daemon thread while the
        # interpreter shuts down aborts the process ("terminate called without an
        # active exception"). So the body takes the run out of a one-slot list (its
        # frame is gone before ``deliver`` runs), failures are left on the run, and
        # ``deliver`` posts a weak reference.
        for_body: list[_Run] = [self]
        ref = weakref.ref(self)

        def body() -> None:
            _lane_body(lane, queue, for_body.pop())

        def deliver(outcome: Any) -> None:  # in the worker thread, after the body
            _post(token, _report_lane_exit, ref, outcome)

        trio.lowlevel.start_thread_soon(
            functools.partial(context.run, body), deliver, name="tinkex lane"
        )

    async def _watch_lanes(self, queue: deque[_Job], max_lanes: int) -> None:
        """Wait for the lanes, enforce timeouts, and add lanes while every lane is stuck.

        Sleeps until a lane reports (its exit or a failure) or the next moment it
        has something to check, whichever comes first; successful terms cost no
        wake-ups at all.

        Timeouts: the next moment is the earliest deadline of a running sync term
        (a term that has not started yet has a later deadline than ``now + timeout``).

        Growth: when work is queued and every lane has been on one term for
        ``GROW_AFTER_S``, another lane starts (up to ``max_lanes``). Cheap torch
        terms finish long before that and share one thread instead of fighting
        over the GIL; terms that block (I/O, a lock, a big kernel) get company.
        """
        timeout = self.ctx.timeout
        try:
            while self.live_lanes > 0 and not self.failures and self.lane_crash is None:
                now = time.perf_counter()
                wake = math.inf
                if timeout is not None:
                    wake = now + timeout
                    for lane in self.lanes:
                        job = lane.current
                        if job is None:
                            continue
                        deadline = job.t_start + timeout
                        if deadline > now:
                            wake = min(wake, deadline)
                        elif lane.current is job and _unfinished(job):
                            self._report(job.term, self.timeout_error(job.term), now - job.t_start)
                            return
                if queue and len(self.lanes) < max_lanes:
                    starts = [job.t_start if (job := lane.current) else None for lane in self.lanes]
                    if all(t is not None and now - t >= GROW_AFTER_S for t in starts):
                        self._start_lane(queue)
                        continue
                    stuck_at = (
                        max(starts) + GROW_AFTER_S if None not in starts else now + GROW_AFTER_S
                    )
                    wake = min(wake, stuck_at)
                self.wake = trio.Event()
                with trio.move_on_after(max(wake - now, 1e-4)):
                    await self.wake.wait()
                self.wake = None
        finally:
            self.wake = None
            if self.live_lanes > 0:
                self.stop.set()  # failed or cancelled: queued terms never start

    async def run_group(
        self,
        sync_terms: Sequence[Term],
        async_terms: Sequence[Term],
        max_lanes: int,
        initial_lanes: int | None = None,
    ) -> None:
        """Run some terms concurrently: async ones as tasks, sync ones in up to ``max_lanes`` lanes.

        ``initial_lanes`` start at once (default: all ``max_lanes``); more are added
        by :meth:`_watch_lanes` while every lane is stuck on a slow term.
        """
        all_jobs = [_Job(t) for t in sync_terms]
        queue = deque(all_jobs)
        max_lanes = min(max_lanes, len(all_jobs))
        initial = max_lanes if initial_lanes is None else min(initial_lanes, max_lanes)
        self.lanes = []
        self.live_lanes = 0
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for term in async_terms:
                nursery.start_soon(self.run_async, term)
            for _ in range(initial):
                self._start_lane(queue)
            if all_jobs:
                await self._watch_lanes(queue, max_lanes)
        self.nursery = None
        if self.lane_crash is not None:
            raise RuntimeError(
                "tinkex: a worker lane crashed (a bug in tinkex)"
            ) from self.lane_crash
        for job in all_jobs:
            if job.out is not None:
                continue  # finished (or failed) by run_async
            if job.result is not None:
                self.results[job.term.index] = job.result
            else:
                self.thread_failed(job)  # a failure no lane exit reported (an abandoned lane)

    def first_failure(self) -> RegularizerError | None:
        if not self.failures:
            return None
        return min(self.failures, key=lambda f: (f[0], f[1]))[2]


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
    """
    grad_sum = GradSum([t.weight for t in terms], leaves) if need_grads else None
    ctx = _Context(
        data=data,
        lp_arg=lp_arg,
        leaves=leaves,
        grad_sum=grad_sum,
        track_norms=track_norms,
        timeout=timeout,
        telemetry=emit_events,
    )
    run = _Run(terms, ctx)
    if parallel:
        sync_terms = [t for t in terms if not t.is_async]
        async_terms = [t for t in terms if t.is_async]
        numel = sum(leaf.numel() for leaf in leaves)
        initial = None if numel >= LANE_WORK_THRESHOLD else 1
        await run.run_group(sync_terms, async_terms, max_concurrency, initial_lanes=initial)
    else:
        i = 0
        while i < len(terms) and not run.failures:
            if terms[i].is_async:
                await run.run_group((), (terms[i],), 0)
                i += 1
                continue
            j = i
            while j < len(terms) and not terms[j].is_async:
                j += 1
            await run.run_group(terms[i:j], (), 1)  # one lane keeps spec order
            i = j
    error = run.first_failure()
    if error is not None:
        raise error
    results = [r for r in run.results if r is not None]
    return results, (grad_sum.result() if grad_sum is not None else None)
