"""RegularizerSpec validation, Datum conversion, and the output value types."""

from __future__ import annotations

import functools
import math

import attrs
import pytest
import torch

import tinkex
from tinkex import Datum, RegularizerSpec, SpecError


def fn(data, lp):
    return lp.sum(), {}


async def afn(data, lp):
    return lp.sum(), {}


class CallableReg:
    def __call__(self, data, logprobs):
        return logprobs.sum(), {}


class AsyncCallableReg:
    async def __call__(self, data, logprobs):
        return logprobs.sum(), {}


@pytest.mark.parametrize("weight", [0, 1, 0.5, 1e6])
def test_valid_weights(weight):
    assert RegularizerSpec(fn, weight, "x").weight == weight


@pytest.mark.parametrize(
    "weight",
    [
        tinkex.schedules.linear(0.0, 0.1, 200),
        tinkex.schedules.cosine(1, 0, 5),
        tinkex.schedules.step(0.5, 0.0, 3),
        tinkex.schedules.constant(0),
    ],
)
def test_a_schedule_is_a_valid_weight(weight):
    spec = RegularizerSpec(fn, weight, "x")
    assert spec.weight is weight and spec.is_scheduled
    assert spec.weight_at(1) == weight(1)
    assert attrs.evolve(spec, weight=0.5).weight_at() == 0.5


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (-0.1, "-0.1"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (True, "True"),
        ("0.1", "'0.1'"),
        (None, "None"),
    ],
)
def test_bad_weight_names_field_value_and_regularizer(weight, shown):
    with pytest.raises(SpecError) as info:
        RegularizerSpec(fn, weight, "l1")
    msg = str(info.value)
    assert "weight must be a finite number >= 0" in msg and shown in msg and "'l1'" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_bad_name(name):
    with pytest.raises(SpecError, match="name must be a non-empty str"):
        RegularizerSpec(fn, 1.0, name)


def test_bad_fn():
    with pytest.raises(SpecError, match="fn must be callable.*'x'"):
        RegularizerSpec(42, 1.0, "x")
    with pytest.raises(SpecError, match="two positional arguments"):
        RegularizerSpec(lambda lp: lp, 1.0, "x")
    with pytest.raises(SpecError, match="two positional arguments"):
        RegularizerSpec(lambda a, b, c: a, 1.0, "x")
    # extra optional/variadic parameters are fine
    RegularizerSpec(lambda a, b, c=1: a, 1.0, "x")
    RegularizerSpec(lambda *args: args, 1.0, "x")


def test_bad_is_async_and_enabled():
    with pytest.raises(SpecError, match="is_async must be"):
        RegularizerSpec(fn, 1.0, "x", is_async="yes")
    with pytest.raises(SpecError, match="enabled must be a bool"):
        RegularizerSpec(fn, 1.0, "x", enabled=1)


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        (fn, False),
        (afn, True),
        (CallableReg(), False),
        (AsyncCallableReg(), True),
        (functools.partial(afn), True),
        (functools.partial(fn), False),
    ],
)
def test_is_async_is_inferred(f, expected):
    assert RegularizerSpec(f, 1.0, "x").runs_async is expected
    assert RegularizerSpec(f, 1.0, "x", is_async=not expected).runs_async is (not expected)


def test_spec_is_frozen():
    s = RegularizerSpec(fn, 1.0, "x")
    with pytest.raises(AttributeError):
        s.weight = 2.0


def test_datum_converts_lists():
    d = Datum(
        model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0, 1, 1]}
    )
    assert d.model_input == (1, 2, 3)
    assert d.loss_fn_inputs["target_tokens"].dtype == torch.int64
    assert d.loss_fn_inputs["weights"].dtype == torch.float32
    assert d.tokens() == [1, 2, 3] and len(d) == 3
    assert tinkex.loss_input(d, "weights").tolist() == [0.0, 1.0, 1.0]
    assert tinkex.loss_input(d, "missing") is None
    assert tinkex.model_input_ints(d) == [1, 2, 3]


def test_datum_length_mismatch_and_bad_values():
    with pytest.raises(SpecError) as info:
        Datum(model_input=[1, 2, 3], loss_fn_inputs={"weights": [1, 1]})
    assert str(info.value) == (
        "loss_fn_inputs['weights'] has shape (2,), expected (3,) or (3, K) with K >= 1; "
        "model_input has 3 tokens"
    )
    with pytest.raises(SpecError, match="model_input"):
        Datum(model_input="abc")
    with pytest.raises(SpecError, match="loss_fn_inputs\\['x'\\]"):
        Datum(model_input=[1], loss_fn_inputs={"x": ["a"]})


def test_datum_accepts_tinker_types():
    tinker = pytest.importorskip("tinker")
    mi = tinker.ModelInput.from_ints([5, 6, 7])
    weights = tinker.TensorData.from_torch(torch.tensor([0.0, 1.0, 1.0]))
    d = Datum(model_input=mi, loss_fn_inputs={"weights": weights})
    assert d.tokens() == [5, 6, 7]
    assert torch.equal(d.loss_fn_inputs["weights"], torch.tensor([0.0, 1.0, 1.0]))
    td = tinker.Datum(model_input=mi, loss_fn_inputs={"weights": weights})
    assert (
        tinkex.loss_input(td, "weights", like=torch.zeros(1, dtype=torch.float64)).dtype
        == torch.float64
    )
    assert tinkex.model_input_ints(td) == [5, 6, 7]


def test_output_types_coerce_to_float():
    out = tinkex.RegularizerOutput(
        name="a", value=1, weight=2, contribution=2, custom={"m": torch.tensor(3)}
    )
    assert out.value == 1.0 and isinstance(out.value, float)
    assert out.custom == {"m": 3.0} and isinstance(out.custom["m"], float)
    assert math.isnan(
        tinkex.BaseLossOutput(value=float("nan")).value
    )  # types carry; the executor validates


def test_specs_built_from_the_same_bound_method_are_equal_and_hash_alike():
    class Reg:
        def __call__(self, data, lp):
            return lp.sum(), {}

        def term(self, data, lp):
            return lp.sum(), {}

    reg = Reg()
    a = RegularizerSpec(reg.term, 0.5, "t")
    b = RegularizerSpec(reg.term, 0.5, "t")
    assert a.fn is not b.fn  # two bound-method objects
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert RegularizerSpec(Reg().term, 0.5, "t") != a  # another instance


def test_a_datum_cannot_be_changed_through_its_accessors():
    d = Datum(model_input=[1, 2, 3], loss_fn_inputs={"weights": [0, 1, 1]})
    tokens = d.tokens()
    tokens.append(4)
    assert d.tokens() == [1, 2, 3] and len(d) == 3
    with pytest.raises(AttributeError):
        d.model_input.append(4)
    with pytest.raises(TypeError):
        d.loss_fn_inputs["weights"] = torch.ones(5)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        d.model_input = [1, 2, 3, 4, 5]
    assert tinkex.loss_input(d, "weights").tolist() == [0.0, 1.0, 1.0]


# --------------------------------------------------------------------------- Datum shapes (top-K)

TOP_K_TARGETS = [[11, 12], [21, 22], [31, 32]]  # n = 3 positions, K = 2 target tokens each


@pytest.mark.parametrize(
    "inputs",
    [
        {"target_tokens": [1, 2, 3], "weights": [1, 0, 1], "mask": [0, 1, 1]},
        {"target_tokens": TOP_K_TARGETS},
        {"target_tokens": TOP_K_TARGETS, "weights": [1, 0, 1]},  # (n,): one per position
        {"target_tokens": TOP_K_TARGETS, "weights": [[1, 0], [1, 1], [0, 0]], "mask": [0, 1, 1]},
        {"target_tokens": [[5], [6], [7]], "weights": [[1], [0], [1]]},  # K = 1
        {"weights": [[1, 0, 1, 1]] * 3, "mask": [1, 1, 0]},  # no target_tokens: (n,) or (n, K)
        {"mask": [1, 1, 0]},
    ],
    ids=["flat", "top_k", "top_k_flat_weights", "top_k_both", "k1", "no_targets", "mask_only"],
)
def test_datum_accepts_flat_and_top_k_shapes(inputs):
    d = Datum(model_input=[1, 2, 3], loss_fn_inputs=inputs)
    for key, value in inputs.items():
        tensor = d.loss_fn_inputs[key]
        assert tensor.tolist() == value
        assert tensor.dtype == (torch.int64 if key == "target_tokens" else torch.float32)
    assert len(d) == 3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"target_tokens": [[1, 2], [3, 4]]},
            "loss_fn_inputs['target_tokens'] has shape (2, 2), expected (3,) or (3, K) with "
            "K >= 1 target tokens per position (top-K losses); model_input has 3 tokens",
        ),
        (
            {"target_tokens": torch.zeros(3, 0, dtype=torch.int64)},
            "loss_fn_inputs['target_tokens'] has shape (3, 0), expected (3,) or (3, K) with "
            "K >= 1 target tokens per position (top-K losses); model_input has 3 tokens",
        ),
        (
            {"target_tokens": torch.zeros(3, 2, 1, dtype=torch.int64)},
            "loss_fn_inputs['target_tokens'] has shape (3, 2, 1), expected (3,) or (3, K) with "
            "K >= 1 target tokens per position (top-K losses); model_input has 3 tokens",
        ),
        (
            {"target_tokens": TOP_K_TARGETS, "weights": [[1, 1, 1]] * 3},
            "loss_fn_inputs['weights'] has shape (3, 3), expected (3,) or (3, 2), the shape of "
            "target_tokens; model_input has 3 tokens",
        ),
        (
            {"target_tokens": TOP_K_TARGETS, "mask": [1, 1]},
            "loss_fn_inputs['mask'] has shape (2,), expected (3,) or (3, 2), the shape of "
            "target_tokens; model_input has 3 tokens",
        ),
        (
            {"target_tokens": [1, 2, 3], "weights": [[1, 1]] * 3},
            "loss_fn_inputs['weights'] has shape (3, 2), expected (3,), the shape of "
            "target_tokens; model_input has 3 tokens",
        ),
        (
            {"mask": [[1, 1, 1]]},  # 3 elements, but not (3,) nor (3, K)
            "loss_fn_inputs['mask'] has shape (1, 3), expected (3,) or (3, K) with K >= 1; "
            "model_input has 3 tokens",
        ),
    ],
    ids=["n_rows", "k0", "three_d", "weights_k", "mask_n", "weights_2d_flat", "mask_row"],
)
def test_datum_refuses_other_shapes_naming_key_shape_and_accepted(inputs, message):
    with pytest.raises(SpecError) as info:
        Datum(model_input=[1, 2, 3], loss_fn_inputs=inputs)
    assert str(info.value) == message


def test_datum_accepts_tinker_top_k_inputs():
    tinker = pytest.importorskip("tinker")
    targets = torch.tensor(TOP_K_TARGETS)
    mask = torch.tensor([0.0, 1.0, 1.0])
    d = Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_torch(targets),
            "mask": tinker.TensorData.from_torch(mask),
        },
    )
    assert torch.equal(d.loss_fn_inputs["target_tokens"], targets)
    assert d.loss_fn_inputs["target_tokens"].dtype == torch.int64
    assert torch.equal(d.loss_fn_inputs["mask"], mask)
    with pytest.raises(
        SpecError, match=r"'weights'\] has shape \(3, 3\), expected \(3,\) or \(3, 2\)"
    ):
        Datum(
            model_input=tinker.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={
                "target_tokens": tinker.TensorData.from_torch(targets),
                "weights": tinker.TensorData.from_torch(torch.ones(3, 3)),
            },
        )


def test_a_top_k_datum_is_immutable():
    d = Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": TOP_K_TARGETS})
    with pytest.raises(TypeError):
        d.loss_fn_inputs["weights"] = torch.ones(3, 2)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        d.loss_fn_inputs = {}


def test_token_ids_are_never_truncated_and_masks_may_be_bools():
    d = Datum(
        model_input=[1, 2, 3],
        loss_fn_inputs={
            "target_tokens": [2.0, 3.0, 4.0],  # whole numbers: fine
            "weights": torch.tensor([True, False, True]),  # the `ids != pad` idiom
            "mask": torch.tensor([1, 0, 1], dtype=torch.uint8),
        },
    )
    assert d.loss_fn_inputs["target_tokens"].dtype == torch.int64
    assert d.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4]
    assert d.loss_fn_inputs["weights"].dtype == torch.float32
    assert d.loss_fn_inputs["weights"].tolist() == [1.0, 0.0, 1.0]
    for bad, shown in (([2.9, 3, 4], "2.9"), (torch.tensor([1.0, float("nan"), 2.0]), "nan")):
        with pytest.raises(SpecError, match=rf"must be token ids \(integers\), got {shown}"):
            Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": bad})
    with pytest.raises(SpecError, match="got bools"):
        Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": torch.tensor([True, False])})
