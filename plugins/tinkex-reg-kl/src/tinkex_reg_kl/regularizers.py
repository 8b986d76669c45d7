"""KL(policy ‖ reference) from per-token logprobs.

Per counted token, ``r = clamp(ref − lp, −clip, clip)`` and one of the standard
estimators of KL on tokens sampled from the policy:

- ``k1 = −r`` (unbiased, high variance, can be negative),
- ``k2 = r²/2`` (biased, low variance),
- ``k3 = exp(r) − r − 1`` (unbiased, low variance, always >= 0),
- ``pointwise = exp(lp)·(−r)`` (the ``p·(log p − log q)`` form of the Tinkex port).

The loss is their mean over the counted tokens of the batch.

On top-K logprobs (``(N, K)`` per datum, with an ``(N, K)`` reference) the same
formula is applied elementwise over the counted (position, slot) elements. The
top-K slots were not sampled from the policy, so k1–k3 are no longer KL
estimators there: the term is an elementwise penalty pulling those logprobs
toward the reference's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tinkex import regkit

if TYPE_CHECKING:  # torch is imported where a loss is computed, not here:
    import torch  # `tinkex plugins list` imports this module and must stay cheap

__all__ = ["KL"]

ESTIMATORS = ("k3", "k1", "k2", "pointwise")


def _per_token(estimator: str, lp: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    import torch

    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r.square()
    if estimator == "k3":
        return torch.expm1(r) - r  # exp(r) - r - 1, accurate for small r
    return -lp.exp() * r  # pointwise


class KL(regkit.Regularizer):
    """Keep the policy close to a reference: mean per-token KL estimate.

    Args:
        reference: the loss-input key holding each datum's reference logprobs
            (same shape as its logprobs).
        estimator: ``"k3"``, ``"k1"``, ``"k2"`` or ``"pointwise"``.
        clip: ``> 0`` (``inf`` allowed): ``r = ref − lp`` is clamped to ``[−clip, clip]``
            (tokens outside get no gradient through ``r``).
        mask: ``"weights"`` (tokens whose ``weights`` and ``mask`` inputs, where present,
            are > 0 count) or ``None`` (all count).

    Metrics: ``kl`` (the loss), ``kl_max``, ``kl_min`` (over the counted tokens'
    per-token estimates; 0.0 when there is none).

    Raises:
        SpecError: a parameter is invalid; at call time, a datum lacks the
            reference input or its shape differs from its logprobs'.
    """

    name = "kl"
    top_k = True  # elementwise, with a reference of the same (N, K) shape
    description = (
        "KL(policy ‖ reference) per token from reference logprobs (k1, k2, k3 or pointwise)."
    )

    def __init__(
        self,
        *,
        reference: str = "reference_logprobs",
        estimator: str = "k3",
        clip: float = 100.0,
        mask: str | None = "weights",
    ) -> None:
        super().__init__(mask=mask)
        self.reference = regkit.check_key(self.name, "reference", reference)
        self.estimator = regkit.check_choice(self.name, "estimator", estimator, ESTIMATORS)
        self.clip = regkit.check_number(self.name, "clip", clip, gt=0.0, allow_inf=True)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        tokens = self.gather(data, logprobs, inputs=(self.reference,))
        lp, ref = tokens.values, tokens.inputs[self.reference]
        r = ref - lp
        if not math.isinf(self.clip):
            r = r.clamp(-self.clip, self.clip)
        per_token = _per_token(self.estimator, lp, r)
        loss = tokens.mean(per_token)
        if per_token.numel() == 0:
            return loss, {"kl": 0.0, "kl_max": 0.0, "kl_min": 0.0}
        extremes = torch.aminmax(per_token.detach())
        return loss, regkit.float_metrics(
            {"kl": loss, "kl_max": extremes.max, "kl_min": extremes.min}
        )
