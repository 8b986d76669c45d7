"""The SDK drop-ins: ``Pipeline.as_loss_fn()`` and ``TrainingClient.forward_backward_custom``.

A Tinker user swaps their own custom loss for ``Pipeline(loss, ...).as_loss_fn()``;
what must not change for them: the metric keys their loss returns, no time limit on
their own loss, and the SDK's refusal of a loss that does not depend on the logprobs.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import trio

import tinkex
from tinkex import RegularizerError, RegularizerSpec, RegularizerTimeoutError
from tinkex._pipeline import DEFAULT_TIMEOUT, _DefaultTimeout


def dpo_like(data, logprobs):
    """A base loss with its own metric keys, as the cookbook's DPO loss has."""
    loss = -sum(lp.sum() for lp in logprobs)
    return loss, {"dpo_loss": float(loss.detach()), "accuracy": 0.75, "margin": 1.5}


def squares(data, logprobs):
    return sum((lp**2).sum() for lp in logprobs), {"sq": 2.0}


def make_logprobs():
    return [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -0.25, -3.0])]


def sq_spec(weight=0.1):
    return RegularizerSpec(fn=squares, weight=weight, name="sq")


# --------------------------------------------------------------------------- metric keys


def test_the_base_loss_keeps_its_own_metric_keys_next_to_tinkexs():
    lps = [lp.requires_grad_() for lp in make_logprobs()]
    loss, metrics = tinkex.Pipeline(dpo_like, regularizers=[sq_spec()]).as_loss_fn()([0, 1], lps)
    # base = 6.75, squares = 1 + 4 + 0.25 + 0.0625 + 9 = 14.3125
    assert metrics["dpo_loss"] == 6.75
    assert metrics["accuracy"] == 0.75 and metrics["margin"] == 1.5
    assert metrics["loss_total"] == pytest.approx(6.75 + 0.1 * 14.3125)
    assert metrics["base_loss/value"] == 6.75
    assert metrics["base_loss/dpo_loss"] == 6.75
    assert metrics["reg/sq/value"] == pytest.approx(14.3125)
    assert metrics["reg/sq/sq"] == 2.0
    assert "sq" not in metrics  # a regularizer's metrics stay under reg/<name>/
    assert not any(k.startswith("tinkex/") for k in metrics)  # no collision, no prefix
    assert float(loss.detach()) == pytest.approx(metrics["loss_total"])
    # the user's keys come first, in the order the loss returned them
    assert list(metrics)[:3] == ["dpo_loss", "accuracy", "margin"]


def test_a_base_loss_key_equal_to_a_tinkex_key_wins_and_tinkexs_moves_under_tinkex():
    def clashing(data, logprobs):
        loss = -sum(lp.sum() for lp in logprobs)
        return loss, {"loss_total": 7.0, "tinkex/loss_total": 8.0, "regularizer_total": 9.0}

    lps = [lp.requires_grad_() for lp in make_logprobs()]
    _, metrics = tinkex.Pipeline(clashing, regularizers=[sq_spec()]).as_loss_fn()([0, 1], lps)
    total = 6.75 + 0.1 * 14.3125
    assert metrics["loss_total"] == 7.0
    assert metrics["tinkex/loss_total"] == 8.0
    assert metrics["tinkex/tinkex/loss_total"] == pytest.approx(total)
    assert metrics["regularizer_total"] == 9.0
    assert metrics["tinkex/regularizer_total"] == pytest.approx(0.1 * 14.3125)


def test_a_recipe_that_keeps_only_its_own_keys_still_gets_them():
    """The cookbook's decisions recipe logs only ``loss``, ``target_prob:mean``, ``accuracy``."""

    def decisions_like(data, logprobs):
        loss = torch.stack([lp.exp().sum() for lp in logprobs]).mean()
        return loss, {"loss": float(loss.detach()), "target_prob:mean": 0.4, "accuracy": 0.5}

    lps = [lp.requires_grad_() for lp in make_logprobs()]
    _, metrics = tinkex.Pipeline(decisions_like, regularizers=[sq_spec()]).as_loss_fn()([0, 1], lps)
    kept = {k: v for k, v in metrics.items() if k in ("loss", "target_prob:mean", "accuracy")}
    expected = (sum(torch.exp(lp).sum() for lp in make_logprobs()) / 2).item()
    assert kept == {"loss": pytest.approx(expected), "target_prob:mean": 0.4, "accuracy": 0.5}


def test_drop_in_metrics_is_the_public_form_of_the_same_merge():
    out = trio.run(
        tinkex.Pipeline(dpo_like, regularizers=[sq_spec()]).compute, [0, 1], make_logprobs()
    )
    merged = tinkex.drop_in_metrics(out)
    assert merged == {**out.base_loss.custom, **out.flat_metrics()}


async def test_forward_backward_custom_metrics_keep_the_base_loss_keys_and_loss_sum():
    data = [tinkex.Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    async with await tinkex.TrainingClient.create(backend="local", base_model="tiny") as tc:
        fb = await tc.forward_backward_custom(data, dpo_like, regularizers=[sq_spec()])
    assert fb.metrics["accuracy"] == 0.75 and fb.metrics["margin"] == 1.5
    assert fb.metrics["dpo_loss"] == pytest.approx(fb.custom.base_loss.value)
    assert fb.metrics["loss:sum"] == pytest.approx(fb.custom.loss_total)
    assert fb.metrics["loss_total"] == pytest.approx(fb.custom.loss_total)
    assert fb.metrics["reg/sq/value"] == pytest.approx(fb.custom.regularizers["sq"].value)


def sdk_batch(tinker, lps):
    """``tinker.Datum``s for ``lps`` and the SDK's forward output carrying them."""
    data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints(list(range(lp.numel()))),
            loss_fn_inputs={
                "target_tokens": tinker.TensorData.from_torch(
                    torch.ones(lp.numel(), dtype=torch.int64)
                )
            },
        )
        for lp in lps
    ]
    forward = tinker.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[{"logprobs": tinker.TensorData.from_torch(lp)} for lp in lps],
        metrics={},
    )
    return data, forward


def test_through_the_sdks_own_custom_loss_step_the_keys_arrive_unchanged():
    tinker = pytest.importorskip("tinker")
    lps = make_logprobs()
    data, forward = sdk_batch(tinker, lps)
    fn = tinkex.Pipeline(dpo_like, regularizers=[sq_spec()]).as_loss_fn()
    result = tinker.TrainingClient._compute_custom_loss(data, fn, forward)
    assert result.metrics["dpo_loss"] == 6.75 and result.metrics["accuracy"] == 0.75
    assert result.loss_sum == pytest.approx(6.75 + 0.1 * 14.3125)
    # weights = -d(loss)/d(lp) = -(-1 + 0.1 * 2 lp)
    for sent, lp in zip(result.data, lps, strict=True):
        torch.testing.assert_close(sent.loss_fn_inputs["weights"].to_torch(), 1 - 0.2 * lp)


# --------------------------------------------------------------------------- timeouts


def slow_base(data, logprobs):
    threading.Event().wait(0.4)  # a slow but finite loss (a reference-model call, say)
    return -sum(lp.sum() for lp in logprobs), {}


def test_the_default_timeout_is_30_seconds_and_reads_as_a_number():
    assert DEFAULT_TIMEOUT == 30.0 and repr(DEFAULT_TIMEOUT) == "30.0"
    assert tinkex.Pipeline(dpo_like).timeout == 30.0


def test_as_loss_fn_leaves_the_base_loss_unbounded_by_default():
    short_default = _DefaultTimeout(0.05)  # the default, made short for the test
    pipeline = tinkex.Pipeline(slow_base, regularizers=[sq_spec()], timeout=short_default)
    lps = [lp.requires_grad_() for lp in make_logprobs()]
    loss, _ = pipeline.as_loss_fn()([0, 1], lps)
    assert float(loss.detach()) == pytest.approx(6.75 + 0.1 * 14.3125)
    # compose (not a drop-in) bounds every term with the default
    with pytest.raises(RegularizerTimeoutError) as info:
        trio.run(pipeline.compose, [0, 1], make_logprobs())
    assert info.value.name == "base_loss"


def test_an_explicit_timeout_bounds_the_base_loss_in_as_loss_fn_too():
    pipeline = tinkex.Pipeline(slow_base, regularizers=[sq_spec()], timeout=0.05)
    with pytest.raises(RegularizerTimeoutError) as info:
        pipeline.as_loss_fn()([0, 1], [lp.requires_grad_() for lp in make_logprobs()])
    assert info.value.name == "base_loss"
    assert "0.05" in str(info.value)


@pytest.mark.parametrize("parallel", [True, False])
def test_regularizers_keep_the_timeout_after_an_unbounded_base_loss(parallel):
    """One lane runs the unbounded base loss, then a hung regularizer: its deadline holds."""
    release = threading.Event()

    def hung(data, logprobs):
        release.wait(10)
        return torch.zeros(()), {}

    pipeline = tinkex.Pipeline(
        slow_base,
        regularizers=[RegularizerSpec(fn=hung, weight=1.0, name="hung")],
        timeout=_DefaultTimeout(0.2),
        parallel=parallel,
        max_concurrency=1,
    )
    started = time.perf_counter()
    try:
        with pytest.raises(RegularizerTimeoutError) as info:
            pipeline.as_loss_fn()([0, 1], [lp.requires_grad_() for lp in make_logprobs()])
    finally:
        release.set()
    assert info.value.name == "hung"
    assert time.perf_counter() - started < 5  # the deadline fired, not the 10 s release


async def test_forward_backward_custom_leaves_the_base_loss_unbounded_unless_given():
    async def slow_async_base(data, logprobs):
        await trio.sleep(0.3)
        return -sum(lp.sum() for lp in logprobs), {}

    data = [tinkex.Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    async with await tinkex.TrainingClient.create(backend="local", base_model="tiny") as tc:
        fb = await tc.forward_backward_custom(data, slow_async_base, timeout=_DefaultTimeout(0.05))
        assert fb.custom.base_loss.value > 0
        with pytest.raises(RegularizerTimeoutError) as info:
            await tc.forward_backward_custom(data, slow_async_base, timeout=0.05)
        assert info.value.name == "base_loss"


# --------------------------------------------------------------------------- no path to the logprobs


def constant_base(data, logprobs):
    return torch.tensor(1.5), {}


def detached_base(data, logprobs):
    return -sum(lp.detach().sum() for lp in logprobs), {}


@pytest.mark.parametrize("base", [constant_base, detached_base, lambda d, lp: (2.0, {})])
def test_a_base_loss_without_a_path_to_the_logprobs_is_an_error_when_a_gradient_is_needed(base):
    pipeline = tinkex.Pipeline(base, regularizers=[sq_spec()])
    with pytest.raises(RegularizerError, match="does not depend on the logprobs") as info:
        trio.run(pipeline.compose, [0, 1], make_logprobs())
    assert info.value.name == "base_loss"
    assert "\n" not in str(info.value)
    with pytest.raises(RegularizerError, match="does not depend on the logprobs"):
        pipeline.as_loss_fn()([0, 1], [lp.requires_grad_() for lp in make_logprobs()])
    # no gradient wanted: a value like any other (grad norm 0 when tracked)
    out = trio.run(pipeline.compute, [0, 1], make_logprobs())
    assert out.base_loss.value == float(base([0, 1], make_logprobs())[0])
    tracked = tinkex.Pipeline(base, regularizers=[sq_spec()], track_grad_norms=True)
    assert trio.run(tracked.compute, [0, 1], make_logprobs()).base_loss.grad_norm == 0.0


def test_the_sdk_refuses_such_a_loss_too():
    """What the error message quotes: the SDK's own custom-loss step fails on it."""
    tinker = pytest.importorskip("tinker")
    data, forward = sdk_batch(tinker, make_logprobs())
    with pytest.raises(RuntimeError, match="does not require grad"):
        tinker.TrainingClient._compute_custom_loss(data, constant_base, forward)


async def test_a_regularizer_without_a_path_still_gets_a_zero_gradient():
    def constant_reg(data, logprobs):
        return torch.tensor(3.0), {}

    composed = await tinkex.compose_loss(
        [0, 1],
        make_logprobs(),
        dpo_like,
        regularizers=[RegularizerSpec(fn=constant_reg, weight=0.5, name="const")],
        track_grad_norms=True,
    )
    assert composed.output.regularizers["const"].grad_norm == 0.0
    assert composed.output.loss_total == pytest.approx(6.75 + 1.5)
    for g in composed.logprob_grads:
        torch.testing.assert_close(g, -torch.ones_like(g))


async def test_a_training_step_with_such_a_base_loss_changes_nothing():
    data = [tinkex.Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    async with await tinkex.TrainingClient.create(backend="local", base_model="tiny") as tc:
        with pytest.raises(RegularizerError, match="base_loss does not depend"):
            await tc.forward_backward_custom(data, constant_base, regularizers=[sq_spec()])
        assert all(p.grad is None for p in tc.backend.model.parameters())
        fb = await tc.forward_backward_custom(data, dpo_like)  # the client is still usable
        assert fb.custom.base_loss.value > 0


# --------------------------------------------------------------------------- what the SDK lets through


def test_the_base_loss_metrics_go_on_as_returned_nan_and_non_numbers_included():
    """The cookbook's SFT loss reports nll = NaN for a batch with no trained token."""
    tinker = pytest.importorskip("tinker")
    odd = {"nll": float("nan"), "big": float("inf"), "arr": "text", 3: 1.0, "ok": torch.tensor(2.0)}

    def cookbookish(data, logprobs):
        return -sum(lp.sum() for lp in logprobs), dict(odd)

    data, forward = sdk_batch(tinker, make_logprobs())
    plain = tinker.TrainingClient._compute_custom_loss(data, cookbookish, forward)
    wrapped = tinker.TrainingClient._compute_custom_loss(
        data, tinkex.Pipeline(cookbookish, regularizers=[sq_spec()]).as_loss_fn(), forward
    )
    for key, value in plain.metrics.items():
        got = wrapped.metrics[key]
        assert got is value or got == value or (got != got and value != value), key
    # only the finite numbers enter the structured output
    out_custom = {k: v for k, v in wrapped.metrics.items() if str(k).startswith("base_loss/")}
    assert out_custom == {"base_loss/value": 6.75, "base_loss/ok": 2.0}
    # outside the drop-ins a NaN metric is still an error
    with pytest.raises(RegularizerError, match="non-finite metric 'nll'"):
        trio.run(tinkex.Pipeline(cookbookish).compose, [0, 1], make_logprobs())


async def test_forward_backward_custom_passes_a_nan_metric_on_too():
    def nan_metric(data, logprobs):
        return -sum(lp.sum() for lp in logprobs), {"nll": float("nan")}

    data = [tinkex.Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    async with await tinkex.TrainingClient.create(backend="local", base_model="tiny") as tc:
        fb = await tc.forward_backward_custom(data, nan_metric)
    assert fb.metrics["nll"] != fb.metrics["nll"]  # NaN, as returned
    assert fb.custom.base_loss.custom == {}
    assert fb.custom.to_json()  # the structured output stays JSON-safe


def test_a_nan_gradient_is_an_error_naming_its_term_even_without_tracked_norms():
    def sqrt_at_zero(data, logprobs):  # value 0, gradient NaN (d sqrt / dx at 0 times 0)
        return sum(torch.where(lp < 0, 0.0, lp.clamp(min=0).sqrt()).sum() for lp in logprobs), {}

    lps = [torch.tensor([0.0, -1.0]), torch.tensor([-2.0])]
    specs = [RegularizerSpec(fn=sqrt_at_zero, weight=0.5, name="bad")]
    with pytest.raises(RegularizerError, match="non-finite gradient") as info:
        trio.run(tinkex.Pipeline(dpo_like, regularizers=specs).compose, [0, 1], lps)
    assert info.value.name == "bad"
    with pytest.raises(RegularizerError, match="non-finite gradient"):
        tinkex.Pipeline(dpo_like, regularizers=specs).as_loss_fn()(
            [0, 1], [lp.requires_grad_() for lp in lps]
        )
    # a weight-0 term's gradient never reaches the total: not checked
    zero = [RegularizerSpec(fn=sqrt_at_zero, weight=0.0, name="bad")]
    composed = trio.run(tinkex.Pipeline(dpo_like, regularizers=zero).compose, [0, 1], lps)
    assert all(bool(torch.isfinite(g).all()) for g in composed.logprob_grads)


def test_the_loss_the_sdk_sees_is_the_total_exactly():
    """The SDK reports float(loss) as loss:sum; a float32 surrogate used to round it."""
    tinker = pytest.importorskip("tinker")
    lps = [torch.linspace(-30.0, -0.1, 500), torch.linspace(-20.0, -0.5, 333)]
    data, forward = sdk_batch(tinker, lps)
    fn = tinkex.Pipeline(dpo_like, regularizers=[sq_spec(0.37)]).as_loss_fn()
    result = tinker.TrainingClient._compute_custom_loss(data, fn, forward)
    assert result.loss_sum == result.metrics["loss_total"]


def test_an_empty_batch_is_a_spec_error_when_a_gradient_is_wanted():
    with pytest.raises(tinkex.SpecError, match="empty batch"):
        tinkex.Pipeline(dpo_like).as_loss_fn()([], [])
    with pytest.raises(tinkex.SpecError, match="empty batch"):
        trio.run(tinkex.Pipeline(dpo_like).compose, [], [])


# --------------------------------------------------------------------------- interrupting an unbounded base loss


async def test_cancelling_the_call_abandons_a_hung_base_loss_that_has_no_timeout():
    """With no timeout, nothing else would ever end the wait for it."""
    release = threading.Event()

    def hung(data, logprobs):
        release.wait(30)
        return -sum(lp.sum() for lp in logprobs), {}

    pipeline = tinkex.Pipeline(hung, regularizers=[sq_spec()])
    started = time.perf_counter()
    try:
        with trio.move_on_after(0.3) as scope:
            await pipeline._drop_in([0, 1], make_logprobs())
    finally:
        release.set()
    assert scope.cancelled_caught
    assert time.perf_counter() - started < 10  # not the 30 s the term would take


CTRL_C_HUNG_BASE = """
import os, signal, threading, time, torch, tinkex

def hung(data, logprobs):
    threading.Event().wait()  # a deadlocked loss: nothing ends it
    return logprobs[0].sum(), {}

threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
started = time.perf_counter()
try:
    tinkex.Pipeline(hung).as_loss_fn()([0], [torch.zeros(3, requires_grad=True)])
except KeyboardInterrupt:
    print(f"interrupted after {time.perf_counter() - started:.1f}s", flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_stops_as_loss_fn_while_its_base_loss_hangs():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_HUNG_BASE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "TINKEX_EXIT_GRACE_S": "0.5"},
    )
    assert "interrupted after" in proc.stdout, proc.stderr[-2000:]
    seconds = float(proc.stdout.split("interrupted after ")[1].split("s")[0])
    assert seconds < 10
