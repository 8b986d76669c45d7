"""Tests of tinkex-reg-consistency (mse, l1, cosine; masks, references, gradients, errors)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tinkex_reg_consistency
import torch
from tinkex_reg_consistency import Consistency

import tinkex
import tinkex.testing

LP = [-1.0, -2.0, -3.0]
REF = [-1.5, -2.0, -2.0]


def datum(
    ref: list[float] | None, weights: list[float] | None = None, key: str = "original_logprobs"
):
    n = len(ref) if ref is not None else len(weights or [0.0])
    inputs: dict[str, list[float]] = {}
    if ref is not None:
        inputs[key] = ref
    if weights is not None:
        inputs["weights"] = weights
    return tinkex.Datum(model_input=list(range(n)), loss_fn_inputs=inputs)


def leaf(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def run(reg, lp=LP, ref=REF, weights=None):
    x = leaf(lp)
    loss, metrics = reg([datum(ref, weights)], [x])
    loss.backward()
    return loss.item(), metrics, x.grad


def np_cosine_loss(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- values


def test_hand_computed_values_of_the_three_metrics():
    # d = lp - ref = [0.5, 0, -1]
    assert run(Consistency(metric="mse"))[0] == pytest.approx(1.25 / 3)
    assert run(Consistency(metric="l1"))[0] == pytest.approx(0.5)
    assert run(Consistency(metric="cosine"))[0] == pytest.approx(1 - 11.5 / math.sqrt(14 * 10.25))
    assert run(Consistency(metric="cosine"))[0] == pytest.approx(np_cosine_loss(LP, REF))


def test_metric_is_the_loss_as_a_plain_float():
    for metric in ("mse", "l1", "cosine"):
        loss, metrics, _ = run(Consistency(metric=metric))
        assert metrics == {"consistency": pytest.approx(loss)}
        assert type(metrics["consistency"]) is float


def test_default_is_mse_on_original_logprobs():
    reg = Consistency()
    assert (reg.reference, reg.metric, reg.mask) == ("original_logprobs", "mse", "weights")


def test_cosine_is_one_cosine_over_all_counted_tokens_of_the_batch():
    rows = [[-1.0, -2.0], [-3.0, -0.5, -4.0]]
    refs = [[-1.1, -1.0], [-2.0, -0.7, -9.0]]
    weights = [[1.0, 1.0], [1.0, 0.0, 1.0]]
    data = [datum(r, w) for r, w in zip(refs, weights, strict=True)]
    loss, _ = Consistency(metric="cosine")(data, [torch.tensor(r) for r in rows])
    expected = np_cosine_loss([-1.0, -2.0, -3.0, -4.0], [-1.1, -1.0, -2.0, -9.0])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cosine_ignores_scale_and_identical_vectors_give_zero():
    base = run(Consistency(metric="cosine"))[0]
    scaled = run(Consistency(metric="cosine"), LP, [2 * r for r in REF])[0]
    assert scaled == pytest.approx(base)
    loss, _, grad = run(Consistency(metric="cosine"), LP, LP)
    assert loss == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(grad, torch.zeros(3, dtype=torch.float64))


def test_cosine_with_a_zero_vector_is_one_and_finite():
    loss, _, grad = run(Consistency(metric="cosine"), [0.0, 0.0], [-1.0, -2.0])
    assert loss == 1.0
    assert torch.isfinite(grad).all()
    loss, _, grad = run(Consistency(metric="cosine"), [-1.0, -2.0], [0.0, 0.0])
    assert loss == 1.0
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))


def test_mean_is_over_counted_tokens_of_the_whole_batch():
    data = [datum([0.0, 0.0], [1.0, 1.0]), datum([0.0, 0.0, 0.0], [0.0, 0.0, 1.0])]
    lps = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -6.0])]
    assert Consistency(metric="l1")(data, lps)[0].item() == pytest.approx((1 + 2 + 6) / 3)
    assert Consistency(metric="mse")(data, lps)[0].item() == pytest.approx((1 + 4 + 36) / 3)


# --------------------------------------------------------------------------- masks and layouts

ALL = [Consistency(), Consistency(metric="l1"), Consistency(metric="cosine")]


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_masked_tokens_change_neither_value_nor_gradient(reg):
    weights = [1.0, 0.0, 1.0]
    la, _, ga = run(reg, [-1.0, -2.0, -0.5], [-1.5, -1.0, -0.25], weights)
    lb, _, gb = run(reg, [-1.0, -9.0, -0.5], [-1.5, 4.0, -0.25], weights)
    lc, _, _ = run(reg, [-1.0, -0.5], [-1.5, -0.25])
    assert la == pytest.approx(lb) and la == pytest.approx(lc)
    assert ga[1].item() == 0.0 and gb[1].item() == 0.0
    torch.testing.assert_close(ga, gb)


def test_mask_none_counts_every_token():
    loss, _, _ = run(Consistency(metric="l1", mask=None), LP, REF, [0.0, 0.0, 1.0])
    assert loss == pytest.approx(0.5)


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_three_logprob_layouts_agree(reg):
    rows = [[-1.0, -2.0, -0.5], [-3.0, -0.25, -4.0]]
    data = [datum([-1.5, -1.0, -0.2], [1.0, 1.0, 0.0]), datum([-2.0, -0.5, -4.5])]
    as_list, _ = reg(data, [torch.tensor(r) for r in rows])
    as_matrix, _ = reg(data, torch.tensor(rows))
    assert as_list.item() == pytest.approx(as_matrix.item())
    one_list, _ = reg([data[1]], [torch.tensor(rows[1])])
    one_tensor, _ = reg([data[1]], torch.tensor(rows[1]))
    assert one_list.item() == pytest.approx(one_tensor.item())


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_empty_selection_gives_zero_not_nan(reg):
    loss, metrics, grad = run(reg, LP, REF, [0.0, 0.0, 0.0])
    assert loss == 0.0 and metrics == {"consistency": 0.0}
    assert torch.equal(grad, torch.zeros(3, dtype=torch.float64))


# --------------------------------------------------------------------------- gradients


def test_analytic_gradients():
    lp, ref = torch.tensor(LP, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64)
    torch.testing.assert_close(run(Consistency(metric="mse"))[2], 2 * (lp - ref) / 3)
    torch.testing.assert_close(run(Consistency(metric="l1"))[2], torch.sign(lp - ref) / 3)
    # d(1 - cos)/d lp = -(ref / (|lp||ref|) - cos · lp / |lp|²)
    cos = lp @ ref / (lp.norm() * ref.norm())
    expected = -(ref / (lp.norm() * ref.norm()) - cos * lp / lp.norm() ** 2)
    torch.testing.assert_close(run(Consistency(metric="cosine"))[2], expected)


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_gradcheck_float64(reg):
    data = [datum([-1.4, -0.2, -2.0], [1.0, 0.0, 1.0]), datum([-0.1, -2.9])]
    a = leaf([-0.7, -1.3, -2.6])
    b = leaf([-0.4, -3.2])
    assert torch.autograd.gradcheck(lambda x, y: reg(data, [x, y])[0], (a, b))


def test_usable_as_a_plain_tinker_loss_fn():
    lp = torch.tensor(LP)
    loss, metrics = Consistency(metric="l1")([datum(REF)], [lp.requires_grad_()])
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([1 / 3, 0.0, -1 / 3]))
    assert metrics["consistency"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- data and errors


def test_accepts_tinker_sdk_datums():
    tinker = pytest.importorskip("tinker")
    sdk = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "weights": tinker.TensorData.from_torch(torch.tensor([1.0, 0.0, 1.0])),
            "original_logprobs": tinker.TensorData.from_torch(torch.tensor(REF)),
        },
    )
    lp = [torch.tensor(LP)]
    for reg in ALL:
        ours, _ = reg([datum(REF, [1.0, 0.0, 1.0])], lp)
        theirs, _ = reg([sdk], lp)
        assert ours.item() == pytest.approx(theirs.item())


def test_missing_reference_names_datum_key_and_shape():
    with pytest.raises(tinkex.SpecError) as info:
        Consistency()([datum(REF), datum(None, [1.0, 1.0])], [torch.zeros(3), torch.zeros(2)])
    message = str(info.value)
    assert "'consistency'" in message and "datum 1" in message
    assert "'original_logprobs'" in message and "(2,)" in message


def test_reference_shape_mismatch_names_datum_key_and_shape():
    with pytest.raises(tinkex.SpecError) as info:
        Consistency(reference="ref")([datum([-1.0, -2.0], key="ref")], [torch.zeros(3)])
    assert "loss input 'ref' of datum 0 has shape (2,), expected (3,)" in str(info.value)


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"metric": "l2"}, "metric"),
        ({"metric": None}, "metric"),
        ({"reference": ""}, "reference"),
        ({"reference": None}, "reference"),
        ({"mask": "yes"}, "mask"),
    ],
)
def test_parameter_validation_names_regularizer_and_parameter(params, parameter):
    with pytest.raises(tinkex.SpecError) as info:
        Consistency(**params)
    assert f"parameter {parameter!r} of regularizer 'consistency'" in str(info.value)


def test_repr_and_class_contract():
    assert (
        repr(Consistency())
        == "Consistency(reference='original_logprobs', metric='mse', mask='weights')"
    )
    tinkex.testing.check_regularizer_class(Consistency)
    with pytest.raises(TypeError):
        Consistency("ref")  # type: ignore[misc]


# --------------------------------------------------------------------------- plugin wiring


@pytest.fixture
def registry():
    """The real plugin registry (entry points), whatever the developer's TINKEX_* variables say."""
    with tinkex.testing.installed_plugins():
        yield


def test_wiring_entry_point_distribution_and_hook():
    tinkex.testing.check_plugin_module(
        tinkex_reg_consistency,
        distribution="tinkex-reg-consistency",
        entry_point="consistency",
        registers=[Consistency],
    )


def test_found_through_the_registry(registry):
    spec = tinkex.regularizer("consistency", weight=0.1, metric="cosine")
    assert isinstance(spec.fn, Consistency) and spec.fn.metric == "cosine"


async def test_composes_through_compute_loss():
    def base(data, logprobs):
        return -logprobs[0].sum(), {}

    data = [datum(REF)]
    specs = [
        tinkex.RegularizerSpec(fn=Consistency(metric="mse"), weight=3.0, name="mse"),
        tinkex.RegularizerSpec(fn=Consistency(metric="l1"), weight=1.0, name="l1"),
    ]
    out = await tinkex.compute_loss(
        data,
        [torch.tensor(LP, dtype=torch.float64)],
        base,
        regularizers=specs,
        track_grad_norms=True,
    )
    assert out.regularizers["mse"].value == pytest.approx(1.25 / 3)
    assert out.regularizers["mse"].custom == {"consistency": pytest.approx(1.25 / 3)}
    assert out.regularizers["l1"].value == pytest.approx(0.5)
    assert out.regularizer_total == pytest.approx(1.25 + 0.5)
    # mse grad 2d/3 = [1/3, 0, -2/3]; l1 grad sign(d)/3 = [1/3, 0, -1/3]
    assert out.regularizers["mse"].grad_norm == pytest.approx(math.sqrt(5) / 3)
    assert out.regularizers["mse"].grad_norm_weighted == pytest.approx(math.sqrt(5))
    assert out.regularizers["l1"].grad_norm == pytest.approx(math.sqrt(2) / 3)


def test_readme_example_runs(registry, capsys):
    ns = tinkex.testing.run_readme_example(Path(__file__).parents[1] / "README.md")
    assert ns["loss"].item() == pytest.approx(0.5)
    assert ns["logprobs"][0].grad.tolist() == pytest.approx([1 / 3, 0.0, -1 / 3])
    expected = 1 - 11.5 / math.sqrt(14 * 10.25)
    assert ns["out"].regularizers["consistency"].value == pytest.approx(expected, rel=1e-5)
    assert "RegularizerOutput(" in capsys.readouterr().out
