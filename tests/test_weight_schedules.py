"""Scheduled regularizer weights: tinkex.schedules.Schedule, its mapping form, plugin kinds,
and the weight actually used at each step by the pipeline and the training client."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import attrs
import pytest
import torch

import tinkex
from tinkex import Datum, PluginError, RegularizerSpec, SpecError, TrainingClient, _plugins
from tinkex.schedules import (
    BUILTIN_KINDS,
    Schedule,
    constant,
    cosine,
    from_dict,
    kinds,
    linear,
    register_kind,
    step,
    unregister_kind,
)

# --------------------------------------------------------------------------- the kinds


def values(schedule, steps):
    return [schedule(s) for s in steps]


def test_constant_is_its_value_at_every_step():
    assert values(constant(0.25), (1, 1, 2, 11)) == [0.25, 0.25, 0.25, 0.25]
    assert constant(3).start == 3.0 and isinstance(constant(3).start, float)


def test_linear_from_start_at_step_1_to_end_at_steps_plus_1():
    # steps 1, steps, steps + 1, steps + 10
    assert values(linear(0.0, 0.1, 200), (1, 200, 201, 210)) == [0.0, 0.0995, 0.1, 0.1]
    assert linear(0.0, 0.1, 200)(101) == 0.05  # p = 100 / 200
    # the end is exactly `end`, not start + (end - start) * 1.0 (0.09999999999999998 here)
    assert values(linear(1.0, 0.1, 3), (1, 3, 4, 13)) == [1.0, 0.4, 0.1, 0.1]


def test_cosine_has_the_same_endpoints_along_half_a_cosine():
    assert values(cosine(1.0, 0.0, 4), (1, 4, 5, 14)) == [
        1.0,
        (1 + math.cos(math.pi * 0.75)) / 2,
        0.0,
        0.0,
    ]
    assert cosine(1.0, 0.0, 4)(4) == 0.14644660940672627
    assert cosine(2.0, 4.0, 2)(2) == 3.0  # p = 1/2: the mean of start and end
    assert values(cosine(0.0, 0.5, 1), (1, 2, 3)) == [0.0, 0.5, 0.5]


def test_step_keeps_start_for_steps_then_end():
    assert values(step(0.5, 0.0, 3), (1, 3, 4, 13)) == [0.5, 0.5, 0.0, 0.0]
    assert values(step(0.0, 2.0, 1), (1, 2)) == [0.0, 2.0]


def test_a_schedule_is_an_immutable_hashable_comparable_value():
    s = linear(0.0, 0.1, 200)
    assert (s.kind, s.start, s.end, s.steps) == ("linear", 0.0, 0.1, 200)
    assert s == Schedule("linear", 0, 0.1, 200) and hash(s) == hash(Schedule("linear", 0, 0.1, 200))
    assert s != cosine(0.0, 0.1, 200) and s != linear(0.0, 0.1, 100)
    assert len({s, linear(0.0, 0.1, 200), step(0.0, 0.1, 200)}) == 2
    assert sorted([step(0, 1, 2), cosine(0, 1, 2), linear(1, 1, 2), linear(0, 1, 2)]) == [
        cosine(0, 1, 2),
        linear(0, 1, 2),
        linear(1, 1, 2),
        step(0, 1, 2),
    ]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.end = 1.0  # type: ignore[misc]
    assert s.at(51) == s(51) == 0.025
    assert isinstance(constant(1)(1), float)
    assert repr(s) == "Schedule(kind='linear', start=0.0, end=0.1, steps=200)"
    assert (str(s), str(constant(0.5)), str(step(1, 0, 3))) == (
        "linear(0, 0.1, 200)",
        "constant(0.5)",
        "step(1, 0, 3)",
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: linear(0.0, 0.1, 0), "Schedule.steps must be >= 1, got 0"),
        (lambda: linear(0.0, 0.1, 2.0), "Schedule.steps must be an integer >= 1, got 2.0 (float)"),
        (lambda: cosine(math.inf, 0.1, 2), "Schedule.start must be a finite real number, got inf"),
        (lambda: step(0.0, "1", 2), "Schedule.end must be a finite real number, got '1' (str)"),
        (lambda: constant(True), "Schedule.start must be a finite real number, got True (bool)"),
        (
            lambda: Schedule("cosin", 1.0, 0.0, 2),
            "Schedule.kind must be one of 'constant', 'linear', 'cosine', 'step', got 'cosin'; "
            "did you mean 'cosine'?",
        ),
        (lambda: linear(0.0, 0.1, 2)(0), "step must be >= 1, got 0"),
        (lambda: linear(0.0, 0.1, 2)(1.5), "step must be an integer >= 1, got 1.5 (float)"),
    ],
)
def test_bad_schedules_and_steps_are_one_line_spec_errors(call, message):
    with pytest.raises(SpecError) as info:
        call()
    assert str(info.value) == message


# --------------------------------------------------------------------------- mapping form


@pytest.mark.parametrize(
    "schedule",
    [constant(0.3), linear(0.0, 0.1, 200), cosine(1.0, 0.25, 7), step(0.5, 0.0, 3)],
)
def test_to_dict_and_from_dict_round_trip(schedule):
    data = schedule.to_dict()
    assert list(data) == ["schedule", "start", "end", "steps"]
    assert from_dict(data) == schedule
    assert Schedule.from_dict(data) == schedule


def test_to_dict_is_the_toml_inline_table():
    assert linear(0.0, 0.1, 200).to_dict() == {
        "schedule": "linear",
        "start": 0.0,
        "end": 0.1,
        "steps": 200,
    }
    table = tomllib.loads('weight = { schedule = "linear", start = 0.0, end = 0.1, steps = 200 }')
    assert from_dict(table["weight"]) == linear(0.0, 0.1, 200)
    # ints are numbers too; a constant needs only its value
    assert from_dict({"schedule": "cosine", "start": 1, "end": 0, "steps": 5}) == cosine(
        1.0, 0.0, 5
    )
    assert from_dict({"schedule": "constant", "start": 0.2}) == constant(0.2)
    assert constant(0.2).to_dict() == {"schedule": "constant", "start": 0.2, "end": 0.2, "steps": 1}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            0.1,
            'weight must be a table such as { schedule = "linear", start = 0.0, end = 0.1, '
            "steps = 200 }, got 0.1 (float)",
        ),
        (
            {"start": 0.0, "end": 0.1, "steps": 200},
            "weight has no 'schedule' key (the kind: 'constant', 'linear', 'cosine', 'step' or "
            'a plugin\'s), e.g. { schedule = "linear", start = 0.0, end = 0.1, steps = 200 }',
        ),
        (
            {"schedule": "cosin", "start": 1.0, "end": 0.0, "steps": 3},
            "weight.schedule must be one of 'constant', 'linear', 'cosine', 'step', got 'cosin'; "
            "did you mean 'cosine'?",
        ),
        (
            {"schedule": "Linear", "start": 1.0, "end": 0.0, "steps": 3},
            "weight.schedule must be one of 'constant', 'linear', 'cosine', 'step', got 'Linear'; "
            "did you mean 'linear'?",
        ),
        (
            {"schedule": "exponential", "start": 1.0, "end": 0.0, "steps": 3},
            "weight.schedule must be one of 'constant', 'linear', 'cosine', 'step', got "
            "'exponential' (a plugin's kind needs that plugin installed: see `tinkex plugins list`)",
        ),
        (
            {"schedule": 1, "start": 1.0},
            "weight.schedule must be one of 'constant', 'linear', 'cosine', 'step', got 1 (int)",
        ),
        (
            {"schedule": "linear", "start": 0.0, "end": 0.1, "stpes": 200},
            "weight has unknown key(s) 'stpes'; did you mean 'steps'? "
            "(a schedule takes 'schedule', 'start', 'end', 'steps')",
        ),
        (
            {"schedule": "linear", "start": 0.0, "end": 0.1, "steps": 2, "warmup": 1},
            "weight has unknown key(s) 'warmup' (a schedule takes 'schedule', 'start', 'end', "
            "'steps')",
        ),
        (
            {"schedule": "linear", "start": 0.0},
            "weight (schedule 'linear') is missing 'end', 'steps'; write "
            '{ schedule = "linear", start = ..., end = ..., steps = ... }',
        ),
        (
            {"schedule": "constant", "end": 0.0},
            "weight (schedule 'constant') is missing 'start'; write "
            '{ schedule = "constant", start = ... }',
        ),
        (
            {"schedule": "linear", "start": math.nan, "end": 0.1, "steps": 2},
            "weight.start must be a finite real number, got nan",
        ),
        (
            {"schedule": "linear", "start": 0.0, "end": "0.1", "steps": 2},
            "weight.end must be a finite real number, got '0.1' (str)",
        ),
        (
            {"schedule": "step", "start": 0.0, "end": 0.1, "steps": 0},
            "weight.steps must be >= 1, got 0",
        ),
        (
            {"schedule": "step", "start": 0.0, "end": 0.1, "steps": 2.5},
            "weight.steps must be an integer >= 1, got 2.5 (float)",
        ),
        (
            {"schedule": "step", "start": 0.0, "end": 0.1, "steps": True},
            "weight.steps must be an integer >= 1, got True (bool)",
        ),
    ],
)
def test_from_dict_errors_are_one_line_and_say_the_fix(data, message):
    with pytest.raises(SpecError) as info:
        from_dict(data)
    assert str(info.value) == message


def test_from_dict_names_the_subject_it_is_given():
    with pytest.raises(SpecError) as info:
        from_dict(
            {"schedule": "linear", "start": 0, "end": 1, "steps": -3},
            subject="regularizers.kl.weight",
        )
    assert str(info.value) == "regularizers.kl.weight.steps must be >= 1, got -3"


# --------------------------------------------------------------------------- plugin kinds


def exp_decay(step, *, start, end, steps):
    """start * (end / start) ** p: a geometric path from start to end."""
    return start * (end / start) ** min((step - 1) / steps, 1.0)


@pytest.fixture
def registered():
    names = []

    def add(name, fn, source="my-plugin"):
        names.append(name)
        register_kind(name, fn, source=source)

    yield add
    for name in names:
        unregister_kind(name)


def test_a_registered_kind_works_like_a_built_in_one(registered):
    registered("exp", exp_decay)
    listed = kinds()  # installed plugins' kinds may follow: only this test's are checked
    assert list(listed)[:4] == list(BUILTIN_KINDS)
    assert {name: listed[name] for name in (*BUILTIN_KINDS, "exp")} == {
        "constant": "tinkex",
        "linear": "tinkex",
        "cosine": "tinkex",
        "step": "tinkex",
        "exp": "my-plugin",
    }
    s = from_dict({"schedule": "exp", "start": 1.0, "end": 0.25, "steps": 2})
    assert s == Schedule("exp", 1.0, 0.25, 2)
    assert values(s, (1, 2, 3, 12)) == [1.0, 0.5, 0.25, 0.25]
    assert from_dict(s.to_dict()) == s
    # every field is required for a plugin kind
    with pytest.raises(SpecError) as info:
        from_dict({"schedule": "exp", "start": 1.0})
    assert str(info.value) == (
        "weight (schedule 'exp') is missing 'end', 'steps'; write "
        '{ schedule = "exp", start = ..., end = ..., steps = ... }'
    )
    # the same source may register again (plugins reload); the kind is replaced
    registered("exp", lambda step, *, start, end, steps: start)
    assert s(3) == 1.0
    unregister_kind("exp")
    assert "exp" not in kinds()
    with pytest.raises(SpecError, match="got 'exp'"):
        s(1)


def test_register_kind_refuses_collisions_bad_names_and_bad_functions(registered):
    registered("exp", exp_decay)
    cases = [
        (
            lambda: register_kind("exp", exp_decay, source="other-plugin"),
            PluginError,
            "schedule kind 'exp' is registered by both my-plugin and other-plugin; "
            "uninstall or disable one of them",
        ),
        (
            lambda: register_kind("cosine", exp_decay, source="other-plugin"),
            PluginError,
            "schedule kind 'cosine' is built into tinkex; other-plugin must register its kind "
            "under another name",
        ),
        (
            lambda: register_kind("Exp Decay", exp_decay),
            SpecError,
            "schedule kind name must be a lower-case name: a letter, then letters, digits, '_' "
            "or '-', got 'Exp Decay'",
        ),
        (
            lambda: register_kind("bad", 3),
            SpecError,
            "schedule kind 'bad' must be a callable fn(step, *, start, end, steps) -> float, got 3",
        ),
        (
            lambda: register_kind("bad", lambda step: 1.0),
            SpecError,
            None,  # the signature is shown; checked below
        ),
        (
            lambda: register_kind("bad", exp_decay, source=""),
            SpecError,
            "the source of schedule kind 'bad' must be a non-empty string, got ''",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        if message is not None:
            assert str(info.value) == message
        else:
            assert str(info.value).startswith(
                "schedule kind 'bad' must be callable as fn(step, *, start, end, steps) -> float, "
                "got <function "
            )
            assert str(info.value).endswith("with signature (step)")
    assert "bad" not in kinds()


def test_a_plugin_kind_that_fails_or_returns_a_non_number_is_a_spec_error(registered):
    registered("nan", lambda step, *, start, end, steps: math.nan)
    registered("boom", lambda step, *, start, end, steps: 1 / 0)
    with pytest.raises(SpecError) as info:
        Schedule("nan", 1.0, 0.0, 3)(2)
    assert str(info.value) == (
        "schedule kind 'nan' (from my-plugin) returned nan at step 2; "
        "it must return a finite real number"
    )
    with pytest.raises(SpecError) as info:
        Schedule("boom", 1.0, 0.0, 3)(1)
    assert str(info.value) == (
        "schedule kind 'boom' (from my-plugin) failed at step 1: ZeroDivisionError: division by zero"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_the_plugin_system_is_asked_first_for_a_kind_that_is_not_built_in(monkeypatch):
    calls = []

    def load_schedule_kinds():
        calls.append(1)
        register_kind("hooked", exp_decay, source="tinkex-sched-plugin")

    monkeypatch.setattr(_plugins, "load_schedule_kinds", load_schedule_kinds, raising=False)
    try:
        assert from_dict({"schedule": "linear", "start": 0, "end": 1, "steps": 2}) == linear(
            0, 1, 2
        )
        assert calls == []  # built-in kinds never load plugins
        s = from_dict({"schedule": "hooked", "start": 4.0, "end": 1.0, "steps": 2})
        assert calls == [1] and s(2) == 2.0
        assert kinds()["hooked"] == "tinkex-sched-plugin"
    finally:
        unregister_kind("hooked")


def test_without_the_plugin_hook_only_registered_kinds_exist(monkeypatch):
    monkeypatch.delattr(_plugins, "load_schedule_kinds", raising=False)
    with pytest.raises(SpecError, match="got 'hooked'"):
        from_dict({"schedule": "hooked", "start": 4.0, "end": 1.0, "steps": 2})


def test_importing_the_module_imports_no_torch_and_no_plugins():
    import subprocess
    import sys

    code = (
        "import sys, tinkex.schedules as s\n"
        "s.from_dict({'schedule': 'linear', 'start': 0, 'end': 1, 'steps': 2})(2)\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "assert 'tinkex._plugins' not in sys.modules, 'plugins'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_kinds():
    assert BUILTIN_KINDS == ("constant", "linear", "cosine", "step")


# --------------------------------------------------------------------------- specs


def sum_sq(data, lp):
    return sum((t**2).sum() for t in lp), {"n": 1.0}


def base_sum(data, lp):
    return sum(t.sum() for t in lp), {}


def test_a_spec_takes_a_schedule_as_its_weight():
    spec = RegularizerSpec(sum_sq, linear(0.0, 0.1, 200), "kl")
    assert spec.is_scheduled and not RegularizerSpec(sum_sq, 0.1, "kl").is_scheduled
    assert [spec.weight_at(s) for s in (1, 101, 201)] == [0.0, 0.05, 0.1]
    assert RegularizerSpec(sum_sq, 0.1, "kl").weight_at() == 0.1
    assert RegularizerSpec(sum_sq, 0.1, "kl").weight_at(7) == 0.1
    # compared and hashed by the schedule (the training client's pipeline cache relies on it)
    same = RegularizerSpec(sum_sq, linear(0.0, 0.1, 200), "kl")
    assert spec == same and hash(spec) == hash(same)
    assert spec != RegularizerSpec(sum_sq, linear(0.0, 0.1, 100), "kl")
    assert spec != RegularizerSpec(sum_sq, 0.1, "kl")
    assert RegularizerSpec(sum_sq, constant(0.1), "kl") != RegularizerSpec(sum_sq, 0.1, "kl")


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (
            linear(-0.1, 0.1, 10),
            "weight schedule start must be >= 0 (a weight is never negative), got -0.1 in "
            "linear(-0.1, 0.1, 10) for regularizer 'kl'",
        ),
        (
            step(0.1, -1, 10),
            "weight schedule end must be >= 0 (a weight is never negative), got -1.0 in "
            "step(0.1, -1, 10) for regularizer 'kl'",
        ),
        (
            {"schedule": "linear", "start": 0.0, "end": 0.1, "steps": 200},
            "weight must be a finite number >= 0 or a tinkex.schedules.Schedule, got "
            "{'schedule': 'linear', 'start': 0.0, 'end': 0.1, 'steps': 200} (dict) for "
            "regularizer 'kl'; build a schedule from a mapping with "
            "tinkex.schedules.from_dict(...)",
        ),
        (
            "0.1",
            "weight must be a finite number >= 0 or a tinkex.schedules.Schedule, got '0.1' (str) "
            "for regularizer 'kl'",
        ),
        (-0.1, "weight must be a finite number >= 0, got -0.1 (float) for regularizer 'kl'"),
    ],
)
def test_bad_weights_name_the_regularizer(weight, message):
    with pytest.raises(SpecError) as info:
        RegularizerSpec(sum_sq, weight, "kl")
    assert str(info.value) == message


def test_weight_at_without_or_with_a_bad_step(registered):
    spec = RegularizerSpec(sum_sq, linear(0.0, 0.1, 200), "kl")
    with pytest.raises(SpecError) as info:
        spec.weight_at()
    assert str(info.value) == MISSING_STEP
    with pytest.raises(SpecError) as info:
        spec.weight_at(0)
    assert (
        str(info.value)
        == "step must be an integer >= 1 (the 1-based optimizer step) or None, got 0 (int)"
    )
    registered("negative", lambda step, *, start, end, steps: start - step)
    neg = RegularizerSpec(sum_sq, Schedule("negative", 1.0, 0.0, 5), "kl")
    assert neg.weight_at(1) == 0.0
    with pytest.raises(SpecError) as info:
        neg.weight_at(3)
    assert str(info.value) == (
        "weight schedule negative(1, 0, 5) gives -2.0 at step 3, but a weight must be >= 0, "
        "for regularizer 'kl'; fix the schedule kind 'negative'"
    )
    registered("nan", lambda step, *, start, end, steps: math.nan)
    with pytest.raises(SpecError) as info:
        RegularizerSpec(sum_sq, Schedule("nan", 1.0, 0.0, 5), "kl").weight_at(2)
    assert str(info.value) == (
        "schedule kind 'nan' (from my-plugin) returned nan at step 2; it must return a finite "
        "real number (the weight of regularizer 'kl')"
    )


MISSING_STEP = (
    "regularizer 'kl' has a scheduled weight, linear(0, 0.1, 200), so its value depends on the "
    "step: pass step=<the 1-based optimizer step> (TrainingClient.forward_backward_custom "
    "passes tc.step + 1 itself)"
)

# --------------------------------------------------------------------------- the pipeline

LP = [torch.tensor([-1.2, -1.5, -0.7]), torch.tensor([-0.3, -2.0])]
REF = [[-1.0, -2.0, -0.5], [-0.5, -1.0]]


def kl_data():
    return [
        Datum(
            model_input=list(range(1, len(r) + 1)),
            loss_fn_inputs={"target_tokens": list(range(2, len(r) + 2)), "reference_logprobs": r},
        )
        for r in REF
    ]


def kl_spec(weight):
    return tinkex.regularizer("kl", weight=weight)


@pytest.mark.parametrize(("at", "weight"), [(1, 0.0), (101, 0.05)])
async def test_compose_loss_uses_the_weight_of_the_step(at, weight):
    data = kl_data()
    scheduled = await tinkex.compose_loss(
        data,
        LP,
        base_sum,
        regularizers=[kl_spec(linear(0.0, 0.1, 200))],
        track_grad_norms=True,
        step=at,
    )
    term = await tinkex.compose_loss(
        data, LP, lambda d, lp: (sum(t.sum() for t in lp) * 0.0, {}), regularizers=[kl_spec(1.0)]
    )
    base = await tinkex.compose_loss(data, LP, base_sum)
    kl_value = term.output.regularizers["kl"].value
    reg = scheduled.output.regularizers["kl"]
    assert reg.weight == weight
    assert reg.value == kl_value
    assert reg.contribution == weight * kl_value
    assert scheduled.output.regularizer_total == weight * kl_value
    assert scheduled.output.loss_total == base.output.loss_total + weight * kl_value
    assert reg.grad_norm_weighted == weight * reg.grad_norm
    flat = scheduled.output.flat_metrics()
    assert (flat["reg/kl/weight"], flat["reg/kl/contribution"]) == (weight, weight * kl_value)
    assert scheduled.output.grad_shares()["kl"] == (
        weight * reg.grad_norm / (reg.grad_norm_weighted + scheduled.output.base_loss.grad_norm)
    )
    for got, b, t in zip(
        scheduled.logprob_grads, base.logprob_grads, term.logprob_grads, strict=True
    ):
        torch.testing.assert_close(got, b + weight * t, rtol=0, atol=1e-7)
    # exactly what a plain weight of that value gives
    fixed = await tinkex.compose_loss(
        data, LP, base_sum, regularizers=[kl_spec(weight)], track_grad_norms=True
    )
    assert fixed.output == scheduled.output
    for got, want in zip(scheduled.logprob_grads, fixed.logprob_grads, strict=True):
        assert torch.equal(got, want)


async def test_a_scheduled_weight_of_zero_still_evaluates_and_reports_the_term():
    calls = []

    def counted(data, lp):
        calls.append(1)
        return sum((t**2).sum() for t in lp), {"n": 2.0}

    out = await tinkex.compute_loss(
        None, LP, base_sum, regularizers=[RegularizerSpec(counted, step(0.0, 1.0, 2), "sq")], step=2
    )
    assert calls == [1]
    reg = out.regularizers["sq"]
    assert (reg.weight, reg.contribution, reg.custom) == (0.0, 0.0, {"n": 2.0})
    assert reg.value == pytest.approx(8.27)
    assert out.loss_total == out.base_loss.value


async def test_a_scheduled_pipeline_without_a_step_is_a_spec_error_before_anything_runs():
    calls = []

    def counted(data, lp):
        calls.append(1)
        return base_sum(data, lp)

    specs = [
        RegularizerSpec(counted, 0.5, "plain"),
        RegularizerSpec(counted, linear(0.0, 0.1, 200), "kl"),
    ]
    pipeline = tinkex.Pipeline(counted, regularizers=specs)
    for call in (
        lambda: tinkex.compute_loss(None, LP, counted, regularizers=specs),
        lambda: tinkex.compose_loss(None, LP, counted, regularizers=specs),
        lambda: pipeline.compute(None, LP),
        lambda: pipeline.compose(None, LP),
    ):
        with pytest.raises(SpecError) as info:
            await call()
        assert str(info.value) == MISSING_STEP
    with pytest.raises(SpecError) as info:
        pipeline.as_loss_fn()
    assert str(info.value) == MISSING_STEP
    for bad, shown in (
        (0, "0 (int)"),
        (True, "True (bool)"),
        (1.0, "1.0 (float)"),
        ("3", "'3' (str)"),
    ):
        with pytest.raises(SpecError) as info:
            await pipeline.compute(None, LP, step=bad)
        assert str(info.value) == (
            f"step must be an integer >= 1 (the 1-based optimizer step) or None, got {shown}"
        )
    assert calls == []


async def test_a_pipeline_without_schedules_costs_nothing_extra():
    specs = [RegularizerSpec(sum_sq, 0.5, "sq")]
    pipeline = tinkex.Pipeline(base_sum, regularizers=specs)
    assert not pipeline.is_scheduled
    prebuilt = pipeline._terms_at(None, drop_in=False)
    assert pipeline._terms_at(7, drop_in=False) is prebuilt  # the terms are built once
    assert (await pipeline.compute(None, LP, step=3)) == (await pipeline.compute(None, LP))
    with pytest.raises(SpecError, match="step must be an integer >= 1"):
        await pipeline.compute(None, LP, step=0)  # still checked
    # with a schedule only the scheduled term's weight is rebuilt
    mixed = tinkex.Pipeline(
        base_sum,
        regularizers=[*specs, RegularizerSpec(sum_sq, linear(0.0, 1.0, 4), "ramp")],
    )
    assert mixed.is_scheduled
    a, b = mixed._terms_at(2, drop_in=False), mixed._terms_at(3, drop_in=False)
    assert a[0] is b[0] and a[1] is b[1] and a[2] is not b[2]
    assert (a[2].weight, b[2].weight) == (0.25, 0.5)
    assert mixed.weights(5) == {"sq": 0.5, "ramp": 1.0}
    assert (
        repr(mixed) == "Pipeline(base_loss='base_sum', regularizers=[sq=0.5, ramp=linear(0, 1, 4)])"
    )


def test_as_loss_fn_uses_the_step_it_was_made_for():
    pipeline = tinkex.Pipeline(
        base_sum, regularizers=[RegularizerSpec(sum_sq, linear(0.0, 1.0, 4), "sq")]
    )
    for at, weight in ((1, 0.0), (3, 0.5), (9, 1.0)):
        lps = [t.clone().requires_grad_(True) for t in LP]
        loss, metrics = pipeline.as_loss_fn(step=at)(None, lps)
        assert metrics["reg/sq/weight"] == weight
        loss.backward()
        for lp, t in zip(lps, LP, strict=True):
            torch.testing.assert_close(lp.grad, 1.0 + weight * 2 * t, rtol=0, atol=1e-6)
        assert pipeline.as_loss_fn(at)(None, LP)[1]["reg/sq/weight"] == weight


# --------------------------------------------------------------------------- training


def squares(data, logprobs):
    return sum((lp**2).mean() for lp in logprobs), {}


def cross_entropy(data, logprobs):
    loss = sum(
        -(tinkex.loss_input(d, "weights", like=lp) * lp).sum()
        for d, lp in zip(data, logprobs, strict=True)
    )
    return loss, {}


def make_data(tokenizer):
    out = []
    for text in ("hello tinkex", "a scheduled weight"):
        ids = tokenizer.encode(text)
        out.append(
            Datum(
                model_input=ids[:-1],
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
            )
        )
    return out


RAMP = linear(0.0, 0.2, 2)  # 0.0, 0.1, 0.2 at steps 1, 2, 3


def ramp_specs():
    return [RegularizerSpec(squares, RAMP, "sq")]  # a new, equal list each step


async def test_forward_backward_custom_reports_the_weight_of_each_step(tmp_path: Path):
    params = tinkex.AdamParams(learning_rate=1e-2)
    reported = []
    async with await TrainingClient.create(backend="local", base_model="tiny", seed=0) as tc:
        data = make_data(tc.tokenizer)
        for at in (1, 2, 3):
            if at == 3:
                await tc.save_state(str(tmp_path / "two"))
            fb = await tc.forward_backward_custom(data, cross_entropy, regularizers=ramp_specs())
            if at == 1:  # one pipeline serves every step
                pipeline = tc._pipeline_cache[2]
            assert tc._pipeline_cache[2] is pipeline
            # accumulating a second batch before the optimizer step: the same step
            again = await tc.forward_backward_custom(
                data, cross_entropy, regularizers=ramp_specs(), mode="linearized"
            )
            reported.append(
                (
                    fb.custom.regularizers["sq"].weight,
                    fb.metrics["reg/sq/weight"],
                    again.custom.regularizers["sq"].weight,
                )
            )
            assert fb.custom.regularizers["sq"].contribution == (
                RAMP(at) * fb.custom.regularizers["sq"].value
            )
            await tc.optim_step(params)
        third = fb.custom
        # an explicit step wins over tc.step + 1
        explicit = await tc.forward_backward_custom(
            data, cross_entropy, regularizers=ramp_specs(), step=2
        )
        assert explicit.custom.regularizers["sq"].weight == 0.1
        with pytest.raises(SpecError) as info:
            await tc.forward_backward_custom(data, cross_entropy, regularizers=ramp_specs(), step=0)
        assert str(info.value) == (
            "step must be an integer >= 1 (the 1-based optimizer step) or None, got 0 (int)"
        )
    assert reported == [(0.0, 0.0, 0.0), (0.1, 0.1, 0.1), (0.2, 0.2, 0.2)]

    # resume after two steps: the third step's weight (and loss) are those of step 3
    async with await TrainingClient.create(backend="local", base_model="tiny", seed=99) as resumed:
        await resumed.load_state(str(tmp_path / "two"))
        assert resumed.step == 2
        fb = await resumed.forward_backward_custom(data, cross_entropy, regularizers=ramp_specs())
        reg = fb.custom.regularizers["sq"]
        assert (reg.weight, fb.metrics["reg/sq/weight"]) == (0.2, 0.2)
        assert reg.value == pytest.approx(third.regularizers["sq"].value, rel=1e-6)
        assert fb.custom.loss_total == pytest.approx(third.loss_total, rel=1e-6)
