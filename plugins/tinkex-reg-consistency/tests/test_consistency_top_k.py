"""consistency on top-K logprobs ((N, K) per datum, with an (N, K) reference), and with `mask`.

The batch: datum 0 is (2, 2) with (2, 2) weights [[1, 1], [1, 0]] (elementwise);
datum 1 is (1, 2) with a (1,) mask [0] (broadcast over K: nothing counts).
Counted elements: lp = a = [-1, -2, -3], ref = b = [-2, -1, -3], a − b = [1, -1, 0].
"""

from __future__ import annotations

import pytest
import torch
from tinkex_reg_consistency import Consistency

import tinkex
from tinkex.testing import tinker_datum, tinkex_datum

KINDS = pytest.mark.parametrize("make", [tinkex_datum, tinker_datum], ids=["tinkex", "tinker"])


def run(reg, make):
    data = [
        make(
            2,
            target_tokens=[[1, 2], [3, 4]],
            weights=[[1.0, 1.0], [1.0, 0.0]],
            original_logprobs=[[-2.0, -1.0], [-3.0, -2.0]],
        ),
        make(1, target_tokens=[[5, 6]], mask=[0.0], original_logprobs=[[-0.5, -0.5]]),
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
    return [[pytest.approx([g0, g1]), pytest.approx([g2, 0.0])], [[0.0, 0.0]]]


@KINDS
@pytest.mark.parametrize(
    ("metric", "value", "expected_grads"),
    [
        # mean (a − b)² = (1 + 1 + 0) / 3; d/da = 2(a − b) / 3
        ("mse", 2 / 3, (2 / 3, -2 / 3, 0.0)),
        # mean |a − b| = 2 / 3; d/da = sign(a − b) / 3
        ("l1", 2 / 3, (1 / 3, -1 / 3, 0.0)),
        # |a| = |b| = √14, a·b = 13: 1 − 13/14; d/da = −b/14 + 13·a/14² = [15, −12, 3] / 196
        ("cosine", 1 / 14, (15 / 196, -12 / 196, 3 / 196)),
    ],
)
def test_each_metric_elementwise_on_top_k(make, metric, value, expected_grads):
    loss, metrics, g = run(Consistency(metric=metric), make)
    assert loss == pytest.approx(value)
    assert metrics == pytest.approx({"consistency": value})
    assert g == grads(*expected_grads)


@KINDS
def test_rl_datum_counts_only_mask_tokens(make):
    lp = torch.tensor([-5.0, -1.0, -1.0], dtype=torch.float64, requires_grad=True)
    data = [make(3, mask=[0.0, 1.0, 1.0], original_logprobs=[-1.0, -2.0, -1.0])]
    loss, _ = Consistency()(data, [lp])
    assert loss.item() == pytest.approx(1.0 / 2)  # a − b = [1, 0] on the action tokens
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_reference_must_have_the_top_k_shape():
    data = [tinkex_datum(2, original_logprobs=[[-1.0], [-2.0]])]
    with pytest.raises(tinkex.SpecError) as info:
        Consistency()(data, [torch.zeros(2, 3)])
    assert str(info.value) == (
        "regularizer 'consistency': loss input 'original_logprobs' of datum 0 has shape (2, 1), "
        "expected (2, 3) (the shape of that datum's logprobs)"
    )
