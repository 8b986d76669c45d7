"""The gradient helpers: norms in float32 or wider, and a weighted sum independent of timing."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from tinkex._gradients import DOT_NORM_MIN_NUMEL, GradSum, grad_norm


@pytest.mark.parametrize("numel", [3, DOT_NORM_MIN_NUMEL, 4 * DOT_NORM_MIN_NUMEL + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_matches_a_float64_reference_on_both_paths(numel, dtype):
    g = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=dtype)
    exact = math.sqrt(math.fsum(float(x) ** 2 for x in g.double()))
    assert grad_norm((g,)) == pytest.approx(exact, rel=1e-6)


def test_norm_of_half_precision_and_non_contiguous_gradients():
    g = torch.full((4, DOT_NORM_MIN_NUMEL), 0.5)
    assert grad_norm((g.t(),)) == pytest.approx(0.5 * math.sqrt(g.numel()))  # transposed view
    big = torch.full((1000,), 300.0, dtype=torch.float16)  # squares overflow float16
    assert grad_norm((big,)) == pytest.approx(300.0 * math.sqrt(1000))
    expanded = torch.ones(()).expand(DOT_NORM_MIN_NUMEL)  # what autograd returns for x.sum()
    assert grad_norm((expanded,)) == pytest.approx(math.sqrt(DOT_NORM_MIN_NUMEL))


def test_norm_over_several_tensors_and_missing_ones():
    grads = (torch.tensor([3.0]), None, torch.tensor([4.0], dtype=torch.float64))
    assert grad_norm(grads) == pytest.approx(5.0)
    assert grad_norm((None, None)) == 0.0


def weighted_sum(term_grads, weights, leaves):
    """The sum with every term handed over in spec order."""
    total = GradSum(weights, leaves)
    for i, grads in enumerate(term_grads):
        total.put(i, grads)
    return total.result()


def _grads(seed, n_leaves=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(5, generator=g) for _ in range(n_leaves))


def test_weighted_sum_worked_example():
    leaves = (torch.zeros(2), torch.zeros(3))
    grads = [
        (torch.tensor([1.0, 2.0]), None),
        (torch.tensor([10.0, 10.0]), torch.tensor([1.0, 1.0, 1.0])),
    ]
    total = weighted_sum(grads, [1.0, 0.5], leaves)
    assert torch.equal(total[0], torch.tensor([6.0, 7.0]))
    assert torch.equal(total[1], torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("n_leaves", [1, 3])
def test_the_sum_is_bitwise_the_same_whatever_order_terms_arrive_in(n_leaves):
    leaves = tuple(torch.zeros(5) for _ in range(n_leaves))
    weights = [1.0, 0.1, 0.0, 0.37, 1e-3]
    grads = [_grads(i, n_leaves) for i in range(len(weights))]
    in_order = weighted_sum(grads, weights, leaves)
    for order in itertools.islice(itertools.permutations(range(len(weights))), 0, None, 7):
        total = GradSum(weights, leaves)
        for i in order:
            total.put(i, grads[i])
        for a, b in zip(total.result(), in_order, strict=True):
            assert torch.equal(a, b)


def test_a_leaf_no_term_reaches_gets_zeros_and_autograd_tensors_are_never_written():
    leaves = (torch.zeros(4), torch.zeros(2))
    expanded = torch.ones(()).expand(4)  # shares one element: must not be accumulated into
    shared = torch.ones(4)
    total = GradSum([1.0, 2.0], leaves)
    total.put(1, (shared, None))
    total.put(0, (expanded, None))
    result = total.result()
    assert torch.equal(result[0], torch.full((4,), 3.0))
    assert torch.equal(result[1], torch.zeros(2))
    assert torch.equal(shared, torch.ones(4)) and expanded.stride() == (0,)


def test_result_before_every_term_is_in_is_an_error():
    total = GradSum([1.0, 1.0], (torch.zeros(1),))
    total.put(1, (torch.ones(1),))
    with pytest.raises(RuntimeError, match=r"term\(s\) \[0\]"):
        total.result()


def test_puts_from_many_threads_give_the_in_order_sum():
    import threading

    leaves = (torch.zeros(5),)
    weights = [random.Random(i).uniform(0, 2) for i in range(40)]
    grads = [_grads(i, 1) for i in range(40)]
    total = GradSum(weights, leaves)
    order = list(range(40))
    random.Random(0).shuffle(order)
    threads = [threading.Thread(target=total.put, args=(i, grads[i])) for i in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(total.result()[0], weighted_sum(grads, weights, leaves)[0])
