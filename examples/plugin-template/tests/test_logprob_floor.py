"""Tests of the template plugin: the math, validation, and that tinkex finds it."""

from __future__ import annotations

import pytest
import tinkex_reg_logprob_floor
import torch
from tinkex_reg_logprob_floor import LogprobFloor

import tinkex
import tinkex.testing

DIST = "tinkex-reg-logprob-floor"


@pytest.fixture
def registered():
    """Register the plugin in-process (works whether or not it is pip-installed)."""
    with tinkex.testing.register_plugin(tinkex_reg_logprob_floor, name=DIST):
        yield


def test_worked_value_and_gradient():
    lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    data = [tinkex.Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    loss, metrics = LogprobFloor(floor=-2.5)(data, [lp])
    assert loss.item() == pytest.approx(0.5 / 3)
    assert metrics == {
        "logprob_floor": pytest.approx(0.5 / 3),
        "below_fraction": pytest.approx(1 / 3),
    }
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([0.0, 0.0, -1 / 3])


def test_masked_tokens_do_not_count():
    lp = torch.tensor([-9.0, -3.0])
    datum = tinkex.Datum(
        model_input=[1, 2], loss_fn_inputs={"target_tokens": [2, 3], "weights": [0.0, 1.0]}
    )
    loss, _ = LogprobFloor(floor=-2.5)([datum], [lp])
    assert loss.item() == pytest.approx(0.5)


def test_contract_and_parameter_validation():
    tinkex.testing.check_regularizer_class(LogprobFloor)
    with pytest.raises(tinkex.SpecError, match="floor"):
        LogprobFloor(floor=1.0)


def test_tinkex_finds_it(registered):
    spec = tinkex.regularizer("logprob_floor", weight=0.1, name="floor", floor=-4.0)
    assert (spec.name, spec.weight, spec.fn.floor) == ("floor", 0.1, -4.0)
    with pytest.raises(tinkex.SpecError, match="'floor'"):
        tinkex.regularizer("logprob_floor", weight=0.1, floor=float("nan"))
    assert isinstance(spec.fn, LogprobFloor)


def test_wiring_once_installed():
    """Entry point, distribution and hook, as `pip install -e .` declares them."""
    tinkex.testing.check_plugin_module(
        tinkex_reg_logprob_floor,
        distribution=DIST,
        entry_point="logprob_floor",
        registers=[LogprobFloor],
    )
