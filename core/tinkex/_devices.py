"""The one device parser of tinkex: strings and ``torch.device`` s, checked for availability."""

from __future__ import annotations

from typing import Any

import torch

from ._errors import SpecError

__all__ = ["parse_device"]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def parse_device(device: Any, *, allow_auto: bool = False) -> torch.device | None:
    """Turn ``device`` into a ``torch.device`` that exists on this machine.

    Args:
        device: ``None``, a ``torch.device``, or a string such as ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``, ``"mps"``; with ``allow_auto``, also
            ``"auto"`` (cuda, then mps, then cpu; ``None`` means the same).

    Returns:
        The device, or ``None`` for ``None`` without ``allow_auto`` (no move).

    Raises:
        SpecError: not a device, or a device this machine does not have (CUDA
            or MPS unavailable, a CUDA index past the device count).
    """
    if allow_auto and (device is None or device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if device is None:
        return None
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        choices = "'auto', " if allow_auto else ""
        raise SpecError(
            f"device must be {choices}'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device, "
            f"got {device!r}"
        ) from exc
    fix = "use 'cpu'" + (" or 'auto'" if allow_auto else "")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SpecError(
            f"device {device!r} is not one tinkex trains on; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"device {device!r} requested but CUDA is not available here; {fix}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpecError(
                f"device {device!r} requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); {fix}"
            )
    elif dev.type == "mps" and not _mps_available():
        raise SpecError(f"device {device!r} requested but MPS is not available here; {fix}")
    return dev
