"""The value types of tinkex: specs in, structured outputs out.

Everything here is an ``attrs`` frozen class, validated at construction.
Serialization lives in :mod:`tinkex._serialization` (one cattrs converter);
the ``to_dict``/``from_dict`` methods here delegate to it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from ._errors import SpecError
from ._inputs import shape_text
from .schedules import Schedule

__all__ = [
    "BaseLossOutput",
    "ComposedLoss",
    "CustomLossOutput",
    "Datum",
    "RegularizerOutput",
    "RegularizerSpec",
]


# --------------------------------------------------------------------------- specs


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _accepts_two_positional(fn: Callable[..., Any]) -> bool | None:
    """True/False if ``fn(data, logprobs)`` binds; None if the signature is unknowable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(object(), object())
    except TypeError:
        return False
    return True


def infer_is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a coroutine (``async def``, also wrapped or as ``__call__``)."""
    target: Any = fn
    while True:
        if inspect.iscoroutinefunction(target):
            return True
        inner = getattr(target, "func", None)  # functools.partial
        if inner is not None and callable(inner):
            target = inner
            continue
        break
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        call = getattr(type(target), "__call__", None)  # noqa: B004 - we want the class attribute
        if call is not None and inspect.iscoroutinefunction(call):
            return True
    return False


def _finite_nonnegative(value: Any) -> bool:
    """A real number (not bool), finite as a float (huge ints overflow: not finite), >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and number >= 0


def _weight_key(weight: Any) -> Any:
    """What a spec's weight is compared and hashed by: the float, or the schedule itself."""
    return weight if isinstance(weight, Schedule) else float(weight)


def check_step(step: Any) -> int | None:
    """``step`` as given when it is ``None`` or an int >= 1 (bool refused); else a SpecError."""
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise SpecError(
            f"step must be an integer >= 1 (the 1-based optimizer step) or None, "
            f"got {_describe(step)}"
        )
    return int(step)


@attrs.frozen(eq=False)
class RegularizerSpec:
    """One named, weighted term of a composed loss.

    Args:
        fn: ``fn(data, logprobs) -> (loss, metrics)``; ``loss`` a scalar tensor or a
            real number, ``metrics`` a mapping of str to number or scalar tensor.
            May be ``async def`` (or return an awaitable).
        weight: finite real number >= 0 (ints allowed, bool rejected), or a
            :class:`tinkex.schedules.Schedule` of the 1-based optimizer step whose
            ``start`` and ``end`` are >= 0 (a pipeline then needs ``step=`` to run;
            :meth:`weight_at` gives the weight of a step).
        name: non-empty str, unique within a pipeline; ``"base_loss"`` is reserved.
        is_async: ``None`` infers it from ``fn``; ``True`` runs ``fn`` on the Trio
            loop, ``False`` in a worker thread.
        enabled: ``False`` keeps the spec in the list but skips it.

    Raises:
        SpecError: naming the field and the bad value.
    """

    fn: Callable[..., Any]
    weight: float | Schedule
    name: str
    is_async: bool | None = None
    enabled: bool = True

    def __attrs_post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name.strip():
            raise SpecError(f"name must be a non-empty str, got {_describe(name)}")
        if "/" in name:
            raise SpecError(
                f"name must not contain '/', got {name!r}: flat metric keys are "
                f"'reg/<name>/<metric>', so a '/' would make them ambiguous (use '_' or '.')"
            )
        where = f" for regularizer {name!r}"
        weight = self.weight
        if isinstance(weight, Schedule):
            for field in ("start", "end"):
                value = getattr(weight, field)
                if value < 0:  # finite already: a Schedule checks its fields
                    raise SpecError(
                        f"weight schedule {field} must be >= 0 (a weight is never negative), "
                        f"got {value!r} in {weight}{where}"
                    )
        elif isinstance(weight, Mapping):
            raise SpecError(
                f"weight must be a finite number >= 0 or a tinkex.schedules.Schedule, got "
                f"{_describe(weight)}{where}; build a schedule from a mapping with "
                f"tinkex.schedules.from_dict(...)"
            )
        elif not _finite_nonnegative(weight):
            number = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
            also = "" if number else " or a tinkex.schedules.Schedule"
            raise SpecError(
                f"weight must be a finite number >= 0{also}, got {_describe(weight)}{where}"
            )
        fn = self.fn
        if not callable(fn):
            raise SpecError(
                f"fn must be callable as fn(data, logprobs), got {_describe(fn)}{where}"
            )
        if _accepts_two_positional(fn) is False:
            raise SpecError(
                f"fn must accept two positional arguments (data, logprobs), "
                f"got {fn!r} with signature {inspect.signature(fn)}{where}"
            )
        if self.is_async is not None and not isinstance(self.is_async, bool):
            raise SpecError(
                f"is_async must be True, False or None, got {_describe(self.is_async)}{where}"
            )
        if not isinstance(self.enabled, bool):
            raise SpecError(f"enabled must be a bool, got {_describe(self.enabled)}{where}")

    @property
    def is_scheduled(self) -> bool:
        """Whether the weight is a :class:`~tinkex.schedules.Schedule` (it then needs a step)."""
        return isinstance(self.weight, Schedule)

    def weight_at(self, step: int | None = None) -> float:
        """The weight used at the 1-based optimizer ``step``: the number, or the schedule's value.

        Raises:
            SpecError: a scheduled weight without a step, a step that is not an
                int >= 1, or a plugin schedule kind whose value there is not a
                finite number >= 0 (each naming this regularizer).
        """
        step = check_step(step)
        weight = self.weight
        if not isinstance(weight, Schedule):
            return float(weight)
        if step is None:
            raise SpecError(
                f"regularizer {self.name!r} has a scheduled weight, {weight}, so its value "
                f"depends on the step: pass step=<the 1-based optimizer step> "
                f"(TrainingClient.forward_backward_custom passes tc.step + 1 itself)"
            )
        try:
            value = weight.at(step)
        except SpecError as exc:
            raise SpecError(f"{exc} (the weight of regularizer {self.name!r})") from exc
        if value < 0:
            raise SpecError(
                f"weight schedule {weight} gives {value!r} at step {step}, but a weight must be "
                f">= 0, for regularizer {self.name!r}; fix the schedule kind {weight.kind!r}"
            )
        return value

    @property
    def runs_async(self) -> bool:
        """Whether the term runs on the Trio loop (explicit ``is_async``, else inferred)."""
        return self.is_async if self.is_async is not None else infer_is_async(self.fn)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegularizerSpec):
            return NotImplemented
        return (self.fn, _weight_key(self.weight), self.name, self.is_async, self.enabled) == (
            other.fn,
            _weight_key(other.weight),
            other.name,
            other.is_async,
            other.enabled,
        )

    def __hash__(self) -> int:
        try:
            fn_hash = hash(self.fn)  # equal bound methods hash alike
        except TypeError:  # an unhashable callable object: equal ones share a type
            fn_hash = hash(type(self.fn))
        return hash((fn_hash, _weight_key(self.weight), self.name, self.is_async, self.enabled))


# --------------------------------------------------------------------------- outputs


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _float_dict(value: Mapping[str, Any] | None) -> dict[str, float]:
    return {} if value is None else {str(k): float(v) for k, v in value.items()}


@attrs.frozen
class RegularizerOutput:
    """What one regularizer contributed to a composed loss.

    ``weight`` is the weight used in this call (a scheduled weight's value at the
    call's step); ``contribution = weight * value`` and ``grad_norm_weighted = weight * grad_norm``;
    ``grad_norm`` is the L2 norm of d(value)/d(logprobs), present when grad norms
    are tracked. ``custom`` holds the term's own metrics.
    """

    name: str
    value: float = attrs.field(converter=float)
    weight: float = attrs.field(converter=float)
    contribution: float = attrs.field(converter=float)
    grad_norm: float | None = attrs.field(default=None, converter=_opt_float)
    grad_norm_weighted: float | None = attrs.field(default=None, converter=_opt_float)
    custom: dict[str, float] = attrs.field(factory=dict, converter=_float_dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict including ``name``; the grad keys are omitted when None."""
        from ._serialization import converter

        return converter.unstructure(self, RegularizerOutput)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegularizerOutput:
        from ._serialization import converter

        return converter.structure(dict(data), cls)


@attrs.frozen
class BaseLossOutput:
    """The base loss's value, its gradient norm (when tracked) and its metrics."""

    value: float = attrs.field(converter=float)
    grad_norm: float | None = attrs.field(default=None, converter=_opt_float)
    custom: dict[str, float] = attrs.field(factory=dict, converter=_float_dict)


@attrs.frozen
class CustomLossOutput:
    """The structured result of a composed loss.

    ``loss_total = base_loss.value + regularizer_total`` and
    ``regularizer_total = sum(r.contribution for r in regularizers.values())``.
    ``regularizers`` maps name to output, in spec order. ``total_grad_norm`` is
    the L2 norm of d(loss_total)/d(logprobs), present when grad norms are tracked.
    """

    loss_total: float = attrs.field(converter=float)
    base_loss: BaseLossOutput
    regularizers: dict[str, RegularizerOutput]
    regularizer_total: float = attrs.field(converter=float)
    total_grad_norm: float | None = attrs.field(default=None, converter=_opt_float)

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON schema (``total_grad_norm`` omitted when not tracked)."""
        from ._serialization import converter

        return converter.unstructure(self, CustomLossOutput)

    def to_json(self, **kwargs: Any) -> str:
        """``to_dict()`` as JSON text; keyword arguments go to :func:`json.dumps`."""
        import json

        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CustomLossOutput:
        """Inverse of :meth:`to_dict`: ``from_dict(x.to_dict()) == x``."""
        from ._serialization import converter

        return converter.structure(dict(data), cls)

    @classmethod
    def from_json(cls, text: str | bytes) -> CustomLossOutput:
        import json

        return cls.from_dict(json.loads(text))

    def grad_shares(self) -> dict[str, float]:
        """Each term's share of the gradient: ``{"base_loss": s0, "<name>": s, ...}``.

        ``s = weight · grad_norm / Σ over all terms of weight · grad_norm`` (the
        base loss has weight 1), so the shares add up to 1. A share measures how
        hard a term pulls on the logprobs relative to the others, by the size of
        its weighted gradient; terms pulling in opposite directions still each
        get a positive share (the total gradient's norm, ``total_grad_norm``, can be
        smaller than the sum). ``{}`` when norms were not tracked; all zeros when
        every norm is 0.
        """
        if self.base_loss.grad_norm is None:
            return {}
        pulls = {"base_loss": self.base_loss.grad_norm}
        for name, reg in self.regularizers.items():
            if reg.grad_norm_weighted is None:
                return {}
            pulls[name] = reg.grad_norm_weighted
        total = math.fsum(pulls.values())
        return {name: (pull / total if total > 0 else 0.0) for name, pull in pulls.items()}

    def flat_metrics(self) -> dict[str, float]:
        """A flat ``dict[str, float]`` for metric loggers and Tinker's metrics dict.

        Keys: ``loss_total``, ``regularizer_total``, ``total_grad_norm`` (when tracked),
        ``base_loss/value``, ``base_loss/grad_norm``, ``base_loss/grad_share``,
        ``base_loss/<metric>``, and for each regularizer ``reg/<name>/value``,
        ``/weight``, ``/contribution``, ``/grad_norm``, ``/grad_norm_weighted``,
        ``/grad_share`` (the last three when tracked) and ``/<metric>``. A term's own
        metric never overwrites one of these fixed keys (it moves to
        ``.../custom/<metric>``), and names cannot contain ``/``, so keys never collide.
        """
        out: dict[str, float] = {
            "loss_total": self.loss_total,
            "regularizer_total": self.regularizer_total,
        }
        if self.total_grad_norm is not None:
            out["total_grad_norm"] = self.total_grad_norm
        shares = self.grad_shares()
        base = {"value": self.base_loss.value}
        if self.base_loss.grad_norm is not None:
            base["grad_norm"] = self.base_loss.grad_norm
        if shares:
            base["grad_share"] = shares["base_loss"]
        _add_flat(out, "base_loss", base, self.base_loss.custom)
        for name, reg in self.regularizers.items():
            fixed = {"value": reg.value, "weight": reg.weight, "contribution": reg.contribution}
            if reg.grad_norm is not None:
                fixed["grad_norm"] = reg.grad_norm
            if reg.grad_norm_weighted is not None:
                fixed["grad_norm_weighted"] = reg.grad_norm_weighted
            if shares:
                fixed["grad_share"] = shares[name]
            _add_flat(out, f"reg/{name}", fixed, reg.custom)
        return out


def _add_flat(
    out: dict[str, float], prefix: str, fixed: dict[str, float], custom: dict[str, float]
) -> None:
    for key, value in fixed.items():
        out[f"{prefix}/{key}"] = float(value)
    for key, value in custom.items():
        name = f"{prefix}/{key}"
        while name in out:  # a fixed key, or a custom one already there: never overwrite
            key = f"custom/{key}"
            name = f"{prefix}/{key}"
        out[name] = float(value)


@attrs.frozen
class ComposedLoss:
    """A composed loss ready for a training step.

    Attributes:
        output: the structured :class:`CustomLossOutput`.
        loss: the total as a 0-d tensor (detached).
        logprob_grads: d(loss_total)/d(logprobs), with the structure, devices and
            dtypes of the logprobs that were passed in. Fused step:
            ``lp.backward(grads)``; linearized (Tinker) step: ``weights = -grads``.
    """

    output: CustomLossOutput
    loss: torch.Tensor
    logprob_grads: Any


# --------------------------------------------------------------------------- data


def _to_loss_input(key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif callable(getattr(value, "to_torch", None)):  # tinker.TensorData
        tensor = value.to_torch()
    else:
        try:  # no dtype yet: 2.9 must not become token 2 before it is checked
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(
                f"loss_fn_inputs[{key!r}] must be a tensor or a list of numbers, got {_describe(value)}"
            ) from exc
        if key != "target_tokens" and not tensor.is_complex():
            tensor = tensor.to(torch.float32)  # a list of numbers: float32 (token ids: below)
    if tensor.is_complex():
        raise SpecError(f"loss_fn_inputs[{key!r}] must be real numbers, got dtype {tensor.dtype}")
    if key == "target_tokens":
        return _token_ids(tensor)
    if tensor.dtype == torch.bool:  # a mask written as `ids != pad`: 1.0 / 0.0
        return tensor.to(torch.float32)
    return tensor


def _token_ids(tensor: torch.Tensor) -> torch.Tensor:
    """``target_tokens`` as int64; floats only when they are whole numbers (never truncated)."""
    if tensor.dtype == torch.bool:
        raise SpecError("loss_fn_inputs['target_tokens'] must be token ids (integers), got bools")
    if tensor.is_floating_point():
        whole = torch.isfinite(tensor) & (tensor == tensor.round())
        if not bool(whole.all()):
            bad = float(tensor[~whole].reshape(-1)[0])
            raise SpecError(
                f"loss_fn_inputs['target_tokens'] must be token ids (integers), got {bad:g}; "
                f"pass an integer tensor or a list of ints"
            )
    return tensor if tensor.dtype == torch.int64 else tensor.to(torch.int64)


def _convert_loss_inputs(value: Mapping[str, Any] | None) -> Mapping[str, torch.Tensor]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise SpecError(
            f"loss_fn_inputs must be a mapping of name to tensor, got {_describe(value)}"
        )
    return types.MappingProxyType({str(k): _to_loss_input(str(k), v) for k, v in value.items()})


def _convert_model_input(value: Any) -> Any:
    if hasattr(value, "to_ints"):
        return value
    if isinstance(value, torch.Tensor):
        return tuple(int(x) for x in value.reshape(-1).tolist())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            return tuple(int(x) for x in value)
        except (TypeError, ValueError) as exc:
            raise SpecError(
                f"model_input must be a list of token ids, got {_describe(value)}"
            ) from exc
    raise SpecError(
        f"model_input must be a list of token ids or an object with .to_ints(), got {_describe(value)}"
    )


def _check_loss_input_shape(
    key: str, tensor: torch.Tensor, n: int, targets: torch.Tensor | None
) -> None:
    """``(n,)`` or ``(n, K)`` with K >= 1; with ``targets`` (for weights/mask): ``(n,)`` or its shape."""
    shape = tuple(tensor.shape)
    if targets is None:
        if shape == (n,) or (len(shape) == 2 and shape[0] == n and shape[1] >= 1):
            return
        accepted = f"({n},) or ({n}, K) with K >= 1"
        if key == "target_tokens":
            accepted += " target tokens per position (top-K losses)"
    elif shape in ((n,), tuple(targets.shape)):
        return
    else:
        also = "" if targets.dim() == 1 else f" or {shape_text(targets.shape)}"
        accepted = f"({n},){also}, the shape of target_tokens"
    raise SpecError(
        f"loss_fn_inputs[{key!r}] has shape {shape_text(shape)}, expected {accepted}; "
        f"model_input has {n} tokens"
    )


@attrs.frozen(eq=False)
class Datum:
    """One training example, mirroring ``tinker.Datum``.

    A Datum is immutable: token ids are stored as a tuple, ``loss_fn_inputs`` is a
    read-only mapping, and :meth:`tokens` returns a fresh list.

    Args:
        model_input: token ids (a list or tuple, stored as a tuple), or an object
            with ``.to_ints()`` such as Tinker's ``ModelInput``.
        loss_fn_inputs: name -> tensor. Lists of numbers are converted on
            construction: ``target_tokens`` to int64, everything else to float32.
            With ``n = len(model_input)``: ``target_tokens`` has shape ``(n,)``
            (``target_tokens[t]`` is the token predicted after ``model_input[: t + 1]``)
            or ``(n, K)``, K >= 1 target tokens per position (Tinker's top-K losses).
            ``weights`` marks the positions that count and ``mask`` (tinker-cookbook's
            RL datums: 1 on action tokens, 0 on the prompt) likewise; each has shape
            ``(n,)`` or the shape of ``target_tokens`` (without target_tokens:
            ``(n,)`` or ``(n, K)``).

    Raises:
        SpecError: a value cannot be converted, or a shape is not one of those above
            (the message names the key, its shape and the accepted shapes).
    """

    model_input: Any = attrs.field(converter=_convert_model_input)
    loss_fn_inputs: Mapping[str, torch.Tensor] = attrs.field(
        factory=dict, converter=_convert_loss_inputs
    )

    def __attrs_post_init__(self) -> None:
        n = len(self.tokens())
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None:
            _check_loss_input_shape("target_tokens", targets, n, None)
        for key in ("weights", "mask"):
            tensor = self.loss_fn_inputs.get(key)
            if tensor is not None:
                _check_loss_input_shape(key, tensor, n, targets)

    def tokens(self) -> list[int]:
        """The input token ids as a new list of ints (changing it changes nothing here)."""
        mi = self.model_input
        return [int(x) for x in mi.to_ints()] if hasattr(mi, "to_ints") else list(mi)

    def __len__(self) -> int:
        return len(self.tokens())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Datum):
            return NotImplemented
        if (
            self.tokens() != other.tokens()
            or self.loss_fn_inputs.keys() != other.loss_fn_inputs.keys()
        ):
            return False
        return all(torch.equal(v, other.loss_fn_inputs[k]) for k, v in self.loss_fn_inputs.items())

    __hash__ = None  # type: ignore[assignment]


# Resolve the string annotations now, while these classes still live in this module:
# `tinkex` later reports them as `tinkex.<Name>` (their __module__), and resolving
# them then would look the names up in the package, where they may not be yet.
for _cls in (
    RegularizerSpec,
    RegularizerOutput,
    BaseLossOutput,
    CustomLossOutput,
    ComposedLoss,
    Datum,
):
    attrs.resolve_types(_cls)
del _cls
