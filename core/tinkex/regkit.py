"""A small toolkit for writing regularizers: ``tinkex.regkit``.

Every first-party regularizer (``tinkex-reg-*``) is built from these pieces, and
third-party plugins are welcome to use them too. They implement the common
conventions of the first-party regularizers once:

- **Logprobs layouts.** A sequence of per-datum tensors (as Tinker passes
  them), a single 1-D tensor (one datum) or a single 2-D ``[B, T]`` tensor (one
  row per datum) all become a list of per-datum tensors
  (:func:`per_datum_logprobs`). A per-datum tensor is 1-D ``(N,)``, one logprob
  per position, or, for a regularizer that opts in, 2-D ``(N, K)``: Tinker's
  top-K losses give K target tokens per position (``target_tokens`` of shape
  ``(N, K)``).
- **Top-K is opt-in.** A regularizer that handles ``(N, K)`` logprobs sets the
  class attribute ``top_k = True`` (:class:`Regularizer`), or calls
  ``gather(..., top_k=True)``; otherwise a 2-D per-datum tensor raises a
  one-line :class:`tinkex.SpecError`, so a term written for one logprob per
  token never computes something else silently.
- **Masks.** ``mask="weights"``: a token counts where every one of its datum's
  :data:`MASK_KEYS` that is present -- ``loss_fn_inputs["weights"]`` and
  ``loss_fn_inputs["mask"]`` (what tinker-cookbook's RL datums carry: 1 on
  action tokens, 0 on the prompt) -- is > 0; a datum with neither counts every
  token. ``mask=None``: every token counts (:func:`token_masks`). For ``(N, K)``
  logprobs an ``(N,)`` weights/mask applies to all K slots of a position and an
  ``(N, K)`` one applies elementwise. Uncounted elements are *selected away*, so
  they contribute neither to the value nor to the gradient (their gradient is
  exactly 0).
- **Loss inputs.** A required per-token input such as ``reference_logprobs`` is
  read with :func:`tinkex.loss_input` (``tinkex.Datum`` and ``tinker.Datum``
  alike) and must have the shape of its datum's logprobs, ``(N, K)`` for top-K
  (:func:`required_inputs`).
- **Means.** "mean" is the mean over the counted elements of the whole batch
  (positions, or position-slot pairs for top-K); an empty selection gives 0.0
  (a 0-d tensor still attached to the logprobs' graph), never NaN
  (:meth:`Tokens.mean`).
- **Parameters** are keyword-only and validated in the constructor; a bad value
  raises :class:`tinkex.SpecError` naming the regularizer and the parameter
  (:func:`check_number`, :func:`check_choice`, ...), in the format of the
  ``tinkex train`` config's own errors (``... must be > 0, got -1.0``).

A minimal regularizer::

    from tinkex import regkit

    class MeanLogprob(regkit.Regularizer):
        name = "mean_logprob"
        description = "Mean of the counted target-token logprobs."
        top_k = True  # elementwise, so (N, K) top-K logprobs are fine too

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
from ._inputs import shape_text as _shape
from ._rules import Found, bool_problem, choice_problem, number_problem, problem, text_problem

__all__ = [
    "MASK_KEYS",
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

#: The loss inputs ``mask="weights"`` reads: a token counts where each one present is > 0.
MASK_KEYS = ("weights", "mask")

#: The regularizers of the first-party distributions that accept ``(N, K)`` top-K logprobs.
_TOP_K_KINDS = "l1, l2, elastic_net, kl and consistency"


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


def _refuse_top_k(regularizer: str, index: int, shape: Sequence[int]) -> SpecError:
    return SpecError(
        f"regularizer {regularizer!r}: logprobs[{index}] (datum {index}) must be a 1-D tensor "
        f"(one logprob per token), got shape {_shape(shape)}, top-K logprobs (N positions, K "
        f"tokens each) that {regularizer!r} does not handle; use it on target-token logprobs "
        f"({_TOP_K_KINDS} work elementwise on top-K logprobs); a regularizer written for (N, K) "
        f"opts in with the class attribute top_k = True (or gather(..., top_k=True))"
    )


def per_datum_logprobs(
    logprobs: Any, *, regularizer: str = "regularizer", top_k: bool = False
) -> list[torch.Tensor]:
    """Split logprobs into one tensor per datum.

    Args:
        logprobs: a sequence of per-datum tensors, a 1-D tensor (one datum) or a
            2-D ``[B, T]`` tensor (one row per datum). A per-datum tensor is 1-D
            ``(N,)``, or 2-D ``(N, K)`` (top-K) when ``top_k``. The tensors
            returned are the inputs or views of them, so gradients reach them.
        regularizer: the regularizer's name, for error messages.
        top_k: accept 2-D ``(N, K)`` per-datum tensors (Tinker's top-K losses).

    Raises:
        SpecError: a non-tensor element, a per-datum tensor that is not 1-D (or
            2-D with ``top_k``; without it the one-line message says how to opt in),
            or a single tensor that is not 1-D or 2-D.
    """
    import torch

    if isinstance(logprobs, torch.Tensor):
        if logprobs.dim() == 1:
            return [logprobs]
        if logprobs.dim() == 2:
            return list(logprobs.unbind(0))
        raise SpecError(
            f"regularizer {regularizer!r}: logprobs must be a 1-D tensor (one datum), a 2-D [B, T] "
            f"tensor or a sequence of per-datum tensors, got a tensor of shape "
            f"{_shape(logprobs.shape)}"
        )
    if isinstance(logprobs, (str, bytes)) or not isinstance(logprobs, Iterable):
        raise SpecError(
            f"regularizer {regularizer!r}: logprobs must be a tensor or a sequence of per-datum "
            f"tensors, got {type(logprobs).__name__}"
        )
    out = list(logprobs)
    expected = "a 1-D (N,) or 2-D (N, K) top-K tensor" if top_k else "a 1-D tensor"
    for i, lp in enumerate(out):
        if isinstance(lp, torch.Tensor) and lp.dim() == 2 and not top_k:
            raise _refuse_top_k(regularizer, i, lp.shape)
        if not isinstance(lp, torch.Tensor) or lp.dim() not in ((1, 2) if top_k else (1,)):
            got = f"shape {_shape(lp.shape)}" if isinstance(lp, torch.Tensor) else type(lp).__name__
            raise SpecError(
                f"regularizer {regularizer!r}: logprobs[{i}] (datum {i}) must be {expected}, got {got}"
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


def _datum_mask(datum: Any, index: int, lp: torch.Tensor, regularizer: str) -> torch.Tensor | None:
    """Where every mask key the datum has is > 0, with ``lp``'s shape; ``None`` when it has none."""
    counted = None
    for key in MASK_KEYS:
        value = loss_input(datum, key)  # compared in its own dtype: no rounding to the logprobs'
        if value is None:
            continue
        if value.shape == lp.shape[:1] and lp.dim() == 2:  # one value per position: all K slots
            value = value.unsqueeze(-1)
        elif value.shape != lp.shape:
            also = f" or {_shape(lp.shape[:1])}" if lp.dim() == 2 else ""
            raise SpecError(
                f"regularizer {regularizer!r}: loss input {key!r} of datum {index} has shape "
                f"{_shape(value.shape)}, expected {_shape(lp.shape)}{also} (the shape of that "
                f"datum's logprobs{', or one value per position' if also else ''})"
            )
        here = (value > 0).to(lp.device)
        counted = here if counted is None else counted & here
    return None if counted is None else counted.expand(lp.shape)


def _selection(
    data: Sequence[Any], logprobs: Sequence[torch.Tensor], mask: str | None, regularizer: str
) -> torch.Tensor | None:
    """The flat boolean mask over the concatenated, flattened logprobs; ``None`` when all count."""
    import torch

    _check_batch(data, logprobs, regularizer)
    if mask is None:
        return None
    masks = [
        _datum_mask(d, i, lp, regularizer)
        for i, (d, lp) in enumerate(zip(data, logprobs, strict=True))
    ]
    if all(m is None for m in masks):
        return None
    return torch.cat(
        [
            torch.ones(lp.numel(), dtype=torch.bool, device=lp.device)
            if m is None
            else m.reshape(-1)
            for m, lp in zip(masks, logprobs, strict=True)
        ]
    )


def _split_masks(
    logprobs: Sequence[torch.Tensor], selection: torch.Tensor | None
) -> list[torch.Tensor]:
    import torch

    if selection is None:
        return [torch.ones(lp.shape, dtype=torch.bool, device=lp.device) for lp in logprobs]
    parts = selection.split([lp.numel() for lp in logprobs])
    return [part.view(lp.shape) for part, lp in zip(parts, logprobs, strict=True)]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])


def token_masks(
    data: Any,
    logprobs: Sequence[torch.Tensor],
    *,
    mask: str | None = "weights",
    regularizer: str = "regularizer",
) -> list[torch.Tensor]:
    """Per-datum boolean masks of the tokens that count, each of its datum's logprobs' shape.

    Args:
        data: the batch (``tinkex.Datum`` or ``tinker.Datum`` objects), one per logprob tensor.
        logprobs: per-datum ``(N,)`` or ``(N, K)`` logprobs (see :func:`per_datum_logprobs`).
        mask: ``"weights"``: counted where each of ``loss_fn_inputs["weights"]`` and
            ``loss_fn_inputs["mask"]`` that is present is > 0 (every token of a datum
            with neither counts; for ``(N, K)`` logprobs an ``(N,)`` one covers all K
            slots of a position); ``None``: every token counts.
        regularizer: the regularizer's name, for error messages.

    Raises:
        SpecError: a datum count does not match the logprobs, or a weights/mask
            shape is neither the logprobs' nor (for ``(N, K)``) ``(N,)``.
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

    Each must have the shape of its datum's logprobs (``(N, K)`` for top-K). Values
    are converted to the device (and floating dtype) of the datum's logprobs.

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
    """The counted elements of a batch, per datum and concatenated.

    An element is a position of a 1-D ``(N,)`` datum, or a (position, slot) pair
    of a 2-D ``(N, K)`` top-K datum.

    Attributes:
        logprobs: per-datum logprobs, as given (the caller's tensors or views of them).
        values: the counted logprobs of the whole batch, flattened and concatenated
            (1-D), in datum order (row-major within a top-K datum). Uncounted elements
            are not in it, so they get exactly zero gradient.
        inputs: loss-input key -> its counted values, flattened the same way and
            aligned with ``values``.
        selection: the boolean mask over the flattened, concatenated logprobs that
            picked ``values``; ``None`` when every element counts.
    """

    logprobs: list[torch.Tensor]
    values: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    selection: torch.Tensor | None = None

    @property
    def count(self) -> int:
        """The number of counted elements in the batch."""
        return self.values.numel()

    @cached_property
    def masks(self) -> list[torch.Tensor]:
        """Per-datum boolean masks of the counted elements, each of its datum's logprobs' shape."""
        return _split_masks(self.logprobs, self.selection)

    def mean(self, per_token: torch.Tensor) -> torch.Tensor:
        """Mean of a per-counted-element tensor over the batch; 0.0 (still in the graph) when empty."""
        return per_token.sum() / max(per_token.numel(), 1)

    def padded(self, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The logprobs as a ``[B, T_max]`` matrix (right-padded), with its ``[B, T_max]`` mask.

        Uncounted and padding positions hold ``fill`` and carry no gradient.
        For ``B == 0`` both are empty ``[0, 0]`` tensors. (Top-K datums that share
        one K give ``[B, N_max, K]``.)
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
    top_k: bool = False,
) -> Tokens:
    """Normalise logprobs, apply the mask, read required inputs and select the counted elements.

    Args:
        data: the batch, one ``tinkex.Datum``/``tinker.Datum`` per datum.
        logprobs: any layout accepted by :func:`per_datum_logprobs`.
        mask: ``"weights"`` or ``None`` (see :func:`token_masks`).
        inputs: keys of required per-token loss inputs (see :func:`required_inputs`).
        regularizer: the regularizer's name, for error messages.
        top_k: accept ``(N, K)`` per-datum logprobs (Tinker's top-K losses); the
            caller then works elementwise on the flat ``values``.

    Raises:
        SpecError: bad logprobs layout (a 2-D per-datum tensor without ``top_k``),
            datum count mismatch, missing input or shape mismatch.
    """
    import torch

    lps = per_datum_logprobs(logprobs, regularizer=regularizer, top_k=top_k)
    data = _as_list(data)
    selection = _selection(data, lps, mask, regularizer)
    refs = {key: required_inputs(data, lps, key, regularizer=regularizer) for key in inputs}
    if not lps:
        empty = torch.zeros(0)
        return Tokens([], empty, {key: empty for key in refs})
    flat = _flat(lps)  # reshape: views of contiguous tensors, so gradients reach the caller's
    flat_refs = {key: _flat(per_datum) for key, per_datum in refs.items()}
    if selection is None:  # every element counts: no (device-syncing) boolean indexing
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

    ``top_k`` (class attribute, default ``False``): set it to ``True`` when
    ``__call__`` also handles 2-D ``(N, K)`` per-datum logprobs (Tinker's top-K
    losses), typically by working elementwise on :attr:`Tokens.values`. Left
    ``False``, :meth:`gather` refuses them with a one-line :class:`tinkex.SpecError`.

    Raises:
        TypeError: at class definition, when ``name``, ``description`` or ``top_k``
            is malformed.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    top_k: ClassVar[bool] = False

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
        if not isinstance(cls.top_k, bool):
            raise TypeError(f"{cls.__qualname__}.top_k must be True or False, got {cls.top_k!r}")

    def __init__(self, *, mask: str | None = "weights") -> None:
        self.mask = check_mask(self.name, mask)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Compute ``(loss, metrics)``: a 0-d tensor in the logprobs' graph and plain floats."""
        raise NotImplementedError(
            f"{type(self).__qualname__} must implement __call__(data, logprobs)"
        )

    def gather(self, data: Any, logprobs: Any, *, inputs: Iterable[str] = ()) -> Tokens:
        """:func:`gather` with this regularizer's name, ``mask`` and ``top_k``."""
        return gather(
            data, logprobs, mask=self.mask, inputs=inputs, regularizer=self.name, top_k=self.top_k
        )

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
