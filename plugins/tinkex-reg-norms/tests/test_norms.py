"""Tests of tinkex-reg-norms: l1, l2, elastic_net (values, masks, layouts, gradients, errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tinkex_reg_norms
import torch
from tinkex_reg_norms import L1, L2, ElasticNet

import tinkex
import tinkex.testing

LP = [-1.0, -2.0, -3.0]


def datum(n: int, weights: list[float] | None = None) -> tinkex.Datum:
    inputs = {} if weights is None else {"weights": weights}
    return tinkex.Datum(model_input=list(range(n)), loss_fn_inputs=inputs)


def leaf(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def run(reg, values=LP, weights=None):
    lp = leaf(values)
    loss, metrics = reg([datum(len(values), weights)], [lp])
    return loss, metrics, lp


# --------------------------------------------------------------------------- worked values


@pytest.mark.parametrize(
    ("reg", "expected"),
    [
        (L1(), 6.0),
        (L1(reduction="mean"), 2.0),
        (L2(), 14.0),
        (L2(center="mean"), 2.0),
        (ElasticNet(l1_ratio=0.5), 10.0),
    ],
)
def test_worked_values_of_the_spec(reg, expected):
    loss, _, _ = run(reg)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected)


def test_metrics_are_plain_floats_with_the_documented_names():
    _, m1, _ = run(L1())
    _, m2, _ = run(L2(center="mean"))
    _, me, _ = run(ElasticNet())
    assert m1 == pytest.approx({"l1_raw": 6.0, "l1_mean": 2.0})
    assert m2 == pytest.approx({"l2_raw": 2.0, "l2_mean": 2.0 / 3})
    assert me == pytest.approx({"l1_raw": 6.0, "l2_raw": 14.0})
    for metrics in (m1, m2, me):
        assert all(type(v) is float for v in metrics.values())


def test_hand_computed_variants():
    probs = [math.exp(v) for v in LP]
    assert run(L1(target="probs"))[0].item() == pytest.approx(sum(probs))
    assert run(L1(target="probs", reduction="mean"))[0].item() == pytest.approx(sum(probs) / 3)
    assert run(L2(reduction="mean"))[0].item() == pytest.approx(14.0 / 3)
    assert run(L2(center=-2.0))[0].item() == pytest.approx(1.0 + 0.0 + 1.0)
    assert run(L2(center=1))[0].item() == pytest.approx(4.0 + 9.0 + 16.0)
    mean_p = sum(probs) / 3
    l2_probs = sum((p - mean_p) ** 2 for p in probs)
    loss, metrics, _ = run(L2(target="probs", center="mean", reduction="mean"))
    assert loss.item() == pytest.approx(l2_probs / 3)
    assert metrics == pytest.approx({"l2_raw": l2_probs, "l2_mean": l2_probs / 3})
    assert run(ElasticNet(l1_ratio=1.0))[0].item() == pytest.approx(6.0)
    assert run(ElasticNet(l1_ratio=0.0))[0].item() == pytest.approx(14.0)
    assert run(ElasticNet(l1_ratio=0.25))[0].item() == pytest.approx(0.25 * 6 + 0.75 * 14)
    assert run(ElasticNet(reduction="mean"))[0].item() == pytest.approx(10.0 / 3)
    loss, metrics, _ = run(ElasticNet(l1_ratio=0.5, target="probs"))
    assert loss.item() == pytest.approx(0.5 * sum(probs) + 0.5 * sum(p * p for p in probs))
    assert metrics == pytest.approx({"l1_raw": sum(probs), "l2_raw": sum(p * p for p in probs)})


# --------------------------------------------------------------------------- masks and layouts

ALL = [
    L1(),
    L1(reduction="mean", target="probs"),
    L2(),
    L2(center="mean", reduction="mean"),
    L2(center=0.5),
    ElasticNet(l1_ratio=0.3),
    ElasticNet(reduction="mean", target="probs"),
]


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_masked_tokens_change_neither_value_nor_gradient(reg):
    weights = [1.0, 0.0, 1.0]
    loss_a, _, lp_a = run(reg, [-1.0, -2.0, -3.0], weights)
    loss_b, _, lp_b = run(reg, [-1.0, -7.5, -3.0], weights)
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item())
    assert lp_a.grad[1].item() == 0.0
    assert lp_b.grad[1].item() == 0.0
    torch.testing.assert_close(lp_a.grad[[0, 2]], lp_b.grad[[0, 2]])
    # and equals the regularizer on the counted tokens alone
    loss_c, _, _ = run(reg, [-1.0, -3.0])
    assert loss_a.item() == pytest.approx(loss_c.item())


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_mask_none_counts_every_token(reg):
    params = {**reg.params(), "mask": None}
    unmasked = type(reg)(**params)
    loss_none, _, _ = run(unmasked, LP, [1.0, 0.0, 1.0])
    loss_all, _, _ = run(reg, LP)
    assert loss_none.item() == pytest.approx(loss_all.item())


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_three_logprob_layouts_agree(reg):
    rows = [[-1.0, -2.0, -0.5], [-3.0, -0.25, -4.0]]
    data = [datum(3, [1.0, 1.0, 0.0]), datum(3, [0.0, 1.0, 1.0])]
    as_list, _ = reg(data, [torch.tensor(r) for r in rows])
    as_matrix, _ = reg(data, torch.tensor(rows))
    as_tuple, _ = reg(data, tuple(torch.tensor(r) for r in rows))
    assert as_list.item() == pytest.approx(as_matrix.item())
    assert as_list.item() == pytest.approx(as_tuple.item())
    one_list, _ = reg([data[0]], [torch.tensor(rows[0])])
    one_tensor, _ = reg([data[0]], torch.tensor(rows[0]))
    assert one_list.item() == pytest.approx(one_tensor.item())


def test_mean_is_over_counted_tokens_of_the_whole_batch():
    data = [datum(2, [1.0, 1.0]), datum(3, [0.0, 0.0, 1.0])]
    loss, metrics = L1(reduction="mean")(
        data, [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0])]
    )
    assert loss.item() == pytest.approx((1 + 2 + 5) / 3)  # not the mean of per-datum means (2.25)
    assert metrics["l1_raw"] == pytest.approx(8.0)


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_empty_selection_gives_zero_not_nan(reg):
    loss, metrics, lp = run(reg, LP, [0.0, 0.0, 0.0])
    assert loss.item() == 0.0
    assert all(v == 0.0 for v in metrics.values())
    loss.backward()  # still attached to the graph
    assert torch.equal(lp.grad, torch.zeros(3))


# --------------------------------------------------------------------------- gradients


def test_analytic_gradients():
    lp_val = torch.tensor([-1.0, -2.0, -3.0])
    lp = leaf(LP)
    L1()([datum(3)], [lp])[0].backward()
    assert torch.allclose(lp.grad, torch.full((3,), -1.0))
    lp = leaf(LP)
    L1(target="probs", reduction="mean")([datum(3)], [lp])[0].backward()
    assert torch.allclose(lp.grad, lp_val.exp() / 3)
    lp = leaf(LP)
    L2()([datum(3)], [lp])[0].backward()
    assert torch.allclose(lp.grad, 2 * lp_val)
    lp = leaf(LP)
    L2(center="mean")([datum(3)], [lp])[0].backward()
    assert torch.allclose(lp.grad, 2 * (lp_val + 2.0))
    lp = leaf(LP)
    ElasticNet(l1_ratio=0.25)([datum(3)], [lp])[0].backward()
    assert torch.allclose(lp.grad, 0.25 * -1.0 + 0.75 * 2 * lp_val)


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_gradcheck_float64(reg):
    data = [datum(3, [1.0, 0.0, 1.0]), datum(2)]
    a = leaf([-0.7, -1.3, -2.1], torch.float64)
    b = leaf([-0.4, -3.2], torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: reg(data, [x, y])[0], (a, b))


def test_usable_as_a_plain_tinker_loss_fn():
    lp = torch.tensor(LP)
    loss, metrics = ElasticNet()([datum(3)], [lp.requires_grad_()])
    loss.backward()
    assert lp.grad is not None
    assert torch.allclose(lp.grad, 0.5 * -1.0 + 0.5 * 2 * torch.tensor(LP))
    assert isinstance(metrics, dict)


def test_float64_logprobs_give_float64_loss():
    loss, _ = L2()([datum(3, [1.0, 1.0, 1.0])], [torch.tensor(LP, dtype=torch.float64)])
    assert loss.dtype == torch.float64


# --------------------------------------------------------------------------- data and errors


def test_accepts_tinker_sdk_datums():
    tinker = pytest.importorskip("tinker")
    weights = torch.tensor([1.0, 0.0, 1.0])
    sdk = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"weights": tinker.TensorData.from_torch(weights)},
    )
    for reg in ALL:
        ours, _ = reg([datum(3, weights.tolist())], [torch.tensor(LP)])
        theirs, _ = reg([sdk], [torch.tensor(LP)])
        assert ours.item() == pytest.approx(theirs.item())


def test_weights_shape_mismatch_names_datum_key_and_shape():
    data = [datum(3), datum(3, [1.0, 1.0, 1.0])]
    with pytest.raises(tinkex.SpecError) as info:
        L1()(data, [torch.zeros(3), torch.zeros(4)])
    message = str(info.value)
    assert (
        "datum 1" in message and "'weights'" in message and "(4,)" in message and "'l1'" in message
    )


def test_datum_count_mismatch_is_an_error():
    with pytest.raises(tinkex.SpecError, match="2 datums but logprobs for 1"):
        L2()([datum(3), datum(3)], [torch.zeros(3)])


def test_bad_logprobs_layout_is_an_error():
    with pytest.raises(
        tinkex.SpecError,
        match=r"logprobs\[0\] \(datum 0\) must be a 1-D \(N,\) or 2-D \(N, K\) top-K tensor, "
        r"got shape \(3, 1, 1\)",
    ):
        L1()([datum(3)], [torch.zeros(3, 1, 1)])
    with pytest.raises(tinkex.SpecError, match="shape"):
        L1()([datum(3)], torch.zeros(1, 1, 3))


@pytest.mark.parametrize(
    ("cls", "params", "parameter"),
    [
        (L1, {"reduction": "max"}, "reduction"),
        (L1, {"target": "logits"}, "target"),
        (L1, {"mask": "all"}, "mask"),
        (L2, {"center": "median"}, "center"),
        (L2, {"center": float("nan")}, "center"),
        (L2, {"center": True}, "center"),
        (ElasticNet, {"l1_ratio": 1.5}, "l1_ratio"),
        (ElasticNet, {"l1_ratio": -0.1}, "l1_ratio"),
        (ElasticNet, {"l1_ratio": "half"}, "l1_ratio"),
        (ElasticNet, {"reduction": None}, "reduction"),
    ],
)
def test_parameter_validation_names_regularizer_and_parameter(cls, params, parameter):
    with pytest.raises(tinkex.SpecError) as info:
        cls(**params)
    assert f"parameter {parameter!r} of regularizer {cls.name!r}" in str(info.value)
    assert repr(next(iter(params.values()))) in str(info.value)


def test_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        L1("mean")  # type: ignore[misc]


def test_repr_and_class_contract():
    assert (
        repr(L2(center="mean"))
        == "L2(reduction='sum', target='logprobs', center='mean', mask='weights')"
    )
    for cls in (L1, L2, ElasticNet):
        tinkex.testing.check_regularizer_class(cls)
    assert (L1.name, L2.name, ElasticNet.name) == ("l1", "l2", "elastic_net")


# --------------------------------------------------------------------------- plugin wiring


@pytest.fixture
def registry():
    """The real plugin registry (entry points), whatever the developer's TINKEX_* variables say."""
    with tinkex.testing.installed_plugins():
        yield


def test_wiring_entry_point_distribution_and_hook():
    tinkex.testing.check_plugin_module(
        tinkex_reg_norms,
        distribution="tinkex-reg-norms",
        entry_point="norms",
        registers=[L1, L2, ElasticNet],
    )


def test_found_through_the_registry(registry):
    spec = tinkex.regularizer("l2", weight=0.5, name="spread", center="mean")
    assert isinstance(spec.fn, L2) and spec.fn.center == "mean" and spec.name == "spread"


async def test_composes_through_compute_loss():
    def base(data, logprobs):
        return torch.stack([lp.sum() for lp in logprobs]).sum().neg(), {}

    data = [datum(3, [1.0, 1.0, 0.0])]
    specs = [
        tinkex.RegularizerSpec(fn=L1(), weight=0.5, name="l1"),
        tinkex.RegularizerSpec(fn=L2(center="mean"), weight=2.0, name="l2c"),
    ]
    out = await tinkex.compute_loss(
        data, [torch.tensor(LP)], base, regularizers=specs, track_grad_norms=True
    )
    # counted tokens [-1, -2]: l1 = 3, l2 (centered) = 0.5
    assert out.regularizers["l1"].value == pytest.approx(3.0)
    assert out.regularizers["l1"].custom == pytest.approx({"l1_raw": 3.0, "l1_mean": 1.5})
    assert out.regularizers["l2c"].value == pytest.approx(0.5)
    assert out.regularizer_total == pytest.approx(0.5 * 3.0 + 2.0 * 0.5)
    assert out.base_loss.value == pytest.approx(6.0)
    # d l1 / d lp = [-1, -1, 0]; d l2c / d lp = 2 (x - mean) = [1, -1, 0]
    assert out.regularizers["l1"].grad_norm == pytest.approx(math.sqrt(2))
    assert out.regularizers["l2c"].grad_norm == pytest.approx(math.sqrt(2))
    assert out.regularizers["l2c"].grad_norm_weighted == pytest.approx(2 * math.sqrt(2))


def test_readme_example_runs(registry, capsys):
    ns = tinkex.testing.run_readme_example(Path(__file__).parents[1] / "README.md")
    assert ns["loss"].item() == pytest.approx(2.5)
    assert ns["logprobs"][0].grad.tolist() == pytest.approx([-1.0, -2.0, 0.0])
    assert ns["out"].regularizers["l2"].value == pytest.approx(0.5)
    assert "RegularizerOutput(" in capsys.readouterr().out
