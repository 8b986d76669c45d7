"""Orthogonality of the datums' logprob vectors.

The rows of ``X`` are the datums' logprobs, uncounted tokens set to 0 in place
and right-padded with 0 to the longest datum.

- ``soft``: ``G`` = Gram matrix of the L2-normalised rows (zero rows stay
  zero); loss ``Σ_{i≠j} G_ij²``, the squared cosines between distinct datums.
- ``hard``: ``G = X Xᵀ``; loss ``‖G − I‖_F²`` (orthonormal rows give 0).

A batch without any counted token gives 0.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinkex import regkit

if TYPE_CHECKING:  # torch is imported where a loss is computed, not here:
    import torch  # `tinkex plugins list` imports this module and must stay cheap

__all__ = ["Orthogonality"]

MODES = ("soft", "hard")


class Orthogonality(regkit.Regularizer):
    """Decorrelate the datums: penalise the Gram matrix of their logprob vectors.

    Args:
        mode: ``"soft"`` (squared off-diagonal cosines) or ``"hard"``
            (``‖X Xᵀ − I‖_F²`` on the raw rows).
        mask: ``"weights"`` (tokens whose ``weights`` or ``mask`` input is <= 0 are set to 0)
            or ``None``.

    Metrics: ``orthogonality`` (the loss).

    Raises:
        SpecError: a parameter is invalid.
    """

    name = "orthogonality"
    description = "Gram-matrix penalty pushing the datums' logprob vectors towards orthogonality (soft or hard)."

    def __init__(self, *, mode: str = "soft", mask: str | None = "weights") -> None:
        super().__init__(mask=mask)
        self.mode = regkit.check_choice(self.name, "mode", mode, MODES)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        tokens = self.gather(data, logprobs)
        x, _ = tokens.padded()  # [B, T_max]; uncounted and padding = 0, no gradient
        if tokens.count == 0:
            loss = x.sum()  # 0.0, still in the graph
        elif self.mode == "soft":
            rows = regkit.l2_normalize(x, dim=-1)
            gram = rows @ rows.T
            diagonal = torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
            loss = gram.masked_fill(diagonal, 0.0).square().sum()
        else:
            gram = x @ x.T
            loss = (
                (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
                .square()
                .sum()
            )
        return loss, regkit.float_metrics({"orthogonality": loss})
