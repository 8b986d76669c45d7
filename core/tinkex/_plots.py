"""The plots of a run and of a comparison of runs, and writing a run's report files.

Two figures per run (``loss_components.png``, ``grad_share.png``) and two per
comparison (``compare_loss.png``, ``compare_grad_share.png``, see
:mod:`tinkex._compare`). Every figure keeps the same conventions, so one reads
like the next:

- **one colour per term** (:func:`term_colours`): ``base_loss`` is always
  :data:`BASE_COLOUR` and ``loss_total`` black; the first-party regularizers have
  a fixed colour each, any other name a stable slot of the same palette -- the
  same term is drawn in the same colour in every figure of a run and of a
  comparison;
- **units** on the y-axes (nats per response token for the cross-entropy under
  ``loss.normalize = "tokens"``);
- **raw values faint, smoothed values bold** (for more than 50 points): a
  centred Gaussian smoothing, so a spike stays a peak at its own step -- lower,
  never a plateau, never shifted;
- **the gradient share as lines** on a logarithmic axis, so a term with 1% of
  the gradient is as visible as one with 50%;
- **resume boundaries** (``summary.json``'s ``sessions``) as dotted vertical lines.

matplotlib is imported only when a plot is drawn, through its object-oriented
API with the Agg canvas (no pyplot, no global backend switch). Files are written
atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._errors import RunDirError
from ._files import atomic_write, atomic_write_text
from ._report import (
    BASE,
    LOSS_PLOT,
    SHARE_PLOT,
    SUMMARY_FILE,
    StepRecord,
    _read_config,
    grad_shares,
    last_samples,
    loss_unit,
    merge_sessions,
    read_metrics,
    resume_steps,
    summarize,
    term_names,
)

__all__ = [
    "BASE_COLOUR",
    "COMPARE_LOSS_PLOT",
    "COMPARE_SHARE_PLOT",
    "TOTAL_COLOUR",
    "VariantCurves",
    "plot_compare_grad_share",
    "plot_compare_loss",
    "plot_grad_share",
    "plot_loss_components",
    "smooth",
    "term_colours",
    "variant_colours",
    "write_report",
]

COMPARE_LOSS_PLOT = "compare_loss.png"
COMPARE_SHARE_PLOT = "compare_grad_share.png"

#: ``loss_total`` in every figure
TOTAL_COLOUR = "#000000"
#: ``base_loss`` in every figure (and its held-out evaluation, dashed)
BASE_COLOUR = "#1f77b4"
#: the regularizers' colours: tab10 without the base loss's blue and without grey
#: (grey is for reference lines), then darker tones
_PALETTE = (
    "#d62728",  # red
    "#2ca02c",  # green
    "#ff7f0e",  # orange
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#17becf",  # cyan
    "#bcbd22",  # olive
    "#393b79",  # indigo
    "#637939",  # moss
    "#843c39",  # maroon
    "#7b4173",  # plum
)
#: the first-party regularizers (and the names the shipped configs give them)
_KNOWN = {
    "kl_ref": 0,
    "kl": 0,
    "entropy": 1,
    "l2": 3,
    "l1": 4,
    "elastic_net": 5,
    "consistency": 6,
    "orthogonality": 7,
}
#: the gradient share's log axis starts here (0.01%); shares below are drawn on it
SHARE_FLOOR = 1e-4


def term_colours(names: Iterable[str]) -> dict[str, str]:
    """A colour for each term name, stable across figures.

    ``base_loss`` is :data:`BASE_COLOUR` and ``loss_total`` :data:`TOTAL_COLOUR`,
    always. A first-party regularizer's name (``kl_ref``/``kl``, ``entropy``,
    ``l2``, ...) has its own palette slot; any other name takes the slot its
    SHA-256 picks. When two names of ``names`` want one slot, the one later in
    sorted order moves to the next free slot -- so the colours depend on the set of
    names, not on their order: give every figure of a comparison the union of its
    runs' names and a term keeps its colour in all of them.
    """
    out = {BASE: BASE_COLOUR, "loss_total": TOTAL_COLOUR}
    wanted = sorted({n for n in names if n not in out})
    taken: set[int] = set()
    size = len(_PALETTE)

    def slot(name: str) -> int:
        if name in _KNOWN:
            return _KNOWN[name]
        return int(hashlib.sha256(name.encode()).hexdigest(), 16) % size

    # the known names claim their slots first, so an unknown name never displaces one
    for name in sorted(wanted, key=lambda n: (n not in _KNOWN, n)):
        start = slot(name)
        free = [(start + i) % size for i in range(size) if (start + i) % size not in taken]
        index = free[0] if free else start  # more names than colours: share one
        taken.add(index)
        out[name] = _PALETTE[index]
    return out


def variant_colours(n: int) -> list[str]:
    """``n`` colours for the variants of a comparison (drawn without term colours):
    evenly spaced along viridis, dark to light-green, for up to 8; tab20 beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n <= 1:
        return [to_hex(colormaps["viridis"](0.3))]
    if n <= 8:
        return [to_hex(colormaps["viridis"](0.85 * i / (n - 1))) for i in range(n)]
    cmap = colormaps["tab20"]
    return [to_hex(cmap(i % 20)) for i in range(n)]


# --------------------------------------------------------------------------- smoothing


def _window(n: int) -> int:
    """The smoothing scale for ``n`` points: 1 (no smoothing) up to 50 points, then n // 50."""
    return 1 if n <= 50 else max(2, n // 50)


def smooth(values: Sequence[float], k: int) -> list[float]:
    """A centred Gaussian smoothing with standard deviation ``k`` points (none for ``k <= 1``).

    Each point is the weighted mean of its neighbours within ``3 k`` points, the
    weights renormalised at the ends (no lag, no droop at the edges). A single
    spike becomes a lower peak at the same step that falls off on both sides --
    not the flat plateau a rolling mean makes of it. Non-finite values are
    skipped.
    """
    n = len(values)
    if k <= 1 or n < 3:
        return [float(v) for v in values]
    half = 3 * k
    kernel = [math.exp(-0.5 * (d / k) ** 2) for d in range(-half, half + 1)]
    out = []
    for i in range(n):
        acc = weight = 0.0
        for d in range(max(-half, -i), min(half, n - 1 - i) + 1):
            v = float(values[i + d])
            if math.isfinite(v):
                w = kernel[d + half]
                acc += w * v
                weight += w
        out.append(acc / weight if weight > 0 else math.nan)
    return out


# --------------------------------------------------------------------------- drawing


def _figure(rows: int = 1, height: float = 4.0, cols: int = 1, width: float = 8.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _curve(
    ax: Any, xs: Sequence[float], ys: Sequence[float], k: int, *, color: str, **kw: Any
) -> None:
    """The raw curve (faint when smoothed) and its smoothing (bold, labelled)."""
    if k <= 1:
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3, color=color, **kw)
        return
    label = kw.pop("label", None)
    ax.plot(xs, ys, alpha=0.25, lw=0.8, color=color, **kw)
    ax.plot(xs, smooth(ys, k), label=label, color=color, lw=1.8, **kw)


def _mark_resumes(axes: Sequence[Any], resumes: Sequence[int]) -> None:
    """A dotted vertical line before each resumed session's first step (labelled on the first axes)."""
    for i, ax in enumerate(axes):
        for step in resumes:
            ax.axvline(step - 0.5, color="0.35", ls=":", lw=1.1, zorder=0)
            if i == 0:
                ax.text(
                    step - 0.5,
                    1.0,
                    f" resumed at {step}",
                    transform=ax.get_xaxis_transform(),
                    ha="left",
                    va="top",
                    fontsize="x-small",
                    color="0.35",
                )


def _loss_label(unit: str | None) -> str:
    return f"loss ({unit})" if unit else "loss"


def _percent(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:g}%"))


def _share_curves(
    ax: Any,
    steps: Sequence[float],
    series: Mapping[str, Sequence[float]],
    k: int,
    colours: Mapping[str, str],
    log: bool,
    *,
    label: Callable[[str, Sequence[float]], str] = lambda name, values: name,
) -> dict[str, Any]:
    """Each term's grad share as a curve on a share axis; returns term -> its line.

    On a log axis a term whose share is always 0 cannot be drawn: it is named in
    a note at the bottom instead.
    """
    lines: dict[str, Any] = {}
    zero = []
    for name, values in series.items():
        if log and max(values) <= 0.0:
            zero.append(name)  # nothing to draw on a log axis
            continue
        shown = [max(x, SHARE_FLOOR) for x in values] if log else values
        _curve(ax, steps, shown, k, label=label(name, values), color=colours[name])
        lines[name] = ax.get_lines()[-1]
    _share_axis(ax, log)
    if zero:
        ax.text(
            0.01,
            0.02,
            "zero share (not drawn): " + ", ".join(zero),
            transform=ax.transAxes,
            fontsize="x-small",
            color="0.35",
        )
    return lines


def _share_axis(ax: Any, log: bool) -> None:
    if log:
        ax.set_yscale("log")
        ax.set_ylim(SHARE_FLOOR, 1.05)
    else:
        ax.set_ylim(0, 1)
    _percent(ax)
    ax.grid(alpha=0.3, which="major")


def loss_components_figure(
    records: Sequence[StepRecord],
    *,
    unit: str | None = None,
    resumes: Sequence[int] = (),
    colours: Mapping[str, str] | None = None,
) -> Any:
    """The figure of ``loss_components.png`` (see :func:`plot_loss_components`)."""
    steps = [r.step for r in records]
    k = _window(len(steps))
    names = term_names(records)
    colours = dict(colours or term_colours(names))
    fig, axes = _figure(2, 6.0)
    top, bottom = axes[0, 0], axes[1, 0]
    _curve(
        top,
        steps,
        [r.output.loss_total for r in records],
        k,
        label="loss_total (composed)",
        color=colours["loss_total"],
    )
    _curve(
        top,
        steps,
        [r.output.base_loss.value for r in records],
        k,
        label=BASE,
        color=colours[BASE],
    )
    held = [r for r in records if r.eval is not None]
    if held:
        # the held-out loss is always per response token: with a training loss summed
        # over the batch, it gets an axis of its own instead of a flat line at the bottom
        eval_ax = top.twinx() if unit is not None and "summed" in unit else top
        if eval_ax is not top:
            eval_ax.set_ylabel("eval base_loss (nats per response token)", fontsize="small")
        eval_ax.plot(
            [r.step for r in held],
            [float(r.eval["base_loss"]) for r in held],  # type: ignore[index]
            marker="o",
            ms=4,
            lw=1.2,
            ls="--",
            color=colours[BASE],
            label="eval base_loss (held out, nats per response token)",
        )
        if eval_ax is not top:
            eval_ax.legend(loc="upper center", fontsize="small")
    top.set_ylabel(_loss_label(unit))
    smooth_note = f" (bold: smoothed over ~{k} steps; faint: each step)" if k > 1 else ""
    top.set_title("loss" + smooth_note)
    top.legend(loc="upper right", fontsize="small")
    top.grid(alpha=0.3)
    regs = names[1:]
    for name in regs:
        rows = [r for r in records if name in r.output.regularizers]
        _curve(
            bottom,
            [r.step for r in rows],
            [r.output.regularizers[name].contribution for r in rows],
            k,
            label=name,
            color=colours[name],
        )
    bottom.axhline(0.0, color="grey", lw=0.8, ls="--")
    bottom.set_title("each regularizer's contribution to the loss", fontsize="medium")
    bottom.set_ylabel("weight x value\n" + (f"({unit})" if unit else "(added to the loss)"))
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    if regs:
        bottom.legend(loc="best", fontsize="small")
    else:
        bottom.text(
            0.5, 0.5, "no regularizers", ha="center", va="center", transform=bottom.transAxes
        )
    _mark_resumes([top, bottom], resumes)
    return fig


def plot_loss_components(
    records: Sequence[StepRecord],
    path: str | Path,
    *,
    unit: str | None = None,
    resumes: Sequence[int] = (),
) -> Path:
    """Draw ``loss_components.png``: the total and the base loss (top; the held-out
    base loss as points joined by a dashed line, where steps were evaluated), each
    regularizer's contribution ``weight * value`` (bottom), over the steps.

    ``unit``: the loss's unit for the y-axis (:func:`tinkex._report.loss_unit`);
    ``resumes``: steps where a resumed session started (marked)."""
    fig = loss_components_figure(records, unit=unit, resumes=resumes)
    return _save(fig, Path(path))


def grad_share_figure(
    records: Sequence[StepRecord],
    *,
    log: bool = True,
    resumes: Sequence[int] = (),
    colours: Mapping[str, str] | None = None,
) -> Any:
    """The figure of ``grad_share.png`` (see :func:`plot_grad_share`)."""
    names = term_names(records)
    colours = dict(colours or term_colours(names))
    rows = [(r.step, grad_shares(r.output)) for r in records]
    rows = [(s, sh) for s, sh in rows if sh is not None]
    fig, axes = _figure(1, 4.2)
    ax = axes[0, 0]
    scale = "log scale" if log else "linear scale"
    ax.set_title(f"share of the gradient norm per term ({scale})")
    ax.set_xlabel("step")
    ax.set_ylabel("share of sum of weight x |d term / d logprobs|")
    if not rows:
        ax.text(
            0.5,
            0.5,
            "gradient norms were not tracked\n(set training.track_grad_norms = true)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return fig
    steps = [s for s, _ in rows]
    k = _window(len(steps))
    if k > 1:
        ax.set_title(
            f"share of the gradient norm per term ({scale}; bold: smoothed over ~{k} steps)"
        )
    series = {name: [sh.get(name, 0.0) for _, sh in rows] for name in names}
    _share_curves(
        ax,
        steps,
        series,
        k,
        colours,
        log,
        label=lambda name, values: f"{name} (mean {100 * sum(values) / len(values):.1f}%)",
    )
    if len(steps) == 1:
        ax.set_xlim(steps[0] - 0.5, steps[0] + 0.5)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    _mark_resumes([ax], resumes)
    return fig


def plot_grad_share(
    records: Sequence[StepRecord],
    path: str | Path,
    *,
    log: bool = True,
    resumes: Sequence[int] = (),
) -> Path:
    """Draw ``grad_share.png``: each term's share of the gradient norm over the
    steps, one line per term (see :mod:`tinkex._report` for the definition); on a
    logarithmic axis unless ``log=False``, so small shares stay visible."""
    fig = grad_share_figure(records, log=log, resumes=resumes)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------- comparisons


@attrs.frozen
class VariantCurves:
    """One variant of a comparison, its curves averaged over its runs (seeds).

    Attributes:
        label: the legend's name for it.
        colour, linestyle: how its lines are drawn.
        runs: how many runs (seeds) it averages.
        steps: the steps, and for each the mean over the runs of ``loss_total``
            and of ``base_loss`` (``*_std``: their standard deviation, ddof=1,
            None with one run).
        eval_steps, eval_base_loss: the evaluated steps and the mean held-out base
            loss (``eval_base_loss_std``: its standard deviation over the runs).
        shares: term -> the mean gradient share at each of ``share_steps``.
        resumes: steps where one of its runs was resumed.
    """

    label: str
    colour: str
    linestyle: str
    runs: int
    steps: list[int]
    loss_total: list[float]
    base_loss: list[float]
    loss_total_std: list[float] | None = None
    base_loss_std: list[float] | None = None
    eval_steps: list[int] = attrs.Factory(list)
    eval_base_loss: list[float] = attrs.Factory(list)
    eval_base_loss_std: list[float] | None = None
    share_steps: list[int] = attrs.Factory(list)
    shares: dict[str, list[float]] = attrs.Factory(dict)
    resumes: list[int] = attrs.Factory(list)


def _variant_line(
    ax: Any, v: VariantCurves, xs: list[int], ys: list[float], std: list[float] | None
) -> None:
    k = _window(len(xs))
    _curve(ax, xs, ys, k, color=v.colour, ls=v.linestyle, label=v.label)
    if std is not None and len(xs) > 1:
        mid = smooth(ys, k)
        spread = smooth(std, k)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mid, spread, strict=True)],
            [m + s for m, s in zip(mid, spread, strict=True)],
            color=v.colour,
            alpha=0.12,
            lw=0,
        )


def _resume_ticks(ax: Any, variants: Sequence[VariantCurves]) -> None:
    for v in variants:
        if v.resumes:
            ax.plot(
                [s - 0.5 for s in v.resumes],
                [0.0] * len(v.resumes),
                marker="^",
                ls="none",
                ms=6,
                color=v.colour,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )


def compare_loss_figure(variants: Sequence[VariantCurves], *, unit: str | None = None) -> Any:
    """The figure of ``compare_loss.png`` (see :func:`plot_compare_loss`)."""
    held = [v for v in variants if v.eval_steps]
    rows = 3 if held else 2
    fig, axes = _figure(rows, 3.0 * rows + 0.6, width=9.5)
    panels = [axes[i, 0] for i in range(rows)]
    base, total = panels[0], panels[1]
    for v in variants:
        _variant_line(base, v, v.steps, v.base_loss, v.base_loss_std)
        _variant_line(total, v, v.steps, v.loss_total, v.loss_total_std)
    positive = all(x > 0 for v in variants for x in v.base_loss)
    if positive:  # the cross-entropy falls by orders of magnitude: differences show on a log axis
        base.set_yscale("log")
    base.set_title(
        "training base loss (cross-entropy): what the model learns"
        + (" (log scale)" if positive else ""),
        fontsize="medium",
    )
    base.set_ylabel(_loss_label(unit))
    total.set_title(
        "training loss_total (base + weighted regularizers): what the optimizer minimises",
        fontsize="medium",
    )
    total.set_ylabel(_loss_label(unit))
    if held:
        ax = panels[2]
        gaps = [b - a for v in held for a, b in zip(v.eval_steps, v.eval_steps[1:], strict=False)]
        spread = 0.3 * min(gaps) / max(1, len(held) - 1) if gaps else 0.0
        for i, v in enumerate(held):
            # side by side around the step, so the error bars do not hide each other
            xs = [s + (i - (len(held) - 1) / 2) * spread for s in v.eval_steps]
            ax.errorbar(
                xs,
                v.eval_base_loss,
                yerr=v.eval_base_loss_std,
                marker="o",
                ms=4,
                lw=1.5,
                capsize=2,
                ls=v.linestyle,
                color=v.colour,
                label=v.label,
            )
        bars = " (bars: ±1 std over seeds)" if any(v.eval_base_loss_std for v in held) else ""
        ax.set_title(f"held-out base loss (eval){bars}", fontsize="medium")
        ax.set_ylabel("loss (nats per response token)")
    for ax in panels:
        ax.grid(alpha=0.3)
        _resume_ticks(ax, variants)
    panels[-1].set_xlabel("step")
    seeds = sorted({v.runs for v in variants})
    note = "mean over seeds, band: ±1 std" if max(seeds) > 1 else "one run per variant"
    fig.suptitle(f"{len(variants)} variants ({note}; faint: each step, bold: smoothed)")
    base.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def plot_compare_loss(
    variants: Sequence[VariantCurves], path: str | Path, *, unit: str | None = None
) -> Path:
    """Draw ``compare_loss.png``: per variant, the training base loss, the training
    ``loss_total`` and (when the runs were evaluated) the held-out base loss, over
    the steps; each variant's mean over its seeds, with a +-1 std band."""
    return _save(compare_loss_figure(variants, unit=unit), Path(path))


def compare_grad_share_figure(
    variants: Sequence[VariantCurves], *, log: bool = True, colours: Mapping[str, str] | None = None
) -> Any:
    """The figure of ``compare_grad_share.png`` (see :func:`plot_compare_grad_share`)."""
    names = [BASE]
    for v in variants:
        names += [n for n in v.shares if n not in names]
    colours = dict(colours or term_colours(names))
    n = max(1, len(variants))
    cols = 1 if n == 1 else 2 if n in (2, 4) else 3
    rows = math.ceil(n / cols)
    fig, axes = _figure(rows, 2.6 * rows + 0.8, cols=cols, width=4.2 * cols + 1.6)
    fig.get_layout_engine().set(w_pad=0.05, h_pad=0.05)
    flat = [axes[r, c] for r in range(rows) for c in range(cols)]
    handles: dict[str, Any] = {}
    for ax, v in zip(flat, variants, strict=False):
        k = _window(len(v.share_steps))
        series = {name: v.shares[name] for name in names if v.shares.get(name)}
        handles.update(_share_curves(ax, v.share_steps, series, k, colours, log))
        ax.set_title(v.label, fontsize="small")
        if not v.share_steps:
            ax.text(0.5, 0.5, "no gradient norms", ha="center", va="center", transform=ax.transAxes)
    for ax in flat[len(variants) :]:
        ax.set_visible(False)
    for r in range(rows):
        axes[r, 0].set_ylabel("grad share")
    for c in range(cols):
        axes[rows - 1, c].set_xlabel("step")
    order = [name for name in names if name in handles]
    fig.legend(
        [handles[name] for name in order], order, loc="outside right upper", fontsize="small"
    )
    scale = "log scale" if log else "linear scale"
    fig.suptitle(f"share of the gradient norm per term, one panel per variant ({scale})")
    return fig


def plot_compare_grad_share(
    variants: Sequence[VariantCurves],
    path: str | Path,
    *,
    log: bool = True,
    colours: Mapping[str, str] | None = None,
) -> Path:
    """Draw ``compare_grad_share.png``: one panel per variant, each term's mean
    gradient share over the steps as a line in the term's colour (the colours of
    the runs' own ``grad_share.png``), on a logarithmic axis unless ``log=False``."""
    return _save(compare_grad_share_figure(variants, log=log, colours=colours), Path(path))


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
            wall time and how it ended). Its ``session``, when it says its steps,
            is added to the summary's ``sessions`` (those of the previous
            ``summary.json`` kept; see :func:`tinkex._report.merge_sessions`);
            the resumed sessions are marked on the plots.

    Returns:
        The summary dict (as written).

    Raises:
        RunDirError: no ``metrics.jsonl``, a damaged one, or no step in it.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run directory not found: {run}")
    records = read_metrics(run, torn=torn)
    config = _read_config(run)
    summary = summarize(records, config=config)
    samples = last_samples(run)
    if samples is not None:
        summary["samples"] = samples
    if extra:
        summary.update(extra)
    previous: Any = None
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8"))
    summary["sessions"] = merge_sessions(
        previous, (extra or {}).get("session"), summary["last_step"]
    )
    if plots:
        resumes = resume_steps(summary)
        unit = loss_unit(config)
        plot_loss_components(records, run / LOSS_PLOT, unit=unit, resumes=resumes)
        plot_grad_share(records, run / SHARE_PLOT, resumes=resumes)
    atomic_write_text(run / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
