"""entropy refuses top-K logprobs ((N, K) per datum) in one line; on RL datums it reads `mask`."""

from __future__ import annotations

import math

import pytest
import torch
from tinkex_reg_entropy import Entropy

import tinkex
from tinkex.testing import tinker_datum, tinkex_datum

KINDS = pytest.mark.parametrize("make", [tinkex_datum, tinker_datum], ids=["tinkex", "tinker"])


@KINDS
@pytest.mark.parametrize("mask", ["weights", None])
def test_top_k_logprobs_are_refused_in_one_line(make, mask):
    data = [
        make(2, target_tokens=[1, 2]),
        make(3, target_tokens=[[1, 2], [3, 4], [5, 6]], weights=[1.0, 1.0, 0.0]),
    ]
    with pytest.raises(tinkex.SpecError) as info:
        Entropy(mask=mask)(data, [torch.zeros(2), torch.zeros(3, 2)])
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "regularizer 'entropy': logprobs[1] (datum 1) must be a 1-D tensor (one logprob per "
        "token), got shape (3, 2), top-K logprobs (N positions, K tokens each) that 'entropy' "
        "does not handle; use it on target-token logprobs (l1, l2, elastic_net, kl and "
        "consistency work elementwise on top-K logprobs); a regularizer written for (N, K) opts "
        "in with the class attribute top_k = True (or gather(..., top_k=True))"
    )
    assert Entropy.top_k is False


@KINDS
def test_rl_datum_counts_only_mask_tokens(make):
    # the softmax is over the action tokens [-3, -4] only: q = [σ(1), σ(−1)]
    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64, requires_grad=True)
    data = [make(4, target_tokens=[5, 6, 7, 8], mask=[0.0, 0.0, 1.0, 1.0])]
    loss, metrics = Entropy()(data, [lp])
    h = math.log(1 + math.exp(-1)) + math.exp(-1) / (1 + math.exp(-1))  # lse(z) − Σ q·z
    assert loss.item() == pytest.approx(h) == pytest.approx(0.5822031)
    assert metrics == pytest.approx({"entropy": h})
    loss.backward()
    # dH/dz_i = −q_i (z_i − Σ q·z) = [−q1·q2, q1·q2]; the prompt tokens get 0
    q1q2 = math.exp(-1) / (1 + math.exp(-1)) ** 2
    assert lp.grad.tolist() == pytest.approx([0.0, 0.0, -q1q2, q1q2])
