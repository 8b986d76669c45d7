"""orthogonality refuses top-K logprobs ((N, K) per datum) in one line; on RL datums it reads `mask`."""

from __future__ import annotations

import pytest
import torch
from tinkex_reg_orthogonality import Orthogonality

import tinkex
from tinkex.testing import tinker_datum, tinkex_datum

KINDS = pytest.mark.parametrize("make", [tinkex_datum, tinker_datum], ids=["tinkex", "tinker"])


@KINDS
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_top_k_logprobs_are_refused_in_one_line(make, mode):
    data = [make(308, target_tokens=[[1, 2]] * 308)]
    with pytest.raises(tinkex.SpecError) as info:
        Orthogonality(mode=mode)(data, [torch.zeros(308, 2)])
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "regularizer 'orthogonality': logprobs[0] (datum 0) must be a 1-D tensor (one logprob "
        "per token), got shape (308, 2), top-K logprobs (N positions, K tokens each) that "
        "'orthogonality' does not handle; use it on target-token logprobs (l1, l2, elastic_net, "
        "kl and consistency work elementwise on top-K logprobs); a regularizer written for "
        "(N, K) opts in with the class attribute top_k = True (or gather(..., top_k=True))"
    )
    assert Orthogonality.top_k is False


@KINDS
def test_rl_datums_zero_their_prompt_tokens(make):
    # rows after masking: A = [0, -2, -3], B = [-3, -2, 0]; |A|² = |B|² = 13, A·B = 4
    lps = [
        torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([-3.0, -2.0, -1.0], dtype=torch.float64, requires_grad=True),
    ]
    data = [make(3, mask=[0.0, 1.0, 1.0]), make(3, mask=[1.0, 1.0, 0.0])]
    loss, _ = Orthogonality(mode="hard")(data, lps)
    assert loss.item() == pytest.approx(
        12**2 + 12**2 + 2 * 4**2
    )  # ‖G − I‖², G = [[13, 4], [4, 13]]
    loss.backward()
    # d/dX = 4 (G − I) X: row A = 4 (12 A + 4 B), row B = 4 (4 A + 12 B); masked elements get 0
    assert lps[0].grad.tolist() == pytest.approx([0.0, -128.0, -144.0])
    assert lps[1].grad.tolist() == pytest.approx([-144.0, -128.0, 0.0])
    soft, _ = Orthogonality(mode="soft")(data, [lp.detach() for lp in lps])
    assert soft.item() == pytest.approx(2 * (4 / 13) ** 2)
