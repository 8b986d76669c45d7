"""Tests of tinkex.regkit, the toolkit the regularizer plugins are built from.

The plugins' own tests (plugins/tinkex-reg-*/tests) exercise it end to end; these
pin the public helpers a third-party author relies on.
"""

from __future__ import annotations

import math

import pytest
import torch

import tinkex
from tinkex import regkit
from tinkex.testing import tinker_datum, tinkex_datum

datum = tinkex_datum
sdk_datum = tinker_datum  # the same datum as a tinker.Datum (values are TensorData)


BOTH_KINDS = pytest.mark.parametrize("make", [datum, sdk_datum], ids=["tinkex", "tinker"])


# --------------------------------------------------------------------------- layouts


def test_per_datum_logprobs_layouts():
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])
    assert regkit.per_datum_logprobs([a, b]) == [a, b]
    assert regkit.per_datum_logprobs((a, b)) == [a, b]
    (single,) = regkit.per_datum_logprobs(a)
    assert single is a
    m = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    rows = regkit.per_datum_logprobs(m)
    assert [r.tolist() for r in rows] == [[-1.0, -2.0], [-3.0, -4.0]]
    rows[1].sum().backward()  # rows are views: gradients reach the matrix
    assert m.grad.tolist() == [[0.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("logprobs", "match"),
    [
        (torch.zeros(()), r"got a tensor of shape \(\)"),
        (torch.zeros(1, 2, 3), r"shape \(1, 2, 3\)"),
        ([torch.zeros(2), [0.0, 1.0]], r"logprobs\[1\] \(datum 1\) must be a 1-D tensor, got list"),
        (
            [torch.zeros(2, 1)],
            r"logprobs\[0\] \(datum 0\) must be a 1-D tensor \(one logprob per token\), "
            r"got shape \(2, 1\)",
        ),
        ([torch.zeros(2, 1, 1)], r"logprobs\[0\] \(datum 0\) must be a 1-D tensor, got shape"),
        ("abc", "got str"),
        (3.0, "got float"),
    ],
)
def test_per_datum_logprobs_rejects_bad_layouts(logprobs, match):
    with pytest.raises(tinkex.SpecError, match=match) as info:
        regkit.per_datum_logprobs(logprobs, regularizer="mine")
    assert "regularizer 'mine'" in str(info.value)


# --------------------------------------------------------------------------- masks and inputs


def test_token_masks_from_weights_and_defaults():
    data = [datum(3, weights=[1.0, 0.0, 0.5]), datum(2)]
    lps = [torch.zeros(3), torch.zeros(2)]
    masks = regkit.token_masks(data, lps)
    assert [m.tolist() for m in masks] == [[True, False, True], [True, True]]
    assert all(m.dtype == torch.bool for m in masks)
    masks = regkit.token_masks(data, lps, mask=None)
    assert [m.tolist() for m in masks] == [[True, True, True], [True, True]]


def test_negative_weights_do_not_count():
    (mask,) = regkit.token_masks([datum(3, weights=[-1.0, 0.0, 2.0])], [torch.zeros(3)])
    assert mask.tolist() == [False, False, True]


def test_token_masks_errors_name_datum_key_and_shape():
    with pytest.raises(tinkex.SpecError, match="2 datums but logprobs for 1"):
        regkit.token_masks([datum(2), datum(2)], [torch.zeros(2)], regularizer="r")
    with pytest.raises(tinkex.SpecError) as info:
        regkit.token_masks(
            [datum(2), datum(3, weights=[1.0] * 3)],
            [torch.zeros(2), torch.zeros(4)],
            regularizer="r",
        )
    assert str(info.value) == (
        "regularizer 'r': loss input 'weights' of datum 1 has shape (3,), expected (4,) "
        "(the shape of that datum's logprobs)"
    )


def test_required_inputs_converts_to_the_logprobs_dtype():
    lp = torch.zeros(2, dtype=torch.float64)
    (ref,) = regkit.required_inputs([datum(2, ref=[-1.0, -2.0])], [lp], "ref")
    assert ref.dtype == torch.float64 and ref.tolist() == [-1.0, -2.0]


def test_required_inputs_missing_names_datum_key_and_shape():
    with pytest.raises(tinkex.SpecError) as info:
        regkit.required_inputs(
            [datum(2, ref=[0.0, 0.0]), datum(3)],
            [torch.zeros(2), torch.zeros(3)],
            "ref",
            regularizer="kl",
        )
    assert str(info.value) == (
        "regularizer 'kl': datum 1 has no loss input 'ref'; expected a tensor of shape (3,) "
        "(like its logprobs) in loss_fn_inputs['ref']"
    )


def test_required_inputs_accepts_tinker_datums():
    tinker = pytest.importorskip("tinker")
    sdk = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"ref": tinker.TensorData.from_torch(torch.tensor([-0.5, -1.5]))},
    )
    (ref,) = regkit.required_inputs([sdk], [torch.zeros(2)], "ref")
    assert ref.tolist() == [-0.5, -1.5]


# --------------------------------------------------------------------------- gather


def test_gather_selects_counted_tokens_and_aligned_inputs():
    data = [datum(3, weights=[1.0, 0.0, 1.0], ref=[-0.1, -0.2, -0.3]), datum(2, ref=[-0.4, -0.5])]
    lps = [
        torch.tensor([-1.0, -2.0, -3.0], requires_grad=True),
        torch.tensor([-4.0, -5.0], requires_grad=True),
    ]
    tokens = regkit.gather(data, lps, inputs=["ref"])
    assert tokens.values.tolist() == [-1.0, -3.0, -4.0, -5.0]
    assert tokens.inputs["ref"].tolist() == pytest.approx([-0.1, -0.3, -0.4, -0.5])
    assert tokens.count == 4
    assert [m.tolist() for m in tokens.masks] == [[True, False, True], [True, True]]
    tokens.mean(tokens.values).backward()
    assert lps[0].grad.tolist() == [0.25, 0.0, 0.25]
    assert lps[1].grad.tolist() == [0.25, 0.25]


def test_gather_without_any_weights_selects_everything():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    tokens = regkit.gather([datum(2), datum(2)], lp)
    assert tokens.selection is None
    assert tokens.values.tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert [m.tolist() for m in tokens.masks] == [[True, True], [True, True]]


def test_empty_selection_mean_is_zero_and_attached():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    tokens = regkit.gather([datum(2, weights=[0.0, 0.0])], [lp])
    assert tokens.count == 0
    loss = tokens.mean(tokens.values.square())
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert lp.grad.tolist() == [0.0, 0.0]


def test_gather_of_an_empty_batch():
    tokens = regkit.gather([], [])
    assert tokens.count == 0 and tokens.mean(tokens.values).item() == 0.0
    x, m = tokens.padded()
    assert x.shape == (0, 0) and m.shape == (0, 0)


def test_padded_fills_uncounted_and_padding_positions():
    lps = [
        torch.tensor([-1.0, -2.0, -3.0], requires_grad=True),
        torch.tensor([-4.0], requires_grad=True),
    ]
    tokens = regkit.gather([datum(3, weights=[1.0, 0.0, 1.0]), datum(1)], lps)
    x, m = tokens.padded(fill=9.0)
    assert x.tolist() == [[-1.0, 9.0, -3.0], [-4.0, 9.0, 9.0]]
    assert m.tolist() == [[True, False, True], [True, False, False]]
    x.sum().backward()
    assert lps[0].grad.tolist() == [1.0, 0.0, 1.0]


# --------------------------------------------------------------------------- top-K (N, K) logprobs

#: The one-line refusal of a 2-D per-datum tensor by a regularizer that did not opt in.
REFUSAL = (
    "regularizer 'mine': logprobs[1] (datum 1) must be a 1-D tensor (one logprob per token), "
    "got shape (3, 2), top-K logprobs (N positions, K tokens each) that 'mine' does not handle; "
    "use it on target-token logprobs (l1, l2, elastic_net, kl and consistency work elementwise "
    "on top-K logprobs); a regularizer written for (N, K) opts in with the class attribute "
    "top_k = True (or gather(..., top_k=True))"
)


def test_top_k_logprobs_are_refused_in_one_line_unless_opted_in():
    lps = [torch.zeros(2), torch.zeros(3, 2)]
    for call in (
        lambda: regkit.per_datum_logprobs(lps, regularizer="mine"),
        lambda: regkit.gather([datum(2), datum(3)], lps, regularizer="mine"),
    ):
        with pytest.raises(tinkex.SpecError) as info:
            call()
        assert str(info.value) == REFUSAL and "\n" not in str(info.value)
    assert regkit.per_datum_logprobs(lps, top_k=True) == lps
    with pytest.raises(
        tinkex.SpecError,
        match=r"logprobs\[0\] \(datum 0\) must be a 1-D \(N,\) or 2-D \(N, K\) top-K tensor, "
        r"got shape \(3, 2, 1\)$",
    ):
        regkit.per_datum_logprobs([torch.zeros(3, 2, 1)], top_k=True)
    # a single tensor keeps its meaning: 2-D is [B, T] rows, 3-D is an error
    assert len(regkit.per_datum_logprobs(torch.zeros(3, 2), top_k=True)) == 3
    with pytest.raises(tinkex.SpecError, match=r"got a tensor of shape \(1, 3, 2\)"):
        regkit.per_datum_logprobs(torch.zeros(1, 3, 2), top_k=True)


@BOTH_KINDS
def test_gather_top_k_flattens_counted_elements_with_aligned_inputs(make):
    # datum 0: (3, 2) with (3,) weights, broadcast over K; datum 1: (2, 2), no weights.
    data = [
        make(3, weights=[1.0, 0.0, 1.0], ref=[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]),
        make(2, ref=[[0.7, 0.8], [0.9, 1.0]]),
    ]
    a = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]], requires_grad=True)
    b = torch.tensor([[-7.0, -8.0], [-9.0, -10.0]], requires_grad=True)
    tokens = regkit.gather(data, [a, b], inputs=["ref"], top_k=True)
    assert tokens.values.tolist() == [-1.0, -2.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    assert tokens.inputs["ref"].tolist() == pytest.approx([0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert tokens.count == 8
    assert [m.tolist() for m in tokens.masks] == [
        [[True, True], [False, False], [True, True]],
        [[True, True], [True, True]],
    ]
    assert tokens.logprobs[0] is a and tokens.logprobs[1] is b
    tokens.mean(tokens.values).backward()  # d mean / d element = 1/8 where counted, else 0
    assert a.grad.tolist() == [[0.125, 0.125], [0.0, 0.0], [0.125, 0.125]]
    assert b.grad.tolist() == [[0.125, 0.125], [0.125, 0.125]]


def test_gather_top_k_without_masks_takes_the_fast_path():
    a = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    tokens = regkit.gather([datum(2, mask=[0.0, 0.0])], [a], mask=None, top_k=True)
    assert tokens.selection is None and tokens.values.tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert [m.tolist() for m in tokens.masks] == [[[True, True], [True, True]]]
    tokens.values.square().sum().backward()
    assert a.grad.tolist() == [[-2.0, -4.0], [-6.0, -8.0]]
    tokens = regkit.gather([datum(2)], [a.detach()], top_k=True)  # no weights, no mask
    assert tokens.selection is None and tokens.count == 4


def test_padded_top_k_with_one_k():
    lps = [torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), torch.tensor([[-5.0, -6.0]])]
    tokens = regkit.gather([datum(2, weights=[1.0, 0.0]), datum(1)], lps, top_k=True)
    x, m = tokens.padded(fill=9.0)
    assert x.tolist() == [[[-1.0, -2.0], [9.0, 9.0]], [[-5.0, -6.0], [9.0, 9.0]]]
    assert m.tolist() == [[[True, True], [False, False]], [[True, True], [False, False]]]


# --------------------------------------------------------------------------- weights and mask


@BOTH_KINDS
@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({}, [True, True, True, True]),
        ({"weights": [1.0, 0.0, 0.5, 1.0]}, [True, False, True, True]),
        ({"mask": [0.0, 0.0, 1.0, 1.0]}, [False, False, True, True]),  # tinker-cookbook RL datums
        (
            {"weights": [1.0, 0.0, 0.5, 1.0], "mask": [0.0, 1.0, 1.0, 1.0]},
            [False, False, True, True],
        ),
        (
            {"weights": [-1.0, 2.0, 2.0, 2.0], "mask": [1.0, 1.0, -3.0, 1.0]},
            [False, True, False, True],
        ),
    ],
    ids=["neither", "weights", "mask", "both", "negatives"],
)
def test_mask_weights_reads_weights_and_mask(make, inputs, expected):
    (m,) = regkit.token_masks([make(4, **inputs)], [torch.zeros(4)])
    assert m.tolist() == expected
    (m,) = regkit.token_masks([make(4, **inputs)], [torch.zeros(4)], mask=None)
    assert m.tolist() == [True] * 4


@BOTH_KINDS
def test_mask_shapes_for_top_k_logprobs(make):
    lp = torch.zeros(3, 2)
    weights = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]  # (N, K): elementwise
    mask = [1.0, 1.0, 0.0]  # (N,): all K slots of a position
    (m,) = regkit.token_masks([make(3, weights=weights)], [lp])
    assert m.tolist() == [[True, False], [True, True], [False, True]]
    (m,) = regkit.token_masks([make(3, mask=mask)], [lp])
    assert m.tolist() == [[True, True], [True, True], [False, False]]
    (m,) = regkit.token_masks([make(3, weights=weights, mask=mask)], [lp])
    assert m.tolist() == [[True, False], [True, True], [False, False]]
    (m,) = regkit.token_masks([make(3, weights=[1.0, 0.0, 1.0], mask=mask)], [lp])
    assert m.tolist() == [[True, True], [False, False], [False, False]]


def test_mask_keys_in_their_own_dtype():
    # a tiny positive weight counts, though it underflows to 0 in float16 logprobs
    (m,) = regkit.token_masks(
        [datum(2, weights=[1e-8, 0.0])], [torch.zeros(2, dtype=torch.float16)]
    )
    assert m.tolist() == [True, False]
    assert regkit.MASK_KEYS == ("weights", "mask")


@pytest.mark.parametrize(
    ("lp", "inputs", "message"),
    [
        (
            torch.zeros(3, 2),
            {"mask": [1.0, 1.0]},
            "regularizer 'r': loss input 'mask' of datum 1 has shape (2,), expected (3, 2) or (3,) "
            "(the shape of that datum's logprobs, or one value per position)",
        ),
        (
            torch.zeros(3, 2),
            {"weights": [[1.0, 1.0, 1.0]] * 3},
            "regularizer 'r': loss input 'weights' of datum 1 has shape (3, 3), expected (3, 2) "
            "or (3,) (the shape of that datum's logprobs, or one value per position)",
        ),
        (
            torch.zeros(3),
            {"weights": [1.0, 1.0, 1.0], "mask": [[1.0], [1.0], [1.0]]},
            "regularizer 'r': loss input 'mask' of datum 1 has shape (3, 1), expected (3,) "
            "(the shape of that datum's logprobs)",
        ),
    ],
    ids=["mask_n", "weights_k", "mask_2d_for_1d"],
)
def test_mask_shape_errors_name_datum_key_shape_and_expected(lp, inputs, message):
    # tinker.Datum does not check shapes; tinkex.Datum would refuse the first one already
    with pytest.raises(tinkex.SpecError) as info:
        regkit.token_masks(
            [datum(1), sdk_datum(3, **inputs)], [torch.zeros(1), lp], regularizer="r"
        )
    assert str(info.value) == message


def test_required_inputs_must_match_top_k_logprobs():
    with pytest.raises(tinkex.SpecError) as info:
        regkit.gather(
            [datum(2, ref=[-1.0, -2.0])],
            [torch.zeros(2, 3)],
            inputs=["ref"],
            top_k=True,
            regularizer="kl",
        )
    assert str(info.value) == (
        "regularizer 'kl': loss input 'ref' of datum 0 has shape (2,), expected (2, 3) "
        "(the shape of that datum's logprobs)"
    )


# --------------------------------------------------------------------------- math and metrics


def test_l2_normalize_keeps_zero_rows_zero_with_finite_gradients():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = regkit.l2_normalize(x)
    assert y.tolist() == [[0.6, 0.8], [0.0, 0.0]]
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[1].tolist() == [0.0, 0.0]
    assert torch.autograd.gradcheck(
        regkit.l2_normalize,
        (torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64, requires_grad=True),),
    )


def test_float_metrics_gives_plain_floats_in_order():
    out = regkit.float_metrics(
        {"b": torch.tensor(2.5, requires_grad=True), "a": 1, "c": torch.tensor([3.0])}
    )
    assert out == {"b": 2.5, "a": 1.0, "c": 3.0}
    assert list(out) == ["b", "a", "c"]
    assert all(type(v) is float for v in out.values())


# --------------------------------------------------------------------------- parameter checks


def test_check_number_messages():
    assert regkit.check_number("entropy", "temperature", 2, gt=0) == 2.0
    with pytest.raises(tinkex.SpecError) as info:
        regkit.check_number("entropy", "temperature", -1.0, gt=0)
    assert (
        str(info.value) == "parameter 'temperature' of regularizer 'entropy' must be > 0, got -1.0"
    )
    with pytest.raises(tinkex.SpecError, match=r"must be >= 0 and <= 1, got 1\.5$"):
        regkit.check_number("elastic_net", "l1_ratio", 1.5, ge=0, le=1)
    for bad in (True, "1", None, float("nan"), math.inf):
        with pytest.raises(tinkex.SpecError, match="must be a finite real number > 0"):
            regkit.check_number("entropy", "temperature", bad, gt=0)
    assert regkit.check_number("kl", "clip", math.inf, gt=0, allow_inf=True) == math.inf
    with pytest.raises(tinkex.SpecError, match="must be a real number > 0, got nan"):
        regkit.check_number("kl", "clip", float("nan"), gt=0, allow_inf=True)


def test_check_helpers_share_the_config_message_format():
    from tinkex._config import config_from_dict, problem

    with pytest.raises(tinkex.SpecError) as info:
        regkit.check_number("entropy", "temperature", "1", gt=0)
    assert str(info.value) == problem(
        "parameter 'temperature' of regularizer 'entropy'",
        "a finite real number > 0",
        "1",
        wrong_type=True,
    )
    assert str(info.value).endswith("got '1' (str)")  # a wrong type is named
    # the same rule words the same requirement in a config and in a regularizer
    with pytest.raises(tinkex.SpecError) as reg:
        regkit.check_number("l2", "weight", -0.5, ge=0)
    with pytest.raises(tinkex.ConfigError) as cfg:
        config_from_dict({"regularizers": [{"name": "l2", "weight": -0.5}]})
    assert str(reg.value).split(" must be ")[1] == str(cfg.value).split(" must be ")[1]
    with pytest.raises(tinkex.SpecError, match=r"must be True or False, got 'yes' \(str\)$"):
        regkit.check_bool("entropy", "normalize", "yes")
    with pytest.raises(tinkex.SpecError, match=r"must be one of 'k3', 'k2', got 3 \(int\)$"):
        regkit.check_choice("kl", "estimator", 3, ("k3", "k2"))
    with pytest.raises(tinkex.SpecError, match=r"naming a loss input, got None \(NoneType\)$"):
        regkit.check_key("kl", "reference", None)


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "minus_huge"])
def test_check_number_rejects_ints_that_overflow_a_float(value):
    with pytest.raises(tinkex.SpecError, match="must be a real number"):
        regkit.check_number("kl", "clip", value, gt=0, allow_inf=True)
    with pytest.raises(tinkex.SpecError, match="must be a finite real number"):
        regkit.check_number("kl", "clip", value)
    assert regkit.check_number("r", "p", 10**300) == 1e300


def test_check_choice_bool_key_and_mask():
    assert regkit.check_choice("kl", "estimator", "k2", ("k3", "k2")) == "k2"
    assert regkit.check_choice("l2", "center", None, (None, "mean")) is None
    with pytest.raises(tinkex.SpecError) as info:
        regkit.check_choice("kl", "estimator", "k9", ("k3", "k2"))
    assert (
        str(info.value)
        == "parameter 'estimator' of regularizer 'kl' must be one of 'k3', 'k2', got 'k9'"
    )
    with pytest.raises(tinkex.SpecError, match="must be one of 1, 2"):
        regkit.check_choice("r", "p", True, (1, 2))  # True == 1, but it is not an int choice
    assert regkit.check_bool("entropy", "normalize", False) is False
    with pytest.raises(
        tinkex.SpecError, match="'normalize' of regularizer 'entropy' must be True or False, got 1"
    ):
        regkit.check_bool("entropy", "normalize", 1)
    assert regkit.check_key("kl", "reference", "ref") == "ref"
    with pytest.raises(
        tinkex.SpecError, match="'reference' of regularizer 'kl' must be a non-empty str"
    ):
        regkit.check_key("kl", "reference", " ")
    assert regkit.check_mask("l1", "weights") == "weights" and regkit.check_mask("l1", None) is None
    with pytest.raises(
        tinkex.SpecError,
        match="'mask' of regularizer 'l1' must be one of 'weights', None, got 'all'$",
    ):
        regkit.check_mask("l1", "all")


# --------------------------------------------------------------------------- base class


class Scaled(regkit.Regularizer):
    name = "scaled"
    description = "Scaled mean of the counted logprobs."

    def __init__(self, *, scale: float = 1.0, mask: str | None = "weights") -> None:
        super().__init__(mask=mask)
        self.scale = regkit.check_number(self.name, "scale", scale, gt=0)

    def __call__(self, data, logprobs):
        tokens = self.gather(data, logprobs)
        loss = self.scale * tokens.mean(tokens.values)
        return loss, regkit.float_metrics({"scaled": loss})


def test_base_class_gather_repr_and_contract():
    reg = Scaled(scale=2.0, mask=None)
    assert repr(reg) == "Scaled(scale=2.0, mask=None)"
    assert reg.params() == {"scale": 2.0, "mask": None}
    assert Scaled.parameter_names() == ("scale", "mask")
    lp = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss, metrics = reg([datum(2, weights=[1.0, 0.0])], [lp])
    assert loss.item() == -4.0 and metrics == {"scaled": -4.0}
    loss.backward()
    assert lp.grad.tolist() == [1.0, 1.0]
    tinkex.testing.check_regularizer_class(Scaled)
    with pytest.raises(tinkex.SpecError, match="'mask' of regularizer 'scaled'"):
        Scaled(mask="tokens")


def test_base_class_checks_name_and_description_at_definition():
    with pytest.raises(TypeError, match=r"name must match \[a-z\]\[a-z0-9_\]\*, got 'Bad-Name'"):

        class BadName(regkit.Regularizer):
            name = "Bad-Name"

    with pytest.raises(TypeError, match="description must be one non-empty line"):

        class BadDescription(regkit.Regularizer):
            name = "fine"
            description = "two\nlines"


class TopKMean(Scaled):
    name = "top_k_mean"
    top_k = True


def test_top_k_is_opt_in_per_class():
    assert regkit.Regularizer.top_k is False and Scaled.top_k is False and TopKMean.top_k is True
    data = [datum(2, mask=[0.0, 1.0])]
    lp = torch.tensor([[-1.0, -3.0], [-5.0, -7.0]], requires_grad=True)
    loss, _ = TopKMean(scale=2.0)(data, [lp])
    assert loss.item() == -12.0  # 2 * mean(-5, -7)
    loss.backward()
    assert lp.grad.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(tinkex.SpecError) as info:
        Scaled()(data, [lp])
    message = str(info.value)
    assert message.startswith("regularizer 'scaled': logprobs[0] (datum 0) must be a 1-D tensor")
    assert "got shape (2, 2)" in message and "top_k = True" in message and "\n" not in message
    with pytest.raises(TypeError, match=r"top_k must be True or False, got 1"):

        class BadTopK(regkit.Regularizer):
            name = "bad_top_k"
            top_k = 1


def test_base_class_call_must_be_implemented():
    class NoCall(regkit.Regularizer):
        name = "no_call"
        description = "Forgets __call__."

    with pytest.raises(NotImplementedError, match="must implement __call__"):
        NoCall()([datum(1)], [torch.zeros(1)])


def test_top_k_gradients_reach_non_contiguous_logprobs():
    base = torch.tensor([[-1.0, -3.0], [-2.0, -4.0]], requires_grad=True)
    lp = base.T  # (2, 2), not contiguous: flattening copies, autograd still flows
    tokens = regkit.gather([datum(2, weights=[1.0, 0.0])], [lp], top_k=True)
    assert tokens.values.tolist() == [-1.0, -2.0]
    tokens.values.sum().backward()
    assert base.grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]
