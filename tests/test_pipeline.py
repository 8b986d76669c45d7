"""compute_loss / compose_loss / Pipeline: values, gradients, structure, modes."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import trio
import trio.lowlevel

import tinkex
from tinkex import RegularizerSpec, SpecError


def const(value):
    def fn(data, lp):
        return torch.tensor(float(value)), {}

    return fn


def base_sum(data, lp):
    if isinstance(lp, torch.Tensor):
        return lp.sum(), {}
    return sum(t.sum() for t in lp), {}


def sum_sq(data, lp):
    if isinstance(lp, torch.Tensor):
        return (lp**2).sum(), {"n": lp.numel()}
    return sum((t**2).sum() for t in lp), {"n": sum(t.numel() for t in lp)}


LP = torch.tensor([1.0, 2.0, 3.0])


async def test_worked_example_total_12():
    out = await tinkex.compute_loss(
        None,
        LP,
        const(1.0),
        regularizers=[RegularizerSpec(const(10), 0.1, "a"), RegularizerSpec(const(20), 0.5, "b")],
    )
    assert out.loss_total == pytest.approx(12.0)
    assert out.regularizer_total == pytest.approx(11.0)
    assert out.base_loss.value == 1.0
    assert list(out.regularizers) == ["a", "b"]
    assert out.regularizers["a"].contribution == pytest.approx(1.0)
    assert out.regularizers["b"].contribution == pytest.approx(10.0)
    assert out.total_grad_norm is None and out.regularizers["a"].grad_norm is None


@pytest.mark.parametrize("parallel", [True, False])
async def test_analytic_grad_norms(parallel):
    # base = sum(x): grad 1 -> sqrt(3); term = sum(x^2): grad 2x -> sqrt(56);
    # total = 1 + 0.5 * 2x = [2, 3, 4] -> sqrt(29)
    out = await tinkex.compute_loss(
        None,
        LP,
        base_sum,
        regularizers=[RegularizerSpec(sum_sq, 0.5, "sq")],
        track_grad_norms=True,
        parallel=parallel,
    )
    assert out.base_loss.grad_norm == pytest.approx(math.sqrt(3))
    reg = out.regularizers["sq"]
    assert reg.value == pytest.approx(14.0)
    assert reg.contribution == pytest.approx(7.0)
    assert reg.grad_norm == pytest.approx(math.sqrt(56))
    assert reg.grad_norm_weighted == pytest.approx(0.5 * math.sqrt(56))
    assert out.total_grad_norm == pytest.approx(math.sqrt(29))
    assert out.loss_total == pytest.approx(13.0)
    assert reg.custom == {"n": 3.0}


async def test_list_of_tensors_gives_the_same_numbers():
    specs = [RegularizerSpec(sum_sq, 0.5, "sq")]
    single = await tinkex.compute_loss(
        None, LP, base_sum, regularizers=specs, track_grad_norms=True
    )
    split = await tinkex.compute_loss(
        None, [LP[:1], LP[1:]], base_sum, regularizers=specs, track_grad_norms=True
    )
    assert split.flat_metrics() == pytest.approx(single.flat_metrics(), rel=1e-6)
    assert split.total_grad_norm == pytest.approx(math.sqrt(29))
    assert split.regularizers["sq"].grad_norm == pytest.approx(math.sqrt(56))


async def test_compose_returns_the_total_gradient_with_the_input_structure():
    specs = [RegularizerSpec(sum_sq, 0.5, "sq")]
    composed = await tinkex.compose_loss(None, [LP[:1], LP[1:]], base_sum, regularizers=specs)
    assert isinstance(composed.logprob_grads, list) and len(composed.logprob_grads) == 2
    torch.testing.assert_close(torch.cat(composed.logprob_grads), torch.tensor([2.0, 3.0, 4.0]))
    assert composed.loss.shape == () and composed.loss.item() == pytest.approx(13.0)
    as_tuple = await tinkex.compose_loss(None, (LP,), base_sum, regularizers=specs)
    assert isinstance(as_tuple.logprob_grads, tuple)
    single = await tinkex.compose_loss(None, LP, base_sum, regularizers=specs)
    assert isinstance(single.logprob_grads, torch.Tensor)
    torch.testing.assert_close(single.logprob_grads, torch.tensor([2.0, 3.0, 4.0]))


async def test_compose_gradient_matches_autograd_on_the_handwritten_loss():
    torch.manual_seed(0)
    lp = [-torch.rand(5, dtype=torch.float64) * 3, -torch.rand(7, dtype=torch.float64) * 3]
    ref = [t.detach().clone() for t in lp]

    def entropy_like(data, x):
        flat = torch.cat(list(x))
        q = torch.softmax(flat, 0)
        return -(q * torch.log(q)).sum(), {}

    def l1(data, x):
        return sum(t.abs().sum() for t in x), {}

    specs = [RegularizerSpec(entropy_like, 0.3, "ent"), RegularizerSpec(l1, 0.01, "l1")]
    composed = await tinkex.compose_loss(
        None, lp, base_sum, regularizers=specs, track_grad_norms=True
    )
    leaves = [t.clone().requires_grad_(True) for t in ref]
    total = (
        base_sum(None, leaves)[0] + 0.3 * entropy_like(None, leaves)[0] + 0.01 * l1(None, leaves)[0]
    )
    expected = torch.autograd.grad(total, leaves)
    for got, want in zip(composed.logprob_grads, expected, strict=True):
        torch.testing.assert_close(got, want)
        assert got.dtype == torch.float64
    assert composed.output.loss_total == pytest.approx(total.item())
    assert composed.output.total_grad_norm == pytest.approx(
        torch.linalg.vector_norm(torch.cat(expected)).item()
    )
    for t, r in zip(lp, ref, strict=True):  # the caller's tensors are untouched
        assert torch.equal(t, r) and not t.requires_grad and t.grad is None


async def test_parallel_equals_sequential():
    torch.manual_seed(1)
    lp = -torch.rand(4, 16)
    specs = [
        RegularizerSpec(lambda d, x: (((x + 1) ** 2).mean(), {}), 0.2, "a"),
        RegularizerSpec(sum_sq, 0.05, "b"),
        RegularizerSpec(lambda d, x: (torch.exp(x).sum(), {"m": 1.5}), 1.0, "c"),
    ]
    par = await tinkex.compose_loss(None, lp, base_sum, regularizers=specs, track_grad_norms=True)
    seq = await tinkex.compose_loss(
        None, lp, base_sum, regularizers=specs, track_grad_norms=True, parallel=False
    )
    assert par.output == seq.output
    torch.testing.assert_close(par.logprob_grads, seq.logprob_grads, rtol=0, atol=0)


async def test_each_term_is_evaluated_exactly_once_with_grad_norms():
    calls = {"base": 0, "a": 0, "b": 0}

    def counting(key, fn):
        def wrapped(data, lp):
            calls[key] += 1
            return fn(data, lp)

        return wrapped

    await tinkex.compose_loss(
        None,
        LP,
        counting("base", base_sum),
        regularizers=[
            RegularizerSpec(counting("a", sum_sq), 0.5, "a"),
            RegularizerSpec(counting("b", sum_sq), 0.1, "b"),
        ],
        track_grad_norms=True,
    )
    assert calls == {"base": 1, "a": 1, "b": 1}


async def test_term_without_a_path_to_logprobs_has_grad_norm_zero():
    out = await tinkex.compute_loss(
        None,
        LP,
        base_sum,
        regularizers=[RegularizerSpec(lambda d, lp: (3.0, {}), 2.0, "const")],
        track_grad_norms=True,
    )
    reg = out.regularizers["const"]
    assert reg.value == 3.0 and reg.grad_norm == 0.0 and reg.grad_norm_weighted == 0.0
    assert out.total_grad_norm == pytest.approx(math.sqrt(3))


async def test_no_grad_caller_still_gets_gradient_norms():
    with torch.no_grad():
        out = await tinkex.compute_loss(
            None,
            LP,
            base_sum,
            regularizers=[RegularizerSpec(sum_sq, 0.5, "sq")],
            track_grad_norms=True,
        )
    assert out.regularizers["sq"].grad_norm == pytest.approx(math.sqrt(56))
    with torch.no_grad():  # and the caller's grad mode is restored afterwards
        await tinkex.compute_loss(None, LP, base_sum)
        assert not torch.is_grad_enabled()


async def test_async_terms_see_autograd_even_under_no_grad():
    async def async_sq(data, lp):
        await trio.lowlevel.checkpoint()
        return (lp**2).sum(), {}

    with torch.no_grad():
        out = await tinkex.compute_loss(
            None,
            LP,
            base_sum,
            regularizers=[RegularizerSpec(async_sq, 1.0, "sq")],
            track_grad_norms=True,
        )
    assert out.regularizers["sq"].grad_norm == pytest.approx(math.sqrt(56))


async def test_disabled_specs_are_skipped():
    calls = []

    def spy(data, lp):
        calls.append(1)
        return lp.sum(), {}

    out = await tinkex.compute_loss(
        None,
        LP,
        base_sum,
        regularizers=[
            RegularizerSpec(spy, 1.0, "off", enabled=False),
            RegularizerSpec(sum_sq, 1.0, "on"),
        ],
    )
    assert calls == [] and list(out.regularizers) == ["on"]


async def test_mixed_sync_and_async_terms_keep_spec_order():
    async def a(data, lp):
        await trio.sleep(0.001)
        return lp.mean(), {}

    names = [f"t{i}" for i in range(6)]
    specs = [
        RegularizerSpec(a if i % 2 else sum_sq, 0.1 * (i + 1), name) for i, name in enumerate(names)
    ]
    for parallel in (True, False):
        out = await tinkex.compute_loss(None, LP, base_sum, regularizers=specs, parallel=parallel)
        assert list(out.regularizers) == names
        assert out.regularizers["t1"].value == pytest.approx(2.0)
        assert out.regularizers["t0"].value == pytest.approx(14.0)


async def test_sync_fn_returning_an_awaitable_is_awaited():
    async def inner(lp):
        await trio.lowlevel.checkpoint()
        return lp.sum() * 2, {}

    def sync_returning_coroutine(data, lp):
        return inner(lp)

    out = await tinkex.compute_loss(
        None,
        LP,
        base_sum,
        regularizers=[RegularizerSpec(sync_returning_coroutine, 1.0, "aw", is_async=False)],
        track_grad_norms=True,
    )
    assert out.regularizers["aw"].value == pytest.approx(12.0)
    assert out.regularizers["aw"].grad_norm == pytest.approx(2 * math.sqrt(3))


async def test_async_terms_really_overlap(autojump_clock):
    # Each term sleeps 10 virtual seconds; run concurrently the whole call takes 10, not 30.
    async def slow(data, lp):
        await trio.sleep(10)
        return lp.sum(), {}

    async def base(data, lp):  # async too: a worker thread would let the mock clock jump
        return lp.sum(), {}

    specs = [RegularizerSpec(slow, 1.0, f"s{i}") for i in range(3)]
    t0 = trio.current_time()
    await tinkex.compute_loss(None, LP, base, regularizers=specs, timeout=60)
    assert trio.current_time() - t0 == pytest.approx(10.0)
    t0 = trio.current_time()
    await tinkex.compute_loss(None, LP, base, regularizers=specs, timeout=60, parallel=False)
    assert trio.current_time() - t0 == pytest.approx(30.0)


async def test_async_terms_rendezvous_when_parallel():
    # Deadlocks (and times out) unless both terms run at the same time.
    a_ready, b_ready = trio.Event(), trio.Event()

    async def a(data, lp):
        a_ready.set()
        await b_ready.wait()
        return lp.sum(), {}

    async def b(data, lp):
        b_ready.set()
        await a_ready.wait()
        return lp.sum(), {}

    with trio.fail_after(5):
        out = await tinkex.compute_loss(
            None,
            LP,
            base_sum,
            regularizers=[RegularizerSpec(a, 1, "a"), RegularizerSpec(b, 1, "b")],
        )
    assert out.loss_total == pytest.approx(18.0)


async def test_sync_terms_run_in_parallel_worker_threads():
    barrier = threading.Barrier(2, timeout=5)
    threads = set()

    def meet(data, lp):
        threads.add(threading.get_ident())
        barrier.wait()  # BrokenBarrierError unless the two terms overlap
        return lp.sum(), {}

    out = await tinkex.compute_loss(
        None,
        LP,
        base_sum,
        regularizers=[RegularizerSpec(meet, 1, "a"), RegularizerSpec(meet, 1, "b")],
        max_concurrency=2,
    )
    assert out.loss_total == pytest.approx(18.0)
    assert len(threads) == 2 and threading.get_ident() not in threads


async def test_sync_terms_never_run_on_the_trio_thread():
    seen = []

    def where(data, lp):
        seen.append(threading.get_ident())
        return lp.sum(), {}

    await tinkex.compute_loss(
        None, LP, where, regularizers=[RegularizerSpec(where, 1, "a")], parallel=False
    )
    assert seen and threading.get_ident() not in seen


async def test_max_concurrency_bounds_worker_threads():
    active = 0
    peak = 0
    lock = threading.Lock()

    def busy(data, lp):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        threading.Event().wait(0.02)
        with lock:
            active -= 1
        return lp.sum(), {}

    specs = [RegularizerSpec(busy, 1, f"b{i}") for i in range(6)]
    await tinkex.compute_loss(None, LP, busy, regularizers=specs, max_concurrency=2)
    assert peak == 2
    peak = 0
    await tinkex.compute_loss(None, LP, busy, regularizers=specs, max_concurrency=1)
    assert peak == 1


async def test_device_cpu_is_honoured_and_grads_come_back_on_the_callers_device():
    seen = []

    def record(data, lp):
        seen.append(lp.device)
        return lp.sum(), {}

    composed = await tinkex.compose_loss(None, LP, record, device="cpu")
    assert seen == [torch.device("cpu")]
    assert composed.logprob_grads.device == LP.device
    with pytest.raises(SpecError, match="device"):
        await tinkex.compose_loss(None, LP, record, device="not-a-device")


async def test_norms_are_computed_in_float32_or_wider():
    lp = torch.full((4096,), -1.0, dtype=torch.bfloat16)
    out = await tinkex.compute_loss(
        None, lp, lambda d, x: (x.sum() * 3.0, {}), track_grad_norms=True
    )
    # 3 * sqrt(4096) = 192 exactly; bf16 accumulation of 4096 squares would be off
    assert out.base_loss.grad_norm == pytest.approx(192.0, rel=1e-6)


async def test_pipeline_object_is_reusable_and_as_loss_fn_backpropagates_the_composed_gradient():
    pipeline = tinkex.Pipeline(
        base_sum, regularizers=[RegularizerSpec(sum_sq, 0.5, "sq")], track_grad_norms=True
    )
    first = await pipeline.compute(None, LP)
    second = await pipeline.compute(None, LP)
    assert first == second
    loss_fn = pipeline.as_loss_fn()
    # The Tinker SDK calls the loss fn from a thread of its own with leaf tensors.
    lps = [torch.tensor([1.0]).requires_grad_(True), torch.tensor([2.0, 3.0]).requires_grad_(True)]
    loss, metrics = await trio.to_thread.run_sync(loss_fn, None, lps)
    assert loss.item() == pytest.approx(13.0)
    assert metrics["loss_total"] == pytest.approx(13.0)
    assert metrics["reg/sq/grad_norm"] == pytest.approx(math.sqrt(56))
    loss.backward()
    torch.testing.assert_close(lps[0].grad, torch.tensor([2.0]))
    torch.testing.assert_close(lps[1].grad, torch.tensor([3.0, 4.0]))


async def test_as_loss_fn_inside_a_trio_loop_says_what_to_do():
    loss_fn = tinkex.Pipeline(base_sum).as_loss_fn()
    with pytest.raises(RuntimeError, match="await pipeline.compose"):
        loss_fn(None, LP)


def test_as_loss_fn_from_plain_sync_code():
    loss_fn = tinkex.Pipeline(
        base_sum, regularizers=[RegularizerSpec(sum_sq, 0.5, "sq")]
    ).as_loss_fn()
    lp = LP.clone().requires_grad_(True)
    loss, _ = loss_fn(None, lp)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([2.0, 3.0, 4.0]))


# --------------------------------------------------------------------------- bad input


async def test_duplicate_names_are_rejected_before_anything_runs():
    calls = []

    def spy(data, lp):
        calls.append(1)
        return lp.sum(), {}

    with pytest.raises(SpecError, match="duplicate regularizer name 'x'"):
        await tinkex.compute_loss(
            None, LP, spy, regularizers=[RegularizerSpec(spy, 1, "x"), RegularizerSpec(spy, 2, "x")]
        )
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regularizers": [lambda d, lp: (0, {})]}, r"regularizers\[0\] must be a RegularizerSpec"),
        (
            {"regularizers": [RegularizerSpec(base_sum, 1, "base_loss")]},
            "reserved name 'base_loss'",
        ),
        ({"timeout": -1}, "timeout must be"),
        ({"timeout": float("nan")}, "timeout must be"),
        ({"max_concurrency": 0}, "max_concurrency must be"),
        ({"parallel": "yes"}, "parallel must be a bool"),
    ],
)
async def test_bad_options_raise_spec_error(kwargs, match):
    with pytest.raises(SpecError, match=match):
        await tinkex.compute_loss(None, LP, base_sum, **kwargs)


async def test_non_callable_base_loss():
    with pytest.raises(SpecError, match="base_loss_fn must be callable"):
        await tinkex.compute_loss(None, LP, 42)
    with pytest.raises(SpecError, match="two positional arguments"):
        await tinkex.compute_loss(None, LP, lambda lp: lp)


async def test_bad_logprobs():
    with pytest.raises(SpecError, match="floating-point"):
        await tinkex.compute_loss(None, torch.tensor([1, 2]), base_sum)
    with pytest.raises(SpecError, match="logprobs must be a tensor"):
        await tinkex.compute_loss(None, 3.0, base_sum)


@pytest.mark.parametrize("parallel", [True, False])
async def test_terms_may_share_an_intermediate_of_the_logprobs(parallel):
    # One softmax, cached for two terms: the first term's backward must not free it.
    lp = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.7]])
    cache = {}

    def probs(x):
        if "q" not in cache:
            cache["q"] = torch.softmax(x, dim=-1)
        return cache["q"]

    def square(data, x):
        return probs(x).pow(2).sum(), {}

    def log(data, x):
        return probs(x).log().sum(), {}

    out = await tinkex.compute_loss(
        None,
        lp,
        base_sum,
        regularizers=[RegularizerSpec(square, 1.0, "square"), RegularizerSpec(log, 1.0, "log")],
        track_grad_norms=True,
        parallel=parallel,
        max_concurrency=1,
    )
    for name, fn in (("square", square), ("log", log)):
        x = lp.clone().requires_grad_()
        cache.clear()
        value = fn(None, x)[0]
        (g,) = torch.autograd.grad(value, x)
        assert out.regularizers[name].value == pytest.approx(value.item())
        assert out.regularizers[name].grad_norm == pytest.approx(g.norm().item())


async def test_scheduled_weights_reach_the_outputs_and_the_gradient_of_each_step():
    # base = sum(x): grad 1; term = sum(x^2) = 14: grad 2x; weight linear 0 -> 1 over 4 steps
    pipeline = tinkex.Pipeline(
        base_sum,
        regularizers=[RegularizerSpec(sum_sq, tinkex.schedules.linear(0.0, 1.0, 4), "sq")],
        track_grad_norms=True,
    )
    for step, weight in ((1, 0.0), (2, 0.25), (3, 0.5), (5, 1.0), (50, 1.0)):
        composed = await pipeline.compose(None, LP, step=step)
        reg = composed.output.regularizers["sq"]
        assert (reg.weight, reg.contribution) == (weight, weight * 14.0)
        assert composed.output.loss_total == 6.0 + weight * 14.0
        assert reg.grad_norm_weighted == weight * reg.grad_norm
        assert composed.output.flat_metrics()["reg/sq/weight"] == weight
        torch.testing.assert_close(composed.logprob_grads, 1.0 + weight * 2.0 * LP)
        out = await pipeline.compute(None, LP, step=step)
        assert out == composed.output


async def test_telemetry_reports_the_weight_of_the_step():
    from structlog.testing import capture_logs

    specs = [RegularizerSpec(sum_sq, tinkex.schedules.step(0.5, 0.0, 1), "sq")]
    for step, weight in ((1, 0.5), (2, 0.0)):
        with capture_logs() as logs:
            await tinkex.compute_loss(None, LP, base_sum, regularizers=specs, step=step)
        stop = [e for e in logs if e["event"] == "regularizer.compute.stop"]
        assert [(e["weight"], e["contribution"]) for e in stop] == [(weight, weight * 14.0)]
