"""l1, l2 and elastic_net on top-K logprobs ((N, K) per datum) and on RL datums with `mask`.

The batch: datum 0 is (3, 2) with (3,) weights [1, 0, 1] (broadcast over K),
datum 1 is (2, 2) with (2, 2) weights [[1, 0], [1, 1]] (elementwise). Counted
elements, in order: x = [-1, -2, -5, -6, -0.5, -2.5, -3.5] (n = 7), so
Σ|x| = 20.5 and Σx² = 84.75.
"""

from __future__ import annotations

import math

import pytest
import torch
from tinkex_reg_norms import L1, L2, ElasticNet

import tinkex
from tinkex.testing import tinker_datum, tinkex_datum

LP0 = [[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]
W0 = [1.0, 0.0, 1.0]
LP1 = [[-0.5, -1.5], [-2.5, -3.5]]
W1 = [[1.0, 0.0], [1.0, 1.0]]
M0 = [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]  # W0 broadcast over K
COUNTED = [-1.0, -2.0, -5.0, -6.0, -0.5, -2.5, -3.5]
N = len(COUNTED)


KINDS = pytest.mark.parametrize("make", [tinkex_datum, tinker_datum], ids=["tinkex", "tinker"])


def run(reg, make):
    """The loss, metrics and gradients of ``reg`` on the top-K batch above (float64)."""
    data = [
        make(3, target_tokens=[[1, 2], [3, 4], [5, 6]], weights=W0),
        make(2, target_tokens=[[7, 8], [9, 10]], weights=W1),
    ]
    lps = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (LP0, LP1)]
    loss, metrics = reg(data, lps)
    loss.backward()
    return loss.item(), metrics, [lp.grad.tolist() for lp in lps]


def on_batch(f) -> list[list[list[float]]]:
    """``f(x)`` at each counted element, 0.0 at the uncounted ones, in the batch's shapes."""
    out = []
    for lp, mask in ((LP0, M0), (LP1, W1)):
        rows = []
        for row, mrow in zip(lp, mask, strict=True):
            rows.append([f(x) if m > 0 else 0.0 for x, m in zip(row, mrow, strict=True)])
        out.append(rows)
    return out


def approx_grads(grads):
    return [pytest.approx(row) for g in grads for row in g]


def flat(grads):
    return [row for g in grads for row in g]


@KINDS
def test_l1_sums_over_counted_elements(make):
    loss, metrics, grads = run(L1(), make)
    assert loss == pytest.approx(20.5)
    assert metrics == pytest.approx({"l1_raw": 20.5, "l1_mean": 20.5 / N})
    # d|x|/dx = -1 at every counted element (all are negative), 0 at the uncounted ones
    assert flat(grads) == approx_grads(on_batch(lambda x: -1.0))
    assert grads[0][1] == [0.0, 0.0] and grads[1][0][1] == 0.0


@KINDS
def test_l1_mean_is_over_elements(make):
    loss, _, grads = run(L1(reduction="mean"), make)
    assert loss == pytest.approx(20.5 / 7)
    assert flat(grads) == approx_grads(on_batch(lambda x: -1.0 / 7))


@KINDS
def test_l2_sum_and_mean(make):
    loss, metrics, grads = run(L2(), make)
    assert loss == pytest.approx(84.75)
    assert metrics == pytest.approx({"l2_raw": 84.75, "l2_mean": 84.75 / 7})
    assert flat(grads) == approx_grads(on_batch(lambda x: 2 * x))
    loss, _, grads = run(L2(reduction="mean"), make)
    assert loss == pytest.approx(84.75 / 7)
    assert flat(grads) == approx_grads(on_batch(lambda x: 2 * x / 7))


@KINDS
def test_l2_center_mean_is_the_mean_of_counted_elements(make):
    c = -20.5 / 7
    spread = sum((x - c) ** 2 for x in COUNTED)
    assert spread == pytest.approx(84.75 - 20.5**2 / 7)  # Σx² − (Σx)²/n
    loss, _, grads = run(L2(center="mean"), make)
    assert loss == pytest.approx(spread)
    # Σ(x − c) = 0, so the gradient through c vanishes: 2(x − c)
    assert flat(grads) == approx_grads(on_batch(lambda x: 2 * (x - c)))


@KINDS
def test_l2_of_probabilities(make):
    loss, _, grads = run(L2(target="probs"), make)
    assert loss == pytest.approx(sum(math.exp(2 * x) for x in COUNTED))
    assert flat(grads) == approx_grads(on_batch(lambda x: 2 * math.exp(2 * x)))


@KINDS
def test_elastic_net(make):
    loss, metrics, grads = run(ElasticNet(l1_ratio=0.25), make)
    assert loss == pytest.approx(0.25 * 20.5 + 0.75 * 84.75)
    assert metrics == pytest.approx({"l1_raw": 20.5, "l2_raw": 84.75})
    assert flat(grads) == approx_grads(on_batch(lambda x: -0.25 + 0.75 * 2 * x))
    loss, _, grads = run(ElasticNet(l1_ratio=0.25, reduction="mean"), make)
    assert loss == pytest.approx((0.25 * 20.5 + 0.75 * 84.75) / 7)


@KINDS
def test_mask_none_counts_all_n_times_k_elements(make):
    everything = [x for lp in (LP0, LP1) for row in lp for x in row]
    loss, _, grads = run(L1(mask=None, reduction="mean"), make)
    assert loss == pytest.approx(sum(abs(x) for x in everything) / 10)
    assert flat(grads) == approx_grads([[[-0.1, -0.1]] * 3, [[-0.1, -0.1]] * 2])


@KINDS
def test_rl_datum_with_mask_and_no_weights_counts_only_action_tokens(make):
    # tinker-cookbook's RL datums: `mask` is 0 on the prompt, 1 on the action tokens
    lp = torch.tensor([-4.0, -3.0, -1.0, -2.0], requires_grad=True)
    data = [make(4, target_tokens=[5, 6, 7, 8], mask=[0.0, 0.0, 1.0, 1.0])]
    loss, metrics = L2()(data, [lp])
    assert loss.item() == pytest.approx(1.0 + 4.0)  # not 16 + 9 + 1 + 4 = 30
    assert metrics == pytest.approx({"l2_raw": 5.0, "l2_mean": 2.5})
    loss.backward()
    assert lp.grad.tolist() == [0.0, 0.0, -2.0, -4.0]


@KINDS
def test_weights_and_mask_both_present_must_both_be_positive(make):
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    data = [make(2, weights=[[1.0, 0.0], [1.0, 1.0]], mask=[0.0, 1.0])]
    loss, _ = L1()(data, [lp])
    assert loss.item() == pytest.approx(3.0 + 4.0)
    loss.backward()
    assert lp.grad.tolist() == [[0.0, 0.0], [-1.0, -1.0]]


def test_a_misshapen_mask_names_regularizer_datum_key_and_shapes():
    data = [tinker_datum(3, mask=[1.0, 1.0])]  # tinker.Datum does not check shapes itself
    with pytest.raises(tinkex.SpecError) as info:
        L2()(data, [torch.zeros(3, 2)])
    assert str(info.value) == (
        "regularizer 'l2': loss input 'mask' of datum 0 has shape (2,), expected (3, 2) or (3,) "
        "(the shape of that datum's logprobs, or one value per position)"
    )


async def test_top_k_composes_through_compute_loss():
    def base(data, logprobs):
        return torch.stack([lp.sum() for lp in logprobs]).sum().neg(), {}

    data = [tinkex_datum(2, target_tokens=[[1, 2], [3, 4]], mask=[0.0, 1.0])]
    specs = [tinkex.RegularizerSpec(fn=L2(), weight=1.0, name="l2")]
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    out = await tinkex.compute_loss(data, [lp], base, regularizers=specs, track_grad_norms=True)
    assert out.regularizers["l2"].value == pytest.approx(9.0 + 16.0)
    assert out.regularizers["l2"].grad_norm == pytest.approx(10.0)  # |(0, 0, -6, -8)|
