"""``tinkex compare``: runs and sweeps side by side, from their ``metrics.jsonl``.

Every number comes from the runs' ``metrics.jsonl`` through
:func:`tinkex._report.summarize` (what ``summary.json`` says), so a comparison
agrees with each run's own report:

- per run (``--json``): ``final_loss`` (``loss_total`` at the last step),
  ``final_base_loss`` (the base loss at the last step), ``best_loss`` (the lowest
  ``loss_total`` of any step), ``final_eval_loss`` (the held-out base loss of the
  last evaluation, or None), ``wall_time_s`` (the summed step times) and, per
  term, ``mean_contribution`` and ``mean_grad_share`` (means over the steps);
- per variant (the table): the mean over its runs (seeds), +- the sample
  standard deviation (ddof=1) when there are two or more.

A sweep directory contributes its runs (``sweep.json``) with their grid values
as ``params`` and their seed; a run directory given directly has ``params`` {}
and the ``training.seed`` of its ``config.toml``.
"""

from __future__ import annotations

import math
import statistics
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ._errors import RunDirError
from ._report import (
    BASE,
    METRICS_FILE,
    SUMMARY_FILE,
    StepRecord,
    grad_shares,
    loss_unit,
    read_metrics,
    resume_steps,
    summarize,
)
from ._sweep import SWEEP_FILE, read_manifest, short_key

__all__ = ["RunStats", "VariantRow", "collect", "group", "run_json", "write_plots"]


@attrs.frozen
class RunStats:
    """One run of a comparison: where it is, what it varied, and its records and summary."""

    run: Path
    sweep: Path | None
    variant: str  # the variant's name in its sweep, or the run directory's name
    params: dict[str, Any]
    seed: int | None
    records: list[StepRecord]
    summary: dict[str, Any]
    config: dict[str, Any] | None
    resumes: list[int]

    def final_eval_loss(self) -> float | None:
        held = self.summary.get("eval")
        return None if not held else float(held["last"]["base_loss"])

    def term(self, name: str, key: str) -> float | None:
        t = self.summary["terms"].get(name)
        return None if t is None else t.get(key)


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load_run(
    path: Path, *, sweep: Path | None, variant: str, params: dict[str, Any], seed: int | None
) -> RunStats | None:
    """A run's stats; None when it has recorded no step yet."""
    metrics = path / METRICS_FILE
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    records = read_metrics(path)
    if not records:
        return None
    config = _read_toml(path / "config.toml")
    if seed is None and config is not None:
        value = config.get("training", {}).get("seed")
        seed = value if isinstance(value, int) else None
    return RunStats(
        run=path,
        sweep=sweep,
        variant=variant,
        params=params,
        seed=seed,
        records=records,
        summary=summarize(records),
        config=config,
        resumes=resume_steps(_read_json(path / SUMMARY_FILE)),
    )


def collect(paths: Sequence[Path]) -> tuple[list[RunStats], list[str], list[str]]:
    """The runs of ``paths`` (run or sweep directories), in order.

    Returns the runs, the grid keys (of the sweeps, in order), and notes about runs
    left out (not started yet).

    Raises:
        RunDirError: a path that is neither a run nor a sweep directory, a damaged
            ``metrics.jsonl`` or ``sweep.json``, or nothing to compare.
    """
    runs: list[RunStats] = []
    keys: list[str] = []
    notes: list[str] = []
    for path in paths:
        if not path.is_dir():
            raise RunDirError(f"{path}: no such directory")
        manifest = read_manifest(path)
        if manifest is not None:
            for axis in manifest.get("grid", []):
                key = axis.get("key") if isinstance(axis, dict) else None
                if isinstance(key, str) and key not in keys:
                    keys.append(key)
            missing = []
            for variant in manifest["variants"]:
                for entry in variant.get("runs", []):
                    run_dir = path / str(entry.get("run_dir"))
                    stats = _load_run(
                        run_dir,
                        sweep=path,
                        variant=str(variant.get("name")),
                        params=dict(variant.get("params") or {}),
                        seed=entry.get("seed"),
                    )
                    if stats is None:
                        missing.append(run_dir.name)
                    else:
                        runs.append(stats)
            if missing:
                many = "runs" if len(missing) != 1 else "run"
                notes.append(
                    f"{path}: {len(missing)} {many} with no step yet, left out: "
                    + ", ".join(missing)
                )
            continue
        if not (path / METRICS_FILE).exists():
            raise RunDirError(
                f"{path} is neither a tinkex run directory (no {METRICS_FILE}) nor a sweep "
                f"directory (no {SWEEP_FILE})"
            )
        stats = _load_run(path, sweep=None, variant=path.name, params={}, seed=None)
        if stats is None:  # as a sweep's runs with no step yet: left out, said so
            notes.append(f"{path}: no step recorded in {METRICS_FILE} yet, left out")
            continue
        runs.append(stats)
    if not runs:
        raise RunDirError("no run with a recorded step in " + ", ".join(map(str, paths)))
    return runs, keys, notes


def run_json(r: RunStats) -> dict[str, Any]:
    """One run as ``tinkex compare --json`` prints it."""
    loss = r.summary["loss"]
    return {
        "run": str(r.run),
        "sweep": None if r.sweep is None else str(r.sweep),
        "variant": r.variant,
        "params": r.params,
        "seed": r.seed,
        "steps": r.summary["last_step"],
        "final_loss": loss["final"],
        "final_base_loss": loss["final_base"],
        "best_loss": loss["best"],
        "final_eval_loss": r.final_eval_loss(),
        "wall_time_s": r.summary["wall_time_s"],
        "terms": {
            name: {
                "mean_contribution": t["mean_contribution"],
                "mean_grad_share": t["mean_grad_share"],
            }
            for name, t in r.summary["terms"].items()
        },
    }


# --------------------------------------------------------------------------- variants


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two) of the
    values that are not None, and how many there were."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return statistics.fmean(vals), std, len(vals)


@attrs.frozen
class VariantRow:
    """The runs (seeds) of one variant."""

    label: str
    params: dict[str, Any]
    runs: list[RunStats]

    def stat(
        self, fn: Callable[[RunStats], float | None]
    ) -> tuple[float | None, float | None, int]:
        return mean_std([fn(r) for r in self.runs])

    def terms(self) -> list[str]:
        names: list[str] = []
        for r in self.runs:
            names += [n for n in r.summary["terms"] if n not in names]
        return names


def group(runs: Sequence[RunStats]) -> list[VariantRow]:
    """The runs grouped by variant (a sweep's variant, or a run of its own), in order."""
    sources = {r.sweep or r.run for r in runs}
    several = len(sources) > 1
    rows: dict[tuple[Any, ...], VariantRow] = {}
    for r in runs:
        if r.sweep is not None:
            key: tuple[Any, ...] = ("sweep", r.sweep, r.variant)
            label = f"{r.sweep.name}/{r.variant}" if several else r.variant
        else:
            key = ("run", r.run)
            label = r.variant
        if key not in rows:
            rows[key] = VariantRow(label=label, params=r.params, runs=[])
        rows[key].runs.append(r)
    labels = [row.label for row in rows.values()]
    out = []
    for row in rows.values():
        if labels.count(row.label) > 1 and len(row.runs) == 1:  # two runs named alike
            row = attrs.evolve(row, label=f"{row.runs[0].run.parent.name}/{row.label}")
        out.append(row)
    return out


# --------------------------------------------------------------------------- tables


def _pm(mean: float | None, std: float | None, spec: str = ".4g") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = format(mean, spec)
    return text if std is None else f"{text} ± {std:.2g}"


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    text = f"{100 * mean:.1f}%"
    if std is None:
        return text
    return f"{text} ± <0.1" if 100 * std < 0.05 else f"{text} ± {100 * std:.1f}"


def _value_text(value: Any) -> str:
    from ._sweep import format_value

    return format_value(value)


def _key_columns(rows: Sequence[VariantRow], keys: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether the table needs a ``variant`` column, and the grid-key columns."""
    from_one_sweep = len({r.runs[0].sweep for r in rows}) == 1 and rows[0].runs[0].sweep
    return not (from_one_sweep and keys), list(keys)


def tables(rows: Sequence[VariantRow], keys: Sequence[str]) -> list[Any]:
    """Two rich tables: the losses per variant, and the terms per variant (run means)."""
    from rich.table import Table
    from rich.text import Text

    from ._plots import term_colours

    with_label, key_cols = _key_columns(rows, keys)
    seeds = max(len(r.runs) for r in rows)
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one run per variant"
    unit = loss_unit(rows[0].runs[0].config) or "nats"
    has_eval = any(r.final_eval_loss() is not None for row in rows for r in row.runs)

    def lead(table: Any) -> None:
        if with_label:
            table.add_column("variant", no_wrap=True)
        for key in key_cols:
            table.add_column(short_key(key), no_wrap=True)

    def lead_cells(row: VariantRow) -> list[str]:
        cells = [row.label] if with_label else []
        return cells + [_value_text(row.params[k]) if k in row.params else "-" for k in key_cols]

    losses = Table(
        title=f"loss per variant ({over})",
        caption=(
            f"loss: loss_total (base + weighted regularizers) and base loss (cross-entropy), "
            f"in {unit}; eval: the held-out base loss, nats per response token; "
            f"last step / min over steps / last evaluation, then averaged over the seeds"
        ),
        caption_justify="left",
    )
    lead(losses)
    losses.add_column("runs", justify="right")
    cols = [
        ("final loss\n(last step)", lambda r: r.summary["loss"]["final"]),
        ("best loss\n(min over steps)", lambda r: r.summary["loss"]["best"]),
        ("final base loss\n(last step)", lambda r: r.summary["loss"]["final_base"]),
    ]
    if has_eval:
        cols.append(("final eval loss\n(last evaluation)", RunStats.final_eval_loss))
    cols.append(("time in steps\n(s, per run)", lambda r: r.summary["wall_time_s"]))
    for title, _ in cols:
        losses.add_column(title, justify="right")
    for row in rows:
        losses.add_row(
            *lead_cells(row),
            str(len(row.runs)),
            *[
                _pm(*row.stat(fn)[:2], spec=".1f" if "time" in title else ".4g")
                for title, fn in cols
            ],
        )

    names: list[str] = [BASE]
    for row in rows:
        names += [n for n in row.terms() if n not in names]
    colours = term_colours(names)
    terms = Table(
        title=f"terms per variant: run means ({over})",
        caption=(
            "contrib.: weight x value, mean over the steps of a run; grad share: weight x "
            "|d term / d logprobs| over the sum across terms, mean over the steps; "
            "'-': the term is not in that variant"
        ),
        caption_justify="left",
    )
    lead(terms)
    for name in names:
        style = f"bold {colours[name]}"
        if name != BASE:
            terms.add_column(Text(f"{name}\ncontrib.", style=style), justify="right")
        terms.add_column(Text(f"{name}\ngrad share", style=style), justify="right")
    for row in rows:
        cells = lead_cells(row)
        for name in names:

            def contrib(r: RunStats, name: str = name) -> float | None:
                return r.term(name, "mean_contribution")

            def share(r: RunStats, name: str = name) -> float | None:
                return r.term(name, "mean_grad_share")

            if name != BASE:
                cells.append(_pm(*row.stat(contrib)[:2]))
            cells.append(_pct(*row.stat(share)[:2]))
        terms.add_row(*cells)
    return [losses, terms]


# --------------------------------------------------------------------------- plots


def _mean_by_step(series: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    steps = sorted({s for d in series for s in d})
    means, stds = [], []
    for s in steps:
        vals = [d[s] for d in series if s in d]
        means.append(statistics.fmean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return steps, means, stds


def curves(rows: Sequence[VariantRow], keys: Sequence[str]) -> list[Any]:
    """The :class:`tinkex._plots.VariantCurves` of each variant: its runs' curves
    averaged step by step, with a colour and a line style -- for a grid of two keys,
    the colour says the first key's value and the line style the second's."""
    from ._plots import VariantCurves, variant_colours

    styles = ["-", "--", ":", "-."]
    first = [k for k in keys if any(k in row.params for row in rows)]
    values: list[list[Any]] = []
    for key in first[:2]:
        seen: list[Any] = []
        for row in rows:
            v = row.params.get(key)
            if all(not (type(v) is type(w) and v == w) for w in seen):
                seen.append(v)
        values.append(seen)

    def index(key_i: int, row: VariantRow) -> int:
        v = row.params.get(first[key_i])
        return next(i for i, w in enumerate(values[key_i]) if type(v) is type(w) and v == w)

    by_pair = len(first) == 2 and len(values[1]) <= len(styles)
    palette = variant_colours(len(values[0]) if by_pair else len(rows))
    out = []
    for i, row in enumerate(rows):
        if by_pair:
            colour, style = palette[index(0, row)], styles[index(1, row)]
        else:
            colour, style = palette[i], "-"
        n = len(row.runs)
        steps, total, total_std = _mean_by_step(
            [{rec.step: rec.output.loss_total for rec in r.records} for r in row.runs]
        )
        _, base, base_std = _mean_by_step(
            [{rec.step: rec.output.base_loss.value for rec in r.records} for r in row.runs]
        )
        eval_steps, eval_base, eval_std = _mean_by_step(
            [
                {rec.step: float(rec.eval["base_loss"]) for rec in r.records if rec.eval}
                for r in row.runs
            ]
        )
        share_series: dict[str, list[dict[int, float]]] = {}
        for r in row.runs:
            per_term: dict[str, dict[int, float]] = {}
            for rec in r.records:
                shares = grad_shares(rec.output)
                for name, value in (shares or {}).items():
                    per_term.setdefault(name, {})[rec.step] = value
            for name, series in per_term.items():
                share_series.setdefault(name, []).append(series)
        share_steps: list[int] = []
        shares: dict[str, list[float]] = {}
        for name, series in share_series.items():
            share_steps, shares[name], _ = _mean_by_step(series)
        resumes = sorted({s for r in row.runs for s in r.resumes})
        out.append(
            VariantCurves(
                label=row.label if n == 1 else f"{row.label} (x{n})",
                colour=colour,
                linestyle=style,
                runs=n,
                steps=steps,
                loss_total=total,
                base_loss=base,
                loss_total_std=total_std if n > 1 else None,
                base_loss_std=base_std if n > 1 else None,
                eval_steps=eval_steps,
                eval_base_loss=eval_base,
                eval_base_loss_std=eval_std if n > 1 else None,
                share_steps=share_steps,
                shares=shares,
                resumes=resumes,
            )
        )
    return out


def write_plots(rows: Sequence[VariantRow], keys: Sequence[str], out: Path) -> list[Path]:
    """Draw ``compare_loss.png`` and ``compare_grad_share.png`` into ``out``."""
    from ._files import storage_errors
    from ._plots import (
        COMPARE_LOSS_PLOT,
        COMPARE_SHARE_PLOT,
        plot_compare_grad_share,
        plot_compare_loss,
    )

    with storage_errors(str(out)):
        out.mkdir(parents=True, exist_ok=True)
    variants = curves(rows, keys)
    unit = loss_unit(rows[0].runs[0].config)
    return [
        plot_compare_loss(variants, out / COMPARE_LOSS_PLOT, unit=unit),
        plot_compare_grad_share(variants, out / COMPARE_SHARE_PLOT),
    ]
