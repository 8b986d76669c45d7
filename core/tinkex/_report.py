"""What a run directory says: read ``metrics.jsonl``, summarise it, tabulate it.

(The plots and the writing of ``summary.json`` are :mod:`tinkex._plots`.)

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

**Sessions.** Every ``tinkex train`` session that ends with a report adds
``{"stopped", "first_step", "last_step", ...}`` to the summary's ``sessions``
(:func:`merge_sessions`); a session that starts after the first recorded step is
a resume, and :func:`resume_steps` gives those steps (the plots mark them).

**Held-out evaluation.** A step evaluated on the held-out set (``[eval]``) has
an ``"eval"`` object on its line: ``base_loss`` (mean negative log-likelihood
per response token), ``loss_total`` and each term's ``value`` (``terms``). The
summary's ``eval`` has the ``last`` and the ``best`` (lowest ``base_loss``) of
them and how many there were.
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
from ._rundir import CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, read_samples, scan_metrics
from ._types import CustomLossOutput

__all__ = [
    "GRAD_SHARE_DEFINITION",
    "StepRecord",
    "eval_line",
    "grad_shares",
    "last_samples",
    "loss_unit",
    "merge_sessions",
    "read_metrics",
    "resume_steps",
    "summarize",
    "terms_table",
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
    """One line of ``metrics.jsonl``.

    ``eval``: the held-out metrics of the model after this step (``base_loss``,
    ``loss_total``, ``terms``), on the steps that were evaluated; else ``None``
    (and the line has no ``"eval"`` key).
    """

    step: int
    output: CustomLossOutput
    metrics: dict[str, float] = attrs.field(factory=dict)
    eval: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The line as written (no trailing newline)."""
        row: dict[str, Any] = {
            "step": self.step,
            "output": self.output.to_dict(),
            "metrics": self.metrics,
        }
        if self.eval is not None:
            row["eval"] = self.eval
        return json.dumps(row, allow_nan=False)


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
                    eval=row.get("eval"),
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


def _eval_summary(records: Sequence[StepRecord]) -> dict[str, Any] | None:
    """``{"evaluations", "last", "best"}`` of the held-out evaluations, or None when none."""
    evaluated = [r for r in records if r.eval is not None]
    if not evaluated:
        return None

    def entry(r: StepRecord) -> dict[str, Any]:
        return {"step": r.step, **r.eval}  # type: ignore[dict-item]

    best = min(evaluated, key=lambda r: float(r.eval["base_loss"]))  # type: ignore[index]
    return {"evaluations": len(evaluated), "last": entry(evaluated[-1]), "best": entry(best)}


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
    ``tokens_per_s``; ``eval`` (when steps were evaluated: ``evaluations``, and
    the ``last`` and ``best`` evaluation, each ``step``, ``base_loss``,
    ``loss_total``, ``terms``); ``config`` (the resolved config, when given).

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
    held = _eval_summary(records)
    if held is not None:
        summary["eval"] = held
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
    """A rich :class:`~rich.table.Table` of the terms: weight, value and contribution
    at the last step, then the run means of the contribution and of the gradient-norm
    share (the headers say which is which)."""
    from rich.table import Table

    loss = summary["loss"]
    table = Table(
        title=title or f"loss terms after step {summary['last_step']}",
        caption=(
            "weight, value, contrib.: at the last step; run mean: the mean over the "
            f"{summary['steps']} steps. grad share: weight x |d term / d logprobs| over the "
            "sum across terms"
        ),
        caption_justify="left",
    )
    table.add_column("term")
    for col in (  # short headers: the table fits an 80-column terminal
        "weight",
        "value",
        "contrib.",
        "contrib.\n(run mean)",
        "grad share\n(run mean)",
    ):
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


def eval_line(summary: Mapping[str, Any]) -> str | None:
    """One line about the held-out evaluations, or None when there were none."""
    held = summary.get("eval")
    if not held:
        return None
    last, best = held["last"], held["best"]
    terms = ", ".join(f"{k} {v:.4g}" for k, v in last.get("terms", {}).items())
    return (
        f"eval base_loss {last['base_loss']:.4f} at step {last['step']} (best "
        f"{best['base_loss']:.4f} at step {best['step']}; {held['evaluations']} evaluations)"
        + (f"; terms: {terms}" if terms else "")
    )


def last_samples(run_dir: str | Path) -> dict[str, Any] | None:
    """The samples of the last step in ``samples.jsonl``: ``{"step", "samples": [{"prompt",
    "completion"}, ...]}``; None without the file or a sample (a torn last line is skipped).

    Raises:
        RunDirError: the file is damaged (naming the line).
    """
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return None
    lines, _ = read_samples(path)
    if not lines:
        return None
    last = lines[-1][0]
    rows = [json.loads(line) for step, line in lines if step == last]
    return {
        "step": last,
        "samples": [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows],
    }


# --------------------------------------------------------------------------- units, sessions


def loss_unit(config: Mapping[str, Any] | None) -> str | None:
    """The unit of the training loss under a run's resolved config, for axis labels:
    ``"nats per response token"`` (``loss.normalize = "tokens"``, the default) or
    ``"nats, summed over the batch"`` (``"sum"``); None without a config."""
    if not isinstance(config, Mapping):
        return None
    loss = config.get("loss")
    normalize = loss.get("normalize", "tokens") if isinstance(loss, Mapping) else "tokens"
    return "nats, summed over the batch" if normalize == "sum" else "nats per response token"


def _session_ok(session: Any) -> bool:
    return (
        isinstance(session, Mapping)
        and isinstance(session.get("first_step"), int)
        and isinstance(session.get("last_step"), int)
        and not isinstance(session.get("first_step"), bool)
    )


def merge_sessions(
    previous: Mapping[str, Any] | None, session: Any, last_step: int
) -> list[dict[str, Any]]:
    """The ``sessions`` of a run's summary after a report: those of the ``previous``
    summary (or its single ``session``, from before this key existed) that started
    before ``session`` did -- a resume cuts the steps after its checkpoint away, and
    the sessions that wrote them with it -- then ``session`` itself (when it says
    its steps; a report of a failed start does not), none starting after ``last_step``.
    """
    old: list[Any] = []
    if isinstance(previous, Mapping):
        listed = previous.get("sessions")
        if isinstance(listed, list):
            old = list(listed)
        elif previous.get("session") is not None:
            old = [previous["session"]]
    sessions = [dict(s) for s in old if _session_ok(s)]
    if _session_ok(session):
        sessions = [s for s in sessions if s["first_step"] < session["first_step"]]
        sessions.append(dict(session))
    return [s for s in sessions if s["first_step"] <= last_step]


def resume_steps(summary: Mapping[str, Any] | None) -> list[int]:
    """The steps at which a resumed session started (after the first recorded step),
    from a summary's ``sessions``."""
    if not isinstance(summary, Mapping):
        return []
    first = summary.get("first_step", 1)
    sessions = summary.get("sessions")
    if not isinstance(sessions, list):
        return []
    return sorted({s["first_step"] for s in sessions if _session_ok(s) and s["first_step"] > first})
