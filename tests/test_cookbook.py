"""tinker-cookbook's losses, metrics and data through tinkex, unchanged.

The real cookbook's DPO loss (the ``dpo_loss_fn`` closure ``train_dpo.do_update``
builds), SDFT's ``reverse_kl_custom_loss`` on top-K ``(N, K)`` data, the decisions
recipe's ``probability_loss(brier_score_loss)`` and a hand-built loss on hand-built
``tinker.Datum``s, each on data the cookbook built, run (i) on their own, (ii) through
``tinkex.compute_loss`` / ``tinkex.compose_loss``, (iii) through
``tinkex.Pipeline(loss).as_loss_fn()`` called as the SDK calls it, and (iv) through
the SDK's own client-side step ``tinker.TrainingClient._compute_custom_loss``, whose
weights are ``-dL/dlogprobs``. Alone, tinkex gives the cookbook's loss, gradient and
metrics exactly; with ``l2`` and ``kl``, the cookbook's plus the hand-computed terms.
The cookbook's own metric keys stay at the top level of the metrics.

The recipes' own loops are in ``test_cookbook_recipes.py``; helpers in ``cookbook_helpers.py``.
"""

from __future__ import annotations

import pytest
import torch
import trio

import tinkex
from tests.cookbook_helpers import (
    CASES,
    Case,
    assert_drop_in_metrics,
    assert_grads,
    assert_value,
    build_case,
    call_like_the_sdk,
    composed_regularizers,
    counted,
    dpo_run,
    expected_composed,
    hand_kl,
    hand_l2,
    run_alone,
    sdft_datums,
    sdk_custom_loss,
    weighted_cross_entropy,
    with_inputs,
)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dpo-run"))


@pytest.fixture(scope="module", params=CASES)
def case(request, log_path) -> Case:
    return build_case(request.param, log_path)


# --------------------------------------------------------------------------- the data are the cookbook's


def test_the_cookbook_built_the_data_in_its_own_shapes(log_path):
    dpo = build_case("dpo", log_path)
    assert all(lp.dim() == 1 for lp in dpo.logprobs)
    assert all(
        set(d.loss_fn_inputs) == {"target_tokens", "weights"} for d in dpo_run(log_path).data
    )
    for name in ("sdft", "decisions"):
        top_k = build_case(name, log_path)
        for d, lp in zip(top_k.data, top_k.logprobs, strict=True):
            assert lp.dim() == 2 and lp.shape[0] == d.model_input.length
            assert tuple(d.loss_fn_inputs["target_tokens"].shape) == tuple(lp.shape)
            assert tuple(d.loss_fn_inputs["weights"].shape) == tuple(lp.shape)
    sdft_weights = torch.cat([d.loss_fn_inputs["weights"].to_torch() for d in sdft_datums()])
    assert (sdft_weights == 0).any() and (sdft_weights > 0).any()  # masked and padding slots too


def test_each_cookbook_loss_alone_gives_its_own_metric_keys(case):
    ref = run_alone(case.loss_fn, case.data, case.logprobs)
    assert set(ref.metrics) == case.own_keys
    assert any(bool(g.abs().sum() > 0) for g in ref.grads)


# --------------------------------------------------------------------------- (ii) compute_loss / compose_loss


async def test_compute_loss_and_compose_loss_give_the_cookbooks_loss_gradient_and_metrics(case):
    ref = run_alone(case.loss_fn, case.data, case.logprobs)

    out = await tinkex.compute_loss(case.data, case.logprobs, case.loss_fn)
    assert_value(out.base_loss.value, ref.value)
    assert_value(out.loss_total, ref.value)
    assert out.base_loss.custom == pytest.approx(ref.metrics, rel=1e-6, abs=1e-9)

    composed = await tinkex.compose_loss(case.data, case.logprobs, case.loss_fn)
    assert_value(float(composed.loss), ref.value)
    assert_grads(composed.logprob_grads, ref.grads)


async def test_compose_loss_with_l2_and_kl_adds_exactly_the_hand_computed_terms(case):
    want = expected_composed(case)
    composed = await tinkex.compose_loss(
        case.data, case.logprobs, case.loss_fn, regularizers=composed_regularizers()
    )
    out = composed.output
    assert_value(out.regularizers["l2"].value, hand_l2(case.data, case.logprobs)[0])
    assert_value(out.regularizers["kl"].value, hand_kl(case.data, case.logprobs)[0])
    assert_value(out.loss_total, want.value)
    assert out.base_loss.custom == pytest.approx(want.metrics, rel=1e-6, abs=1e-9)
    assert_grads(composed.logprob_grads, want.grads)


# --------------------------------------------------------------------------- (iii) as_loss_fn


def test_as_loss_fn_called_as_the_sdk_calls_it_is_the_cookbooks_loss(case):
    ref = run_alone(case.loss_fn, case.data, case.logprobs)
    loss, metrics, grads = call_like_the_sdk(
        tinkex.Pipeline(case.loss_fn).as_loss_fn(), case.data, case.logprobs
    )
    assert_value(float(loss), ref.value)
    assert_grads(grads, ref.grads)
    assert_drop_in_metrics(metrics, ref.metrics, regs=False)


def test_as_loss_fn_with_regularizers_adds_them_and_keeps_the_cookbooks_metrics(case):
    want = expected_composed(case)
    pipeline = tinkex.Pipeline(case.loss_fn, regularizers=composed_regularizers())
    loss, metrics, grads = call_like_the_sdk(pipeline.as_loss_fn(), case.data, case.logprobs)
    assert_value(float(loss), want.value)
    assert_grads(grads, want.grads)
    assert_drop_in_metrics(metrics, want.metrics, regs=True)
    assert_value(metrics["loss_total"], want.value)
    assert_value(metrics["reg/l2/value"], hand_l2(case.data, case.logprobs)[0])


# --------------------------------------------------------------------------- (iv) the SDK's own step


def test_the_sdks_own_step_sends_the_same_weights_with_tinkex_as_without(case):
    alone = sdk_custom_loss(case.data, case.loss_fn, case.logprobs)
    ref = run_alone(case.loss_fn, case.data, case.logprobs)
    assert_value(alone.loss_sum, ref.value)
    assert_grads(alone.weights, [-g for g in ref.grads])

    through = sdk_custom_loss(case.data, tinkex.Pipeline(case.loss_fn).as_loss_fn(), case.logprobs)
    assert_value(through.loss_sum, alone.loss_sum)
    assert_grads(through.weights, alone.weights)
    assert_drop_in_metrics(through.metrics, alone.metrics, regs=False)


def test_the_sdks_own_step_with_l2_and_kl_sends_the_cookbooks_weights_plus_the_terms(case):
    want = expected_composed(case)
    pipeline = tinkex.Pipeline(case.loss_fn, regularizers=composed_regularizers())
    step = sdk_custom_loss(case.data, pipeline.as_loss_fn(), case.logprobs)
    assert_value(step.loss_sum, want.value)
    assert_grads(step.weights, [-g for g in want.grads])  # the weights sent are -dL/dlogprobs
    assert_drop_in_metrics(step.metrics, want.metrics, regs=True)


# --------------------------------------------------------------------------- no path to the logprobs


def constant_loss(data, logprobs_list):
    """A "loss" that never looks at the logprobs."""
    return torch.tensor(0.5), {"constant": 0.5}


def test_a_base_loss_without_a_path_to_the_logprobs_is_an_error_naming_base_loss(log_path):
    case = build_case("hand_built", log_path)
    # the SDK refuses it too: torch has no gradient to give it (or the SDK finds none)
    with pytest.raises((RuntimeError, ValueError)):
        sdk_custom_loss(case.data, constant_loss, case.logprobs)
    with pytest.raises(tinkex.RegularizerError) as caught:
        call_like_the_sdk(tinkex.Pipeline(constant_loss).as_loss_fn(), case.data, case.logprobs)
    assert caught.value.name == "base_loss" and "base_loss" in str(caught.value)
    with pytest.raises(tinkex.RegularizerError) as caught:
        sdk_custom_loss(case.data, tinkex.Pipeline(constant_loss).as_loss_fn(), case.logprobs)
    assert caught.value.name == "base_loss"


async def test_compose_loss_refuses_a_base_loss_without_a_path_to_the_logprobs(log_path):
    case = build_case("hand_built", log_path)
    with pytest.raises(tinkex.RegularizerError) as caught:
        await tinkex.compose_loss(case.data, case.logprobs, constant_loss)
    assert caught.value.name == "base_loss" and "base_loss" in str(caught.value)


def test_a_regularizer_without_a_path_to_the_logprobs_adds_its_value_and_no_gradient(case):
    ref = run_alone(case.loss_fn, case.data, case.logprobs)
    spec = tinkex.RegularizerSpec(fn=constant_loss, weight=0.3, name="constant")
    pipeline = tinkex.Pipeline(case.loss_fn, regularizers=[spec], track_grad_norms=True)
    loss, metrics, grads = call_like_the_sdk(pipeline.as_loss_fn(), case.data, case.logprobs)
    assert_value(float(loss), ref.value + 0.3 * 0.5)
    assert_grads(grads, ref.grads)
    assert metrics["reg/constant/grad_norm"] == 0.0
    assert metrics["reg/constant/value"] == 0.5


# --------------------------------------------------------------------------- metric key collisions


def test_a_base_loss_metric_named_like_a_tinkex_key_keeps_it_and_tinkexs_moves(log_path):
    case = build_case("hand_built", log_path)

    def reports_its_own_total(data, logprobs_list):
        loss, metrics = weighted_cross_entropy(data, logprobs_list)
        return loss, {**metrics, "loss_total": 123.0, "reg/l2/value": -1.0}

    pipeline = tinkex.Pipeline(reports_its_own_total, regularizers=composed_regularizers())
    loss, metrics, _ = call_like_the_sdk(pipeline.as_loss_fn(), case.data, case.logprobs)
    assert metrics["loss_total"] == 123.0 and metrics["reg/l2/value"] == -1.0
    assert metrics["tinkex/loss_total"] == pytest.approx(float(loss), rel=1e-6)
    assert metrics["tinkex/reg/l2/value"] == pytest.approx(
        hand_l2(case.data, case.logprobs)[0], rel=1e-6
    )
    assert "tinkex/base_loss/value" not in metrics and "base_loss/value" in metrics
    step = sdk_custom_loss(case.data, pipeline.as_loss_fn(), case.logprobs)
    assert step.metrics["loss_total"] == 123.0
    assert step.metrics["tinkex/loss_total"] == pytest.approx(step.loss_sum, rel=1e-6)


# --------------------------------------------------------------------------- top-K (N, K) logprobs


@pytest.mark.parametrize("name", ["entropy", "orthogonality"])
async def test_regularizers_that_need_one_logprob_per_token_refuse_top_k_logprobs(name, log_path):
    case = build_case("sdft", log_path)
    with pytest.raises(tinkex.RegularizerError) as caught:
        await tinkex.compute_loss(
            case.data,
            case.logprobs,
            case.loss_fn,
            regularizers=[tinkex.regularizer(name, weight=0.1)],
        )
    assert caught.value.name == name
    assert isinstance(caught.value.__cause__, tinkex.SpecError)
    assert "top-K" in str(caught.value)


async def test_consistency_on_top_k_logprobs_takes_an_n_by_k_reference(log_path):
    case = build_case("sdft", log_path)
    refs = [d.loss_fn_inputs["reference_logprobs"].to_torch() for d in case.data]
    data = [with_inputs(d, original_logprobs=r) for d, r in zip(case.data, refs, strict=True)]
    spec = tinkex.regularizer("consistency", weight=0.1)
    out = await tinkex.compute_loss(data, case.logprobs, case.loss_fn, regularizers=[spec])
    masks = [counted(d, lp) for d, lp in zip(data, case.logprobs, strict=True)]
    squares = [((lp - r) ** 2)[m] for lp, r, m in zip(case.logprobs, refs, masks, strict=True)]
    want = float(sum(s.sum() for s in squares)) / sum(s.numel() for s in squares)
    assert_value(out.regularizers["consistency"].value, want)

    per_position = [  # one reference logprob per position is not a top-K reference
        with_inputs(d, original_logprobs=r[:, 0]) for d, r in zip(case.data, refs, strict=True)
    ]
    with pytest.raises(tinkex.RegularizerError) as caught:
        await tinkex.compute_loss(per_position, case.logprobs, case.loss_fn, regularizers=[spec])
    assert caught.value.name == "consistency"
    assert isinstance(caught.value.__cause__, tinkex.SpecError)


# --------------------------------------------------------------------------- tinker.Datum, not tinkex.Datum


async def test_a_cookbook_loss_reading_to_torch_needs_tinker_datums(log_path):
    """tinkex takes the cookbook's tinker.Datums as they are; converting them to
    tinkex.Datums (torch tensors, no ``.to_torch()``) breaks a loss that reads them."""
    from tinkex._backends.tinker import from_tinker_datum

    case = build_case("hand_built", log_path)
    converted = [from_tinker_datum(d) for d in case.data]
    with pytest.raises(tinkex.RegularizerError) as caught:
        await tinkex.compute_loss(converted, case.logprobs, case.loss_fn)
    assert caught.value.name == "base_loss"
    assert isinstance(caught.value.__cause__, AttributeError)
    assert "to_torch" in str(caught.value.__cause__)
    out = await tinkex.compute_loss(case.data, case.logprobs, case.loss_fn)  # as they are
    assert_value(out.loss_total, run_alone(case.loss_fn, case.data, case.logprobs).value)


# --------------------------------------------------------------------------- trio


async def test_as_loss_fn_from_a_worker_thread_of_a_trio_program(log_path):
    """Inside a Trio program, the SDK's thread is a worker thread: as_loss_fn works there."""
    case = build_case("decisions", log_path)
    ref = run_alone(case.loss_fn, case.data, case.logprobs)
    fn = tinkex.Pipeline(case.loss_fn).as_loss_fn()
    loss, metrics, grads = await trio.to_thread.run_sync(
        call_like_the_sdk, fn, case.data, case.logprobs
    )
    assert_value(float(loss), ref.value)
    assert_grads(grads, ref.grads)
    assert_drop_in_metrics(metrics, ref.metrics, regs=False)
