"""Tests of tinkex-reg-kl (each estimator, clipping, metrics, masks, references, gradients, errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tinkex_reg_kl
import torch
from tinkex_reg_kl import KL

import tinkex
import tinkex.testing

E = math.e
LP = [-1.0, -2.0]
REF = [-2.0, -1.0]  # r = ref - lp = [-1, 1]


def datum(
    ref: list[float] | None, weights: list[float] | None = None, key: str = "reference_logprobs"
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


# --------------------------------------------------------------------------- estimators

# per-token values for r = [-1, 1], lp = [-1, -2]
PER_TOKEN = {
    "k1": [1.0, -1.0],
    "k2": [0.5, 0.5],
    "k3": [math.exp(-1) + 1 - 1, E - 1 - 1],
    "pointwise": [math.exp(-1) * 1.0, math.exp(-2) * -1.0],
}
# d(mean)/dlp for r = [-1, 1]: k1: 1/n; k2: -r/n; k3: -(e^r - 1)/n; pointwise: e^lp (1 - r)/n
GRADS = {
    "k1": [0.5, 0.5],
    "k2": [0.5, -0.5],
    "k3": [-(math.exp(-1) - 1) / 2, -(E - 1) / 2],
    "pointwise": [math.exp(-1) * 2 / 2, math.exp(-2) * 0 / 2],
}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "pointwise"])
def test_each_estimator_by_hand(estimator):
    loss, metrics, grad = run(KL(estimator=estimator))
    per_token = PER_TOKEN[estimator]
    assert loss == pytest.approx(sum(per_token) / 2)
    assert metrics == pytest.approx(
        {"kl": loss, "kl_max": max(per_token), "kl_min": min(per_token)}
    )
    assert all(type(v) is float for v in metrics.values())
    torch.testing.assert_close(grad, torch.tensor(GRADS[estimator], dtype=torch.float64))


def test_default_is_k3_on_reference_logprobs():
    reg = KL()
    assert (reg.estimator, reg.reference, reg.clip, reg.mask) == (
        "k3",
        "reference_logprobs",
        100.0,
        "weights",
    )
    assert run(reg)[0] == pytest.approx((math.exp(-1) + E - 2) / 2)


def test_identical_policy_and_reference_give_zero():
    for estimator in ("k1", "k2", "k3", "pointwise"):
        loss, metrics, grad = run(KL(estimator=estimator), LP, LP)
        assert loss == 0.0 and metrics == {"kl": 0.0, "kl_max": 0.0, "kl_min": 0.0}
        if estimator in ("k2", "k3"):
            assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))  # minimum


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "pointwise"])
def test_clip_bounds_the_log_ratio_and_stops_its_gradient(estimator):
    loss, metrics, grad = run(KL(estimator=estimator, clip=0.5))  # r = [-0.5, 0.5]
    r = [-0.5, 0.5]
    per_token = {
        "k1": [0.5, -0.5],
        "k2": [0.125, 0.125],
        "k3": [math.exp(-0.5) + 0.5 - 1, math.exp(0.5) - 0.5 - 1],
        "pointwise": [-math.exp(lp) * ri for lp, ri in zip(LP, r, strict=True)],
    }[estimator]
    assert loss == pytest.approx(sum(per_token) / 2)
    assert metrics["kl_max"] == pytest.approx(max(per_token))
    assert metrics["kl_min"] == pytest.approx(min(per_token))
    # both tokens are clipped: r is constant, so only pointwise's exp(lp) factor has a gradient
    expected = (
        [-math.exp(lp) * ri / 2 for lp, ri in zip(LP, r, strict=True)]
        if estimator == "pointwise"
        else [0.0, 0.0]
    )
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64))


def test_clip_only_touches_tokens_beyond_it():
    # r = [-0.2, 3.0], clip = 1: the first token is untouched, the second clipped to 1
    loss, _, grad = run(KL(estimator="k2", clip=1.0), [-1.0, -3.0], [-1.2, 0.0])
    assert loss == pytest.approx((0.02 + 0.5) / 2)
    torch.testing.assert_close(grad, torch.tensor([0.1, 0.0], dtype=torch.float64))
    loss_inf, _, _ = run(KL(estimator="k2", clip=math.inf), [-1.0, -3.0], [-1.2, 0.0])
    assert loss_inf == pytest.approx((0.02 + 4.5) / 2)


def test_mean_is_over_counted_tokens_of_the_whole_batch():
    data = [datum([-2.0, -1.0], [1.0, 1.0]), datum([0.0, -3.0, -1.0], [0.0, 1.0, 0.0])]
    lps = [torch.tensor([-1.0, -2.0]), torch.tensor([5.0, -1.0, 7.0])]
    loss, metrics = KL(estimator="k1")(data, lps)
    # counted r: [-1, 1, -2] -> k1: [1, -1, 2]
    assert loss.item() == pytest.approx(2.0 / 3)
    assert metrics == pytest.approx({"kl": 2.0 / 3, "kl_max": 2.0, "kl_min": -1.0})


# --------------------------------------------------------------------------- masks and layouts

ALL = [KL(), KL(estimator="k1"), KL(estimator="k2", clip=0.75), KL(estimator="pointwise")]


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_masked_tokens_change_neither_value_nor_gradient(reg):
    weights = [1.0, 0.0, 1.0]
    la, ma, ga = run(reg, [-1.0, -2.0, -0.5], [-1.5, -1.0, -0.25], weights)
    lb, mb, gb = run(reg, [-1.0, -9.0, -0.5], [-1.5, 4.0, -0.25], weights)
    lc, mc, _ = run(reg, [-1.0, -0.5], [-1.5, -0.25])
    assert la == pytest.approx(lb) and la == pytest.approx(lc)
    assert ma == pytest.approx(mb) and ma == pytest.approx(mc)
    assert ga[1].item() == 0.0 and gb[1].item() == 0.0
    torch.testing.assert_close(ga, gb)


def test_mask_none_counts_every_token():
    loss, _, _ = run(KL(estimator="k1", mask=None), LP, REF, [1.0, 0.0])
    assert loss == pytest.approx(0.0)  # (1 + -1) / 2, not 1


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_three_logprob_layouts_agree(reg):
    rows = [[-1.0, -2.0, -0.5], [-3.0, -0.25, -4.0]]
    data = [datum([-1.5, -1.0, -0.2], [1.0, 1.0, 0.0]), datum([-2.0, -0.5, -4.5])]
    as_list, m_list = reg(data, [torch.tensor(r) for r in rows])
    as_matrix, m_matrix = reg(data, torch.tensor(rows))
    assert as_list.item() == pytest.approx(as_matrix.item())
    assert m_list == pytest.approx(m_matrix)
    one_list, _ = reg([data[1]], [torch.tensor(rows[1])])
    one_tensor, _ = reg([data[1]], torch.tensor(rows[1]))
    assert one_list.item() == pytest.approx(one_tensor.item())


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_empty_selection_gives_zero_not_nan(reg):
    loss, metrics, grad = run(reg, LP, REF, [0.0, 0.0])
    assert loss == 0.0 and metrics == {"kl": 0.0, "kl_max": 0.0, "kl_min": 0.0}
    assert torch.equal(grad, torch.zeros(2, dtype=torch.float64))


def test_custom_reference_key():
    reg = KL(reference="base_logprobs", estimator="k2")
    loss, _ = reg([datum(REF, key="base_logprobs")], [leaf(LP)])
    assert loss.item() == pytest.approx(0.5)
    with pytest.raises(tinkex.SpecError, match="'base_logprobs'"):
        reg([datum(REF)], [leaf(LP)])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("reg", [*ALL, KL(estimator="k3", clip=0.5)], ids=repr)
def test_gradcheck_float64(reg):
    data = [datum([-1.4, -0.2, -2.0], [1.0, 0.0, 1.0]), datum([-0.1, -2.9])]
    a = leaf([-0.7, -1.3, -2.6])
    b = leaf([-0.4, -3.2])
    assert torch.autograd.gradcheck(lambda x, y: reg(data, [x, y])[0], (a, b))


def test_usable_as_a_plain_tinker_loss_fn():
    lp = torch.tensor(LP)
    loss, metrics = KL(estimator="k2")([datum(REF)], [lp.requires_grad_()])
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([0.5, -0.5]))
    assert metrics["kl"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- data and errors


def test_accepts_tinker_sdk_datums():
    tinker = pytest.importorskip("tinker")
    sdk = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "weights": tinker.TensorData.from_torch(torch.tensor([1.0, 0.0, 1.0])),
            "reference_logprobs": tinker.TensorData.from_torch(torch.tensor([-2.0, 0.0, -1.0])),
        },
    )
    lp = [torch.tensor([-1.0, -5.0, -2.0], dtype=torch.float64)]
    for reg in ALL:
        ours, m_ours = reg([datum([-2.0, 0.0, -1.0], [1.0, 0.0, 1.0])], lp)
        theirs, m_theirs = reg([sdk], lp)
        assert ours.item() == pytest.approx(theirs.item())
        assert m_ours == pytest.approx(m_theirs)
        assert theirs.dtype == torch.float64  # the float32 reference follows the logprobs


def test_missing_reference_names_datum_key_and_shape():
    data = [datum(REF), datum(None, [1.0, 1.0, 1.0])]
    with pytest.raises(tinkex.SpecError) as info:
        KL()(data, [torch.zeros(2), torch.zeros(3)])
    message = str(info.value)
    assert "'kl'" in message and "datum 1" in message and "'reference_logprobs'" in message
    assert "(3,)" in message


def test_reference_shape_mismatch_names_datum_key_and_shape():
    data = [datum(REF), datum([-1.0, -1.0])]
    with pytest.raises(tinkex.SpecError) as info:
        KL()(data, [torch.zeros(2), torch.zeros(3)])
    message = str(info.value)
    assert "datum 1" in message and "'reference_logprobs'" in message
    assert "has shape (2,), expected (3,)" in message


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"estimator": "k4"}, "estimator"),
        ({"estimator": "K3"}, "estimator"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"clip": float("nan")}, "clip"),
        ({"clip": "big"}, "clip"),
        ({"reference": ""}, "reference"),
        ({"reference": 3}, "reference"),
        ({"mask": True}, "mask"),
    ],
)
def test_parameter_validation_names_regularizer_and_parameter(params, parameter):
    with pytest.raises(tinkex.SpecError) as info:
        KL(**params)
    assert f"parameter {parameter!r} of regularizer 'kl'" in str(info.value)


def test_repr_and_class_contract():
    assert (
        repr(KL())
        == "KL(reference='reference_logprobs', estimator='k3', clip=100.0, mask='weights')"
    )
    tinkex.testing.check_regularizer_class(KL)
    with pytest.raises(TypeError):
        KL("ref")  # type: ignore[misc]


# --------------------------------------------------------------------------- plugin wiring


@pytest.fixture
def registry():
    """The real plugin registry (entry points), whatever the developer's TINKEX_* variables say."""
    with tinkex.testing.installed_plugins():
        yield


def test_wiring_entry_point_distribution_and_hook():
    tinkex.testing.check_plugin_module(
        tinkex_reg_kl, distribution="tinkex-reg-kl", entry_point="kl", registers=[KL]
    )


def test_two_kl_terms_through_the_registry(registry):
    sft = tinkex.regularizer("kl", weight=0.1, name="kl_sft")
    base = tinkex.regularizer("kl", weight=0.05, name="kl_base", reference="base_logprobs")
    assert isinstance(sft.fn, KL) and isinstance(base.fn, KL)
    assert (sft.name, sft.fn.reference) == ("kl_sft", "reference_logprobs")
    assert (base.name, base.fn.reference) == ("kl_base", "base_logprobs")


async def test_composes_through_compute_loss():
    def base(data, logprobs):
        return -logprobs[0].sum(), {}

    data = [
        tinkex.Datum(
            model_input=[1, 2],
            loss_fn_inputs={"reference_logprobs": REF, "base_logprobs": [-1.5, -2.0]},
        )
    ]
    specs = [
        tinkex.RegularizerSpec(fn=KL(estimator="k2"), weight=0.5, name="kl_sft"),
        tinkex.RegularizerSpec(
            fn=KL(estimator="k1", reference="base_logprobs"), weight=2.0, name="kl_base"
        ),
    ]
    out = await tinkex.compute_loss(
        data,
        [torch.tensor(LP, dtype=torch.float64)],
        base,
        regularizers=specs,
        track_grad_norms=True,
    )
    assert out.regularizers["kl_sft"].value == pytest.approx(0.5)
    assert out.regularizers["kl_sft"].custom == pytest.approx(
        {"kl": 0.5, "kl_max": 0.5, "kl_min": 0.5}
    )
    # k1 with r = [-0.5, 0]: mean(-r) = 0.25
    assert out.regularizers["kl_base"].value == pytest.approx(0.25)
    assert out.regularizer_total == pytest.approx(0.5 * 0.5 + 2.0 * 0.25)
    assert out.loss_total == pytest.approx(3.0 + 0.75)
    # k2 grad = -r/n = [0.5, -0.5]; k1 grad = 1/n = [0.5, 0.5]
    assert out.regularizers["kl_sft"].grad_norm == pytest.approx(math.sqrt(0.5))
    assert out.regularizers["kl_base"].grad_norm == pytest.approx(math.sqrt(0.5))
    assert out.regularizers["kl_base"].grad_norm_weighted == pytest.approx(2.0 * math.sqrt(0.5))


def test_readme_example_runs(registry, capsys):
    ns = tinkex.testing.run_readme_example(Path(__file__).parents[1] / "README.md")
    assert ns["loss"].item() == pytest.approx(0.5)
    assert ns["metrics"] == pytest.approx({"kl": 0.5, "kl_max": 0.5, "kl_min": 0.5})
    assert ns["logprobs"][0].grad.tolist() == pytest.approx([0.5, -0.5])
    assert ns["out"].regularizers["kl_sft"].value == pytest.approx((math.exp(-1) + math.e - 2) / 2)
    assert ns["out"].regularizers["kl_base"].value == pytest.approx((math.exp(1) - 1 - 1) / 2)
    assert "RegularizerOutput(" in capsys.readouterr().out
