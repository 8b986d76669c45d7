"""Reading loss inputs from either ``tinkex.Datum`` or the Tinker SDK's ``tinker.Datum``.

Regularizers receive whatever data the caller passed: our :class:`~tinkex.Datum`
(values are tensors) or Tinker's own ``Datum`` (values are ``TensorData`` with
``.to_torch()``). These helpers hide the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: listing plugins must not pay for it
    import torch

__all__ = ["loss_input", "model_input_ints"]


def loss_input(
    datum: Any,
    key: str,
    *,
    like: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """Return ``datum.loss_fn_inputs[key]`` as a tensor, or ``None`` when absent.

    Args:
        datum: a :class:`tinkex.Datum`, a ``tinker.Datum``, or any object with a
            ``loss_fn_inputs`` mapping whose values are tensors, ``TensorData``
            (``.to_torch()``), numpy arrays or lists of numbers.
        key: the loss-input name, e.g. ``"weights"``.
        like: when given, the result is moved to its device (and, unless ``dtype``
            is given, to its dtype if both are floating point).
        dtype: convert to this dtype.

    Raises:
        TypeError: ``datum`` has no ``loss_fn_inputs`` mapping.
    """
    import torch

    inputs = getattr(datum, "loss_fn_inputs", None)
    if inputs is None:
        raise TypeError(
            f"expected a Datum with .loss_fn_inputs (tinkex.Datum or tinker.Datum), got {type(datum).__name__}"
        )
    value = inputs.get(key)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        tensor = value
    elif callable(getattr(value, "to_torch", None)):
        tensor = value.to_torch()
    else:
        tensor = torch.as_tensor(value)
    if like is not None:
        target_dtype = dtype
        if target_dtype is None and tensor.is_floating_point() and like.is_floating_point():
            target_dtype = like.dtype
        tensor = tensor.to(device=like.device, dtype=target_dtype)
    elif dtype is not None:
        tensor = tensor.to(dtype=dtype)
    return tensor


def model_input_ints(datum: Any) -> list[int]:
    """The input token ids of a ``tinkex.Datum`` or ``tinker.Datum`` as a list of ints."""
    import torch

    mi = getattr(datum, "model_input", datum)
    if hasattr(mi, "to_ints"):
        return [int(x) for x in mi.to_ints()]
    if isinstance(mi, torch.Tensor):
        return [int(x) for x in mi.reshape(-1).tolist()]
    return [int(x) for x in mi]


def shape_text(shape: Sequence[int]) -> str:
    """A shape as tuple text for error messages: ``(3,)``, ``(3, 2)``, ``()``."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
