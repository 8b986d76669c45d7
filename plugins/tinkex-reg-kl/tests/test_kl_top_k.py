"""kl on top-K logprobs ((N, K) per datum, with an (N, K) reference), and on RL datums with `mask`.

The batch: datum 0 is (2, 2) with (2, 2) weights [[1, 1], [1, 0]] (elementwise);
datum 1 is (1, 2) with a (1,) mask [0] (broadcast over K: nothing counts).
Counted elements: lp = [-1, -2, -3], ref = [-2, -1, -3], so r = ref − lp = [-1, 1, 0].
"""

from __future__ import annotations

import math

import pytest
import torch
from tinkex_reg_kl import KL

import tinkex
from tinkex.testing import tinker_datum, tinkex_datum

E = math.e


KINDS = pytest.mark.parametrize("make", [tinkex_datum, tinker_datum], ids=["tinkex", "tinker"])


def run(reg, make):
    data = [
        make(
            2,
            target_tokens=[[1, 2], [3, 4]],
            weights=[[1.0, 1.0], [1.0, 0.0]],
            reference_logprobs=[[-2.0, -1.0], [-3.0, -2.0]],
        ),
        make(1, target_tokens=[[5, 6]], mask=[0.0], reference_logprobs=[[-0.5, -0.5]]),
    ]
    lps = [
        torch.tensor([[-1.0, -2.0], [-3.0, -1.0]], dtype=torch.float64, requires_grad=True),
        torch.tensor([[-0.5, -1.5]], dtype=torch.float64, requires_grad=True),
    ]
    loss, metrics = reg(data, lps)
    loss.backward()
    return loss.item(), metrics, [lp.grad.tolist() for lp in lps]


def grads(g0: float, g1: float, g2: float) -> list:
    """The expected gradients: the three counted elements, 0.0 at the uncounted ones."""
    return [
        [pytest.approx([g0, g1]), pytest.approx([g2, 0.0])],
        [[0.0, 0.0]],
    ]


@KINDS
@pytest.mark.parametrize(
    ("estimator", "value", "expected_grads", "extremes"),
    [
        # k1 = −r: mean (1 − 1 + 0) / 3; d/dlp = 1
        ("k1", 0.0, (1 / 3, 1 / 3, 1 / 3), (1.0, -1.0)),
        # k2 = r²/2: mean (0.5 + 0.5 + 0) / 3; d/dlp = −r
        ("k2", 1 / 3, (1 / 3, -1 / 3, 0.0), (0.5, 0.0)),
        # k3 = e^r − r − 1: (e⁻¹ + (e − 2) + 0) / 3; d/dlp = −(e^r − 1)
        ("k3", (1 / E + E - 2) / 3, ((1 - 1 / E) / 3, (1 - E) / 3, 0.0), (E - 2, 0.0)),
        # pointwise = −e^lp·r: (e⁻¹ − e⁻² + 0) / 3; d/dlp = e^lp·(1 − r)
        (
            "pointwise",
            (1 / E - 1 / E**2) / 3,
            (2 / E / 3, 0.0, E**-3 / 3),
            (1 / E, -(E**-2)),
        ),
    ],
)
def test_each_estimator_elementwise_on_top_k(make, estimator, value, expected_grads, extremes):
    loss, metrics, g = run(KL(estimator=estimator), make)
    assert loss == pytest.approx(value, abs=1e-12)
    assert metrics == pytest.approx({"kl": value, "kl_max": extremes[0], "kl_min": extremes[1]})
    assert g == grads(*expected_grads)


@KINDS
def test_mask_none_counts_every_element(make):
    # all six elements: r = [-1, 1, 0, -1, 0, 1]; k2 mean = (4 · 0.5) / 6
    loss, _, g = run(KL(estimator="k2", mask=None), make)
    assert loss == pytest.approx(2.0 / 6)
    assert g == [
        [pytest.approx([1 / 6, -1 / 6]), pytest.approx([0.0, 1 / 6])],
        [pytest.approx([0.0, -1 / 6])],
    ]


@KINDS
def test_rl_datum_counts_only_mask_tokens(make):
    lp = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64, requires_grad=True)
    data = [make(3, mask=[0.0, 1.0, 1.0], reference_logprobs=[-9.0, -2.0, -1.0])]
    loss, _ = KL(estimator="k2")(data, [lp])
    assert loss.item() == pytest.approx(0.5 / 2)  # r = [-1, 0] on the action tokens
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([0.0, 0.5, 0.0])


def test_reference_must_have_the_top_k_shape():
    data = [tinkex_datum(2, reference_logprobs=[-1.0, -2.0])]
    with pytest.raises(tinkex.SpecError) as info:
        KL()(data, [torch.zeros(2, 3)])
    assert str(info.value) == (
        "regularizer 'kl': loss input 'reference_logprobs' of datum 0 has shape (2,), "
        "expected (2, 3) (the shape of that datum's logprobs)"
    )
