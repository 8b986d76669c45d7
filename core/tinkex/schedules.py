"""Schedules: a value as a pure function of the 1-based training step, ``tinkex.schedules``.

``tinkex train``'s ``[scheduler]`` section uses :func:`learning_rate`; the same
core, :func:`schedule`, serves any other per-step value (a regularizer weight
that ramps up or decays, for instance). Nothing here keeps state: the value at
step ``s`` depends only on ``s`` and the arguments, so a resumed run continues a
schedule exactly by asking for its next step.

The formulas, with ``s`` the step (1-based), ``W = warmup_steps``, ``T = steps``
and ``A = max(W, 1)`` (the step the value first reaches ``start``)::

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
"""

from __future__ import annotations

import math
from typing import Any

from ._errors import SpecError
from ._rules import choice_problem, number_problem, problem

__all__ = ["KINDS", "learning_rate", "multiplier", "schedule"]

#: the schedule kinds: how the value goes from ``start`` to ``end`` after the warm-up
KINDS = ("constant", "linear", "cosine")


def _check(subject: str, value: Any, **bounds: Any) -> None:
    found = number_problem(value, **bounds)
    if found is not None:
        requirement, wrong_type = found
        raise SpecError(problem(subject, requirement, value, wrong_type=wrong_type))


def schedule(
    kind: str,
    step: int,
    *,
    start: float,
    end: float,
    steps: int,
    warmup_steps: int = 0,
) -> float:
    """The value of a schedule at ``step`` (1-based); see the module doc for the formulas.

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
    if kind == "constant":
        return start
    anchor = max(warmup_steps, 1)
    p = 0.0 if steps <= anchor else min(1.0, max(0.0, (step - anchor) / (steps - anchor)))
    if kind == "linear":
        return start + (end - start) * p
    return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0


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
