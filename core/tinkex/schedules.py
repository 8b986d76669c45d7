"""Schedules: a value as a pure function of the 1-based training step, ``tinkex.schedules``.

Two families live here, sharing one interpolation formula:

- **Learning rates**: ``tinkex train``'s ``[scheduler]`` section uses
  :func:`learning_rate` (and :func:`multiplier`), built on :func:`schedule`, with
  an optional linear warm-up and a decay that reaches ``end`` at the last step.
- **Weight schedules**: a :class:`Schedule` object (:func:`constant`,
  :func:`linear`, :func:`cosine`, :func:`step`, :func:`from_dict`, or a kind a
  plugin registered with :func:`register_kind`) is a regularizer weight that
  changes with the optimizer step: ``RegularizerSpec(fn, weight=linear(0.0, 0.1, 200), name="kl")``.

Nothing here keeps state: the value at step ``s`` depends only on ``s`` and the
arguments, so a resumed run continues a schedule exactly by asking for its next
step. Importing this module does not import torch.

**Learning-rate formulas**, with ``s`` the step (1-based), ``W = warmup_steps``,
``T = steps`` and ``A = max(W, 1)`` (the step the value first reaches ``start``)::

    warmup   (s <= W):   start * s / W                  # start/W at step 1, start at step W
    after    (s >  W):   p = (s - A) / (T - A)           # 0 at step A, 1 at step T (clamped to [0, 1];
                                                          # p = 0 when T <= A)
      "constant":        start
      "linear":          start + (end - start) * p
      "cosine":          end + (start - end) * (1 + cos(pi * p)) / 2

so without warm-up the value is ``start`` at step 1 and ``end`` at the last step
``T`` ("constant" never reaches ``end``); with warm-up it climbs linearly from
``start / W`` at step 1 to ``start`` at step ``W``, then decays to ``end`` at
step ``T``. Steps after ``T`` keep ``end`` (``start`` for "constant"). When
``W >= T`` the whole run is warm-up.

Example: ``learning_rate(step, 1e-3, total_steps=10, warmup_steps=2,
decay="linear")`` is 5e-4, 1e-3, then 1e-3 * (1 - (s - 2) / 8) down to 0.0 at step 10.

**Weight-schedule formulas** (:class:`Schedule`), with ``p = min((s - 1) / steps, 1)``::

    "constant":  start                                     # end and steps are not used
    "linear":    start + (end - start) * p                 # start at step 1, end from step steps + 1
    "cosine":    end + (start - end) * (1 + cos(pi * p)) / 2
    "step":      start for s <= steps, end after

Both families return ``start`` exactly where ``p = 0`` and ``end`` exactly where
``p = 1``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._errors import PluginError, SpecError
from ._rules import (
    InvalidValue,
    choice_problem,
    describe,
    number,
    number_problem,
    problem,
    to_float,
)

__all__ = [
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

#: the learning-rate schedule kinds: how the value goes from ``start`` to ``end`` after the warm-up
KINDS = ("constant", "linear", "cosine")

#: the built-in kinds of :class:`Schedule` (plugins add more with :func:`register_kind`)
BUILTIN_KINDS = ("constant", "linear", "cosine", "step")

#: the keys of a schedule's mapping form (:meth:`Schedule.to_dict`, :func:`from_dict`)
KEYS = ("schedule", "start", "end", "steps")

#: the source :func:`kinds` reports for a built-in kind
BUILTIN_SOURCE = "tinkex"


def _check(subject: str, value: Any, **bounds: Any) -> None:
    found = number_problem(value, **bounds)
    if found is not None:
        requirement, wrong_type = found
        raise SpecError(problem(subject, requirement, value, wrong_type=wrong_type))


def _interpolate(kind: str, start: float, end: float, p: float) -> float:
    """The one formula of both families: from ``start`` (``p <= 0``) to ``end`` (``p >= 1``).

    The endpoints are returned as given (no rounding through the formula), so a
    schedule that has arrived is exactly ``end``.
    """
    if kind == "constant" or p <= 0.0:
        return start
    if p >= 1.0:
        return end
    if kind == "linear":
        return start + (end - start) * p
    return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0  # "cosine"


# --------------------------------------------------------------------------- learning rates


def schedule(
    kind: str,
    step: int,
    *,
    start: float,
    end: float,
    steps: int,
    warmup_steps: int = 0,
) -> float:
    """The value of a learning-rate style schedule at ``step`` (1-based); see the module doc.

    Args:
        kind: "constant", "linear" or "cosine" (:data:`KINDS`).
        step: the training step, an int >= 1.
        start: the value after the warm-up (the peak of a decaying schedule).
        end: the value at the last step (ignored by "constant").
        steps: the last step ``T``, an int >= 1.
        warmup_steps: ``W`` steps of linear warm-up from ``start / W`` to ``start``
            (an int >= 0; 0: none).

    Raises:
        SpecError: an unknown kind, a step, steps or warmup_steps that is not an
            int in range, or a start or end that is not a finite number.
    """
    found = choice_problem(kind, KINDS)
    if found is not None:
        raise SpecError(problem("schedule kind", found[0], kind, wrong_type=found[1]))
    _check("step", step, integer=True, ge=1)
    _check("steps", steps, integer=True, ge=1)
    _check("warmup_steps", warmup_steps, integer=True, ge=0)
    _check("start", start)
    _check("end", end)
    start, end = float(start), float(end)
    if step <= warmup_steps:
        return start * step / warmup_steps
    anchor = max(warmup_steps, 1)
    p = 0.0 if steps <= anchor else min(1.0, max(0.0, (step - anchor) / (steps - anchor)))
    return _interpolate(kind, start, end, p)


def learning_rate(
    step: int,
    base_lr: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate of ``step`` (1-based): :func:`schedule` from ``base_lr`` to
    ``min_lr_ratio * base_lr`` over ``total_steps``, after ``warmup_steps`` of warm-up.

    This is what ``tinkex train`` passes to ``AdamParams(learning_rate=...)`` at
    each step (``[scheduler]``). With ``min_lr_ratio = 0`` a decaying schedule's
    last step has learning rate 0.0 (Adam's moments move, the weights do not).

    Raises:
        SpecError: a bad argument (also ``base_lr`` < 0 or ``min_lr_ratio``
            outside [0, 1]).
    """
    _check("base_lr", base_lr, ge=0)
    _check("min_lr_ratio", min_lr_ratio, ge=0, le=1)
    found = choice_problem(decay, KINDS)
    if found is not None:  # named as the config names it
        raise SpecError(problem("decay", found[0], decay, wrong_type=found[1]))
    return schedule(
        decay,
        step,
        start=float(base_lr),
        end=float(min_lr_ratio) * float(base_lr),
        steps=total_steps,
        warmup_steps=warmup_steps,
    )


def multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
    """:func:`learning_rate` with ``base_lr = 1``: the factor applied to the base rate."""
    return learning_rate(
        step,
        1.0,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay=decay,
        min_lr_ratio=min_lr_ratio,
    )


# --------------------------------------------------------------------------- registered kinds

#: ``fn(step, *, start, end, steps) -> float``: a kind's value at a 1-based step
KindFn = Callable[..., float]

_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@attrs.frozen
class _Kind:
    fn: KindFn
    source: str


_registry: dict[str, _Kind] = {}
_registry_lock = threading.Lock()
_loading = threading.local()


def _load_plugin_kinds() -> None:
    """Let the plugin system register its kinds: ``tinkex._plugins.load_schedule_kinds()``.

    Called before a kind that is not built in is looked up by name. The plugin
    module is optional here (and so is the function): without it, only kinds
    registered with :func:`register_kind` exist. Re-entrant calls (a plugin that
    looks a kind up while registering) do nothing.
    """
    if getattr(_loading, "active", False):
        return
    try:
        from . import _plugins
    except ImportError:  # pragma: no cover - a stripped-down install
        return
    load = getattr(_plugins, "load_schedule_kinds", None)
    if not callable(load):
        return
    _loading.active = True
    try:
        load()
    finally:
        _loading.active = False


def _closest(name: str, choices: list[str]) -> str | None:
    import difflib  # only on this error path

    key = name.lower()
    if key in choices:
        return key
    matches = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _kind_problem(kind: Any, subject: str) -> str | None:
    """``None`` when ``kind`` names a built-in or registered kind, else the one-line message."""
    if isinstance(kind, str) and (kind in BUILTIN_KINDS or kind in _registry):
        return None
    if isinstance(kind, str):
        _load_plugin_kinds()
        if kind in _registry:
            return None
    names = [*BUILTIN_KINDS, *_registry]
    message = problem(
        subject,
        "one of " + ", ".join(repr(n) for n in names),
        kind,
        wrong_type=not isinstance(kind, str),
    )
    if not isinstance(kind, str):
        return message
    guess = _closest(kind, names)
    if guess is not None:
        return f"{message}; did you mean {guess!r}?"
    return f"{message} (a plugin's kind needs that plugin installed: see `tinkex plugins list`)"


def _check_kind_fn(name: str, fn: Any) -> None:
    shape = "fn(step, *, start, end, steps) -> float"
    if not callable(fn):
        raise SpecError(f"schedule kind {name!r} must be a callable {shape}, got {describe(fn)}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # unknowable (a builtin): trust it
    try:
        signature.bind(1, start=0.0, end=0.0, steps=1)
    except TypeError:
        raise SpecError(
            f"schedule kind {name!r} must be callable as {shape}, got {fn!r} with signature "
            f"{signature}"
        ) from None


def register_kind(name: str, fn: KindFn, *, source: str = "python") -> None:
    """Add a :class:`Schedule` kind: ``fn(step, *, start, end, steps) -> float``.

    ``fn`` gets the 1-based step and the schedule's fields and returns the value
    (a finite real number) at that step; it must be a pure function of its
    arguments, so that a resumed run continues the schedule exactly. After this,
    ``Schedule(name, ...)`` and ``from_dict({"schedule": name, ...})`` accept the
    kind (``from_dict`` requires all four keys for it).

    Registering the same name again from the same ``source`` replaces the kind
    (plugins are reloaded); from another source it is an error.

    Args:
        name: the kind's name, lower case: a letter, then letters, digits, ``_`` or ``-``.
        fn: the kind's formula.
        source: where the kind comes from (a plugin's distribution name), shown by
            :func:`kinds` and in errors.

    Raises:
        SpecError: a bad name, ``fn`` or ``source``.
        PluginError: ``name`` is built in, or another source registered it.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(
            problem(
                "schedule kind name",
                "a lower-case name: a letter, then letters, digits, '_' or '-'",
                name,
                wrong_type=not isinstance(name, str),
            )
        )
    if not isinstance(source, str) or not source.strip():
        raise SpecError(
            problem(
                f"the source of schedule kind {name!r}",
                "a non-empty string",
                source,
                wrong_type=not isinstance(source, str),
            )
        )
    _check_kind_fn(name, fn)
    if name in BUILTIN_KINDS:
        raise PluginError(
            f"schedule kind {name!r} is built into tinkex; {source} must register its kind "
            f"under another name"
        )
    with _registry_lock:
        known = _registry.get(name)
        if known is not None and known.source != source:
            raise PluginError(
                f"schedule kind {name!r} is registered by both {known.source} and {source}; "
                f"uninstall or disable one of them"
            )
        _registry[name] = _Kind(fn, source)


def unregister_kind(name: str) -> None:
    """Remove a kind added by :func:`register_kind` (nothing happens if there is none)."""
    with _registry_lock:
        _registry.pop(name, None)


def kinds() -> dict[str, str]:
    """Every :class:`Schedule` kind, name -> source: the built-ins (source ``"tinkex"``)
    first, then the registered ones in registration order (plugins load first)."""
    _load_plugin_kinds()
    return {
        **dict.fromkeys(BUILTIN_KINDS, BUILTIN_SOURCE),
        **{n: k.source for n, k in _registry.items()},
    }


# --------------------------------------------------------------------------- Schedule


def _kind_validator(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    message = _kind_problem(value, "Schedule.kind")
    if message is not None:
        raise SpecError(message)


def _to_int(value: Any) -> Any:
    """An integral number (not a bool) as an int; anything else is left for the validator."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


@attrs.frozen(order=True)
class Schedule:
    """A value (a regularizer weight) as a pure function of the 1-based optimizer step.

    Build one with :func:`constant`, :func:`linear`, :func:`cosine`, :func:`step`
    or :func:`from_dict`. It is immutable, hashable and compared by value;
    ``schedule(step)`` (or ``schedule.at(step)``) is its value at ``step``, with
    ``p = min((step - 1) / steps, 1)``:

    - ``"constant"``: ``start`` (``end`` and ``steps`` are not used);
    - ``"linear"``: ``start + (end - start) * p``: ``start`` at step 1, ``end`` from step ``steps + 1``;
    - ``"cosine"``: ``end + (start - end) * (1 + cos(pi * p)) / 2``, same endpoints;
    - ``"step"``: ``start`` for steps 1..``steps``, then ``end``;
    - a kind registered with :func:`register_kind`: its ``fn(step, start=, end=, steps=)``.

    Attributes:
        kind: the kind's name (:func:`kinds`).
        start: a finite real number (stored as a float).
        end: a finite real number (stored as a float).
        steps: an int >= 1.

    Raises:
        SpecError: an unknown kind (with "did you mean"), or a field out of range.
    """

    kind: str = attrs.field(validator=_kind_validator)
    start: float = attrs.field(converter=to_float, validator=number())
    end: float = attrs.field(converter=to_float, validator=number())
    steps: int = attrs.field(converter=_to_int, validator=number(integer=True, ge=1))

    def at(self, step: int) -> float:
        """The value at ``step`` (1-based), a finite float.

        Raises:
            SpecError: ``step`` is not an int >= 1, or a registered kind is missing,
                fails, or returns something other than a finite real number.
        """
        _check("step", step, integer=True, ge=1)
        kind = self.kind
        if kind in BUILTIN_KINDS:
            if kind == "step":
                return self.start if step <= self.steps else self.end
            return _interpolate(kind, self.start, self.end, min((step - 1) / self.steps, 1.0))
        return self._registered(step)

    __call__ = at

    def _registered(self, step: int) -> float:
        entry = _registry.get(self.kind)
        if entry is None:
            message = _kind_problem(self.kind, "Schedule.kind")
            if message is not None:
                raise SpecError(message)
            entry = _registry[self.kind]
        where = f"schedule kind {self.kind!r} (from {entry.source})"
        try:
            value = entry.fn(step, start=self.start, end=self.end, steps=self.steps)
        except Exception as exc:
            raise SpecError(f"{where} failed at step {step}: {type(exc).__name__}: {exc}") from exc
        found = number_problem(value)
        if found is not None:
            raise SpecError(
                f"{where} returned {describe(value, with_type=found[1])} at step {step}; "
                f"it must return a finite real number"
            )
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        """``{"schedule": kind, "start": ..., "end": ..., "steps": ...}``: the TOML inline-table form.

        ``from_dict(s.to_dict()) == s``; TOML writes it as
        ``weight = { schedule = "linear", start = 0.0, end = 0.1, steps = 200 }``.
        """
        return {"schedule": self.kind, "start": self.start, "end": self.end, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, subject: str = "weight") -> Schedule:
        """:func:`from_dict`."""
        return from_dict(data, subject=subject)

    def __str__(self) -> str:
        """A short text, as a call: ``linear(0, 0.1, 200)``, ``constant(0.5)``."""
        if self.kind == "constant":
            return f"constant({self.start:g})"
        return f"{self.kind}({self.start:g}, {self.end:g}, {self.steps})"


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    return Schedule("constant", value, value, 1)


def linear(start: float, end: float, steps: int) -> Schedule:
    """From ``start`` at step 1 to ``end`` at step ``steps + 1`` in equal increments, then ``end``."""
    return Schedule("linear", start, end, steps)


def cosine(start: float, end: float, steps: int) -> Schedule:
    """From ``start`` at step 1 to ``end`` at step ``steps + 1`` along half a cosine, then ``end``."""
    return Schedule("cosine", start, end, steps)


def step(start: float, end: float, steps: int) -> Schedule:
    """``start`` for steps 1..``steps``, then ``end``."""
    return Schedule("step", start, end, steps)


def _quoted(keys: Any) -> str:
    return ", ".join(repr(k) for k in keys)


def from_dict(data: Mapping[str, Any], *, subject: str = "weight") -> Schedule:
    """A :class:`Schedule` from its mapping form (a TOML inline table), every field checked.

    ``{"schedule": "linear", "start": 0.0, "end": 0.1, "steps": 200}``; for
    ``"constant"`` only ``start`` is required (``end`` defaults to ``start``,
    ``steps`` to 1). A kind that is not built in is looked up among the
    registered ones, after the installed plugins have registered theirs.

    Args:
        data: the mapping.
        subject: what the mapping is, for messages (default ``"weight"``): a config
            passes its key, e.g. ``"regularizers.kl.weight"``.

    Raises:
        SpecError: one line naming ``subject``, the field, the value and the fix:
            not a mapping, an unknown kind (with "did you mean"), a missing or
            unknown key, ``start``/``end`` not finite numbers, ``steps`` not an int >= 1.
    """
    shape = '{ schedule = "linear", start = 0.0, end = 0.1, steps = 200 }'
    if not isinstance(data, Mapping):
        raise SpecError(
            f"{subject} must be a table such as {shape}, got {describe(data, with_type=True)}"
        )
    if "schedule" not in data:
        raise SpecError(
            f"{subject} has no 'schedule' key (the kind: {_quoted(BUILTIN_KINDS)} or a "
            f"plugin's), e.g. {shape}"
        )
    kind = data["schedule"]
    message = _kind_problem(kind, f"{subject}.schedule")
    if message is not None:
        raise SpecError(message)
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        first = unknown[0]
        guess = (
            _closest(first, [k for k in KEYS if k not in data]) if isinstance(first, str) else None
        )
        hint = f"; did you mean {guess!r}?" if guess else ""
        raise SpecError(
            f"{subject} has unknown key(s) {_quoted(unknown)}{hint} "
            f"(a schedule takes {_quoted(KEYS)})"
        )
    required = ("start",) if kind == "constant" else KEYS[1:]
    missing = [k for k in required if k not in data]
    if missing:
        form = ", ".join(f"{k} = ..." for k in required)
        raise SpecError(
            f"{subject} (schedule {kind!r}) is missing {_quoted(missing)}; write "
            f'{{ schedule = "{kind}", {form} }}'
        )
    start = data["start"]
    values = {"start": start, "end": data.get("end", start), "steps": data.get("steps", 1)}
    for key, value in values.items():
        bounds: dict[str, Any] = {"integer": True, "ge": 1} if key == "steps" else {}
        found = number_problem(value, **bounds)
        if found is not None:
            raise SpecError(problem(f"{subject}.{key}", found[0], value, wrong_type=found[1]))
    try:
        return Schedule(kind, values["start"], values["end"], values["steps"])
    except InvalidValue as exc:  # pragma: no cover - every field was checked above
        raise SpecError(exc.at(f"{subject}.{exc.field}")) from None
