"""CustomLossOutput JSON: the exact schema, key sets, and an exact round trip."""

from __future__ import annotations

import json

import pytest

from tinkex import BaseLossOutput, CustomLossOutput, RegularizerOutput, SpecError

WORKED = {
    "loss_total": 12.0,
    "regularizer_total": 11.0,
    "base_loss": {"value": 1.0, "grad_norm": None, "custom": {}},
    "regularizers": {
        "a": {
            "value": 10.0,
            "weight": 0.1,
            "contribution": 1.0,
            "grad_norm": None,
            "grad_norm_weighted": None,
            "custom": {},
        }
    },
    "total_grad_norm": 5.67,
}


def make(total_grad_norm=5.67):
    return CustomLossOutput(
        loss_total=12.0,
        base_loss=BaseLossOutput(value=1.0),
        regularizers={"a": RegularizerOutput(name="a", value=10.0, weight=0.1, contribution=1.0)},
        regularizer_total=11.0,
        total_grad_norm=total_grad_norm,
    )


def test_to_dict_matches_the_documented_schema_exactly():
    assert make().to_dict() == WORKED
    assert list(make().to_dict()) == [
        "loss_total",
        "regularizer_total",
        "base_loss",
        "regularizers",
        "total_grad_norm",
    ]


def test_total_grad_norm_key_is_omitted_when_not_tracked():
    d = make(total_grad_norm=None).to_dict()
    assert "total_grad_norm" not in d
    assert set(d) == {"loss_total", "regularizer_total", "base_loss", "regularizers"}


def test_key_sets():
    d = make().to_dict()
    assert set(d["base_loss"]) == {"value", "grad_norm", "custom"}
    assert set(d["regularizers"]["a"]) == {
        "value",
        "weight",
        "contribution",
        "grad_norm",
        "grad_norm_weighted",
        "custom",
    }


def test_standalone_regularizer_output_includes_name_and_omits_none_grads():
    r = RegularizerOutput(name="a", value=10.0, weight=0.1, contribution=1.0, custom={"k": 2})
    assert r.to_dict() == {
        "name": "a",
        "value": 10.0,
        "weight": 0.1,
        "contribution": 1.0,
        "custom": {"k": 2.0},
    }
    r2 = RegularizerOutput(
        name="a", value=1, weight=2, contribution=2, grad_norm=3, grad_norm_weighted=6
    )
    assert r2.to_dict()["grad_norm"] == 3.0 and r2.to_dict()["grad_norm_weighted"] == 6.0
    assert RegularizerOutput.from_dict(r.to_dict()) == r
    assert RegularizerOutput.from_dict(r2.to_dict()) == r2


@pytest.mark.parametrize("tracked", [True, False])
def test_round_trip_is_exact(tracked):
    out = CustomLossOutput(
        loss_total=0.1 + 0.2,
        base_loss=BaseLossOutput(
            value=0.1, grad_norm=1 / 3 if tracked else None, custom={"tokens": 17.0}
        ),
        regularizers={
            "kl_sft": RegularizerOutput(
                name="kl_sft",
                value=2.0 / 3.0,
                weight=0.3,
                contribution=0.3 * 2.0 / 3.0,
                grad_norm=1e-12 if tracked else None,
                grad_norm_weighted=3e-13 if tracked else None,
                custom={"kl_max": 1e300},
            ),
            "l1": RegularizerOutput(name="l1", value=0.0, weight=0.0, contribution=0.0),
        },
        regularizer_total=0.2,
        total_grad_norm=7.0 if tracked else None,
    )
    assert CustomLossOutput.from_dict(out.to_dict()) == out
    assert CustomLossOutput.from_json(out.to_json()) == out
    assert list(CustomLossOutput.from_json(out.to_json()).regularizers) == ["kl_sft", "l1"]
    assert json.loads(out.to_json()) == out.to_dict()


def test_all_numbers_are_plain_floats():
    d = make().to_dict()
    assert type(d["loss_total"]) is float and type(d["regularizers"]["a"]["weight"]) is float


def test_non_finite_numbers_never_reach_json_silently():
    bad = CustomLossOutput(
        loss_total=float("nan"),
        base_loss=BaseLossOutput(value=1.0),
        regularizers={},
        regularizer_total=0.0,
    )
    with pytest.raises(ValueError):
        bad.to_json()


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(SpecError, match="unknown keys \\['extra'\\]"):
        CustomLossOutput.from_dict({**WORKED, "extra": 1})
    broken = json.loads(json.dumps(WORKED))
    del broken["regularizers"]["a"]["weight"]
    with pytest.raises(SpecError, match="missing keys \\['weight'\\]"):
        CustomLossOutput.from_dict(broken)


def test_flat_metrics():
    out = CustomLossOutput(
        loss_total=12.0,
        base_loss=BaseLossOutput(value=1.0, grad_norm=2.0, custom={"tokens": 5}),
        regularizers={
            "a": RegularizerOutput(
                name="a",
                value=10.0,
                weight=0.1,
                contribution=1.0,
                grad_norm=4.0,
                grad_norm_weighted=0.4,
                custom={"value": 9, "m": 1},
            )
        },
        regularizer_total=11.0,
        total_grad_norm=5.67,
    )
    assert out.flat_metrics() == {
        "loss_total": 12.0,
        "regularizer_total": 11.0,
        "total_grad_norm": 5.67,
        "base_loss/value": 1.0,
        "base_loss/grad_norm": 2.0,
        "base_loss/grad_share": pytest.approx(2.0 / 2.4),
        "base_loss/tokens": 5.0,
        "reg/a/value": 10.0,
        "reg/a/weight": 0.1,
        "reg/a/contribution": 1.0,
        "reg/a/grad_norm": 4.0,
        "reg/a/grad_norm_weighted": 0.4,
        "reg/a/grad_share": pytest.approx(0.4 / 2.4),
        "reg/a/custom/value": 9.0,  # a metric never overwrites a fixed key
        "reg/a/m": 1.0,
    }
    assert all(type(v) is float for v in out.flat_metrics().values())
    assert "total_grad_norm" not in make(total_grad_norm=None).flat_metrics()


def test_grad_shares_are_weighted_norms_over_their_sum():
    def reg(name, weight, norm):
        return RegularizerOutput(
            name=name,
            value=1.0,
            weight=weight,
            contribution=weight,
            grad_norm=norm,
            grad_norm_weighted=None if norm is None else weight * norm,
        )

    out = CustomLossOutput(
        loss_total=1.5,
        base_loss=BaseLossOutput(value=1.0, grad_norm=3.0),
        regularizers={"kl": reg("kl", 0.5, 2.0), "l2": reg("l2", 0.0, 7.0)},
        regularizer_total=0.5,
        total_grad_norm=3.5,
    )
    assert out.grad_shares() == {"base_loss": 0.75, "kl": 0.25, "l2": 0.0}
    flat = out.flat_metrics()
    assert flat["base_loss/grad_share"] == 0.75 and flat["reg/kl/grad_share"] == 0.25
    untracked = CustomLossOutput(
        loss_total=1.5,
        base_loss=BaseLossOutput(value=1.0),
        regularizers={"kl": reg("kl", 0.5, None)},
        regularizer_total=0.5,
    )
    assert untracked.grad_shares() == {}
    assert not any(k.endswith("grad_share") for k in untracked.flat_metrics())
    zero = CustomLossOutput(
        loss_total=1.0,
        base_loss=BaseLossOutput(value=1.0, grad_norm=0.0),
        regularizers={"kl": reg("kl", 0.5, 0.0)},
        regularizer_total=0.0,
        total_grad_norm=0.0,
    )
    assert zero.grad_shares() == {"base_loss": 0.0, "kl": 0.0}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["regularizers"]["a"].update(value="abc"), r"regularizers\['a'\]\.value"),
        (
            lambda d: d["regularizers"]["a"].update(name="b"),
            r"has name 'b' but is stored under 'a'",
        ),
        (lambda d: d["base_loss"].update(extra=1), r"base_loss has unknown keys \['extra'\]"),
        (lambda d: d.update(base_loss=3), r"base_loss must be a mapping"),
        (lambda d: d.update(regularizers=[]), r"'regularizers' must be a mapping"),
    ],
)
def test_from_dict_errors_are_spec_errors_naming_the_place(change, match):
    broken = json.loads(json.dumps(WORKED))
    change(broken)
    with pytest.raises(SpecError, match=match):
        CustomLossOutput.from_dict(broken)


def test_flat_metric_keys_never_overwrite_each_other():
    out = CustomLossOutput(
        loss_total=1.0,
        base_loss=BaseLossOutput(value=1.0, custom={"value": 111, "custom/value": 222}),
        regularizers={},
        regularizer_total=0.0,
    )
    flat = out.flat_metrics()
    assert sorted(v for k, v in flat.items() if k.startswith("base_loss/")) == [1.0, 111.0, 222.0]
