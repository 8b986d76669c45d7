"""The cattrs converter of the loss outputs' JSON (the ``tinkex train`` config has its own).

The JSON schema of :class:`CustomLossOutput` keeps the keys of the Tinkex port::

    {"loss_total": 12.0, "regularizer_total": 11.0,
     "base_loss": {"value": 1.0, "grad_norm": null, "custom": {}},
     "regularizers": {"a": {"value": 10.0, "weight": 0.1, "contribution": 1.0,
                             "grad_norm": null, "grad_norm_weighted": null, "custom": {}}},
     "total_grad_norm": 5.67}            # key omitted when not tracked

Inside ``regularizers`` the name is the key; a standalone
:meth:`RegularizerOutput.to_dict` carries ``name`` and omits the grad keys when
they are None. All numbers are plain floats (the classes' attrs converters see
to that). The hooks are cattrs' generated ones with overrides; unknown and
missing keys are :class:`tinkex.SpecError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError, IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._errors import SpecError
from ._types import CustomLossOutput, RegularizerOutput

__all__ = ["converter"]

converter = cattrs.Converter(forbid_extra_keys=True)

#: the order of the top-level keys of the schema
_ORDER = ("loss_total", "regularizer_total", "base_loss", "regularizers", "total_grad_norm")

# --------------------------------------------------------------------------- unstructure

_entry = make_dict_unstructure_fn(RegularizerOutput, converter, name=override(omit=True))
_output = make_dict_unstructure_fn(
    CustomLossOutput,
    converter,
    regularizers=override(unstruct_hook=lambda regs: {n: _entry(r) for n, r in regs.items()}),
    total_grad_norm=override(omit_if_default=True),
)


def _unstructure_output(out: CustomLossOutput) -> dict[str, Any]:
    data = _output(out)
    return {key: data[key] for key in _ORDER if key in data}


converter.register_unstructure_hook(CustomLossOutput, _unstructure_output)
converter.register_unstructure_hook(
    RegularizerOutput,
    make_dict_unstructure_fn(
        RegularizerOutput,
        converter,
        grad_norm=override(omit_if_default=True),
        grad_norm_weighted=override(omit_if_default=True),
    ),
)

# --------------------------------------------------------------------------- structure

_structure_entry = make_dict_structure_fn(RegularizerOutput, converter)


def _entries(data: Any, _type: Any) -> dict[str, RegularizerOutput]:
    """``regularizers``: name -> entry, the name being the key (an entry's own
    ``name``, when present, must agree with it)."""
    if not isinstance(data, Mapping):
        raise SpecError(
            f"'regularizers' must be a mapping of name to entry, got {type(data).__name__}"
        )
    out, errors = {}, []
    for name, entry in data.items():
        try:
            if isinstance(entry, Mapping) and entry.get("name", name) != name:
                raise SpecError(
                    f"regularizers[{name!r}] has name {entry['name']!r} but is stored under {name!r}"
                )
            named = {**entry, "name": str(name)} if isinstance(entry, Mapping) else entry
            out[str(name)] = _structure_entry(named, RegularizerOutput)
        except Exception as exc:
            exc.add_note(IterableValidationNote(f"regularizers[{name!r}]", name, RegularizerOutput))
            errors.append(exc)
    if errors:
        raise IterableValidationError("While structuring regularizers", errors, dict)
    return out


def _message(exc: BaseException, where: str) -> str:
    if isinstance(exc, SpecError):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = [a.name for a in attrs.fields(exc.cl)]
        return f"{where} has unknown keys {sorted(exc.extra_fields)}; allowed: {allowed}"
    if isinstance(exc, (TypeError, AttributeError)):
        return f"{where} must be a mapping ({exc})"
    return f"{where}: {exc}"


def _checked(cls: type, gen: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``gen``, with cattrs' errors turned into one :class:`SpecError` through
    ``cattrs.transform_error``: the first problem, or every missing key of one table."""

    def structure(data: Any, _type: Any) -> Any:
        if not isinstance(data, Mapping):
            raise SpecError(f"a {cls.__name__} dict must be a mapping, got {type(data).__name__}")
        try:
            return gen(data, cls)
        except cattrs.BaseValidationError as exc:
            found: list[BaseException] = []

            def remember(error: BaseException, _type: Any) -> str:
                found.append(error)
                return str(len(found) - 1)

            missing: dict[str, list[str]] = {}
            for line in cattrs.transform_error(exc, path="", format_exception=remember):
                token, _, path = line.partition(" @ ")
                error = found[int(token)]
                if isinstance(error, KeyError):  # a required key; path "<table>.<key>"
                    table, _, key = path.rpartition(".")
                    missing.setdefault(table.lstrip(".") or cls.__name__, []).append(key)
                elif not missing:
                    raise SpecError(_message(error, path.lstrip(".") or cls.__name__)) from None
            table, keys = next(iter(missing.items()))
            raise SpecError(f"{table} is missing keys {keys}") from None

    return structure


converter.register_structure_hook(
    CustomLossOutput,
    _checked(
        CustomLossOutput,
        make_dict_structure_fn(
            CustomLossOutput, converter, regularizers=override(struct_hook=_entries)
        ),
    ),
)
converter.register_structure_hook(RegularizerOutput, _checked(RegularizerOutput, _structure_entry))
