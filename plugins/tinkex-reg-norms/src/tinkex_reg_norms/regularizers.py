"""Norms of the counted target-token logprobs (or probabilities).

``x`` is the counted ``lp`` (``target="logprobs"``) or ``exp(lp)``
(``target="probs"``); ``n`` is the number of counted tokens of the batch. On
top-K logprobs (``(N, K)`` per datum) every counted (position, slot) element is
one entry of ``x``.

- ``l1``: ``Σ|x|`` (or ``/ n`` for ``reduction="mean"``).
- ``l2``: ``Σ(x − c)²`` (or ``/ n``), ``c`` = 0, the mean of the counted ``x``, or a number.
- ``elastic_net``: ``α·Σ|x| + (1 − α)·Σx²`` (or both as means), ``α = l1_ratio``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinkex import regkit

if TYPE_CHECKING:  # torch is imported where a loss is computed, not here:
    import torch  # `tinkex plugins list` imports this module and must stay cheap

__all__ = ["L1", "L2", "ElasticNet"]

REDUCTIONS = ("sum", "mean")
TARGETS = ("logprobs", "probs")


class _Norm(regkit.Regularizer):
    """Shared parameters and input handling of the three norms."""

    top_k = True  # elementwise over the counted elements, so (N, K) top-K logprobs work too

    def __init__(
        self, *, reduction: str = "sum", target: str = "logprobs", mask: str | None = "weights"
    ) -> None:
        super().__init__(mask=mask)
        self.reduction = regkit.check_choice(self.name, "reduction", reduction, REDUCTIONS)
        self.target = regkit.check_choice(self.name, "target", target, TARGETS)

    def _counted_x(self, data: Any, logprobs: Any) -> torch.Tensor:
        """The counted ``x`` of the whole batch, concatenated (1-D)."""
        values = self.gather(data, logprobs).values
        return values.exp() if self.target == "probs" else values

    def _reduce(self, total: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return total if self.reduction == "sum" else mean


def _mean(total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return total / max(x.numel(), 1)


class L1(_Norm):
    """``Σ|x|`` (or its mean) over the counted tokens.

    Args:
        reduction: ``"sum"`` or ``"mean"`` (over the counted tokens of the batch).
        target: ``"logprobs"`` (x = lp) or ``"probs"`` (x = exp(lp)).
        mask: ``"weights"`` (tokens whose ``weights`` and ``mask`` inputs, where present,
            are > 0 count) or ``None`` (all count).

    Metrics: ``l1_raw`` (the sum), ``l1_mean``.

    Raises:
        SpecError: a parameter is invalid.
    """

    name = "l1"
    description = "L1 norm of the target-token logprobs (or probabilities): sum or mean of |x|."

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._counted_x(data, logprobs)
        raw = x.abs().sum()
        mean = _mean(raw, x)
        return self._reduce(raw, mean), regkit.float_metrics({"l1_raw": raw, "l1_mean": mean})


class L2(_Norm):
    """``Σ(x − c)²`` (or its mean) over the counted tokens.

    Args:
        reduction: ``"sum"`` or ``"mean"``.
        target: ``"logprobs"`` or ``"probs"``.
        center: ``None`` (c = 0), ``"mean"`` (c = mean of the counted x, so the
            loss is their spread) or a finite number.
        mask: ``"weights"`` or ``None``.

    Metrics: ``l2_raw`` (the sum), ``l2_mean``.

    Raises:
        SpecError: a parameter is invalid.
    """

    name = "l2"
    description = (
        "Squared L2 norm of the (optionally centered) target-token logprobs or probabilities."
    )

    def __init__(
        self,
        *,
        reduction: str = "sum",
        target: str = "logprobs",
        center: str | float | None = None,
        mask: str | None = "weights",
    ) -> None:
        super().__init__(reduction=reduction, target=target, mask=mask)
        if center is None or isinstance(center, str):
            self.center = regkit.check_choice(self.name, "center", center, (None, "mean"))
        else:
            self.center = regkit.check_number(self.name, "center", center)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._counted_x(data, logprobs)
        if self.center == "mean":
            x = x - _mean(x.sum(), x)
        elif self.center is not None:
            x = x - self.center
        raw = x.square().sum()
        mean = _mean(raw, x)
        return self._reduce(raw, mean), regkit.float_metrics({"l2_raw": raw, "l2_mean": mean})


class ElasticNet(_Norm):
    """``α·Σ|x| + (1 − α)·Σx²`` (or the same with means), ``α = l1_ratio``.

    Args:
        l1_ratio: ``α`` in [0, 1]; 1 is pure L1, 0 pure squared L2.
        reduction: ``"sum"`` or ``"mean"``.
        target: ``"logprobs"`` or ``"probs"``.
        mask: ``"weights"`` or ``None``.

    Metrics: ``l1_raw`` (``Σ|x|``), ``l2_raw`` (``Σx²``).

    Raises:
        SpecError: a parameter is invalid.
    """

    name = "elastic_net"
    description = "Elastic net on the target-token logprobs: l1_ratio·Σ|x| + (1 − l1_ratio)·Σx²."

    def __init__(
        self,
        *,
        l1_ratio: float = 0.5,
        reduction: str = "sum",
        target: str = "logprobs",
        mask: str | None = "weights",
    ) -> None:
        super().__init__(reduction=reduction, target=target, mask=mask)
        self.l1_ratio = regkit.check_number(self.name, "l1_ratio", l1_ratio, ge=0.0, le=1.0)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x = self._counted_x(data, logprobs)
        l1 = x.abs().sum()
        l2 = x.square().sum()
        total = self.l1_ratio * l1 + (1.0 - self.l1_ratio) * l2
        loss = self._reduce(total, _mean(total, x))
        return loss, regkit.float_metrics({"l1_raw": l1, "l2_raw": l2})
