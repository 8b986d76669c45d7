"""Failures, timeouts and cancellation: one typed error naming the culprit, never a hang."""

from __future__ import annotations

import math
import threading
import weakref

import pytest
import torch
import trio

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


async def test_a_crash_inside_a_lane_surfaces_instead_of_hanging(monkeypatch):
    import tinkex._executor as executor

    def crash(job, ctx):
        raise SystemError("bug in the lane")

    monkeypatch.setattr(executor, "_execute_in_thread", crash)
    with trio.fail_after(5), pytest.raises(RuntimeError, match="worker lane crashed") as info:
        await run(spec(base_sum, "a"), timeout=None)
    assert isinstance(info.value.__cause__, SystemError)


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
async def test_no_worker_thread_holds_the_call_once_it_returns(parallel, monkeypatch):
    # A lane's thread lingers after reporting its exit: Trio's thread cache drops the
    # lane's callables only once `deliver` returns. If they still held the call's
    # objects, the last reference could drop in that daemon thread -- and a tensor
    # freed there while the interpreter shuts down aborts the process. Make the
    # linger long, then check the call's data is gone as soon as the call returns.
    real = trio.lowlevel.start_thread_soon

    def start_thread_soon(fn, deliver, name=None):
        def deliver_then_linger(outcome):
            deliver(outcome)
            threading.Event().wait(0.05)

        real(fn, deliver_then_linger, name=name)

    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", start_thread_soon)

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
