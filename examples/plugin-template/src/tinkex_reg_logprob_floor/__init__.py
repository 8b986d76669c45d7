"""tinkex-reg-logprob-floor: the ``logprob_floor`` regularizer (a plugin template).

tinkex finds this module through the entry point declared in pyproject.toml and
calls its ``@tinkex.hookimpl`` functions. ``tinkex plugins list`` imports every
plugin, so keep this module's import cheap: import torch (and anything heavy)
inside the functions that compute, never at module top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tinkex
from tinkex import regkit

if TYPE_CHECKING:  # for the annotations only; __call__ imports torch when it runs
    import torch

__all__ = ["LogprobFloor", "tinkex_register_regularizers"]
__version__ = "0.1.0"


class LogprobFloor(regkit.Regularizer):
    """``mean(relu(floor - lp))`` over the counted tokens.

    Pushes up every target-token logprob that falls below ``floor`` and leaves
    the others alone. Worked value: logprobs ``[-1, -2, -3]`` with ``floor=-2.5``
    give ``(0 + 0 + 0.5) / 3 = 0.1667``.

    Args:
        floor: the threshold, a finite number <= 0.
        mask: ``"weights"`` (count tokens whose ``weights`` > 0) or ``None`` (all).
    """

    name = "logprob_floor"
    description = (
        "Hinge penalty mean(relu(floor - logprob)) on target-token logprobs below a floor."
    )

    def __init__(self, *, floor: float = -5.0, mask: str | None = "weights") -> None:
        super().__init__(mask=mask)
        self.floor = regkit.check_number(self.name, "floor", floor, le=0.0)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        tokens = self.gather(data, logprobs)
        below = torch.relu(self.floor - tokens.values)
        loss = tokens.mean(below)
        metrics = regkit.float_metrics(
            {"logprob_floor": loss, "below_fraction": tokens.mean((below > 0).to(below.dtype))}
        )
        return loss, metrics


@tinkex.hookimpl
def tinkex_register_regularizers(register: Callable[[type], None]) -> None:
    """Register ``logprob_floor``."""
    register(LogprobFloor)
