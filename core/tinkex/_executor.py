"""Running the terms of a composed loss under Trio, from stock Trio parts only.

How one call runs (:func:`run_terms`), in one nursery:

- **Async terms** are tasks on the loop, each in a ``trio.CancelScope`` whose
  deadline is its timeout. Their coroutine is driven by :func:`_own_grad_mode`,
  which gives the term a grad mode of its own (on at the start) and puts the
  loop thread's mode back after every step, so a ``torch.no_grad()`` held across
  an ``await`` never reaches another task. An async term that blocks the loop
  past its timeout is reported as such when it returns.
- **Sync terms** run in *lanes*: a lane is one ``trio.to_thread.run_sync`` call,
  made after taking a token of the call's ``trio.CapacityLimiter(max_concurrency)``,
  whose thread runs queued terms one after another (one thread hop for many
  cheap terms). ``parallel=True`` gives up to ``max_concurrency`` lanes sharing
  one queue; ``parallel=False`` one lane per run of consecutive sync terms, in
  spec order. Each term is called and finished with autograd on.
- **Timeouts of sync terms**: the lane's thread runs in a *shielded* cancel
  scope, so nothing from outside can abandon it; a small task per lane
  (:meth:`_Call._keep_deadlines`) sleeps until the running term's deadline and,
  if that term is still running then, cancels the scope: only a term whose own
  timeout fired is abandoned (``abandon_on_cancel=True``; Trio cannot kill a
  thread). A term's time starts when it starts, not while it waits for a worker.
- **Failures**: the first failure stops every lane after its running term (such
  terms are awaited, never abandoned; their results are discarded) and cancels
  the async siblings on Trio's next scheduling pass, so terms failing at the
  same moment are all recorded. The caller gets the earliest failure as one
  :class:`RegularizerError`; equal moments go to spec order. Terms starting
  within ``SAME_START_S`` of the call's start count their time from the call's
  start, so identical terms that hang with the same timeout share one deadline.
- ``KeyboardInterrupt``, ``SystemExit`` and other ``BaseException`` s raised by
  a term stop the others the same way and are re-raised as themselves;
  ``trio.Cancelled`` raised by a term that nothing cancelled is that term's
  failure. The caller's own cancellation (or Ctrl-C) stops the lanes after
  their running terms and propagates as usual; a running term *without* a
  timeout (the base loss of the SDK drop-ins, or ``timeout=None``) has nothing
  to bound that wait, so it is abandoned at once instead.
- An abandoned thread may still be inside torch when the program ends, which
  aborts the interpreter; at exit tinkex waits a while for such terms
  (:class:`_ThreadsInTerms`).
"""

from __future__ import annotations

import atexit
import contextvars
import inspect
import math
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any

import attrs
import torch
import trio

from ._errors import RegularizerError, RegularizerTimeoutError
from ._gradients import GradSum
from ._terms import (
    Term,
    TermContext,
    TermFailure,
    TermResult,
    exception_event,
    finish,
    safe_str,
    start_event,
    stop_event,
)

__all__ = ["BASE_LOSS_NAME", "run_terms"]

BASE_LOSS_NAME = "base_loss"

#: Below this many logprob elements a term is microseconds of torch: one lane runs
#: the sync terms, and the others join only if terms are still queued after
#: ``JOIN_AFTER_S`` (a term that blocks on I/O or a lock), instead of fighting over
#: the GIL. From it on, every lane starts at once.
LANE_WORK_THRESHOLD = 1 << 16
JOIN_AFTER_S = 0.002

#: Terms starting within this many seconds of the call's start count their
#: timeout from the call's start (so simultaneous identical terms tie exactly).
SAME_START_S = 0.01


@types.coroutine
def _own_grad_mode(coro: Any, blocked: list[float]) -> Generator[Any, Any, Any]:
    """Drive ``coro`` with autograd state of its own: grad mode (on at the start) and
    inference mode (off at the start).

    Around each step the term's state is switched in and the loop thread's put
    back, so a ``torch.no_grad()`` or ``torch.inference_mode()`` held across an
    ``await`` stays inside the term. ``blocked[0]`` accumulates the seconds spent
    inside the steps: the time the term blocked the event loop.
    """
    grad, inference, done = True, False, False
    send: Any = None
    error: BaseException | None = None
    while True:
        outer = torch.is_grad_enabled()
        t0 = time.perf_counter()
        with torch.inference_mode(inference):  # restores the loop thread's state on exit
            torch.set_grad_enabled(grad)
            try:
                yielded = coro.throw(error) if error is not None else coro.send(send)
            except StopIteration as stop:
                done, result = True, stop.value
            finally:
                blocked[0] += time.perf_counter() - t0
                grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        torch.set_grad_enabled(outer)
        if done:
            return result
        try:
            send, error = (yield yielded), None
        except BaseException as exc:  # e.g. a cancellation, delivered into the term
            send, error = None, exc


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _only_cancelled(exc: BaseException) -> bool:
    """``trio.Cancelled``, or a group of nothing else (a term with a nursery of its own)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


# --------------------------------------------------------------------------- lanes


@attrs.define(eq=False)
class _Lane:
    """Sync terms run one after another in one worker thread: one thread hop for many.

    The thread takes terms from ``queue`` (shared by the lanes of a group) until it
    is empty, the lane is told to ``stop``, or a term fails. ``running`` (the term
    and its deadline, ``time.perf_counter()`` seconds) is written by the thread
    and read by the lane's deadline keeper on the loop.
    """

    queue: deque[Term]
    scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    keeper: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    delay: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    stop: bool = False
    running: tuple[Term, float] | None = None
    failed: tuple[Term, BaseException, float, float] | None = None  # term, error, when, start
    timed_out: tuple[Term, float] | None = None
    interrupted: bool = False  # its unbounded term was abandoned: the call was interrupted


# --------------------------------------------------------------------------- the call


class _Call:
    """State of one :func:`run_terms` call (lanes write only their own fields)."""

    def __init__(self, ctx: TermContext, max_concurrency: int) -> None:
        self.ctx = ctx
        self.results: dict[int, TermResult] = {}
        self.failures: list[tuple[float, int, RegularizerError]] = []
        self.fatal: BaseException | None = None  # KeyboardInterrupt, SystemExit, ...
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.lanes: list[_Lane] = []
        self.nursery: trio.Nursery | None = None
        # set when the call is interrupted (Ctrl-C, the caller's cancellation) rather
        # than failed: running terms without a timeout are then abandoned, not awaited
        self.interrupted = trio.Event()
        self.t0 = trio.current_time()
        self.t0_wall = time.perf_counter()
        self._wall_to_loop = self.t0 - self.t0_wall  # fixed, so equal walls map alike

    # ---------------------------------------------------------------- failures

    def _record(self, term: Term, at: float, error: RegularizerError, duration: float) -> None:
        """Note a failure: no lane starts another term; the siblings are cancelled next pass.

        Deferring the cancellation (a task started now runs in the next scheduling
        pass) lets every term that failed at the same moment -- identical deadlines
        -- record its failure first, so ties go to spec order.
        """
        exception_event(term, self.ctx, duration, error)
        self.failures.append((at, term.index, error))
        self._stop_lanes()
        if self.nursery is not None and len(self.failures) == 1:
            self.nursery.start_soon(self._cancel_siblings)

    async def _cancel_siblings(self) -> None:
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def _stop_lanes(self) -> None:
        for lane in self.lanes:
            lane.stop = True

    def _loop_time(self, wall: float) -> float:
        """Trio's clock at the moment ``time.perf_counter()`` read ``wall``."""
        return wall + self._wall_to_loop

    def _error(self, term: Term, exc: BaseException) -> RegularizerError:
        if isinstance(exc, TermFailure):
            err = RegularizerError(term.name, str(exc))
            err.__cause__ = exc.__cause__
        else:
            err = RegularizerError(term.name, f"{term.label} raised {safe_str(exc)}")
            err.__cause__ = exc
        return err

    def _timeout(self, term: Term, detail: str) -> RegularizerTimeoutError:
        t = term.timeout
        err = RegularizerTimeoutError(
            term.name,
            f"{term.label} {detail}; raise the pipeline's `timeout` or make the term faster",
            timeout=t,
        )
        err.__cause__ = trio.TooSlowError(f"{term.name} exceeded {t or 0.0:g}s")
        return err

    def _caught(self, term: Term, exc: BaseException, at: float, duration: float) -> None:
        """Record what a term raised: a failure, or a BaseException to re-raise as itself.

        A group (a term with a nursery of its own) is judged by what it holds
        besides ``trio.Cancelled``: a KeyboardInterrupt or the like is re-raised,
        anything else is the term's failure.
        """
        fatal = exc
        if isinstance(exc, BaseExceptionGroup):
            _, rest = exc.split(trio.Cancelled)
            serious = rest.split(Exception)[1] if rest is not None else None
            fatal = _first_leaf(serious) if serious is not None else exc
        if isinstance(fatal, Exception | trio.Cancelled | BaseExceptionGroup):
            self._record(term, at, self._error(term, exc), duration)
            return
        if self.fatal is None:
            self.fatal = fatal
        self._stop_lanes()
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- async terms

    async def run_async_term(
        self,
        term: Term,
        out: Any = None,
        started: float | None = None,
        finished: threading.Event | None = None,
    ) -> None:
        """Run an async term on the loop -- or the awaitable ``out`` a sync term returned.

        ``started`` is when that sync term started (Trio's clock); ``finished`` is
        set at the end, for the lane waiting on it. Raises only a real
        cancellation of this task.
        """
        try:
            await self._run_async_term(term, out, started)
        finally:
            if finished is not None:
                finished.set()

    async def _run_async_term(self, term: Term, out: Any, started: float | None) -> None:
        timeout = term.timeout
        if started is None:
            now = trio.current_time()
            started = self.t0 if now - self.t0 < SAME_START_S else now
            start_event(term, self.ctx)
        deadline = math.inf if timeout is None else started + timeout
        wall, blocked = time.perf_counter(), [0.0]
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                result = await _own_grad_mode(self._on_loop(term, out, wall), blocked)
        except BaseException as exc:
            if _only_cancelled(exc) and trio.current_effective_deadline() == -math.inf:
                raise  # a real cancellation of this task: let Trio unwind it
            now = trio.current_time()
            self._caught(term, exc, now, now - started)
            return
        now = trio.current_time()
        if timeout is not None and blocked[0] > timeout:
            detail = (
                f"blocked the event loop for {blocked[0]:.3g}s, longer than its timeout of "
                f"{timeout:g}s (an async term must await, not block; a plain def runs "
                f"in a worker thread)"
            )
            self._record(term, now, self._timeout(term, detail), now - started)
        elif scope.cancelled_caught:
            error = self._timeout(term, f"timed out after {timeout:g}s")
            self._record(term, deadline, error, now - started)
        else:
            self.results[term.index] = result = result._replace(duration_s=now - started)
            stop_event(term, self.ctx, result)

    async def _on_loop(self, term: Term, out: Any, wall: float) -> TermResult:
        if out is None:
            out = term.fn(self.ctx.data, self.ctx.lp_arg)
        if not isinstance(out, tuple) and inspect.isawaitable(out):
            out = await out
        return finish(term, out, self.ctx, wall)

    # ---------------------------------------------------------------- sync terms

    def _lane_body(self, lane: _Lane) -> None:
        """In the lane's worker thread: run queued terms until none is left or told to stop.

        Each term runs in its own copy of the caller's context (a term's
        ``contextvars`` changes do not reach the next), and is called and
        finished (output checks, ``autograd.grad``, norm) with autograd on,
        whatever the previous term left; the thread's own grad mode is restored
        at the end (Trio reuses its threads). Counted in :data:`_in_threads`
        while it runs, so exit can wait for it.
        """
        ctx = self.ctx
        caller_context = contextvars.copy_context()
        grad_was = torch.is_grad_enabled()
        with _in_threads:
            try:
                while not lane.stop:
                    try:
                        term = lane.queue.popleft()
                    except IndexError:  # the queue is shared: another lane took the last
                        return
                    started = time.perf_counter()
                    # as for async terms: starting with the call means the call's start
                    base = self.t0_wall if started - self.t0_wall < SAME_START_S else started
                    try:
                        result = caller_context.copy().run(self._one_sync_term, lane, term, base)
                    except BaseException as exc:  # reported on the loop, never lost
                        lane.failed = (term, exc, time.perf_counter(), started)
                        return
                    if lane.timed_out is not None or lane.interrupted:
                        return  # abandoned: its result and its events are nobody's now
                    if result is not None:
                        self.results[term.index] = result
                        stop_event(term, ctx, result)
            finally:
                torch.set_grad_enabled(grad_was)

    def _one_sync_term(self, lane: _Lane, term: Term, base: float) -> TermResult | None:
        """Evaluate one sync term in the lane's thread (``None``: finished on the loop)."""
        ctx, timeout = self.ctx, term.timeout
        started = time.perf_counter()
        start_event(term, ctx)
        lane.running = (term, math.inf if timeout is None else base + timeout)
        torch.set_grad_enabled(True)
        try:
            out = term.fn(ctx.data, ctx.lp_arg)
            if isinstance(out, tuple) or not inspect.isawaitable(out):
                return finish(term, out, ctx, started)
        finally:
            lane.running = None
        # A sync-looking fn returned an awaitable: it is finished as a task on the
        # loop (under the same deadline), and the lane waits for it, so terms still
        # run one at a time per lane (in spec order when sequential).
        finished = threading.Event()
        trio.from_thread.run_sync(
            self._spawn, self.run_async_term, term, out, self._loop_time(base), finished
        )
        finished.wait()
        return None

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(fn, *args)

    async def _keep_deadlines(self, lane: _Lane) -> None:
        """On the loop: abandon the lane's thread when its running term passes its deadline.

        Sleeps until the running term's deadline (real time: the term runs in a
        thread), so a lane of fast terms costs no wake-ups; shielded, so a sibling's
        failure does not lift the deadline; cancelled once the lane is done. It
        never sleeps longer than the call's shortest timeout (``poll_s``): a term
        without a timeout (the base loss of ``as_loss_fn()``) may be followed by
        one with a timeout, whose deadline is then at least that far away.

        A term without a timeout has no deadline to bound the wait for it: when the
        call is interrupted (Ctrl-C, the caller cancels it), such a running term is
        abandoned at once, so the interruption goes through.
        """
        poll = self.ctx.poll_s or math.inf
        with lane.keeper:
            while True:
                running, now = lane.running, time.perf_counter()
                if running is not None and (
                    now >= running[1] or (self.interrupted.is_set() and running[0].timeout is None)
                ):
                    lane.stop = True  # the thread starts nothing after this term
                    if now >= running[1]:
                        lane.timed_out = running
                    else:
                        lane.interrupted = True
                    lane.scope.cancel()  # abandons the thread
                    return
                wait = poll if running is None else min(running[1] - now, poll)
                if self.interrupted.is_set():
                    await trio.sleep(wait)
                else:
                    with trio.move_on_after(wait):
                        await self.interrupted.wait()

    async def run_lane(self, lane: _Lane, join_after: float = 0.0) -> None:
        """Run a lane's terms in one worker thread; report its failure; finish its awaitables.

        With ``join_after``, the lane first waits that long and starts only if
        terms are still queued (see :data:`JOIN_AFTER_S`).
        """
        try:
            if join_after:
                with lane.delay:
                    await trio.sleep(join_after)
                if not lane.queue:
                    return
            if lane.stop or trio.current_effective_deadline() == -math.inf:
                return  # the call failed or is cancelled: nothing starts
            if self.nursery is not None:
                self.nursery.start_soon(self._keep_deadlines, lane)
            try:
                # Shielded: a sibling's failure (or the caller's cancellation) stops the
                # lane after its running term; only that term's own deadline (the
                # keeper) abandons the thread. The wait for a worker token is not timed;
                # an abandoned thread keeps its token of this call's limiter only.
                with lane.scope:
                    await trio.to_thread.run_sync(
                        self._lane_body, lane, abandon_on_cancel=True, limiter=self.limiter
                    )
            finally:
                lane.keeper.cancel()
                if not lane.queue:  # nothing left for lanes waiting to join
                    for other in self.lanes:
                        other.delay.cancel()
            if lane.timed_out is not None:
                term, deadline = lane.timed_out
                detail = (
                    f"timed out after {term.timeout or 0.0:g}s (its worker thread cannot be "
                    f"killed and was abandoned)"
                )
                error = self._timeout(term, detail)
                self._record(term, self._loop_time(deadline), error, term.timeout or 0.0)
            elif lane.interrupted:
                pass  # the call is being interrupted: that is what propagates
            elif lane.failed is not None:
                term, exc, when, started = lane.failed
                self._caught(term, exc, self._loop_time(when), when - started)
        finally:
            lane.done.set()

    # ---------------------------------------------------------------- the call

    async def run(self, terms: Sequence[Term], parallel: bool, max_concurrency: int) -> None:
        """Run every term (see the module docstring); raise the first failure."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    if parallel:
                        await self._run_parallel(terms, max_concurrency)
                    else:
                        await self._run_sequential(terms)
                except BaseException:
                    if not self.failures:  # interrupted, not failed: see _keep_deadlines
                        self.interrupted.set()
                    raise
                finally:
                    self._stop_lanes()  # cancelled: running terms finish, no new one starts
        except BaseExceptionGroup as group:
            # Trio hands an exception delivered to the waiting call (Ctrl-C's
            # KeyboardInterrupt) over wrapped in a group; give it back as itself.
            _, rest = group.split(trio.Cancelled)
            if rest is not None:
                leaves = _leaves(rest)
                if len(leaves) == 1:
                    raise leaves[0] from None
            raise
        finally:
            self.nursery = None
        if self.fatal is not None:
            raise self.fatal
        if self.failures:
            raise min(self.failures, key=lambda f: (f[0], f[1]))[2]

    async def _run_parallel(self, terms: Sequence[Term], max_concurrency: int) -> None:
        assert self.nursery is not None
        queue = deque(t for t in terms if not t.is_async)
        self.lanes = [_Lane(queue) for _ in range(min(max_concurrency, len(queue)))]
        for term in terms:
            if term.is_async:
                self.nursery.start_soon(self.run_async_term, term)
        small = sum(leaf.numel() for leaf in self.ctx.leaves) < LANE_WORK_THRESHOLD
        for i, lane in enumerate(self.lanes):
            self.nursery.start_soon(self.run_lane, lane, JOIN_AFTER_S if small and i else 0.0)
        for lane in self.lanes:
            await lane.done.wait()

    async def _async_then_set(self, term: Term, done: trio.Event) -> None:
        try:
            await self.run_async_term(term)
        finally:
            done.set()

    async def _run_sequential(self, terms: Sequence[Term]) -> None:
        assert self.nursery is not None
        i = 0
        while i < len(terms) and not self.failures and self.fatal is None:
            if terms[i].is_async:
                # a task of its own, as in parallel mode: its context changes stay there
                done = trio.Event()
                self.nursery.start_soon(self._async_then_set, terms[i], done)
                await done.wait()
                i += 1
                continue
            j = i
            while j < len(terms) and not terms[j].is_async:
                j += 1
            lane = _Lane(deque(terms[i:j]))  # one lane keeps spec order
            self.lanes.append(lane)
            self.nursery.start_soon(self.run_lane, lane)
            await lane.done.wait()
            i = j


async def run_terms(
    terms: Sequence[Term],
    *,
    data: Any,
    lp_arg: Any,
    leaves: tuple[torch.Tensor, ...],
    need_grads: bool,
    track_norms: bool,
    parallel: bool,
    max_concurrency: int,
    emit_events: bool,
    base_needs_path: bool = False,
    pass_base_metrics: bool = False,
) -> tuple[list[TermResult], list[torch.Tensor] | None]:
    """Evaluate every term once; return their results in order, and the total gradient.

    The total gradient (``None`` unless ``need_grads``) is ``Σ weight · d(term)/d(leaves)``
    per leaf, summed in spec order whatever order the terms finished in. Each term
    runs under its own ``Term.timeout``. With ``base_needs_path`` (a gradient is
    wanted), a base loss with no autograd path to any logprob fails, as in Tinker's SDK.

    Raises:
        RegularizerError: the first term to fail (``RegularizerTimeoutError`` for
            a timeout), with the original error as ``__cause__``.
        BaseException: a ``KeyboardInterrupt``, ``SystemExit`` or other
            non-``Exception`` raised by a term, as itself.
    """
    grad_sum = GradSum([t.weight for t in terms], leaves) if need_grads else None
    ctx = TermContext(
        data=data,
        lp_arg=lp_arg,
        leaves=leaves,
        versions=tuple(leaf._version for leaf in leaves),
        grad_sum=grad_sum,
        track_norms=track_norms,
        poll_s=min((t.timeout for t in terms if t.timeout is not None), default=None),
        telemetry=emit_events,
        base_needs_path=base_needs_path,
        pass_base_metrics=pass_base_metrics,
    )
    call = _Call(ctx, max_concurrency)
    await call.run(terms, parallel, max_concurrency)
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
