"""Tests of tinkex-reg-entropy (values, modes, temperature, normalize, masks, gradients, errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tinkex_reg_entropy
import torch
from tinkex_reg_entropy import Entropy

import tinkex
import tinkex.testing

LP = [-1.0, -2.0, -3.0]


def datum(n: int, weights: list[float] | None = None) -> tinkex.Datum:
    inputs = {} if weights is None else {"weights": weights}
    return tinkex.Datum(model_input=list(range(n)), loss_fn_inputs=inputs)


def leaf(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def softmax_entropy(values: list[float], temperature: float = 1.0) -> float:
    """Reference: −Σ q log q with q = softmax(values / T), in plain Python."""
    z = [v / temperature for v in values]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return -sum(math.exp(v - lse) * (v - lse) for v in z if v - lse > -50)


def run(reg, rows, weights=None):
    weights = weights or [None] * len(rows)
    lps = [leaf(r) for r in rows]
    loss, metrics = reg([datum(len(r), w) for r, w in zip(rows, weights, strict=True)], lps)
    return loss, metrics, lps


# --------------------------------------------------------------------------- values


def test_uniform_two_tokens_is_log_two():
    loss, metrics, _ = run(Entropy(), [[0.0, 0.0]])
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics == {"entropy": pytest.approx(math.log(2))}


def test_hand_computed_value():
    q = [math.exp(v) / sum(math.exp(u) for u in LP) for v in LP]
    expected = -sum(p * math.log(p) for p in q)
    assert expected == pytest.approx(0.8323956, rel=1e-6)  # by hand, once
    loss, metrics, _ = run(Entropy(), [LP])
    assert loss.item() == pytest.approx(expected)
    assert loss.dim() == 0 and type(metrics["entropy"]) is float


def test_maximize_negates_the_loss_but_not_the_metric():
    loss, metrics, _ = run(Entropy(mode="maximize"), [LP])
    assert loss.item() == pytest.approx(-softmax_entropy(LP))
    assert metrics["entropy"] == pytest.approx(softmax_entropy(LP))


@pytest.mark.parametrize("temperature", [0.5, 2.0, 10.0])
def test_temperature_divides_the_logprobs(temperature):
    loss, _, _ = run(Entropy(temperature=temperature), [LP])
    assert loss.item() == pytest.approx(softmax_entropy(LP, temperature))
    # a hotter softmax is flatter
    assert (loss.item() > softmax_entropy(LP)) == (temperature > 1)


def test_normalize_divides_by_log_n():
    loss, _, _ = run(Entropy(normalize=True), [LP])
    assert loss.item() == pytest.approx(softmax_entropy(LP) / math.log(3))
    loss, _, _ = run(Entropy(normalize=True), [[-0.7, -0.7, -0.7, -0.7]])
    assert loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("normalize", [False, True])
def test_single_counted_token_gives_zero(normalize):
    loss, metrics, lps = run(Entropy(normalize=normalize), [[-1.0, -2.0]], [[0.0, 1.0]])
    assert loss.item() == 0.0 and metrics["entropy"] == 0.0
    loss.backward()
    assert torch.equal(lps[0].grad, torch.zeros(2, dtype=torch.float64))


def test_mean_over_datums_with_counted_tokens():
    rows = [LP, [0.0, 0.0], [-1.0, -1.0, -5.0], [-2.0]]
    weights = [None, None, [0.0, 0.0, 0.0], None]  # datum 2 has no counted token: left out
    loss, _, _ = run(Entropy(), rows, weights)
    # datum 3 has one counted token (H = 0) and counts in the mean
    assert loss.item() == pytest.approx((softmax_entropy(LP) + math.log(2) + 0.0) / 3)
    loss, _, _ = run(Entropy(normalize=True), rows, weights)
    assert loss.item() == pytest.approx((softmax_entropy(LP) / math.log(3) + 1.0 + 0.0) / 3)


def test_terms_with_log_q_below_minus_50_are_dropped():
    # q = softmax([0, -60]): log q_2 ≈ -60 is dropped. Its term -q_2 log q_2 ≈ 60·e^-60
    # is invisible next to float rounding, but its gradient is not: with the term,
    # dH/dlp_2 = -q_2 (log q_2 + H) ≈ 60·e^-60; without it, only q_1's dependence on
    # lp_2 is left: q_1 q_2 (log q_1 + 1) ≈ e^-60.
    loss, _, (lp,) = run(Entropy(), [[0.0, -60.0]])
    loss.backward()
    assert lp.grad[1].item() == pytest.approx(math.exp(-60.0), rel=1e-6)
    # at T = 2 the same logprobs give log q_2 ≈ -30: kept, in the value and the gradient
    loss_t, _, (lp_t,) = run(Entropy(temperature=2.0), [[0.0, -60.0]])
    assert loss_t.item() == pytest.approx(softmax_entropy([0.0, -60.0], 2.0), rel=1e-6)
    assert loss_t.item() == pytest.approx(31.0 * math.exp(-30.0), rel=1e-3)
    loss_t.backward()
    assert lp_t.grad[1].item() == pytest.approx(30.0 * math.exp(-30.0) / 2.0, rel=1e-3)


# --------------------------------------------------------------------------- masks and layouts

ALL = [
    Entropy(),
    Entropy(mode="maximize", temperature=0.7),
    Entropy(normalize=True, temperature=3.0),
]


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_masked_tokens_change_neither_value_nor_gradient(reg):
    weights = [[1.0, 0.0, 1.0, 1.0]]
    loss_a, _, (a,) = run(reg, [[-1.0, -2.0, -3.0, -0.5]], weights)
    loss_b, _, (b,) = run(reg, [[-1.0, -0.01, -3.0, -0.5]], weights)
    loss_c, _, _ = run(reg, [[-1.0, -3.0, -0.5]])  # the counted tokens alone
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item())
    assert loss_a.item() == pytest.approx(loss_c.item())
    assert a.grad[1].item() == 0.0 and b.grad[1].item() == 0.0
    torch.testing.assert_close(a.grad, b.grad)


def test_mask_none_counts_every_token():
    loss, _, _ = run(Entropy(mask=None), [LP], [[1.0, 0.0, 0.0]])
    assert loss.item() == pytest.approx(softmax_entropy(LP))


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_three_logprob_layouts_agree(reg):
    rows = [[-1.0, -2.0, -0.5], [-3.0, -0.25, -4.0]]
    data = [datum(3, [1.0, 1.0, 0.0]), datum(3)]
    as_list, _ = reg(data, [torch.tensor(r) for r in rows])
    as_matrix, _ = reg(data, torch.tensor(rows))
    assert as_list.item() == pytest.approx(as_matrix.item())
    one_list, _ = reg([data[1]], [torch.tensor(rows[1])])
    one_tensor, _ = reg([data[1]], torch.tensor(rows[1]))
    assert one_list.item() == pytest.approx(one_tensor.item())


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_empty_selection_gives_zero_not_nan(reg):
    loss, metrics, lps = run(reg, [LP, [-1.0]], [[0.0, 0.0, 0.0], [0.0]])
    assert loss.item() == 0.0 and metrics["entropy"] == 0.0
    loss.backward()
    assert torch.equal(lps[0].grad, torch.zeros(3, dtype=torch.float64))
    assert reg([], [])[0].item() == 0.0


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_analytic_gradient(temperature):
    # dH/dlp_i = -q_i (log q_i + H) / T
    values = [-0.3, -1.1, -2.6, -0.9]
    loss, _, (lp,) = run(Entropy(temperature=temperature), [values])
    loss.backward()
    z = torch.tensor(values, dtype=torch.float64) / temperature
    log_q = torch.log_softmax(z, dim=0)
    h = -(log_q.exp() * log_q).sum()
    torch.testing.assert_close(lp.grad, -log_q.exp() * (log_q + h) / temperature)


@pytest.mark.parametrize("reg", ALL, ids=repr)
def test_gradcheck_float64(reg):
    data = [datum(4, [1.0, 0.0, 1.0, 1.0]), datum(2), datum(1)]
    a = leaf([-0.7, -1.3, -2.1, -0.2])
    b = leaf([-0.4, -3.2])
    c = leaf([-1.5])
    assert torch.autograd.gradcheck(lambda x, y, w: reg(data, [x, y, w])[0], (a, b, c))


def test_usable_as_a_plain_tinker_loss_fn():
    lp = torch.tensor([0.0, -1.0])
    loss, metrics = Entropy(mode="maximize")([datum(2)], [lp.requires_grad_()])
    loss.backward()
    assert (
        lp.grad is not None and lp.grad[0] > 0 > lp.grad[1]
    )  # maximizing flattens: raise the low one
    assert metrics["entropy"] == pytest.approx(softmax_entropy([0.0, -1.0]))


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
    with pytest.raises(tinkex.SpecError) as info:
        Entropy()([datum(3), datum(2, [1.0, 1.0])], [torch.zeros(3), torch.zeros(5)])
    message = str(info.value)
    assert "datum 1" in message and "'weights'" in message and "(5,)" in message


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"mode": "min"}, "mode"),
        ({"normalize": 1}, "normalize"),
        ({"mask": "weight"}, "mask"),
    ],
)
def test_parameter_validation_names_regularizer_and_parameter(params, parameter):
    with pytest.raises(tinkex.SpecError) as info:
        Entropy(**params)
    assert f"parameter {parameter!r} of regularizer 'entropy'" in str(info.value)


def test_temperature_message_is_exact():
    with pytest.raises(
        tinkex.SpecError,
        match=r"^parameter 'temperature' of regularizer 'entropy' must be > 0, got -1\.0$",
    ):
        Entropy(temperature=-1.0)


def test_repr_and_class_contract():
    assert (
        repr(Entropy())
        == "Entropy(mode='minimize', temperature=1.0, normalize=False, mask='weights')"
    )
    tinkex.testing.check_regularizer_class(Entropy)
    with pytest.raises(TypeError):
        Entropy("maximize")  # type: ignore[misc]


# --------------------------------------------------------------------------- plugin wiring


@pytest.fixture
def registry():
    """The real plugin registry (entry points), whatever the developer's TINKEX_* variables say."""
    with tinkex.testing.installed_plugins():
        yield


def test_wiring_entry_point_distribution_and_hook():
    tinkex.testing.check_plugin_module(
        tinkex_reg_entropy,
        distribution="tinkex-reg-entropy",
        entry_point="entropy",
        registers=[Entropy],
    )


def test_found_through_the_registry(registry):
    spec = tinkex.regularizer("entropy", weight=0.01, mode="maximize")
    assert isinstance(spec.fn, Entropy) and spec.fn.mode == "maximize" and spec.name == "entropy"


async def test_composes_through_compute_loss():
    def base(data, logprobs):
        return -logprobs[0].sum(), {}

    values = [0.0, -1.0, -9.0]
    data = [datum(3, [1.0, 1.0, 0.0])]
    specs = [
        tinkex.RegularizerSpec(fn=Entropy(), weight=0.5, name="sharpen"),
        tinkex.RegularizerSpec(
            fn=Entropy(mode="maximize", normalize=True), weight=0.1, name="flatten"
        ),
    ]
    out = await tinkex.compute_loss(
        data,
        [torch.tensor(values, dtype=torch.float64)],
        base,
        regularizers=specs,
        track_grad_norms=True,
    )
    h = softmax_entropy([0.0, -1.0])
    assert out.regularizers["sharpen"].value == pytest.approx(h)
    assert out.regularizers["sharpen"].custom == {"entropy": pytest.approx(h)}
    assert out.regularizers["flatten"].value == pytest.approx(-h / math.log(2))
    assert out.regularizer_total == pytest.approx(0.5 * h - 0.1 * h / math.log(2))
    assert out.loss_total == pytest.approx(10.0 + 0.5 * h - 0.1 * h / math.log(2))
    # analytic gradient norm of H on the two counted tokens (the masked one gets 0)
    q = torch.softmax(torch.tensor([0.0, -1.0], dtype=torch.float64), 0)
    grad = -q * (q.log() + h)
    assert out.regularizers["sharpen"].grad_norm == pytest.approx(grad.norm().item())
    assert out.regularizers["flatten"].grad_norm == pytest.approx(grad.norm().item() / math.log(2))


def test_readme_example_runs(registry, capsys):
    ns = tinkex.testing.run_readme_example(Path(__file__).parents[1] / "README.md")
    assert ns["loss"].item() == pytest.approx(1.0)
    assert ns["logprobs"][0].grad.tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert ns["out"].regularizers["entropy"].value == pytest.approx(-1.0)
    assert "RegularizerOutput(" in capsys.readouterr().out
