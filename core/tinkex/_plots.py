"""The plots of a run, and writing a run's report files (``summary.json`` and PNGs).

Two figures per run: the loss components over the steps, and each term's share
of the gradient norm. Raw values are drawn faint and a rolling mean bold (for
more than 50 steps), so spikes stay visible. Files are written atomically.

matplotlib is imported only when a plot is drawn, through its object-oriented
API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._errors import RunDirError
from ._files import atomic_write, atomic_write_text
from ._report import (
    LOSS_PLOT,
    SHARE_PLOT,
    SUMMARY_FILE,
    StepRecord,
    _read_config,
    grad_shares,
    last_samples,
    read_metrics,
    summarize,
    term_names,
)

__all__ = ["plot_grad_share", "plot_loss_components", "write_report"]


# --------------------------------------------------------------------------- plots


def _figure(rows: int = 1, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _window(n: int) -> int:
    """Rolling-mean window for ``n`` points: 1 (no smoothing) up to 50 points."""
    return 1 if n <= 50 else max(2, n // 50)


def _rolling(values: Sequence[float], k: int) -> list[float]:
    """Trailing rolling mean over ``k`` points (shorter at the start)."""
    if k <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _curve(ax: Any, xs: Sequence[float], ys: Sequence[float], k: int, **kw: Any) -> None:
    """The raw curve (faint when smoothed) and its rolling mean."""
    if k <= 1:
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3, **kw)
        return
    label = kw.pop("label", None)
    (line,) = ax.plot(xs, ys, alpha=0.25, lw=0.8, **kw)
    ax.plot(xs, _rolling(ys, k), label=label, color=line.get_color(), lw=1.6)


def plot_loss_components(records: Sequence[StepRecord], path: str | Path) -> Path:
    """Draw ``loss_components.png``: the total and the base loss (top; with the
    held-out base loss as points where steps were evaluated), each regularizer's
    contribution ``weight * value`` (bottom), over the steps."""
    steps = [r.step for r in records]
    k = _window(len(steps))
    fig, (top, bottom) = _figure(2, 6.0)
    _curve(top, steps, [r.output.loss_total for r in records], k, label="loss_total", color="black")
    _curve(
        top,
        steps,
        [r.output.base_loss.value for r in records],
        k,
        label="base_loss",
        color="tab:blue",
    )
    held = [r for r in records if r.eval is not None]
    if held:
        top.plot(
            [r.step for r in held],
            [float(r.eval["base_loss"]) for r in held],  # type: ignore[index]
            marker="o",
            ms=4,
            lw=1.2,
            ls="--",
            color="tab:orange",
            label="eval base_loss (held out)",
        )
    top.set_ylabel("loss")
    smooth = f" (lines: rolling mean over {k} steps)" if k > 1 else ""
    top.set_title("loss components" + smooth)
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    names = term_names(records)[1:]
    for name in names:
        rows = [r for r in records if name in r.output.regularizers]
        _curve(
            bottom,
            [r.step for r in rows],
            [r.output.regularizers[name].contribution for r in rows],
            k,
            label=name,
        )
    bottom.axhline(0.0, color="grey", lw=0.8, ls="--")
    bottom.set_ylabel("contribution (weight x value)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    if names:
        bottom.legend(loc="best")
    else:
        bottom.text(
            0.5, 0.5, "no regularizers", ha="center", va="center", transform=bottom.transAxes
        )
    return _save(fig, Path(path))


def plot_grad_share(records: Sequence[StepRecord], path: str | Path) -> Path:
    """Draw ``grad_share.png``: each term's share of the gradient norm over the
    steps, stacked (the layers add up to 1; see the module doc for the definition)."""
    names = term_names(records)
    rows = [(r.step, grad_shares(r.output)) for r in records]
    rows = [(s, sh) for s, sh in rows if sh is not None]
    fig, (ax,) = _figure(1, 4.0)
    ax.set_title("share of the gradient norm per term")
    ax.set_xlabel("step")
    ax.set_ylabel("share of sum of weighted grad norms")
    if not rows:
        ax.text(
            0.5,
            0.5,
            "gradient norms were not tracked\n(set training.track_grad_norms = true)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    else:
        steps = [s for s, _ in rows]
        k = _window(len(steps))
        layers = [_rolling([sh.get(name, 0.0) for _, sh in rows], k) for name in names]
        if k > 1:
            ax.set_title(f"share of the gradient norm per term (rolling mean over {k} steps)")
        if len(steps) == 1:  # a stackplot needs two x values to show anything
            steps = [steps[0] - 0.5, steps[0] + 0.5]
            layers = [layer * 2 for layer in layers]
        ax.stackplot(steps, layers, labels=names, alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_xlim(steps[0], steps[-1])
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------- all of it


def write_report(
    run_dir: str | Path,
    *,
    plots: bool = True,
    extra: Mapping[str, Any] | None = None,
    torn: list[int] | None = None,
) -> dict[str, Any]:
    """Summarise a run directory: write ``summary.json`` and (with ``plots``) the
    two PNGs, from ``metrics.jsonl``, ``config.toml`` and ``samples.jsonl`` (the
    last step's samples go into the summary as ``samples``).

    Args:
        run_dir: the run directory.
        plots: draw ``loss_components.png`` and ``grad_share.png``.
        extra: more keys for ``summary.json`` (``tinkex train`` adds the session's
            wall time and how it ended).

    Returns:
        The summary dict (as written).

    Raises:
        RunDirError: no ``metrics.jsonl``, a damaged one, or no step in it.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory not found: {run}")
    records = read_metrics(run, torn=torn)
    summary = summarize(records, config=_read_config(run))
    samples = last_samples(run)
    if samples is not None:
        summary["samples"] = samples
    if extra:
        summary.update(extra)
    if plots:
        plot_loss_components(records, run / LOSS_PLOT)
        plot_grad_share(records, run / SHARE_PLOT)
    atomic_write_text(run / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
