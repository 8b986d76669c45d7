"""The rules values are checked against, and the one message format for a rejected value.

``<what> must be <requirement>, got <value>`` -- with the value's type named when
the type was wrong -- is :func:`problem`. A :class:`Rule` is an attrs validator
carrying its requirement text, so the config classes, :class:`tinkex.AdamParams`,
``docs/config.md`` and :mod:`tinkex.regkit`'s ``check_*`` helpers all say the same
thing about the same value.
"""

from __future__ import annotations

import math
import numbers
import string
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ._errors import SpecError

#: what a check found wrong: (the requirement to state, whether the value's type was wrong)
Found = tuple[str, bool]


def describe(value: Any, *, with_type: bool = False) -> str:
    """``repr(value)`` cut to 60 characters, with ``(type)`` appended when asked."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})" if with_type else text


def problem(subject: str, requirement: str, value: Any, *, wrong_type: bool) -> str:
    """The one message format of a rejected value, for configs and regularizer parameters.

    ``problem("training.steps", "an integer >= 1", "ten", wrong_type=True)`` is
    ``"training.steps must be an integer >= 1, got 'ten' (str)"``; the value's type
    is named only when the type was wrong.
    """
    return f"{subject} must be {requirement}, got {describe(value, with_type=wrong_type)}"


def _bounds(gt: Any, ge: Any, lt: Any, le: Any) -> str:
    parts = [
        f"{op} {bound:g}" if isinstance(bound, float) else f"{op} {bound}"
        for op, bound in ((">", gt), (">=", ge), ("<", lt), ("<=", le))
        if bound is not None
    ]
    return " and ".join(parts)


def number_requirement(
    *,
    integer: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    allow_inf: bool = False,
) -> str:
    """What :func:`number_problem` with the same arguments accepts, e.g. ``"an integer >= 1"``."""
    kind = "an integer" if integer else "a real number" if allow_inf else "a finite real number"
    return f"{kind} {_bounds(gt, ge, lt, le)}".rstrip()


def number_problem(
    value: Any,
    *,
    integer: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    allow_inf: bool = False,
) -> Found | None:
    """Check a number: ``None`` when fine, else what to say.

    Bools are not numbers; an int that overflows a float is not finite; NaN never
    passes, +/-inf only with ``allow_inf``. A value of the right kind outside the
    bounds gets the bounds alone as the requirement (``"> 0"``).
    """
    full = number_requirement(integer=integer, gt=gt, ge=ge, lt=lt, le=le, allow_inf=allow_inf)
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return full, True
        number: float = value  # type: ignore[assignment]  # compared exactly, never rounded
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return full, True
        try:
            number = float(value)
        except OverflowError:
            return full, False
        if math.isnan(number) or (math.isinf(number) and not allow_inf):
            return full, False
    if (
        (gt is not None and not number > gt)
        or (ge is not None and not number >= ge)
        or (lt is not None and not number < lt)
        or (le is not None and not number <= le)
    ):
        return _bounds(gt, ge, lt, le), False
    return None


def choice_requirement(choices: Iterable[Any]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


def choice_problem(value: Any, choices: Iterable[Any]) -> Found | None:
    """``value`` must equal one of ``choices`` and have its type (``True`` is not ``1``)."""
    options = tuple(choices)
    if any(type(value) is type(o) and value == o for o in options):
        return None
    return choice_requirement(options), not any(type(value) is type(o) for o in options)


def bool_problem(value: Any, requirement: str = "true or false") -> Found | None:
    """Only ``True``/``False`` (no truthy stand-ins such as 1 or "yes")."""
    return None if isinstance(value, bool) else (requirement, True)


def text_problem(value: Any, requirement: str = "a non-empty string") -> Found | None:
    """A string with something other than whitespace in it."""
    if not isinstance(value, str):
        return requirement, True
    return None if value.strip() else (requirement, False)


class InvalidValue(SpecError):
    """A value a rule rejected: ``<subject> must be <requirement>, got <value>``.

    Attributes:
        field: the attribute that was checked (``None`` for a value of the wrong
            shape, such as a section that is not a table).
    """

    def __init__(
        self,
        subject: str,
        requirement: str,
        value: Any,
        wrong_type: bool,
        field: str | None = None,
    ) -> None:
        super().__init__(problem(subject, requirement, value, wrong_type=wrong_type))
        self.subject, self.requirement, self.value = subject, requirement, value
        self.wrong_type, self.field = wrong_type, field

    def at(self, subject: str) -> str:
        """The same message about another subject (``training.steps`` for ``TrainingConfig.steps``)."""
        return problem(subject, self.requirement, self.value, wrong_type=self.wrong_type)

    def __reduce__(self) -> Any:
        args = (self.subject, self.requirement, self.value, self.wrong_type, self.field)
        return type(self), args


@attrs.frozen
class Rule:
    """An attrs validator: ``check`` returns what is wrong with a value, or ``None``.

    ``requirement`` says what a valid value is; docs/config.md shows it word for word.
    """

    requirement: str
    check: Callable[[Any], Found | None]

    def __call__(self, inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        found = self.check(value)
        if found is not None:
            subject = f"{type(inst).__name__}.{attribute.name}"
            requirement, wrong_type = found
            raise InvalidValue(subject, requirement, value, wrong_type, field=attribute.name)


def number(**bounds: Any) -> Rule:
    """:func:`number_problem` with these arguments (``integer=True, ge=1``, ``gt=0``, ...)."""
    return Rule(number_requirement(**bounds), lambda v: number_problem(v, **bounds))


def one_of(*choices: str) -> Rule:
    return Rule(choice_requirement(choices), lambda v: choice_problem(v, choices))


def optional(rule: Rule) -> Rule:
    """``rule``, or not set (``None``: the key is left out of the TOML)."""
    return Rule(f"{rule.requirement}, or not set", lambda v: None if v is None else rule.check(v))


boolean = Rule("true or false", bool_problem)
text = Rule("a non-empty string", text_problem)


def template_problem(value: Any) -> Found | None:
    """A prompt template: ``{prompt}`` and literal text only (no other field, no format spec)."""
    requirement = "a string containing {prompt}"
    if not isinstance(value, str):
        return requirement, True
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:
        return f"a valid format string ({exc}; write literal braces as {{{{ and }}}})", False
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name != "prompt" or spec or conversion:
            shown = (
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            return (
                f"a string whose only field is {{prompt}}, without a format spec (found {shown}; "
                f"write literal braces as {{{{ and }}}})",
                False,
            )
    if not any(name == "prompt" for _, name, _, _ in fields):
        return requirement, False
    return None


def keys_problem(value: Any) -> Found | None:
    requirement = "a list of non-empty strings"
    if not isinstance(value, (list, tuple)):
        return requirement, True
    return None if all(text_problem(v) is None for v in value) else (requirement, False)


template = Rule("a string containing {prompt}", template_problem)
key_list = Rule("a list of non-empty strings", keys_problem)


def to_float(value: Any) -> Any:
    """Numbers (not bools) become floats; anything else is left for the validator to reject."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return value
    return value


def to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
