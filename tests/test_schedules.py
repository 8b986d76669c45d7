"""tinkex.schedules: exact values of the warm-up and the decays, and the argument checks."""

from __future__ import annotations

import math

import pytest

import tinkex
from tinkex import schedules
from tinkex.schedules import learning_rate, multiplier, schedule


def test_the_public_module():
    assert tinkex.schedules is schedules
    assert schedules.__all__ == [
        "BUILTIN_KINDS",
        "KINDS",
        "Schedule",
        "constant",
        "cosine",
        "from_dict",
        "kinds",
        "learning_rate",
        "linear",
        "multiplier",
        "register_kind",
        "schedule",
        "step",
        "unregister_kind",
    ]
    assert schedules.KINDS == ("constant", "linear", "cosine")  # the learning-rate kinds


def test_constant_without_warmup_is_the_base_rate_at_every_step():
    assert [learning_rate(s, 3e-3, total_steps=5) for s in range(1, 8)] == [3e-3] * 7


def test_linear_warmup_then_linear_decay_exact_values():
    lrs = [
        learning_rate(s, 1e-3, total_steps=10, warmup_steps=2, decay="linear") for s in range(1, 11)
    ]
    # warm-up: base/W at step 1, base at step W; then p = (s - 2) / 8 down to 0 at step 10
    assert lrs[0] == 5e-4
    assert lrs[1] == 1e-3
    assert lrs[2:] == [1e-3 + (0.0 - 1e-3) * ((s - 2) / 8) for s in range(3, 11)]
    assert lrs[5] == pytest.approx(5e-4)  # step 6: half-way
    assert lrs[-1] == 0.0


def test_linear_decay_without_warmup_starts_at_base_and_ends_at_min():
    lrs = [
        learning_rate(s, 2.0, total_steps=5, decay="linear", min_lr_ratio=0.25) for s in (1, 3, 5)
    ]
    assert lrs == [2.0, 1.25, 0.5]  # p = (s - 1) / 4: 0, 0.5, 1


def test_cosine_decay_exact_values():
    def cos_lr(s):
        return learning_rate(
            s, 1.0, total_steps=11, warmup_steps=1, decay="cosine", min_lr_ratio=0.1
        )

    assert cos_lr(1) == 1.0  # the end of a one-step warm-up
    assert cos_lr(11) == pytest.approx(0.1, abs=1e-15)
    assert cos_lr(6) == pytest.approx(0.55)  # p = 0.5: the mean of start and end
    assert cos_lr(3) == 0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2
    values = [cos_lr(s) for s in range(1, 12)]
    assert values == sorted(values, reverse=True)


def test_constant_after_warmup_and_steps_past_the_end():
    assert [learning_rate(s, 1.0, total_steps=6, warmup_steps=4) for s in (1, 2, 3, 4, 5, 6)] == [
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]
    assert learning_rate(20, 1.0, total_steps=6, decay="linear", min_lr_ratio=0.5) == 0.5


def test_a_warmup_as_long_as_the_run_never_decays():
    values = [
        learning_rate(s, 1.0, total_steps=4, warmup_steps=4, decay="linear") for s in range(1, 5)
    ]
    assert values == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(1, 1.0, total_steps=1, decay="cosine") == 1.0  # a one-step run


def test_a_decay_that_has_arrived_is_exactly_its_end():
    # start + (end - start) * 1.0 would be 0.09999999999999998 here: the end is returned as is
    assert learning_rate(5, 1.0, total_steps=5, decay="linear", min_lr_ratio=0.1) == 0.1
    assert learning_rate(9, 1.0, total_steps=5, decay="cosine", min_lr_ratio=0.1) == 0.1
    assert schedule("linear", 4, start=1.0, end=0.1, steps=4) == 0.1


def test_weight_schedules_share_the_learning_rate_formula():
    # a weight schedule reaches `end` one step later (p = (s - 1) / steps, not / (steps - 1))
    for kind in ("linear", "cosine"):
        weight = schedules.Schedule(kind, 2.0, 0.5, 8)
        for s in range(1, 12):
            assert weight(s) == schedule(kind, s, start=2.0, end=0.5, steps=9)


def test_multiplier_is_the_rate_for_base_one():
    for step in (1, 3, 7, 10):
        m = multiplier(step, total_steps=10, warmup_steps=3, decay="cosine", min_lr_ratio=0.2)
        lr = learning_rate(
            step, 1.0, total_steps=10, warmup_steps=3, decay="cosine", min_lr_ratio=0.2
        )
        assert m == lr
    assert multiplier(1, total_steps=10, warmup_steps=3) == pytest.approx(1 / 3)


def test_the_generic_schedule_ramps_any_value_up_or_down():
    # a regularizer weight that grows from 0.1 to 0.5 over 5 steps
    assert [schedule("linear", s, start=0.1, end=0.5, steps=5) for s in range(1, 6)] == [
        pytest.approx(v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)
    ]
    # a warm-up from 0 to a constant weight
    assert [
        schedule("constant", s, start=0.2, end=0.0, steps=9, warmup_steps=2) for s in (1, 2, 9)
    ] == [
        0.1,
        0.2,
        0.2,
    ]
    assert schedule("cosine", 4, start=2, end=4, steps=7) == pytest.approx(3.0)
    assert isinstance(schedule("constant", 1, start=1, end=1, steps=1), float)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: schedule("step", 1, start=1.0, end=0.0, steps=3),
            "schedule kind must be one of 'constant', 'linear', 'cosine', got 'step'",
        ),
        (
            lambda: schedule("linear", 0, start=1.0, end=0.0, steps=3),
            "step must be >= 1, got 0",
        ),
        (
            lambda: schedule("linear", 1.0, start=1.0, end=0.0, steps=3),
            "step must be an integer >= 1, got 1.0 (float)",
        ),
        (
            lambda: schedule("linear", 1, start=1.0, end=0.0, steps=0),
            "steps must be >= 1, got 0",
        ),
        (
            lambda: schedule("linear", 1, start=1.0, end=0.0, steps=3, warmup_steps=-1),
            "warmup_steps must be >= 0, got -1",
        ),
        (
            lambda: schedule("linear", 1, start=math.nan, end=0.0, steps=3),
            "start must be a finite real number, got nan",
        ),
        (
            lambda: learning_rate(1, -1.0, total_steps=3),
            "base_lr must be >= 0, got -1.0",
        ),
        (
            lambda: learning_rate(1, 1.0, total_steps=3, min_lr_ratio=2),
            "min_lr_ratio must be >= 0 and <= 1, got 2",
        ),
        (
            lambda: learning_rate(1, 1.0, total_steps=3, decay="exp"),
            "decay must be one of 'constant', 'linear', 'cosine', got 'exp'",
        ),
    ],
)
def test_bad_arguments_are_one_line_spec_errors(call, message):
    with pytest.raises(tinkex.SpecError) as info:
        call()
    assert str(info.value) == message


def test_the_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, tinkex.schedules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
