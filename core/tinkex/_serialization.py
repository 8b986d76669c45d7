"""The one cattrs converter of tinkex, with every hook registered here.

The JSON schema of :class:`CustomLossOutput` keeps the keys of the Tinkex port::

    {"loss_total": 12.0, "regularizer_total": 11.0,
     "base_loss": {"value": 1.0, "grad_norm": null, "custom": {}},
     "regularizers": {"a": {"value": 10.0, "weight": 0.1, "contribution": 1.0,
                             "grad_norm": null, "grad_norm_weighted": null, "custom": {}}},
     "total_grad_norm": 5.67}            # key omitted when not tracked

Inside ``regularizers`` the name is the key; a standalone
:meth:`RegularizerOutput.to_dict` carries ``name`` and omits the grad keys when
they are None. All numbers are plain floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cattrs

from ._errors import SpecError
from ._types import BaseLossOutput, CustomLossOutput, RegularizerOutput

__all__ = ["converter"]

converter = cattrs.Converter()

_REG_KEYS = ("value", "weight", "contribution", "grad_norm", "grad_norm_weighted", "custom")
_BASE_KEYS = ("value", "grad_norm", "custom")
_TOP_KEYS = ("loss_total", "regularizer_total", "base_loss", "regularizers", "total_grad_norm")


def _check_keys(where: str, data: Any, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SpecError(f"{where} has unknown keys {unknown}; allowed: {list(allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise SpecError(f"{where} is missing keys {missing}")


def _custom(value: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in value.items()}


def _reg_entry(reg: RegularizerOutput) -> dict[str, Any]:
    return {
        "value": reg.value,
        "weight": reg.weight,
        "contribution": reg.contribution,
        "grad_norm": reg.grad_norm,
        "grad_norm_weighted": reg.grad_norm_weighted,
        "custom": _custom(reg.custom),
    }


def _unstructure_regularizer(reg: RegularizerOutput) -> dict[str, Any]:
    out: dict[str, Any] = {"name": reg.name, **_reg_entry(reg)}
    for key in ("grad_norm", "grad_norm_weighted"):
        if out[key] is None:
            del out[key]
    return out


def _structure_regularizer_entry(
    name: str, data: Mapping[str, Any], where: str
) -> RegularizerOutput:
    _check_keys(where, data, ("name", *_REG_KEYS), ("value", "weight", "contribution"))
    if "name" in data and data["name"] != name:
        raise SpecError(f"{where} has name {data['name']!r} but is stored under {name!r}")
    return RegularizerOutput(
        name=name,
        value=data["value"],
        weight=data["weight"],
        contribution=data["contribution"],
        grad_norm=data.get("grad_norm"),
        grad_norm_weighted=data.get("grad_norm_weighted"),
        custom=data.get("custom") or {},
    )


def _structure_regularizer(data: Mapping[str, Any], _cls: type) -> RegularizerOutput:
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        raise SpecError("a RegularizerOutput dict needs a 'name' string")
    return _structure_regularizer_entry(data["name"], data, "RegularizerOutput")


def _unstructure_base(base: BaseLossOutput) -> dict[str, Any]:
    return {"value": base.value, "grad_norm": base.grad_norm, "custom": _custom(base.custom)}


def _structure_base(data: Mapping[str, Any], _cls: type) -> BaseLossOutput:
    _check_keys("base_loss", data, _BASE_KEYS, ("value",))
    return BaseLossOutput(
        value=data["value"], grad_norm=data.get("grad_norm"), custom=data.get("custom") or {}
    )


def _unstructure_output(out: CustomLossOutput) -> dict[str, Any]:
    result: dict[str, Any] = {
        "loss_total": out.loss_total,
        "regularizer_total": out.regularizer_total,
        "base_loss": _unstructure_base(out.base_loss),
        "regularizers": {name: _reg_entry(reg) for name, reg in out.regularizers.items()},
    }
    if out.total_grad_norm is not None:
        result["total_grad_norm"] = out.total_grad_norm
    return result


def _structure_output(data: Mapping[str, Any], _cls: type) -> CustomLossOutput:
    _check_keys(
        "CustomLossOutput",
        data,
        _TOP_KEYS,
        ("loss_total", "regularizer_total", "base_loss", "regularizers"),
    )
    regs = data["regularizers"]
    if not isinstance(regs, Mapping):
        raise SpecError(
            f"'regularizers' must be a mapping of name to entry, got {type(regs).__name__}"
        )
    return CustomLossOutput(
        loss_total=data["loss_total"],
        regularizer_total=data["regularizer_total"],
        base_loss=_structure_base(data["base_loss"], BaseLossOutput),
        regularizers={
            str(name): _structure_regularizer_entry(str(name), entry, f"regularizers[{name!r}]")
            for name, entry in regs.items()
        },
        total_grad_norm=data.get("total_grad_norm"),
    )


converter.register_unstructure_hook(RegularizerOutput, _unstructure_regularizer)
converter.register_structure_hook(RegularizerOutput, _structure_regularizer)
converter.register_unstructure_hook(BaseLossOutput, _unstructure_base)
converter.register_structure_hook(BaseLossOutput, _structure_base)
converter.register_unstructure_hook(CustomLossOutput, _unstructure_output)
converter.register_structure_hook(CustomLossOutput, _structure_output)
