"""Consistency: keep the target-token logprobs close to reference logprobs.

Over the counted tokens of the whole batch (``lp`` and ``ref`` as vectors):

- ``mse``: ``mean (lp − ref)²``;
- ``l1``: ``mean |lp − ref|``;
- ``cosine``: ``1 − cos(lp, ref)``, with ``cos = 0`` when either vector is zero.

On top-K logprobs (``(N, K)`` per datum, with an ``(N, K)`` reference) every
counted (position, slot) element is one entry of ``lp`` and ``ref``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinkex import regkit

if TYPE_CHECKING:  # torch is imported where a loss is computed, not here:
    import torch  # `tinkex plugins list` imports this module and must stay cheap

__all__ = ["Consistency"]

METRICS = ("mse", "l1", "cosine")


class Consistency(regkit.Regularizer):
    """Penalise the distance between the logprobs and a reference (e.g. the original model's).

    Args:
        reference: the loss-input key holding each datum's reference logprobs
            (same shape as its logprobs).
        metric: ``"mse"``, ``"l1"`` or ``"cosine"``.
        mask: ``"weights"`` (tokens whose ``weights`` and ``mask`` inputs, where present,
            are > 0 count) or ``None`` (all count).

    Metrics: ``consistency`` (the loss).

    Raises:
        SpecError: a parameter is invalid; at call time, a datum lacks the
            reference input or its shape differs from its logprobs'.
    """

    name = "consistency"
    top_k = True  # elementwise, with a reference of the same (N, K) shape
    description = (
        "Distance between the target-token logprobs and reference logprobs (mse, l1 or cosine)."
    )

    def __init__(
        self,
        *,
        reference: str = "original_logprobs",
        metric: str = "mse",
        mask: str | None = "weights",
    ) -> None:
        super().__init__(mask=mask)
        self.reference = regkit.check_key(self.name, "reference", reference)
        self.metric = regkit.check_choice(self.name, "metric", metric, METRICS)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        tokens = self.gather(data, logprobs, inputs=(self.reference,))
        lp, ref = tokens.values, tokens.inputs[self.reference]
        if self.metric == "mse":
            loss = tokens.mean((lp - ref).square())
        elif self.metric == "l1":
            loss = tokens.mean((lp - ref).abs())
        elif tokens.count == 0:
            loss = lp.sum()  # 0.0, still in the graph
        else:
            loss = 1.0 - (regkit.l2_normalize(lp, dim=0) * regkit.l2_normalize(ref, dim=0)).sum()
        return loss, regkit.float_metrics({"consistency": loss})
