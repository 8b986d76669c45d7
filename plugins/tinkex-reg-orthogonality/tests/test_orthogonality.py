"""Tests of tinkex-reg-orthogonality (soft and hard Gram penalties; masks, padding, gradients, errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinkex_reg_orthogonality
import torch
from tinkex_reg_orthogonality import Orthogonality

import tinkex
import tinkex.testing


def datum(n: int, weights: list[float] | None = None) -> tinkex.Datum:
    inputs = {} if weights is None else {"weights": weights}
    return tinkex.Datum(model_input=list(range(n)), loss_fn_inputs=inputs)


def leaf(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def run(reg, rows, weights=None):
    weights = weights or [None] * len(rows)
    lps = [leaf(r) for r in rows]
    loss, metrics = reg([datum(len(r), w) for r, w in zip(rows, weights, strict=True)], lps)
    loss.backward()
    return loss.item(), metrics, [x.grad for x in lps]


def np_matrix(rows, weights=None) -> np.ndarray:
    """Independent construction of X: uncounted -> 0 in place, right-padded with 0."""
    width = max(len(r) for r in rows)
    x = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        w = (weights or [None] * len(rows))[i]
        x[i, : len(r)] = [v if (w is None or w[j] > 0) else 0.0 for j, v in enumerate(r)]
    return x


def np_soft(x: np.ndarray) -> float:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    g = u @ u.T
    return float((g**2).sum() - (np.diag(g) ** 2).sum())


def np_hard(x: np.ndarray) -> float:
    return float(((x @ x.T - np.eye(len(x))) ** 2).sum())


# --------------------------------------------------------------------------- values

ROWS = [[-1.0, -1.0], [-1.0, 0.0, -1.0]]


def test_worked_values():
    assert run(Orthogonality(), ROWS)[0] == pytest.approx(0.5)  # cosine 1/2, twice, squared
    assert run(Orthogonality(mode="hard"), ROWS)[0] == pytest.approx(4.0)  # G = [[2, 1], [1, 2]]


def test_orthogonal_rows():
    rows = [[-1.0, -2.0], [-2.0, 1.0]]
    assert run(Orthogonality(), rows)[0] == pytest.approx(0.0, abs=1e-12)
    assert run(Orthogonality(mode="hard"), rows)[0] == pytest.approx(2 * (5 - 1) ** 2)
    orthonormal = [[0.6, -0.8], [-0.8, -0.6]]
    assert run(Orthogonality(mode="hard"), orthonormal)[0] == pytest.approx(0.0, abs=1e-12)


def test_metric_is_the_loss_as_a_plain_float():
    for mode in ("soft", "hard"):
        loss, metrics, _ = run(Orthogonality(mode=mode), ROWS)
        assert metrics == {"orthogonality": pytest.approx(loss)}
        assert type(metrics["orthogonality"]) is float


def test_against_an_independent_numpy_formula():
    rng = np.random.default_rng(0)
    rows = [list(-rng.random(n) * 3) for n in (4, 2, 5, 3)]
    weights = [[1.0, 0.0, 1.0, 1.0], None, [0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    x = np_matrix(rows, weights)
    assert run(Orthogonality(), rows, weights)[0] == pytest.approx(np_soft(x))
    assert run(Orthogonality(mode="hard"), rows, weights)[0] == pytest.approx(np_hard(x))


def test_one_datum():
    assert run(Orthogonality(), [[-1.0, -2.0]])[0] == 0.0
    assert run(Orthogonality(mode="hard"), [[-1.0, -2.0]])[0] == pytest.approx((5 - 1) ** 2)


def test_soft_ignores_scale():
    scaled = [[3 * v for v in ROWS[0]], ROWS[1]]
    assert run(Orthogonality(), scaled)[0] == pytest.approx(0.5)


# --------------------------------------------------------------------------- masks, padding and layouts


def test_masked_tokens_are_zeroed_in_place_not_removed():
    # [-1, -5, -1] with the middle token masked is [-1, 0, -1]: cosine with [-1, -1, 0] is 1/2.
    # Removing the token instead would give [-1, -1] and a cosine of 1.
    loss, _, _ = run(Orthogonality(), [[-1.0, -5.0, -1.0], [-1.0, -1.0]], [[1.0, 0.0, 1.0], None])
    assert loss == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_masked_tokens_change_neither_value_nor_gradient(mode):
    weights = [[1.0, 0.0, 1.0], None]
    la, _, ga = run(Orthogonality(mode=mode), [[-1.0, -5.0, -0.5], [-1.0, -2.0]], weights)
    lb, _, gb = run(Orthogonality(mode=mode), [[-1.0, -0.1, -0.5], [-1.0, -2.0]], weights)
    lc, _, _ = run(Orthogonality(mode=mode), [[-1.0, 0.0, -0.5], [-1.0, -2.0]])
    assert la == pytest.approx(lb) and la == pytest.approx(lc)
    assert ga[0][1].item() == 0.0 and gb[0][1].item() == 0.0
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_mask_none_counts_every_token():
    rows = [[-1.0, -5.0, -1.0], [-1.0, -1.0]]
    loss, _, _ = run(Orthogonality(mask=None), rows, [[1.0, 0.0, 1.0], None])
    assert loss == pytest.approx(np_soft(np_matrix(rows)))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_zero_rows_stay_zero_without_nan(mode):
    # datum 1 has no counted token: a zero row, with a finite (zero) gradient
    rows = [[-1.0, -2.0], [-0.5, -0.5, -0.5], [-2.0, 1.0]]
    weights = [None, [0.0, 0.0, 0.0], None]
    loss, _, grads = run(Orthogonality(mode=mode), rows, weights)
    x = np_matrix(rows, weights)
    assert loss == pytest.approx(np_soft(x) if mode == "soft" else np_hard(x))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[1], torch.zeros(3, dtype=torch.float64))
    if mode == "soft":
        assert loss == pytest.approx(0.0, abs=1e-12)  # the other two rows are orthogonal
    else:
        assert loss == pytest.approx(16.0 + 1.0 + 16.0)  # the zero row's diagonal: (0 - 1)²


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_three_logprob_layouts_agree(mode):
    reg = Orthogonality(mode=mode)
    rows = [[-1.0, -2.0, -0.5], [-3.0, -0.25, -4.0]]
    data = [datum(3, [1.0, 1.0, 0.0]), datum(3)]
    as_list, _ = reg(data, [torch.tensor(r) for r in rows])
    as_matrix, _ = reg(data, torch.tensor(rows))
    assert as_list.item() == pytest.approx(as_matrix.item())
    one_list, _ = reg([data[1]], [torch.tensor(rows[1])])
    one_tensor, _ = reg([data[1]], torch.tensor(rows[1]))
    assert one_list.item() == pytest.approx(one_tensor.item())


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_empty_selection_gives_zero_not_nan(mode):
    loss, metrics, grads = run(Orthogonality(mode=mode), ROWS, [[0.0, 0.0], [0.0, 0.0, 0.0]])
    assert loss == 0.0 and metrics == {"orthogonality": 0.0}
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert Orthogonality(mode=mode)([], [])[0].item() == 0.0


# --------------------------------------------------------------------------- gradients


def test_hard_analytic_gradient():
    # L = ‖X Xᵀ − I‖², dL/dX = 4 (G − I) X
    rows = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
    _, _, grads = run(Orthogonality(mode="hard"), rows)
    x = torch.tensor(rows, dtype=torch.float64)
    expected = 4 * (x @ x.T - torch.eye(2, dtype=torch.float64)) @ x
    torch.testing.assert_close(torch.stack(grads), expected)


def test_soft_analytic_gradient_for_two_rows():
    # L = 2 c², c = cos(a, b); dL/da = 4 c (b/(|a||b|) − c a/|a|²)
    rows = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
    _, _, grads = run(Orthogonality(), rows)
    a, b = (torch.tensor(r, dtype=torch.float64) for r in rows)
    c = a @ b / (a.norm() * b.norm())
    torch.testing.assert_close(
        grads[0], 4 * c * (b / (a.norm() * b.norm()) - c * a / a.norm() ** 2)
    )


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradcheck_float64(mode):
    reg = Orthogonality(mode=mode)
    data = [datum(4, [1.0, 0.0, 1.0, 1.0]), datum(2), datum(3, [0.0, 0.0, 0.0])]
    a = leaf([-0.7, -1.3, -2.6, -0.2])
    b = leaf([-0.4, -3.2])
    c = leaf([-1.0, -2.0, -3.0])
    assert torch.autograd.gradcheck(lambda x, y, z: reg(data, [x, y, z])[0], (a, b, c))


def test_usable_as_a_plain_tinker_loss_fn():
    lps = [torch.tensor(r) for r in ROWS]
    loss, metrics = Orthogonality(mode="hard")(
        [datum(2), datum(3)], [lp.requires_grad_() for lp in lps]
    )
    loss.backward()
    assert torch.allclose(lps[0].grad, torch.tensor([-8.0, -4.0]))
    assert torch.allclose(lps[1].grad, torch.tensor([-8.0, -4.0, -4.0]))
    assert metrics["orthogonality"] == pytest.approx(4.0)


# --------------------------------------------------------------------------- data and errors


def test_accepts_tinker_sdk_datums():
    tinker = pytest.importorskip("tinker")
    sdk = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={"weights": tinker.TensorData.from_torch(torch.tensor([1.0, 0.0, 1.0]))},
        ),
        tinker.Datum(model_input=tinker.ModelInput.from_ints([5, 6])),
    ]
    lps = [torch.tensor([-1.0, -5.0, -1.0]), torch.tensor([-1.0, -1.0])]
    for mode in ("soft", "hard"):
        ours, _ = Orthogonality(mode=mode)([datum(3, [1.0, 0.0, 1.0]), datum(2)], lps)
        theirs, _ = Orthogonality(mode=mode)(sdk, lps)
        assert ours.item() == pytest.approx(theirs.item())


def test_weights_shape_mismatch_names_datum_key_and_shape():
    with pytest.raises(tinkex.SpecError) as info:
        Orthogonality()([datum(2), datum(3, [1.0, 1.0, 1.0])], [torch.zeros(2), torch.zeros(2)])
    message = str(info.value)
    assert "'orthogonality'" in message and "datum 1" in message and "'weights'" in message
    assert "has shape (3,), expected (2,)" in message


@pytest.mark.parametrize(
    ("params", "parameter"),
    [({"mode": "strict"}, "mode"), ({"mode": None}, "mode"), ({"mask": "tokens"}, "mask")],
)
def test_parameter_validation_names_regularizer_and_parameter(params, parameter):
    with pytest.raises(tinkex.SpecError) as info:
        Orthogonality(**params)
    assert f"parameter {parameter!r} of regularizer 'orthogonality'" in str(info.value)


def test_repr_and_class_contract():
    assert repr(Orthogonality(mode="hard")) == "Orthogonality(mode='hard', mask='weights')"
    tinkex.testing.check_regularizer_class(Orthogonality)
    with pytest.raises(TypeError):
        Orthogonality("hard")  # type: ignore[misc]


# --------------------------------------------------------------------------- plugin wiring


@pytest.fixture
def registry():
    """The real plugin registry (entry points), whatever the developer's TINKEX_* variables say."""
    with tinkex.testing.installed_plugins():
        yield


def test_wiring_entry_point_distribution_and_hook():
    tinkex.testing.check_plugin_module(
        tinkex_reg_orthogonality,
        distribution="tinkex-reg-orthogonality",
        entry_point="orthogonality",
        registers=[Orthogonality],
    )


def test_found_through_the_registry(registry):
    spec = tinkex.regularizer("orthogonality", weight=0.01, mode="hard")
    assert isinstance(spec.fn, Orthogonality) and spec.fn.mode == "hard"


async def test_composes_through_compute_loss():
    def base(data, logprobs):
        return torch.stack([-lp.sum() for lp in logprobs]).sum(), {}

    data = [datum(2), datum(3)]
    lps = [torch.tensor(r, dtype=torch.float64) for r in ROWS]
    specs = [
        tinkex.RegularizerSpec(fn=Orthogonality(), weight=2.0, name="soft"),
        tinkex.RegularizerSpec(fn=Orthogonality(mode="hard"), weight=0.25, name="hard"),
    ]
    out = await tinkex.compute_loss(data, lps, base, regularizers=specs, track_grad_norms=True)
    assert out.regularizers["soft"].value == pytest.approx(0.5)
    assert out.regularizers["hard"].value == pytest.approx(4.0)
    assert out.regularizers["hard"].custom == {"orthogonality": pytest.approx(4.0)}
    assert out.regularizer_total == pytest.approx(2.0 * 0.5 + 0.25 * 4.0)
    assert out.loss_total == pytest.approx(4.0 + 2.0)
    # hard: grads [-8, -4] and [-8, -4, -4]
    assert out.regularizers["hard"].grad_norm == pytest.approx(np.sqrt(64 + 16 + 64 + 16 + 16))
    assert out.regularizers["hard"].grad_norm_weighted == pytest.approx(0.25 * np.sqrt(176))
    # soft: grads [-0.5, 0.5] and [-0.5, -1, 0.5] (by the formula of test_soft_analytic_gradient)
    assert out.regularizers["soft"].grad_norm == pytest.approx(np.sqrt(0.5 + 1.5))


def test_readme_example_runs(registry, capsys):
    ns = tinkex.testing.run_readme_example(Path(__file__).parents[1] / "README.md")
    assert ns["loss"].item() == pytest.approx(4.0)
    assert [g.tolist() for g in (lp.grad for lp in ns["logprobs"])] == [
        [-8.0, -4.0],
        [-8.0, -4.0, -4.0],
    ]
    assert ns["out"].regularizers["orthogonality"].value == pytest.approx(0.5)
    assert "RegularizerOutput(" in capsys.readouterr().out
