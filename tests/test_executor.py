"""Failures, timeouts and cancellation: one typed error naming the culprit, never a hang."""

from __future__ import annotations

import math
import threading
import weakref

import pytest
import torch
import trio
import trio.lowlevel

import tinkex
from tinkex import RegularizerError, RegularizerSpec, RegularizerTimeoutError

LP = torch.tensor([1.0, 2.0, 3.0])


def base_sum(data, lp):
    return lp.sum(), {}


async def abase(data, lp):
    """An async base loss: with a MockClock, any worker thread would let virtual time jump."""
    return lp.sum(), {}


def spec(fn, name, weight=1.0, **kw):
    return RegularizerSpec(fn, weight, name, **kw)


async def run(*specs, base=base_sum, **kw):
    return await tinkex.compute_loss(None, LP, base, regularizers=list(specs), **kw)


@pytest.mark.parametrize(
    ("ret", "match", "cause"),
    [
        (lambda lp: lp.sum(), "must return a 2-tuple", TypeError),
        (lambda lp: (lp.sum(), {}, 1), "2-tuple", TypeError),
        (lambda lp: (lp, {}), r"non-scalar loss of shape \(3,\)", ValueError),
        (lambda lp: (lp.sum() * float("nan"), {}), "non-finite loss", ValueError),
        (lambda lp: (float("inf"), {}), "non-finite loss", ValueError),
        (lambda lp: ("1.0", {}), "loss of type str", TypeError),
        (lambda lp: (True, {}), "loss of type bool", TypeError),
        (lambda lp: (lp.sum(), None), "metrics of type NoneType", TypeError),
        (lambda lp: (lp.sum(), {"m": "high"}), "non-numeric metric 'm'", TypeError),
        (lambda lp: (lp.sum(), {"m": lp}), "non-numeric metric 'm'", TypeError),
        (lambda lp: (lp.sum(), {"m": float("nan")}), "non-finite metric 'm'", ValueError),
        (lambda lp: (lp.sum(), {3: 1.0}), "keys must be str", TypeError),
    ],
)
@pytest.mark.parametrize("is_async", [False, True])
async def test_unusable_outputs_are_named(ret, match, cause, is_async):
    if is_async:

        async def fn(data, lp):
            return ret(lp)

    else:

        def fn(data, lp):
            return ret(lp)

    with pytest.raises(RegularizerError, match=match) as info:
        await run(spec(base_sum, "fine"), spec(fn, "broken"), track_grad_norms=True)
    assert info.value.name == "broken"
    assert "regularizer 'broken'" in str(info.value)
    assert isinstance(info.value.__cause__, cause)


async def test_a_raising_term_is_named_with_the_original_error_as_cause():
    def boom(data, lp):
        raise KeyError("reference_logprobs")

    with pytest.raises(RegularizerError) as info:
        await run(spec(boom, "kl"))
    err = info.value
    assert err.name == "kl" and isinstance(err.__cause__, KeyError)
    assert "regularizer 'kl' raised KeyError" in str(err)
    assert not isinstance(err, ExceptionGroup)


async def test_a_failing_base_loss_is_named_base_loss():
    async def bad_base(data, lp):
        raise ValueError("no weights")

    for base in (bad_base, lambda d, lp: 1 / 0):
        with pytest.raises(RegularizerError) as info:
            await run(spec(lambda d, lp: (lp.sum(), {}), "ok"), base=base)
        assert info.value.name == "base_loss"
        assert "base_loss" in str(info.value)


async def test_async_timeout_names_the_term(autojump_clock):
    async def hang(data, lp):
        await trio.sleep_forever()

    t0 = trio.current_time()
    with pytest.raises(RegularizerTimeoutError) as info:
        await run(spec(abase, "fast"), spec(hang, "slow"), timeout=5.0, base=abase)
    assert trio.current_time() - t0 == pytest.approx(5.0)
    err = info.value
    assert err.name == "slow" and err.timeout == 5.0
    assert "timed out after 5s" in str(err)
    assert isinstance(err.__cause__, trio.TooSlowError)
    assert isinstance(err, RegularizerError)


async def test_first_failure_cancels_its_siblings(autojump_clock):
    cancelled = []

    async def hang(data, lp):
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    async def fail_later(data, lp):
        await trio.sleep(1)
        raise RuntimeError("boom")

    t0 = trio.current_time()
    with pytest.raises(RegularizerError) as info:
        await run(spec(hang, "hang"), spec(fail_later, "failing"), timeout=100, base=abase)
    assert info.value.name == "failing"
    assert cancelled == [True]
    assert trio.current_time() - t0 == pytest.approx(1.0)  # no waiting for the 100 s timeout


async def test_the_first_to_fail_is_named_not_the_first_in_order(autojump_clock):
    async def fail_after(delay, message):
        async def fn(data, lp):
            await trio.sleep(delay)
            raise RuntimeError(message)

        return fn

    late = await fail_after(2, "late")
    early = await fail_after(1, "early")
    with pytest.raises(RegularizerError) as info:
        await run(spec(late, "late"), spec(early, "early"), base=abase)
    assert info.value.name == "early"


async def test_simultaneous_failures_name_the_first_in_spec_order(autojump_clock):
    async def timeout_both(data, lp):
        await trio.sleep_forever()

    with pytest.raises(RegularizerTimeoutError) as info:
        await run(spec(timeout_both, "first"), spec(timeout_both, "second"), timeout=3, base=abase)
    assert info.value.name == "first"


async def test_sequential_mode_stops_at_the_first_failure():
    calls = []

    def ok(name):
        def fn(data, lp):
            calls.append(name)
            return lp.sum(), {}

        return fn

    def boom(data, lp):
        calls.append("boom")
        raise RuntimeError("x")

    with pytest.raises(RegularizerError) as info:
        await run(spec(ok("a"), "a"), spec(boom, "boom"), spec(ok("c"), "c"), parallel=False)
    assert info.value.name == "boom"
    assert calls == ["a", "boom"]


@pytest.mark.parametrize("parallel", [True, False])
async def test_a_hung_sync_term_times_out_and_its_thread_is_abandoned(parallel):
    release = threading.Event()
    finished = threading.Event()

    def stuck(data, lp):
        release.wait(10)
        finished.set()
        return lp.sum(), {}

    t0 = trio.current_time()
    with pytest.raises(RegularizerTimeoutError) as info:
        await run(spec(base_sum, "fine"), spec(stuck, "stuck"), timeout=0.2, parallel=parallel)
    elapsed = trio.current_time() - t0
    assert info.value.name == "stuck"
    assert "worker thread cannot be killed" in str(info.value)
    assert 0.19 <= elapsed < 5  # the caller is not held by the thread
    assert not finished.is_set()
    release.set()
    assert await trio.to_thread.run_sync(finished.wait, 5)


async def test_timeout_counts_from_the_terms_own_start_not_its_wait_for_a_worker():
    # One worker: each term waits for the previous ones, but each runs only 0.15 s < 0.3 s.
    def slowish(data, lp):
        threading.Event().wait(0.15)
        return lp.sum(), {}

    specs = [spec(slowish, f"s{i}") for i in range(4)]
    out = await run(*specs, timeout=0.3, max_concurrency=1)
    assert out.loss_total == pytest.approx(30.0)


async def test_a_sync_failure_cancels_async_siblings_promptly():
    def boom(data, lp):
        raise RuntimeError("boom")

    async def hang(data, lp):
        await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(RegularizerError) as info:
        await run(spec(hang, "hang"), spec(boom, "boom"), timeout=60)
    assert info.value.name == "boom"


async def test_the_client_recovers_after_a_failure():
    state = {"fail": True}

    def flaky(data, lp):
        if state["fail"]:
            raise RuntimeError("once")
        return (lp**2).sum(), {}

    pipeline = tinkex.Pipeline(
        base_sum, regularizers=[spec(flaky, "flaky", 0.5)], track_grad_norms=True
    )
    with pytest.raises(RegularizerError):
        await pipeline.compute(None, LP)
    state["fail"] = False
    out = await pipeline.compute(None, LP)
    assert out.total_grad_norm == pytest.approx(math.sqrt(29))


async def test_gradient_failures_are_errors_not_zero():
    def breaks_autograd(data, lp):
        y = lp * 2
        y.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("hook failed")))
        return y.sum(), {}

    with pytest.raises(RegularizerError, match="taking its gradient") as info:
        await run(spec(breaks_autograd, "fragile"), track_grad_norms=True)
    assert info.value.name == "fragile"
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_in_place_edits_of_the_logprobs_fail_loudly_and_leave_the_callers_tensor_alone():
    lp = LP.clone()

    def mutate(data, x):
        x.add_(1)
        return x.sum(), {}

    with pytest.raises(RegularizerError) as info:
        await tinkex.compute_loss(None, lp, base_sum, regularizers=[spec(mutate, "mutate")])
    assert info.value.name == "mutate"
    assert torch.equal(lp, LP)


async def test_sync_terms_see_the_callers_context_variables():
    import contextvars

    step = contextvars.ContextVar("step")
    step.set(7)
    seen = []

    def read(data, lp):
        seen.append(step.get(None))
        return lp.sum(), {}

    for parallel in (True, False):
        await run(spec(read, "a"), base=read, parallel=parallel)
    assert seen == [7, 7, 7, 7]


@pytest.mark.parametrize("parallel", [True, False])
async def test_no_worker_thread_holds_the_call_once_it_returns(parallel):
    # If a worker thread still held the call's objects after the call returned, the
    # last reference could drop in that daemon thread -- and a tensor freed there
    # while the interpreter shuts down aborts the process.
    class Data:
        pass

    def term(data, lp):
        return (lp * lp).sum(), {}

    specs = [spec(term, f"t{i}") for i in range(3)]
    data = Data()
    alive = weakref.ref(data)
    await tinkex.compose_loss(
        data, LP, base_sum, regularizers=specs, track_grad_norms=True, parallel=parallel
    )
    del data
    assert alive() is None


# --------------------------------------------------------------------------- siblings are
# awaited, not abandoned; only a term's own timeout abandons its thread


@pytest.mark.parametrize("parallel", [True, False])
async def test_a_busy_sibling_is_awaited_not_abandoned_when_another_term_fails(parallel):
    finished = threading.Event()

    def busy(data, lp):
        threading.Event().wait(0.3)
        finished.set()
        return lp.sum(), {}

    def broken(data, lp):
        raise KeyError("reference_logprobs")

    with pytest.raises(RegularizerError) as info:
        await run(spec(busy, "busy"), spec(broken, "broken"), max_concurrency=2, parallel=parallel)
    assert info.value.name == "broken"
    # the error came only once the busy term was done: its thread holds nothing of ours
    assert finished.is_set()


async def test_terms_that_have_not_started_never_start_after_a_failure():
    started = []

    async def boom(data, lp):
        await trio.sleep(0.01)
        raise RuntimeError("boom")

    def later(data, lp):
        started.append(True)
        threading.Event().wait(0.05)
        return lp.sum(), {}

    specs = [spec(later, f"l{i}") for i in range(6)]
    with pytest.raises(RegularizerError) as info:
        await run(spec(boom, "boom"), *specs, base=abase, max_concurrency=1)
    assert info.value.name == "boom"
    assert 1 <= len(started) <= 2  # the one running when boom failed (and at most one more)


# --------------------------------------------------------------------------- grad mode


async def test_no_grad_held_across_an_await_by_one_term_does_not_reach_another():
    # The reproduction: base = -sum(lp), a judge awaiting under no_grad, an async l2.
    lp = torch.tensor([-0.5, -1.0, -2.0])

    def base(data, x):
        return -x.sum(), {}

    async def judge(data, x):
        with torch.no_grad():
            await trio.sleep(0.01)
            score = float(x.sum())
        return torch.tensor(score), {}

    async def async_l2(data, x):
        await trio.sleep(0.005)
        return (x**2).sum(), {}

    for parallel in (True, False):
        composed = await tinkex.compose_loss(
            None,
            lp,
            base,
            regularizers=[spec(judge, "judge"), spec(async_l2, "l2")],
            track_grad_norms=True,
            parallel=parallel,
        )
        out = composed.output
        assert out.regularizers["l2"].grad_norm == pytest.approx(math.sqrt(1 + 4 + 16))
        assert out.regularizers["judge"].grad_norm == 0.0
        assert torch.allclose(composed.logprob_grads, torch.tensor([-2.0, -3.0, -5.0]))
        assert torch.is_grad_enabled()


async def test_a_task_outside_the_call_holding_no_grad_changes_nothing(autojump_clock):
    async def outsider():
        with torch.no_grad():
            await trio.sleep(1)  # the call's async terms resume while this holds no_grad
            assert not torch.is_grad_enabled()  # its own mode is intact when it resumes

    async def slow_square(data, x):
        await trio.sleep(0.5)
        return (x**2).sum(), {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outsider)
        await trio.sleep(0.1)
        out = await run(spec(slow_square, "sq"), base=abase, track_grad_norms=True)
    assert out.regularizers["sq"].grad_norm == pytest.approx(2 * math.sqrt(14))
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_term_that_disables_grad_does_not_leak_it_to_the_caller(is_async):
    if is_async:

        async def leaky(data, x):
            torch.set_grad_enabled(False)  # never restored by the term
            await trio.lowlevel.checkpoint()
            return x.sum(), {}

    else:

        def leaky(data, x):
            torch.set_grad_enabled(False)
            return x.sum(), {}

    with torch.no_grad():
        await run(spec(leaky, "leaky"))
        assert not torch.is_grad_enabled()  # the caller's mode, as before the call
    await run(spec(leaky, "leaky"))
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------- threads


async def test_trio_from_thread_works_inside_a_sync_term():
    async def fetch_score():
        await trio.lowlevel.checkpoint()
        return 2.0

    def judged(data, lp):
        score = trio.from_thread.run(fetch_score)
        trio.from_thread.check_cancelled()
        return lp.sum() * score, {"score": score}

    out = await run(spec(judged, "judged"))
    assert out.regularizers["judged"].value == pytest.approx(12.0)
    assert out.regularizers["judged"].custom == {"score": 2.0}


# --------------------------------------------------------------------------- outputs


async def test_any_two_item_tuple_is_a_valid_return_namedtuple_included():
    from typing import NamedTuple

    class LossOut(NamedTuple):
        loss: torch.Tensor
        metrics: dict

    def named(data, lp):
        return LossOut(lp.sum(), {"m": 1.0})

    out = await run(spec(named, "named"))
    assert out.regularizers["named"].value == 6.0
    assert out.regularizers["named"].custom == {"m": 1.0}


# --------------------------------------------------------------------------- every way to fail


class _BadStr(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


@pytest.mark.parametrize("is_async", [False, True])
async def test_an_exception_whose_str_raises_is_still_named(is_async):
    if is_async:

        async def bad(data, lp):
            raise _BadStr()

    else:

        def bad(data, lp):
            raise _BadStr()

    with pytest.raises(RegularizerError) as info:
        await run(spec(bad, "bad"))
    assert info.value.name == "bad"
    assert "unprintable _BadStr" in str(info.value)
    assert isinstance(info.value.__cause__, _BadStr)


class _Custom(BaseException):
    pass


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, _Custom])
async def test_base_exceptions_propagate_as_themselves_and_cancel_siblings(exc_type, is_async):
    cancelled = []

    async def hang(data, lp):
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    if is_async:

        async def stop(data, lp):
            await trio.sleep(0.01)
            raise exc_type(3)

    else:

        def stop(data, lp):
            raise exc_type(3)

    with trio.fail_after(5), pytest.raises(exc_type) as info:
        await run(spec(hang, "hang"), spec(stop, "stop"), timeout=60)
    assert type(info.value) is exc_type  # not a group, not a RegularizerError
    assert info.value.args == (3,)
    assert cancelled == [True]


@pytest.mark.parametrize("is_async", [False, True])
async def test_a_term_raising_cancelled_itself_is_a_regularizer_error(is_async):
    async def fake_cancel():
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled as exc:
                return exc
        raise AssertionError("unreachable")

    stolen = await fake_cancel()

    if is_async:

        async def rogue(data, lp):
            raise stolen

    else:

        def rogue(data, lp):
            raise stolen

    with pytest.raises(RegularizerError) as info:
        await run(spec(rogue, "rogue"))
    assert info.value.name == "rogue"
    assert isinstance(info.value.__cause__, trio.Cancelled)


async def test_an_async_term_that_blocks_the_loop_past_its_timeout_is_a_timeout():
    import time

    async def blocking(data, lp):
        time.sleep(0.3)  # noqa: ASYNC251 - blocks the loop: no deadline can fire meanwhile
        return lp.sum(), {}

    with pytest.raises(RegularizerTimeoutError, match="blocked the event loop") as info:
        await run(spec(blocking, "blocking"), timeout=0.1)
    assert info.value.name == "blocking"
    assert info.value.timeout == 0.1


# --------------------------------------------------------------------------- inputs are copies


@pytest.mark.parametrize("how", ["detach_clamp", "no_grad", "data"])
async def test_a_term_cannot_modify_the_callers_logprobs(how):
    lp = torch.tensor([-1.0, -2.0, -3.0])
    seen_by_sibling = []

    def edit(data, x):
        if how == "detach_clamp":
            x.detach().clamp_(min=-1.5)  # the common metric idiom, done in place
        elif how == "no_grad":
            with torch.no_grad():
                x.mul_(0)
        else:
            x.data.zero_()  # invisible to torch's version counter
        return torch.tensor(0.0), {}

    def sibling(data, x):
        seen_by_sibling.append(x.detach().clone())
        return x.sum(), {}

    if how == "data":
        # torch cannot see it; the caller's tensor is still untouched
        await tinkex.compute_loss(
            None, lp, base_sum, regularizers=[spec(edit, "edit")], parallel=False
        )
    else:
        with pytest.raises(RegularizerError, match="modified in place") as info:
            await tinkex.compute_loss(
                None,
                lp,
                base_sum,
                regularizers=[spec(edit, "edit"), spec(sibling, "sibling")],
                parallel=False,
            )
        assert info.value.name == "edit"
        assert seen_by_sibling == []  # the call stopped before the sibling saw edited values
    assert torch.equal(lp, torch.tensor([-1.0, -2.0, -3.0]))


# --------------------------------------------------------------------------- bad options


async def test_bad_options_are_spec_errors_before_anything_runs(monkeypatch):
    ran = []

    def term(data, lp):
        ran.append(True)
        return lp.sum(), {}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(tinkex.SpecError, match="CUDA is not available"):
        await run(spec(term, "t"), device="cuda")
    with pytest.raises(tinkex.SpecError, match="timeout"):
        await run(spec(term, "t"), timeout=10**400)
    with pytest.raises(tinkex.SpecError, match="weight"):
        spec(term, "t", weight=10**400)
    with pytest.raises(tinkex.SpecError, match="must not contain '/'"):
        spec(term, "a/b")
    assert ran == []


async def test_data_and_logprobs_of_different_lengths_fail_before_any_term_runs():
    ran = []

    def term(data, lp):
        ran.append(True)
        return sum(x.sum() for x in lp), {}

    data = [object(), object(), object()]
    with pytest.raises(tinkex.SpecError, match="3 data but 2 logprob tensors"):
        await tinkex.compute_loss(data, [LP, LP], term)
    with pytest.raises(tinkex.SpecError, match="3 data but 2 rows"):
        await tinkex.compute_loss(data, torch.zeros(2, 4), term)
    assert ran == []


# --------------------------------------------------------------------------- ties, real clock


async def test_identical_hung_async_terms_name_the_first_in_spec_order_on_the_real_clock():
    async def hang(data, lp):
        await trio.sleep_forever()

    names = []
    for _ in range(40):
        with pytest.raises(RegularizerTimeoutError) as info:
            await run(spec(hang, "first"), spec(hang, "second"), timeout=0.005, base=abase)
        names.append(info.value.name)
    assert set(names) == {"first"}


async def test_identical_hung_sync_terms_name_the_first_in_spec_order_on_the_real_clock():
    release = threading.Event()

    def hang(data, lp):
        release.wait(10)
        return lp.sum(), {}

    names = []
    try:
        for _ in range(8):
            with pytest.raises(RegularizerTimeoutError) as info:
                await run(
                    spec(hang, "first"), spec(hang, "second"), timeout=0.02, max_concurrency=3
                )
            names.append(info.value.name)
    finally:
        release.set()
    assert set(names) == {"first"}


# --------------------------------------------------------------------------- found by trying
# to break it: Ctrl-C, fan-out terms, awaitables from sync terms, contexts, telemetry


@pytest.mark.parametrize("parallel", [True, False])
def test_ctrl_c_during_a_call_is_a_keyboard_interrupt_not_a_group(parallel):
    import signal

    def presses_ctrl_c(data, lp):  # in a worker thread: the loop gets the SIGINT
        signal.raise_signal(signal.SIGINT)
        threading.Event().wait(0.2)
        return lp.sum(), {}

    async def main():
        await run(spec(presses_ctrl_c, "r"), parallel=parallel)

    with pytest.raises(KeyboardInterrupt) as info:
        trio.run(main)
    assert type(info.value) is KeyboardInterrupt


async def test_a_fan_out_term_with_its_own_nursery_beside_a_failing_term():
    async def fanout(data, lp):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(trio.sleep, 1.0)
        return lp.mean(), {}

    async def broken(data, lp):
        await trio.sleep(0.01)
        raise ValueError("boom")

    with trio.fail_after(5), pytest.raises(RegularizerError) as info:
        await run(spec(fanout, "fanout"), spec(broken, "broken"), base=abase)
    assert info.value.name == "broken"


@pytest.mark.parametrize("kw", [{"max_concurrency": 1}, {"parallel": False}])
async def test_an_awaitable_from_a_sync_term_runs_in_its_turn_within_its_own_deadline(kw):
    order = []

    async def fetch(lp):
        order.append("judge awaits")
        await trio.sleep(0.1)
        order.append("judge done")
        return lp.mean(), {}

    def judge(data, lp):  # a plain def returning an awaitable
        order.append("judge called")
        return fetch(lp)

    def slow(data, lp):
        order.append("slow")
        threading.Event().wait(0.3)
        return lp.sum(), {}

    out = await run(spec(judge, "judge"), spec(slow, "slow"), timeout=0.35, **kw)
    assert out.regularizers["judge"].value == pytest.approx(2.0)
    assert order == ["judge called", "judge awaits", "judge done", "slow"]


async def test_sync_terms_do_not_see_each_others_context_changes():
    import contextvars

    var = contextvars.ContextVar("tag", default="unset")

    def writer(data, lp):
        var.set("set by writer")
        return lp.sum(), {}

    seen = []

    def reader(data, lp):
        seen.append(var.get())
        return lp.sum(), {}

    await run(spec(reader, "reader"), base=writer, parallel=False)
    assert seen == ["unset"]
    assert var.get() == "unset"


async def test_an_abandoned_term_emits_nothing_after_the_call_and_durations_are_run_times():
    from structlog.testing import capture_logs

    release = threading.Event()

    def hang(data, lp):
        release.wait(5)
        return lp.sum(), {}

    def boom(data, lp):
        threading.Event().wait(0.1)
        raise RuntimeError("boom")

    with capture_logs() as events:
        with pytest.raises(RegularizerTimeoutError):
            await run(spec(hang, "hang"), timeout=0.15)
        count = len(events)
        release.set()
        await trio.sleep(0.2)  # the abandoned thread finishes its term meanwhile
        assert len(events) == count  # ... and says nothing about it
        with pytest.raises(RegularizerError):
            await run(spec(boom, "boom"), timeout=5)
    failures = {
        e["regularizer_name"]: e["duration_s"]
        for e in events
        if e["event"] == "regularizer.compute.exception"
    }
    assert failures["hang"] == pytest.approx(0.15, abs=0.05)
    assert failures["boom"] == pytest.approx(0.1, abs=0.05)


async def test_an_async_term_that_blocks_then_awaits_is_reported_as_blocking():
    import time

    async def blocks_then_awaits(data, lp):
        time.sleep(0.3)  # noqa: ASYNC251 - the deadline passes meanwhile
        await trio.sleep(0)
        return lp.sum(), {}

    with pytest.raises(RegularizerTimeoutError, match="blocked the event loop"):
        await run(spec(blocks_then_awaits, "b"), timeout=0.1)


# --------------------------------------------------------------------------- second round


async def test_a_fan_out_term_whose_child_fails_while_cancelled_is_still_one_error():
    async def fanout(data, lp):
        async def child():
            try:
                await trio.sleep_forever()
            finally:
                raise RuntimeError("cleanup failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        return lp.sum(), {}

    async def broken(data, lp):
        await trio.sleep(0.01)
        raise ValueError("boom")

    with trio.fail_after(5), pytest.raises(RegularizerError) as info:
        await run(spec(fanout, "fanout"), spec(broken, "broken"), base=abase)
    assert info.value.name == "broken"


async def test_inference_mode_held_across_an_await_stays_inside_the_term():
    async def judge(data, x):
        with torch.inference_mode():
            await trio.sleep(0.02)
        return torch.tensor(0.0), {}

    async def square(data, x):
        await trio.sleep(0.01)  # resumes while the judge holds inference mode
        return (x**2).sum(), {}

    for parallel in (True, False):
        composed = await tinkex.compose_loss(
            None,
            torch.ones(4),
            abase,
            regularizers=[spec(judge, "judge"), spec(square, "square")],
            track_grad_norms=True,
            parallel=parallel,
        )
        assert composed.output.regularizers["square"].grad_norm == pytest.approx(4.0)
        assert torch.equal(composed.logprob_grads, torch.full((4,), 3.0))
        assert not torch.is_inference_mode_enabled()


async def test_a_caller_in_inference_mode_still_gets_gradients():
    with torch.inference_mode():
        lp = torch.tensor([1.0, 2.0])
    with torch.inference_mode():
        composed = await tinkex.compose_loss(
            None, lp, base_sum, regularizers=[spec(lambda d, x: ((x**2).sum(), {}), "sq")]
        )
        assert torch.is_inference_mode_enabled()
    assert torch.equal(composed.logprob_grads, torch.tensor([3.0, 5.0]))


async def test_sequential_async_terms_do_not_change_the_callers_context():
    import contextvars

    var = contextvars.ContextVar("request", default="caller")

    async def judge(data, lp):
        var.set("judge")
        return lp.sum(), {}

    seen = []

    async def after(data, lp):
        seen.append(var.get())
        return lp.sum(), {}

    await run(spec(judge, "judge"), spec(after, "after"), base=abase, parallel=False)
    assert var.get() == "caller" and seen == ["caller"]


def test_as_loss_fn_value_is_finite_with_masked_minus_inf_and_float16():
    def masked(data, lp):
        return -(lp[0][:2]).sum(), {}

    loss_fn = tinkex.Pipeline(masked).as_loss_fn()
    lp = torch.tensor([-1.0, -2.0, -math.inf], requires_grad=True)
    loss, _ = loss_fn(None, [lp])
    assert float(loss.detach()) == pytest.approx(3.0)
    loss.backward()
    assert lp.grad.tolist() == [-1.0, -1.0, 0.0]

    big = torch.full((20_000,), -5.0, dtype=torch.float16, requires_grad=True)
    loss, _ = tinkex.Pipeline(lambda d, lp: (-lp[0].float().sum(), {})).as_loss_fn()(None, [big])
    assert float(loss.detach()) == pytest.approx(100_000.0)
