"""``tinkex sweep`` and ``tinkex compare``: experiments over many runs.

Light to import, like the other command modules: the config checks, the
plots and the runs are imported inside the command bodies.

Exit codes follow ``tinkex train``'s rule:

- 0: done;
- 2: refused before anything started (a bad config, ``--set`` or ``--grid`` item,
  a sweep directory used by another sweep or started with another grid, a
  directory that is not a run or a sweep), and nothing was written;
- 1: a run of the sweep failed (the others went on; each failure is said);
- 130: Ctrl-C (the running runs checkpoint and stop; run the command again to finish).

Every error is one line (``Error: ...``; a JSON line with ``TINKEX_LOG_JSON=1``).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ._cli import json_logs
from ._cli_train import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, _fail

__all__ = ["compare", "sweep"]


def _emit(event: str, **fields: Any) -> None:
    """A JSON log line on stderr (only with TINKEX_LOG_JSON=1)."""
    if json_logs():
        import json

        click.echo(json.dumps({"event": event, "level": "info", **fields}, default=str), err=True)


def _warn(message: str) -> None:
    if json_logs():
        import json

        line = {"event": "tinkex.warning", "level": "warning", "warning": message}
        click.echo(json.dumps(line), err=True)
    else:
        click.echo(f"warning: {message}", err=True)


def _message(exc: BaseException) -> str:
    from ._errors import TinkexError

    text = str(exc) if isinstance(exc, TinkexError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _refusing(fn: Any) -> Any:
    """``fn()``, any error a refusal (exit 2); Ctrl-C meanwhile exits 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as exc:
        _fail(_message(exc), EXIT_CONFIG)


# --------------------------------------------------------------------------- sweep


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--grid",
    "grid",
    multiple=True,
    metavar="SECTION.KEY=V1,V2,...",
    help="A config key and its values (TOML, comma-separated), as --set reads them; "
    "every combination of the --grid items is a variant (repeatable).",
)
@click.option(
    "--seeds",
    metavar="N",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Seeds 0..N-1 for every variant (model.seed and training.seed).",
)
@click.option(
    "--jobs",
    metavar="N",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at the same time, each a process with cores // N torch threads.",
)
@click.option(
    "--out",
    "out",
    metavar="SWEEP_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Sweep directory (give it again to resume) [default: sweeps/<timestamp>].",
)
@click.option(
    "--steps",
    metavar="N",
    type=click.IntRange(min=1),
    help="Total optimizer steps of every run (overrides training.steps).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a config key for every variant, as tinkex train --set (repeatable).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check every variant's config and print the runs and what a sweep would do with each.",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress or tables; only warnings and errors."
)
def sweep(
    config: Path | None,
    grid: tuple[str, ...],
    seeds: int,
    jobs: int,
    out: Path | None,
    steps: int | None,
    sets: tuple[str, ...],
    dry_run: bool,
    quiet: bool,
) -> None:
    """Train every combination of grid values and seeds, each as a tinkex train run.

    Every variant (a combination of the --grid values) is trained once per seed
    into SWEEP_DIR/<variant>-seed<k>/, a tinkex train run directory; sweep.json
    lists them. Running the same command again (same --out) skips finished
    runs, resumes interrupted ones from their checkpoint and starts over the
    ones that never reached one. At the end, the runs are compared (the table
    of tinkex compare) and compare_loss.png and compare_grad_share.png are drawn
    into SWEEP_DIR.
    """
    from ._sweep import SweepDir, parse_grid, plan_sweep

    if out is not None and str(out).strip() in ("", "."):
        raise click.UsageError("--out needs the name of a sweep directory, not the current one")
    axes = _refusing(lambda: parse_grid(grid))
    plan = _refusing(lambda: plan_sweep(config, sets, axes, seeds, steps, base_dir=Path.cwd()))
    claim = out is None
    target = out if out is not None else Path("sweeps") / datetime.now().strftime("%Y%m%d-%H%M%S")
    sd = SweepDir(target)
    manifest = None if claim else _refusing(sd.check_usable)
    if manifest is not None:
        from ._sweep import manifest_differences

        diffs = manifest_differences(manifest, plan.identity())
        if diffs:
            _fail(
                f"{target} holds a sweep started with other settings: {'; '.join(diffs)}. "
                f"Re-run it with its own (see {target}/sweep.json: command), or choose another "
                f"--out",
                EXIT_CONFIG,
            )
    if dry_run:
        _dry_run(plan, sd)
        return
    if claim:
        sd = _refusing(lambda: SweepDir.claim(target))
    _refusing(sd.lock)
    try:
        code = _run_sweep(plan, sd, jobs, quiet, resumed=manifest is not None)
    finally:
        sd.unlock()
    if code:
        sys.exit(code)


def _dry_run(plan: Any, sd: Any) -> None:
    from ._sweep import run_state

    seeds = len(plan.seeds)
    click.echo(
        f"# {len(plan.variants)} variants x {seeds} seed{'s' if seeds != 1 else ''} -> {sd.path}"
    )
    for run in plan.runs:
        state, step, why = run_state(sd.path / run.dir_name, run.steps)
        what = {
            "new": "start",
            "restart": f"start over ({why})",
            "resume": f"resume from step {step}",
            "done": f"done (step {step})",
        }[state]
        click.echo(f"{run.dir_name}\t{run.steps} steps\t{what}")
    _say_ok(f"ok: {len(plan.runs)} runs checked; nothing was written")


def _say_ok(text: str) -> None:
    if json_logs():
        _emit("sweep.dry_run", message=text)
    else:
        click.echo(text, err=True)


def _run_sweep(plan: Any, sd: Any, jobs: int, quiet: bool, *, resumed: bool) -> int:
    from ._display import SweepDisplay
    from ._sweep import SweepRunner, threads_per_run

    as_json = json_logs()
    display = SweepDisplay(quiet=quiet or as_json, bar=not as_json)
    runner = _refusing(
        lambda: SweepRunner(plan=plan, sweep=sd, jobs=jobs, display=display, emit=_emit)
    )
    counts = {
        s: sum(r.state == s for r in runner.runs) for s in ("new", "restart", "resume", "done")
    }
    info = {
        "sweep_dir": str(sd.path),
        "variants": len(plan.variants),
        "seeds": len(plan.seeds),
        "runs": len(plan.runs),
        "done": counts["done"],
        "to_resume": counts["resume"],
        "to_start": counts["new"] + counts["restart"],
        "jobs": jobs,
        "threads": threads_per_run(jobs),
        "resumed": resumed,
    }
    _emit("sweep.start", **info)
    display.start(info)
    try:
        status = runner.run()
    except Exception as exc:  # the sweep itself (not a run) failed: the disk, most likely
        display.stop()
        _fail(_message(exc), EXIT_FAILED)
    finally:
        display.stop()
    done = sum(r.status == "completed" for r in runner.runs)
    failed = [r for r in runner.runs if r.status == "failed"]
    _emit("sweep.stop", status=status, completed=done, failed=len(failed), runs=len(runner.runs))
    command = plan.command(sd.path, jobs)
    if status == "interrupted":
        display.note(
            f"interrupted: {done} of {len(runner.runs)} runs done; finish the sweep with: {command}"
        )
        return EXIT_INTERRUPTED
    wrote = _compare_at_end(sd.path, display, quiet or as_json)
    if failed:
        names = ", ".join(r.label for r in failed)
        _fail(
            f"{len(failed)} of {len(runner.runs)} runs failed ({names}; see {sd.path}/logs/); "
            f"the others are done. Fix the cause and re-run: {command}",
            EXIT_FAILED,
        )
    if not (quiet or as_json):
        display.out.print(
            f"wrote {sd.path}/: sweep.json, {wrote}{len(runner.runs)} run directories, logs/",
            highlight=False,
            soft_wrap=True,
        )
    return 0


def _compare_at_end(sweep_dir: Path, display: Any, quiet: bool) -> str:
    """The comparison of a finished sweep: its tables (unless quiet) and its plots."""
    import warnings

    from ._compare import collect, group, tables, write_plots

    try:
        runs, keys, _ = collect([sweep_dir])
        rows = group(runs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths = write_plots(rows, keys, sweep_dir)
    except Exception as exc:
        _warn(f"no comparison of the sweep: {_message(exc)}")
        return ""
    if not quiet:
        for table in tables(rows, keys):
            display.out.print(table)
    return "".join(f"{p.name}, " for p in paths)


# --------------------------------------------------------------------------- compare


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument(
    "dirs",
    metavar="RUN_OR_SWEEP_DIR...",
    nargs=-1,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per run instead of the tables."
)
@click.option(
    "--out",
    "out",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Draw the plots into DIR [default: the sweep directory, when comparing one sweep].",
)
@click.option(
    "--no-plots", is_flag=True, help="Do not draw compare_loss.png and compare_grad_share.png."
)
def compare(dirs: tuple[Path, ...], as_json: bool, out: Path | None, no_plots: bool) -> None:
    """Compare runs and sweeps: a table per variant (mean ± std over seeds) and overlaid curves.

    Each RUN_OR_SWEEP_DIR is a tinkex train run directory or a tinkex sweep
    directory (all its runs). Numbers come from each run's metrics.jsonl.
    """
    import json
    import warnings

    from ._compare import collect, group, run_json, tables, write_plots

    runs, keys, notes = _refusing(lambda: collect(list(dirs)))
    rows = group(runs)
    for note in notes:
        _warn(note)
    dest = out
    if dest is None and len(dirs) == 1 and runs[0].sweep is not None:
        dest = dirs[0]
    written: list[Path] = []
    if not no_plots and dest is not None:

        def draw() -> list[Path]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return write_plots(rows, keys, dest)

        written = _refusing(draw)
    if as_json:
        click.echo(json.dumps([run_json(r) for r in runs], indent=2, allow_nan=False))
        return
    from rich.console import Console

    console = Console()
    for table in tables(rows, keys):
        console.print(table)
    if written:
        console.print(
            "wrote " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True
        )
    elif not no_plots:
        console.print(
            "no plots: give --out DIR to draw them (they go into the sweep directory only "
            "when comparing one sweep)",
            highlight=False,
            soft_wrap=True,
        )
