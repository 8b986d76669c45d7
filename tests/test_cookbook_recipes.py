"""tinker-cookbook's recipe loops with a tinkex-composed loss: DPO's ``do_update``, the
decisions forecasting recipe's ``train`` (and its metric filter), RL datums (``mask``,
no ``weights``), and the l2 weight to start at next to a DPO loss, measured.

Only the network is replaced (stand-in clients in ``cookbook_helpers.py``); the cookbook's
code runs unchanged, and so does its way of reading ``fwd_bwd_result.metrics``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from tinker_cookbook.recipes.decisions import forecasting
from tinker_cookbook.recipes.decisions.decision import DecisionRenderer

import tinkex
from tests.cookbook_helpers import (
    KL_WEIGHT,
    L2_WEIGHT,
    MetricsLoggerStandIn,
    TrainingClientStandIn,
    WithRegularizers,
    assert_grads,
    assert_value,
    build_case,
    composed_regularizers,
    counted,
    dpo_run,
    expected_composed,
    forecast_examples,
    hand_kl,
    hand_l2,
    logprobs_like,
    rl_datums,
    role_colon_renderer,
    run_alone,
    run_dpo_update,
    sdk_custom_loss,
    tokens_of,
)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dpo-run"))


# --------------------------------------------------------------------------- DPO: do_update itself


def test_dpo_do_update_hands_the_sdk_its_loss_and_logs_its_metrics(log_path):
    run = dpo_run(log_path)
    assert len(run.client.loss_fns) == 1 and len(run.client.optim_steps) == 1
    (logged,) = run.logged
    own = {"dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward"}
    assert own <= logged.keys() and "loss:sum" in logged
    assert logged["dpo_loss"] == pytest.approx(logged["loss:sum"])


def test_dpo_do_update_with_the_one_line_change_logs_the_cookbooks_and_tinkexs_metrics(log_path):
    """The recipe's code unchanged; its training client composes l2 and kl into its loss."""
    run = dpo_run(log_path)
    data = build_case("dpo", log_path).data  # the batch with the reference logprobs added
    client = TrainingClientStandIn(lambda d: run.policy[tokens_of(d)])
    logger = run_dpo_update(
        WithRegularizers(client, composed_regularizers()), data, run.reference_by_sequence, log_path
    )
    (logged,) = logger.logged
    (plain,) = run.logged
    for key in ("dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert logged[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-9), key
    assert {"loss_total", "base_loss/value", "reg/l2/value", "reg/kl/value"} <= logged.keys()
    policy = [run.policy[tokens_of(d)] for d in data]
    l2, _ = hand_l2(data, policy)
    kl, _ = hand_kl(data, policy)
    want = plain["dpo_loss"] + L2_WEIGHT * l2 + KL_WEIGHT * kl
    assert logged["loss:sum"] == pytest.approx(want, rel=1e-6)
    assert logged["loss_total"] == pytest.approx(want, rel=1e-6)
    (step,) = client.steps
    assert_grads(step.weights, [-g for g in expected_composed(build_case("dpo", log_path)).grads])


def test_the_l2_weight_next_to_a_dpo_loss_measured_on_the_test_batch(log_path):
    """The numbers docs/tinker.md quotes: a default (sum) l2 at weight 0.01 next to DPO.

    4 comparisons (8 datums), 201 counted response tokens of about -0.8 nats each, the
    policy a little away from its reference (dpo_beta 0.1). Gradient shares are
    ``weight · ‖∂term/∂logprobs‖`` over the sum of those (``out.grad_shares()``).
    """
    case = build_case("dpo", log_path)
    dpo = run_alone(case.loss_fn, case.data, case.logprobs)
    l2_sum, g_l2 = hand_l2(case.data, case.logprobs)
    tokens = sum(int(counted(d, lp).sum()) for d, lp in zip(case.data, case.logprobs, strict=True))
    assert (len(case.data), tokens) == (8, 201)
    assert dpo.value == pytest.approx(0.6775, abs=5e-4)
    assert l2_sum == pytest.approx(236.6, abs=0.05)
    assert L2_WEIGHT * l2_sum / dpo.value == pytest.approx(3.49, abs=0.01)  # the ratio

    def l2_share(weight: float, grad_norm: float) -> float:
        dpo_norm = float(torch.cat(dpo.grads).norm())
        return weight * grad_norm / (weight * grad_norm + dpo_norm)

    sum_norm = float(torch.cat(g_l2).norm())
    mean_norm = sum_norm / tokens  # reduction="mean" divides value and gradient by the count
    assert l2_share(0.01, sum_norm) == pytest.approx(0.64, abs=0.005)
    assert l2_sum / tokens == pytest.approx(1.18, abs=0.005)  # the mean l2
    # the starting weights docs/tinker.md recommends: about 5% of the gradient
    assert l2_share(3e-4, sum_norm) == pytest.approx(0.05, abs=0.005)
    assert 3e-4 * l2_sum / dpo.value == pytest.approx(0.105, abs=0.005)
    assert l2_share(0.05, mean_norm) == pytest.approx(0.042, abs=0.005)
    assert 0.05 * l2_sum / tokens / dpo.value == pytest.approx(0.087, abs=0.005)


# --------------------------------------------------------------------------- decisions: the recipe's filter


def recipe_metric_filter(metrics: dict[str, float]) -> dict[str, float]:
    """recipes/decisions/forecasting.py's filter of ``fwd_bwd_result.metrics``."""
    return {
        f"train/{key}": value
        for key, value in metrics.items()
        if key in ("loss", "target_prob:mean", "accuracy")
    }


def test_the_decisions_recipes_metric_filter_finds_its_three_keys_through_tinkex(log_path):
    case = build_case("decisions", log_path)
    alone = sdk_custom_loss(case.data, case.loss_fn, case.logprobs)
    pipeline = tinkex.Pipeline(case.loss_fn, regularizers=composed_regularizers())
    through = sdk_custom_loss(case.data, pipeline.as_loss_fn(), case.logprobs)
    want = recipe_metric_filter(alone.metrics)
    assert set(want) == {"train/loss", "train/target_prob:mean", "train/accuracy"}
    assert recipe_metric_filter(through.metrics) == pytest.approx(want, rel=1e-6, abs=1e-9)


def run_forecasting_recipe(training_client, log_path) -> list[dict[str, Any]]:
    """The decisions forecasting recipe's training loop (``forecasting.train``), one step."""
    chat = role_colon_renderer()
    renderer = DecisionRenderer(chat, forecasting.YesNoChoiceRenderer(chat))
    examples = forecast_examples()
    train_examples = [
        (forecasting.forecast_decision(e), forecasting.YES if e.outcome else forecasting.NO)
        for e in examples
    ]
    logger = MetricsLoggerStandIn()
    config = forecasting.Config(batch_size=2, max_steps=1, eval_every=0, save_every=0)
    asyncio.run(
        forecasting.train(
            config,
            training_client=training_client,
            decision_renderer=renderer,
            train_examples=train_examples,
            validation=examples,
            ml_logger=logger,
            log_path=log_path,
        )
    )
    return [m for m in logger.logged if any(k.startswith("train/") for k in m)]


def test_the_decisions_forecasting_recipe_logs_its_three_metrics_through_tinkex(tmp_path):
    """The recipe's own loop, filter included, with l2 composed into its Brier loss."""

    def policy(datum):
        return logprobs_like(
            datum.loss_fn_inputs["target_tokens"].shape, seed=datum.model_input.length
        )

    plain_dir, tinkex_dir = tmp_path / "plain", tmp_path / "tinkex"
    plain_dir.mkdir()
    tinkex_dir.mkdir()
    (plain,) = run_forecasting_recipe(TrainingClientStandIn(policy), str(plain_dir))
    client = TrainingClientStandIn(policy)
    regularized = WithRegularizers(client, [tinkex.regularizer("l2", weight=L2_WEIGHT)])
    (logged,) = run_forecasting_recipe(regularized, str(tinkex_dir))
    keys = {"train/loss", "train/target_prob:mean", "train/accuracy"}
    assert {k for k in plain if k.startswith("train/")} == keys
    assert {k for k in logged if k.startswith("train/")} == keys
    for key in keys:
        assert logged[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-9), key
    (step,) = client.steps
    assert step.metrics["reg/l2/value"] > 0 and "loss_total" in step.metrics


# --------------------------------------------------------------------------- RL datums: mask, no weights


def test_l2_on_a_cookbook_rl_datum_counts_only_its_mask(log_path):
    data, _, _ = rl_datums()
    assert all("mask" in d.loss_fn_inputs and "weights" not in d.loss_fn_inputs for d in data)
    logprobs = [logprobs_like((d.model_input.length,), seed=900 + i) for i, d in enumerate(data)]
    masks = [d.loss_fn_inputs["mask"].to_torch() > 0 for d in data]
    assert all(m.any() and not m.all() for m in masks)  # prompt 0, action tokens 1
    want = sum(float((lp[m] ** 2).sum()) for lp, m in zip(logprobs, masks, strict=True))

    spec = tinkex.regularizer("l2", weight=1.0)
    leaves = [lp.clone().requires_grad_(True) for lp in logprobs]
    value, _ = spec.fn(data, leaves)
    value.backward()
    assert float(value.detach()) == pytest.approx(want, rel=1e-6)
    for lp, m, leaf in zip(logprobs, masks, leaves, strict=True):
        torch.testing.assert_close(leaf.grad, torch.where(m, 2 * lp, 0.0))
        assert (leaf.grad[~m] == 0).all()

    def advantage_weighted(data, logprobs_list):  # a policy-gradient loss over the same datums
        return -sum(
            (d.loss_fn_inputs["advantages"].to_torch() * lp).sum()
            for d, lp in zip(data, logprobs_list, strict=True)
        ), {}

    step = sdk_custom_loss(
        data,
        tinkex.Pipeline(advantage_weighted, regularizers=[spec]).as_loss_fn(),
        logprobs,
    )
    alone = sdk_custom_loss(data, advantage_weighted, logprobs)
    assert_value(step.loss_sum, alone.loss_sum + want)
    for got, base, lp, m in zip(step.weights, alone.weights, logprobs, masks, strict=True):
        torch.testing.assert_close(got, base - torch.where(m, 2 * lp, 0.0), rtol=1e-6, atol=1e-6)
