"""Entropy of the softmax over each datum's counted target-token logprobs.

Per datum ``d`` with ``n_d`` counted tokens: ``q = softmax(lp_d / T)`` over those
tokens, ``H_d = −Σ q·log q`` (terms with ``log q <= −50`` dropped), divided by
``log(n_d)`` when ``normalize`` (0 when ``n_d <= 1``). ``H`` is the mean of
``H_d`` over the datums that have counted tokens (0 if none); the loss is ``H``
(``mode="minimize"``) or ``−H`` (``mode="maximize"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinkex import regkit

if TYPE_CHECKING:  # torch is imported where a loss is computed, not here:
    import torch  # `tinkex plugins list` imports this module and must stay cheap

__all__ = ["LOG_Q_FLOOR", "Entropy"]

#: Terms ``q·log q`` with ``log q`` at or below this are dropped (they are < 1e-20).
LOG_Q_FLOOR = -50.0

MODES = ("minimize", "maximize")


class Entropy(regkit.Regularizer):
    """Minimize (sharpen) or maximize (flatten) the per-datum softmax entropy.

    Args:
        mode: ``"minimize"`` (loss = H) or ``"maximize"`` (loss = −H).
        temperature: ``T > 0``; ``q = softmax(lp / T)``.
        normalize: divide each ``H_d`` by ``log(n_d)`` (so it lies in [0, 1]);
            a datum with one counted token then contributes 0.
        mask: ``"weights"`` (tokens whose ``weights`` and ``mask`` inputs, where present,
            are > 0 count) or ``None`` (all count).

    Metrics: ``entropy`` (H, whatever the mode).

    Raises:
        SpecError: a parameter is invalid.
    """

    name = "entropy"
    description = (
        "Entropy of the softmax over each datum's target-token logprobs; minimize or maximize."
    )

    def __init__(
        self,
        *,
        mode: str = "minimize",
        temperature: float = 1.0,
        normalize: bool = False,
        mask: str | None = "weights",
    ) -> None:
        super().__init__(mask=mask)
        self.mode = regkit.check_choice(self.name, "mode", mode, MODES)
        self.temperature = regkit.check_number(self.name, "temperature", temperature, gt=0.0)
        self.normalize = regkit.check_bool(self.name, "normalize", normalize)

    def __call__(self, data: Any, logprobs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        x, counted = self.gather(data, logprobs).padded()  # [B, T_max]; uncounted = 0, no gradient
        # Uncounted positions get the lowest finite value: q = 0 there, and a row with no
        # counted token stays finite (it is left out of the mean below).
        z = (x / self.temperature).masked_fill(~counted, torch.finfo(x.dtype).min)
        log_q = torch.log_softmax(z, dim=-1)
        keep = counted & (log_q > LOG_Q_FLOOR)
        # where() twice: the dropped terms get neither a value nor a NaN gradient.
        safe_log_q = torch.where(keep, log_q, torch.zeros_like(log_q))
        h = -torch.where(keep, safe_log_q.exp() * safe_log_q, torch.zeros_like(log_q)).sum(dim=-1)
        n = counted.sum(dim=-1)
        if self.normalize:
            several = n > 1
            log_n = n.clamp(min=2).to(h.dtype).log()
            h = torch.where(several, h / log_n, torch.zeros_like(h))
        entropy = h.sum() / (n > 0).sum().clamp(min=1)
        loss = -entropy if self.mode == "maximize" else entropy
        return loss, regkit.float_metrics({"entropy": entropy})
