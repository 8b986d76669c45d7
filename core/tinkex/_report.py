"""What a run directory says: read ``metrics.jsonl``, summarise it, plot it, tabulate it.

Used at the end of ``tinkex train`` and by ``tinkex report RUN_DIR`` (which works
from ``metrics.jsonl`` alone, so it serves Tinker-backend and interrupted runs).

**Gradient share.** For one step, the share of term *i* (the base loss included,
with weight 1) is::

    share_i = gnw_i / sum_j gnw_j,   gnw_i = weight_i * ||d term_i / d logprobs||_2

i.e. each term's *weighted* gradient norm (``grad_norm_weighted``; the base
loss's ``grad_norm``) over the sum of them across all terms. The shares are in
[0, 1] and add up to 1. By the triangle inequality the denominator is at least
``total_grad_norm`` (the norm of the summed gradient); the two are equal only
when the term gradients point the same way, so the ratio
``total_grad_norm / sum_j gnw_j`` (reported as ``grad_alignment``) says how much
the terms reinforce (1) or cancel (towards 0) each other. A step without tracked
gradient norms has no shares. The summary's ``mean_grad_share`` is the mean of
the per-step shares over the steps that have them.

matplotlib is imported only when a plot is drawn, through its object-oriented
API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._errors import RunDirError
from ._files import atomic_write, atomic_write_text
from ._rundir import CONFIG_FILE, METRICS_FILE, scan_metrics
from ._types import CustomLossOutput

__all__ = [
    "GRAD_SHARE_DEFINITION",
    "StepRecord",
    "grad_shares",
    "plot_grad_share",
    "plot_loss_components",
    "read_metrics",
    "summarize",
    "terms_table",
    "write_report",
]

SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss_components.png"
SHARE_PLOT = "grad_share.png"
BASE = "base_loss"

GRAD_SHARE_DEFINITION = (
    "share_i = grad_norm_weighted_i / sum_j grad_norm_weighted_j over all terms, the base loss "
    "included with weight 1 (grad_norm_weighted = weight * L2 norm of d term / d logprobs); "
    "shares add up to 1. grad_alignment = total_grad_norm / sum_j grad_norm_weighted_j."
)


@attrs.frozen
class StepRecord:
    """One line of ``metrics.jsonl``."""

    step: int
    output: CustomLossOutput
    metrics: dict[str, float] = attrs.field(factory=dict)

    def to_json(self) -> str:
        """The line as written (no trailing newline)."""
        return json.dumps(
            {"step": self.step, "output": self.output.to_dict(), "metrics": self.metrics},
            allow_nan=False,
        )


# --------------------------------------------------------------------------- reading


def read_metrics(path: str | Path, *, torn: list[int] | None = None) -> list[StepRecord]:
    """Read ``metrics.jsonl`` (a file, or a run directory holding one).

    A last line cut short by a crash is skipped; its line number is appended to
    ``torn`` when given, so a caller can say so.

    Raises:
        RunDirError: the file is missing or damaged (naming the line).
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    scan = scan_metrics(p)
    if scan.torn_line is not None and torn is not None:
        torn.append(scan.torn_line)
    records: list[StepRecord] = []
    for number, (step, line) in enumerate(scan.lines, 1):
        try:
            row = json.loads(line)
            records.append(
                StepRecord(
                    step=step,
                    output=CustomLossOutput.from_dict(row["output"]),
                    metrics={str(k): float(v) for k, v in dict(row.get("metrics") or {}).items()},
                )
            )
        except Exception as exc:
            raise RunDirError(
                f"{p}: record {number} (step {step}) is not a valid metrics line "
                f"({type(exc).__name__}: {exc})"
            ) from None
    return records


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not UTF-8, not TOML: the summary goes without it
        return None


# --------------------------------------------------------------------------- numbers


def term_names(records: Sequence[StepRecord]) -> list[str]:
    """``base_loss`` then every regularizer name, in first-seen order."""
    names = [BASE]
    for rec in records:
        for name in rec.output.regularizers:
            if name not in names:
                names.append(name)
    return names


def grad_shares(output: CustomLossOutput) -> dict[str, float] | None:
    """Each term's share of the summed weighted gradient norm (see the module doc).

    Returns ``None`` when the step has no gradient norms; all zeros when every
    term's gradient is zero.
    """
    return output.grad_shares() or None


def grad_alignment(output: CustomLossOutput) -> float | None:
    """``total_grad_norm / sum of weighted term norms`` (1: aligned, ->0: cancelling)."""
    shares = grad_shares(output)
    if shares is None or output.total_grad_norm is None:
        return None
    total = float(output.base_loss.grad_norm or 0.0) + sum(
        float(r.grad_norm_weighted or 0.0) for r in output.regularizers.values()
    )
    return output.total_grad_norm / total if total > 0 else None


def _term_value(output: CustomLossOutput, name: str) -> tuple[float, float, float] | None:
    """(weight, value, contribution) of a term at one step; None when absent."""
    if name == BASE:
        v = output.base_loss.value
        return 1.0, v, v
    reg = output.regularizers.get(name)
    if reg is None:
        return None
    return reg.weight, reg.value, reg.contribution


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(
    records: Sequence[StepRecord], *, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``summary.json`` content for a run's records.

    Keys: ``steps`` (records), ``first_step``, ``last_step``; ``loss`` with the
    ``initial``/``final``/``best`` total loss (``best_step``), the same for the base
    loss, and ``initial_mean``/``final_mean``: the mean total loss over the first and
    the last tenth of the steps (at least one step), less noisy than single
    batches; ``terms``: per term ``weight``, ``final_value``, ``final_contribution``,
    ``mean_value``, ``mean_contribution``, ``mean_grad_norm``, ``mean_grad_share``,
    ``final_grad_share``; ``grad_share_definition``; ``mean_grad_alignment``;
    ``wall_time_s`` (sum of the steps' ``step_time_s``), ``tokens``,
    ``tokens_per_s``; ``config`` (the resolved config, when given).

    Raises:
        RunDirError: no records.
    """
    if not records:
        raise RunDirError(f"no steps recorded in {METRICS_FILE}; nothing to summarise")
    totals = [r.output.loss_total for r in records]
    bases = [r.output.base_loss.value for r in records]
    best_i = min(range(len(totals)), key=totals.__getitem__)
    best_base_i = min(range(len(bases)), key=bases.__getitem__)
    window = max(1, len(records) // 10)
    shares = [grad_shares(r.output) for r in records]

    terms: dict[str, Any] = {}
    for name in term_names(records):
        rows = [(r, _term_value(r.output, name)) for r in records]
        rows = [(r, v) for r, v in rows if v is not None]
        last_rec, (weight, value, contribution) = rows[-1]
        if name == BASE:
            norms = [r.output.base_loss.grad_norm for r, _ in rows]
        else:
            norms = [r.output.regularizers[name].grad_norm for r, _ in rows]
        term_shares = [s[name] for s in shares if s is not None and name in s]
        last_share = grad_shares(last_rec.output)
        terms[name] = {
            "weight": weight,
            "final_value": value,
            "final_contribution": contribution,
            "mean_value": _mean(v[1] for _, v in rows),
            "mean_contribution": _mean(v[2] for _, v in rows),
            "mean_grad_norm": _mean(norms),
            "mean_grad_share": _mean(term_shares),
            "final_grad_share": None if last_share is None else last_share.get(name),
        }

    wall = sum(r.metrics.get("step_time_s", 0.0) for r in records)
    tokens = sum(r.metrics.get("tokens", 0.0) for r in records)
    summary: dict[str, Any] = {
        "steps": len(records),
        "first_step": records[0].step,
        "last_step": records[-1].step,
        "loss": {
            "initial": totals[0],
            "final": totals[-1],
            "best": totals[best_i],
            "best_step": records[best_i].step,
            "initial_mean": _mean(totals[:window]),
            "final_mean": _mean(totals[-window:]),
            "initial_base": bases[0],
            "final_base": bases[-1],
            "best_base": bases[best_base_i],
            "best_base_step": records[best_base_i].step,
            "initial_base_mean": _mean(bases[:window]),
            "final_base_mean": _mean(bases[-window:]),
        },
        "terms": terms,
        "grad_share_definition": GRAD_SHARE_DEFINITION,
        "mean_grad_alignment": _mean(grad_alignment(r.output) for r in records),
        "wall_time_s": wall,
        "tokens": int(tokens),
        "tokens_per_s": tokens / wall if wall > 0 else None,
    }
    if config is not None:
        summary["config"] = dict(config)
    return summary


# --------------------------------------------------------------------------- table


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def terms_table(summary: Mapping[str, Any], *, title: str | None = None) -> Any:
    """A rich :class:`~rich.table.Table` of the terms: weight, final value and
    contribution, mean contribution, mean gradient-norm share."""
    from rich.table import Table

    loss = summary["loss"]
    table = Table(
        title=title or f"loss terms after step {summary['last_step']}",
        caption="grad share: weight x |d term / d logprobs| over the sum across terms (mean over steps)",
        caption_justify="left",
    )
    table.add_column("term")
    for col in ("weight", "value", "contribution", "mean contrib.", "grad share"):
        table.add_column(col, justify="right")
    for name, t in summary["terms"].items():
        table.add_row(
            name,
            _fmt(t["weight"]),
            _fmt(t["final_value"]),
            _fmt(t["final_contribution"]),
            _fmt(t["mean_contribution"]),
            _pct(t["mean_grad_share"]),
        )
    table.add_section()
    tracked = any(t["mean_grad_share"] is not None for t in summary["terms"].values())
    table.add_row(
        "total", "", "", _fmt(loss["final"]), "", _pct(1.0 if tracked else None), style="bold"
    )
    return table


def loss_line(summary: Mapping[str, Any]) -> str:
    """One line: the total loss at the start, the end and its best, over the run."""
    loss = summary["loss"]
    return (
        f"loss {loss['initial']:.4f} -> {loss['final']:.4f} (best {loss['best']:.4f} at step "
        f"{loss['best_step']}; mean of first/last {max(1, summary['steps'] // 10)} steps "
        f"{loss['initial_mean']:.4f} -> {loss['final_mean']:.4f}) over {summary['steps']} steps"
    )


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
    """Draw ``loss_components.png``: the total and the base loss (top), each
    regularizer's contribution ``weight * value`` (bottom), over the steps."""
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
    two PNGs, from ``metrics.jsonl`` and ``config.toml``.

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
    if extra:
        summary.update(extra)
    if plots:
        plot_loss_components(records, run / LOSS_PLOT)
        plot_grad_share(records, run / SHARE_PLOT)
    atomic_write_text(run / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
