"""A small toolkit for writing regularizers: ``tinkex.regkit``.

Every first-party regularizer (``tinkex-reg-*``) is built from these pieces, and
third-party plugins are welcome to use them too. They implement the common
conventions of the first-party regularizers once:

- **Logprobs layouts.** A sequence of 1-D tensors (one per datum, as Tinker
  passes them), a single 1-D tensor (one datum) or a 2-D ``[B, T]`` tensor (one
  row per datum) all become a list of per-datum 1-D tensors
  (:func:`per_datum_logprobs`).
- **Masks.** ``mask="weights"``: a token counts when its datum's
  ``loss_fn_inputs["weights"] > 0``; datums without weights count every token.
  ``mask=None``: every token counts (:func:`token_masks`). Uncounted tokens are
  *selected away*, so they contribute neither to the value nor to the gradient
  (their gradient is exactly 0).
- **Loss inputs.** A required per-token input such as ``reference_logprobs`` is
  read with :func:`tinkex.loss_input` (``tinkex.Datum`` and ``tinker.Datum``
  alike) and must have the shape of its datum's logprobs
  (:func:`required_inputs`).
- **Means.** "mean" is the mean over the counted tokens of the whole batch; an
  empty selection gives 0.0 (a 0-d tensor still attached to the logprobs'
  graph), never NaN (:meth:`Tokens.mean`).
- **Parameters** are keyword-only and validated in the constructor; a bad value
  raises :class:`tinkex.SpecError` naming the regularizer and the parameter
  (:func:`check_number`, :func:`check_choice`, ...), in the format of the
  ``tinkex train`` config's own errors (``... must be > 0, got -1.0``).

A minimal regularizer::

    from tinkex import regkit

    class MeanLogprob(regkit.Regularizer):
        name = "mean_logprob"
        description = "Mean of the counted target-token logprobs."

        def __call__(self, data, logprobs):
            tokens = self.gather(data, logprobs)
            loss = tokens.mean(tokens.values)
            return loss, regkit.float_metrics({"mean_logprob": loss})

Only torch (and tinkex's own light modules) are imported here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

from ._errors import SpecError
from ._inputs import loss_input
from ._rules import Found, bool_problem, choice_problem, number_problem, problem, text_problem

__all__ = [
    "NAME_PATTERN",
    "Regularizer",
    "Tokens",
    "check_bool",
    "check_choice",
    "check_key",
    "check_mask",
    "check_number",
    "float_metrics",
    "gather",
    "l2_normalize",
    "per_datum_logprobs",
    "required_inputs",
    "token_masks",
]

#: What a regularizer's ``name`` must look like.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


# --------------------------------------------------------------------------- parameters


def _check(regularizer: str, parameter: str, value: Any, found: Found | None) -> Any:
    """``value`` when the check found nothing, else the SpecError in the config's format:
    ``parameter 'p' of regularizer 'r' must be <requirement>, got <value>``."""
    if found is None:
        return value
    requirement, wrong_type = found
    subject = f"parameter {parameter!r} of regularizer {regularizer!r}"
    raise SpecError(problem(subject, requirement, value, wrong_type=wrong_type))


def check_number(
    regularizer: str,
    parameter: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    allow_inf: bool = False,
) -> float:
    """Validate a real-number parameter and return it as a float.

    Args:
        regularizer: the regularizer's name, for the message.
        parameter: the parameter's name, for the message.
        value: the value given; ints are accepted, bools, strings, NaN and ints
            too large for a float are not.
        gt, ge, lt, le: optional bounds (strictly greater, greater or equal, ...).
        allow_inf: accept +/-inf (subject to the bounds); otherwise the number must be finite.

    Raises:
        SpecError: e.g. ``parameter 'temperature' of regularizer 'entropy' must be > 0, got -1.0``
            (a value of the wrong type also gets its type: ``got '1' (str)``).
    """
    found = number_problem(value, gt=gt, ge=ge, lt=lt, le=le, allow_inf=allow_inf)
    return float(_check(regularizer, parameter, value, found))


def check_choice(regularizer: str, parameter: str, value: Any, choices: Iterable[Any]) -> Any:
    """Validate that ``value`` is one of ``choices`` (compared with ``==``, types must match) and return it.

    Raises:
        SpecError: e.g. ``parameter 'estimator' of regularizer 'kl' must be one of 'k3', 'k1', got 'k9'``.
    """
    return _check(regularizer, parameter, value, choice_problem(value, choices))


def check_bool(regularizer: str, parameter: str, value: Any) -> bool:
    """Validate a ``True``/``False`` parameter (no truthy stand-ins such as 1 or "yes").

    Raises:
        SpecError: naming the regularizer and the parameter.
    """
    return _check(regularizer, parameter, value, bool_problem(value, "True or False"))


def check_key(regularizer: str, parameter: str, value: Any) -> str:
    """Validate a loss-input key (a non-empty str, e.g. ``"reference_logprobs"``).

    Raises:
        SpecError: naming the regularizer and the parameter.
    """
    found = text_problem(value, "a non-empty str naming a loss input")
    return _check(regularizer, parameter, value, found)


def check_mask(regularizer: str, value: Any) -> str | None:
    """Validate the common ``mask`` parameter: ``"weights"`` or ``None``.

    Raises:
        SpecError: naming the regularizer and ``mask``.
    """
    return _check(regularizer, "mask", value, choice_problem(value, ("weights", None)))


# --------------------------------------------------------------------------- inputs


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def per_datum_logprobs(logprobs: Any, *, regularizer: str = "regularizer") -> list[torch.Tensor]:
    """Split logprobs into one 1-D tensor per datum.

    Args:
        logprobs: a sequence of 1-D tensors (one per datum), a 1-D tensor (one
            datum) or a 2-D ``[B, T]`` tensor (one row per datum). The tensors
            returned are views of the inputs, so gradients reach them.
        regularizer: the regularizer's name, for error messages.

    Raises:
        SpecError: a non-tensor element, or a tensor that is not 1-D (2-D for a single tensor).
    """
    import torch

    if isinstance(logprobs, torch.Tensor):
        if logprobs.dim() == 1:
            return [logprobs]
        if logprobs.dim() == 2:
            return list(logprobs.unbind(0))
        raise SpecError(
            f"regularizer {regularizer!r}: logprobs must be a 1-D tensor (one datum), a 2-D [B, T] "
            f"tensor or a sequence of 1-D tensors, got a tensor of shape {_shape(logprobs.shape)}"
        )
    if isinstance(logprobs, (str, bytes)) or not isinstance(logprobs, Iterable):
        raise SpecError(
            f"regularizer {regularizer!r}: logprobs must be a tensor or a sequence of 1-D tensors, "
            f"got {type(logprobs).__name__}"
        )
    out = list(logprobs)
    for i, lp in enumerate(out):
        if not isinstance(lp, torch.Tensor) or lp.dim() != 1:
            got = f"shape {_shape(lp.shape)}" if isinstance(lp, torch.Tensor) else type(lp).__name__
            raise SpecError(
                f"regularizer {regularizer!r}: logprobs[{i}] (datum {i}) must be a 1-D tensor, got {got}"
            )
    return out


def _check_batch(data: Sequence[Any], logprobs: Sequence[torch.Tensor], regularizer: str) -> None:
    if len(data) != len(logprobs):
        raise SpecError(
            f"regularizer {regularizer!r}: got {len(data)} datums but logprobs for {len(logprobs)}; "
            f"pass one logprob tensor (or one row) per datum"
        )


def _as_list(data: Any) -> Sequence[Any]:
    return data if isinstance(data, Sequence) else list(data)


def _input_for(
    datum: Any, index: int, key: str, lp: torch.Tensor, regularizer: str
) -> torch.Tensor | None:
    value = loss_input(datum, key, like=lp)
    if value is not None and value.shape != lp.shape:
        raise SpecError(
            f"regularizer {regularizer!r}: loss input {key!r} of datum {index} has shape "
            f"{_shape(value.shape)}, expected {_shape(lp.shape)} (the shape of that datum's logprobs)"
        )
    return value


def _selection(
    data: Sequence[Any], logprobs: Sequence[torch.Tensor], mask: str | None, regularizer: str
) -> torch.Tensor | None:
    """The flat boolean mask over ``torch.cat(logprobs)``; ``None`` when every token counts."""
    import torch

    _check_batch(data, logprobs, regularizer)
    if mask is None:
        return None
    weights = [
        _input_for(d, i, "weights", lp, regularizer)
        for i, (d, lp) in enumerate(zip(data, logprobs, strict=True))
    ]
    if all(w is None for w in weights):
        return None
    parts = [
        torch.ones_like(lp) if w is None else w for w, lp in zip(weights, logprobs, strict=True)
    ]
    return torch.cat(parts) > 0  # one comparison for the whole batch


def _split_masks(
    logprobs: Sequence[torch.Tensor], selection: torch.Tensor | None
) -> list[torch.Tensor]:
    import torch

    if selection is None:
        return [torch.ones(lp.shape, dtype=torch.bool, device=lp.device) for lp in logprobs]
    return list(selection.split([lp.numel() for lp in logprobs]))


def token_masks(
    data: Any,
    logprobs: Sequence[torch.Tensor],
    *,
    mask: str | None = "weights",
    regularizer: str = "regularizer",
) -> list[torch.Tensor]:
    """Per-datum boolean masks of the tokens that count.

    Args:
        data: the batch (``tinkex.Datum`` or ``tinker.Datum`` objects), one per logprob tensor.
        logprobs: per-datum 1-D logprobs (see :func:`per_datum_logprobs`).
        mask: ``"weights"``: ``loss_fn_inputs["weights"] > 0`` (every token of a
            datum without weights counts); ``None``: every token counts.
        regularizer: the regularizer's name, for error messages.

    Raises:
        SpecError: a datum count or a weights shape does not match the logprobs.
    """
    return _split_masks(logprobs, _selection(_as_list(data), logprobs, mask, regularizer))


def required_inputs(
    data: Any,
    logprobs: Sequence[torch.Tensor],
    key: str,
    *,
    regularizer: str = "regularizer",
) -> list[torch.Tensor]:
    """Read the per-token loss input ``key`` of every datum, e.g. ``reference_logprobs``.

    Values are converted to the device (and floating dtype) of the datum's logprobs.

    Raises:
        SpecError: a datum lacks the input, or its shape differs from its logprobs';
            the message names the datum index, the key and the expected shape.
    """
    data = _as_list(data)
    _check_batch(data, logprobs, regularizer)
    out = []
    for i, (datum, lp) in enumerate(zip(data, logprobs, strict=True)):
        value = _input_for(datum, i, key, lp, regularizer)
        if value is None:
            raise SpecError(
                f"regularizer {regularizer!r}: datum {i} has no loss input {key!r}; "
                f"expected a tensor of shape {_shape(lp.shape)} (like its logprobs) in "
                f"loss_fn_inputs[{key!r}]"
            )
        out.append(value)
    return out


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True, eq=False)
class Tokens:
    """The counted tokens of a batch, per datum and concatenated.

    Attributes:
        logprobs: per-datum 1-D logprobs, as given (views of the caller's tensors).
        values: the counted logprobs of the whole batch, concatenated (1-D), in
            datum order. Uncounted tokens are not in it, so they get exactly zero
            gradient.
        inputs: loss-input key -> its counted values, concatenated and aligned with ``values``.
        selection: the boolean mask over ``torch.cat(logprobs)`` that picked
            ``values``; ``None`` when every token counts.
    """

    logprobs: list[torch.Tensor]
    values: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    selection: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """The number of counted tokens in the batch."""
        return self.values.numel()

    @cached_property
    def masks(self) -> list[torch.Tensor]:
        """Per-datum boolean masks of the counted tokens."""
        return _split_masks(self.logprobs, self.selection)

    def mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Mean of a per-counted-token tensor over the batch; 0.0 (still in the graph) when empty."""
        return per_token.sum() / max(per_token.numel(), 1)

    def padded(self, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The logprobs as a ``[B, T_max]`` matrix (right-padded), with its ``[B, T_max]`` mask.

        Uncounted and padding positions hold ``fill`` and carry no gradient.
        For ``B == 0`` both are empty ``[0, 0]`` tensors.
        """
        import torch

        if not self.logprobs:
            return self.values.new_zeros((0, 0)), torch.zeros((0, 0), dtype=torch.bool)
        pad = torch.nn.utils.rnn.pad_sequence
        x = pad(self.logprobs, batch_first=True)
        m = pad(self.masks, batch_first=True, padding_value=False)
        return x.masked_fill(~m, fill), m


def gather(
    data: Any,
    logprobs: Any,
    *,
    mask: str | None = "weights",
    inputs: Iterable[str] = (),
    regularizer: str = "regularizer",
) -> Tokens:
    """Normalise logprobs, apply the mask, read required inputs and select the counted tokens.

    Args:
        data: the batch, one ``tinkex.Datum``/``tinker.Datum`` per datum.
        logprobs: any layout accepted by :func:`per_datum_logprobs`.
        mask: ``"weights"`` or ``None`` (see :func:`token_masks`).
        inputs: keys of required per-token loss inputs (see :func:`required_inputs`).
        regularizer: the regularizer's name, for error messages.

    Raises:
        SpecError: bad logprobs layout, datum count mismatch, missing input or shape mismatch.
    """
    import torch

    lps = per_datum_logprobs(logprobs, regularizer=regularizer)
    data = _as_list(data)
    selection = _selection(data, lps, mask, regularizer)
    refs = {key: required_inputs(data, lps, key, regularizer=regularizer) for key in inputs}
    if not lps:
        empty = torch.zeros(0)
        return Tokens([], empty, {key: empty for key in refs})
    flat = torch.cat(lps)
    flat_refs = {key: torch.cat(per_datum) for key, per_datum in refs.items()}
    if selection is None:  # every token counts: no (device-syncing) boolean indexing
        return Tokens(lps, flat, flat_refs)
    return Tokens(lps, flat[selection], {k: v[selection] for k, v in flat_refs.items()}, selection)


# --------------------------------------------------------------------------- math and metrics


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / ||x||`` along ``dim``; all-zero slices stay zero, with finite (zero) gradients.

    Unlike dividing by ``x.norm()`` (whose gradient is NaN at 0) or clamping with
    an epsilon (which changes small inputs), this is exact wherever the norm is
    positive and NaN-free everywhere.
    """
    import torch

    sq = (x * x).sum(dim=dim, keepdim=True)
    nonzero = sq > 0
    norm = torch.where(nonzero, sq, torch.ones_like(sq)).sqrt()
    return torch.where(nonzero, x / norm, torch.zeros_like(x))


def float_metrics(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Turn named scalars (0-d tensors or numbers) into plain Python floats, with one device sync."""
    import torch

    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        stacked = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors.values()])
        out.update(zip(tensors, stacked.tolist(), strict=True))
    return {k: out[k] for k in values}


# --------------------------------------------------------------------------- base class


class Regularizer:
    """Base class for regularizer plugins.

    Subclasses set the class attributes ``name`` (``[a-z][a-z0-9_]*``) and
    ``description`` (one line), take **keyword-only** constructor parameters,
    validate them (raising :class:`tinkex.SpecError`), store each one as an
    attribute of the same name, and implement ``__call__(data, logprobs) ->
    (loss, metrics)``. An instance is then a valid Tinker custom loss function
    on its own, and ``repr()`` shows its parameters.

    The base constructor takes the common ``mask`` parameter (``"weights"`` or
    ``None``); :meth:`gather` applies it.

    Raises:
        TypeError: at class definition, when ``name`` or ``description`` is malformed.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and (
            not isinstance(cls.name, str) or NAME_PATTERN.fullmatch(cls.name) is None
        ):
            raise TypeError(
                f"{cls.__qualname__}.name must match [a-z][a-z0-9_]*, got {cls.__dict__['name']!r}"
            )
        if "description" in cls.__dict__ and (
            not isinstance(cls.description, str)
            or not cls.description.strip()
            or "\n" in cls.description
        ):
            raise TypeError(f"{cls.__qualname__}.description must be one non-empty line")

    def __init__(self, *, mask: str | None = "weights") -> None:
        self.mask = check_mask(self.name, mask)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Compute ``(loss, metrics)``: a 0-d tensor in the logprobs' graph and plain floats."""
        raise NotImplementedError(
            f"{type(self).__qualname__} must implement __call__(data, logprobs)"
        )

    def gather(self, data: Any, logprobs: Any, *, inputs: Iterable[str] = ()) -> Tokens:
        """:func:`gather` with this regularizer's name and ``mask``."""
        return gather(data, logprobs, mask=self.mask, inputs=inputs, regularizer=self.name)

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The keyword-only constructor parameters, in signature order."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def params(self) -> dict[str, Any]:
        """The constructor parameters of this instance (what ``repr()`` shows)."""
        return {p: getattr(self, p) for p in self.parameter_names() if hasattr(self, p)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
