"""``tinkex train`` and ``tinkex report``: the main job on the command line.

Kept light to import: torch, transformers and the training code are imported
inside the command bodies, so ``tinkex --help`` stays fast.

Exit codes: 0 done; 1 a training failure (backend, regularizer); 2 a bad config,
data file, regularizer entry or command line (a short message naming the
culprit, no traceback); 130 stopped by Ctrl-C (after writing a checkpoint and
the report; a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

__all__ = ["report", "train"]

LOG_JSON_ENV = "TINKEX_LOG_JSON"
EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _env_json() -> bool:
    return os.environ.get(LOG_JSON_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _run_edge(fn: Any) -> Any:
    """Call ``fn()``, turning tinkex's typed errors into a short message and an exit code."""
    from ._errors import BackendError, PluginError, RegularizerError, SpecError, TinkexError

    try:
        return fn()
    except (SpecError, PluginError) as exc:  # ConfigError, UnknownRegularizerError included
        _fail(str(exc), EXIT_CONFIG)
    except RegularizerError as exc:
        text = str(exc)
        if repr(exc.name) not in text and exc.name not in text:
            text = f"term {exc.name!r} failed: {text}"
        cause = exc.__cause__
        if cause is not None and str(cause) and str(cause) not in text:
            text += f" ({type(cause).__name__}: {cause})"
        _fail(text, EXIT_FAILED)
    except (BackendError, TinkexError) as exc:
        _fail(str(exc), EXIT_FAILED)


def _parse_set(items: tuple[str, ...]) -> dict[str, Any]:
    """``--set section.key=value`` -> ``{"section__key": value}`` (value parsed as TOML)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise click.BadParameter(
                f"expected SECTION.KEY=VALUE, got {item!r}", param_hint="--set"
            )
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: a string
        out[f"{section}__{name}"] = value
    return out


def _default_run_dir() -> Path:
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


# --------------------------------------------------------------------------- display


class _LiveStream:
    """A text stream that prints whole lines through a rich console (above a live bar)."""

    def __init__(self, console: Any) -> None:
        self._console = console
        self._buf = ""

    def write(self, text: str) -> int:
        from rich.text import Text

        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._console.print(Text.from_ansi(line))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return bool(self._console.is_terminal)


class _Display:
    """Progress bar (stderr), start line and final table (stdout); silent when quiet."""

    def __init__(self, *, quiet: bool, bar: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.err = Console(stderr=True)
        self.out = Console()
        self.bar = bar and not quiet
        self._progress: Any = None
        self._task: Any = None

    def start(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        from rich.markup import escape

        what = "resuming" if info["resumed"] else "training"
        ref = " · reference logprobs: initial model" if info["reference"] else ""
        first, total = info["start_step"] + 1, info["total_steps"]
        steps = f"steps {first}..{total}" if first <= total else f"{info['start_step']} steps done"
        self.err.print(
            f"[bold]tinkex train[/] {what} {escape(str(info['base_model']))} "
            f"({escape(str(info['backend']))}, {escape(str(info['device']))}) -> {escape(str(info['run_dir']))}\n"
            f"  {info['examples']} examples · {steps} · "
            f"terms: {escape(', '.join(info['terms']))}{ref}",
            highlight=False,
            soft_wrap=True,
        )
        if info["start_step"] >= info["total_steps"]:
            self.note(
                f"  already at step {info['start_step']} of {info['total_steps']}: nothing to train "
                f"(give a larger --steps to go on)"
            )
            return
        if not self.bar:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold blue]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [bold]{task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=info["total_steps"], completed=info["start_step"], loss="-", tps="-"
        )
        self._progress.start()

    def step(self, record: Any) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=record.step,
                loss=f"{record.output.loss_total:.4f}",
                tps=f"{record.metrics.get('tokens_per_s', 0.0):,.0f}",
            )

    def note(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def log_stream(self) -> Any:
        return _LiveStream(self.err) if self.bar else None


# --------------------------------------------------------------------------- train


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--steps",
    metavar="N",
    type=click.IntRange(min=1),
    help="Total optimizer steps of the run (overrides training.steps).",
)
@click.option(
    "--out",
    "out",
    metavar="RUN_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory to create [default: runs/<timestamp>].",
)
@click.option(
    "--resume",
    metavar="RUN_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Continue the run in this directory from its last checkpoint.",
)
@click.option(
    "--backend",
    metavar="NAME",
    help="Training backend: local, tinker, or one a plugin registers (overrides model.backend).",
)
@click.option(
    "--device",
    metavar="DEVICE",
    help="Device for the local backend: auto, cpu, cuda, cuda:N, mps (overrides model.device).",
)
@click.option(
    "--seed",
    metavar="N",
    type=int,
    help="Seed for the model initialisation and the data order (overrides model.seed and training.seed).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override any config key, e.g. --set training.batch_size=4 (the value is read as TOML; repeatable).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the config, the data and the regularizers, print the resolved config, and exit.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar, start line or final table; only warnings and errors.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help=f"Log level [default: info with {LOG_JSON_ENV}=1, else warning].",
)
def train(
    config: Path | None,
    steps: int | None,
    out: Path | None,
    resume: Path | None,
    backend: str | None,
    device: str | None,
    seed: int | None,
    sets: tuple[str, ...],
    dry_run: bool,
    quiet: bool,
    log_level: str | None,
) -> None:
    """Fine-tune with a composed loss (base loss + weighted regularizers).

    CONFIG is a TOML file (see docs/config.md); without one, the shipped example
    (examples/configs/regularized_sft.toml: the tiny model on the shipped
    instruction data, offline) runs. The run directory gets metrics.jsonl (one
    line per step), config.toml, summary.json, loss_components.png,
    grad_share.png and checkpoint/. Ctrl-C stops after the current step, writes a
    checkpoint and the report; continue with --resume RUN_DIR.

    Set TINKEX_LOG_JSON=1 for JSON log lines on stderr.
    """
    overrides = _parse_set(sets)
    if resume is not None and config is not None:
        raise click.UsageError(
            "give either CONFIG or --resume RUN_DIR (a resumed run uses its own config.toml)"
        )
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise click.UsageError(
            "--out and --resume name different directories; --resume continues in place"
        )
    json_logs = _env_json()
    display = _Display(quiet=quiet, bar=not json_logs)
    level = log_level or ("info" if json_logs else "warning")

    def prepare() -> tuple[Any, Path]:
        from ._config import load_config

        if resume is not None:
            if not (resume / "config.toml").is_file():
                from ._errors import ConfigError

                raise ConfigError(
                    f"{resume} is not a tinkex run directory (no config.toml); nothing to resume"
                )
            cfg = load_config(resume / "config.toml")
            run_dir = resume
        else:
            cfg = load_config(config)
            run_dir = out if out is not None else _default_run_dir()
        flags = {
            "training__steps": steps,
            "model__backend": backend,
            "model__device": device,
            "model__seed": seed,
            "training__seed": seed,
        }
        # --set first, then the dedicated options (they win over --set)
        cfg = cfg.with_overrides(**overrides).with_overrides(**flags)
        return cfg, run_dir

    cfg, run_dir = _run_edge(prepare)

    if dry_run:
        _run_edge(lambda: _dry_run(cfg))
        return

    with _logging(json=json_logs, level=level, stream=display.log_stream()):
        result = _run_edge(lambda: _train(cfg, run_dir, resume is not None, display))
    if result.stopped == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _logging(**options: Any) -> Any:
    """Configure structlog for the command, and put the previous configuration back
    afterwards (a command run in-process, e.g. by click's CliRunner, leaves no trace)."""
    import structlog

    from . import telemetry

    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    telemetry.configure(**options)
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


def _dry_run(cfg: Any) -> None:
    from ._config import build_regularizers, config_to_dict, dumps_toml, load_examples

    pairs = load_examples(cfg)
    specs = build_regularizers(cfg)
    click.echo(
        dumps_toml(config_to_dict(cfg), header="resolved config (dry run: nothing was trained)"),
        nl=False,
    )
    enabled = [s.name for s in specs if s.enabled]
    click.echo(
        f"# ok: {len(pairs)} examples from {cfg.data_path}; terms: {', '.join(['base_loss', *enabled])}",
        err=True,
    )


def _train(cfg: Any, run_dir: Path, resume: bool, display: _Display) -> Any:
    import trio

    from ._errors import TinkexError
    from ._report import write_report
    from ._trainer import Callbacks, StopFlag, run_training

    stop = StopFlag()
    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            stop.set()
            display.note(
                "\n[yellow]Ctrl-C: stopping after this step (checkpoint and report follow); Ctrl-C again aborts now[/]"
            )
            return
        display.stop()
        click.echo("aborted (no checkpoint of the step in progress)", err=True)
        os._exit(EXIT_INTERRUPTED)

    callbacks = Callbacks(on_start=display.start, on_step=display.step)
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
        previous = None
    try:
        result = trio.run(
            lambda: run_training(cfg, run_dir, resume=resume, stop=stop, callbacks=callbacks)
        )
    except TinkexError:
        display.stop()
        if _report_after_failure(run_dir):
            from ._trainer import read_checkpoint_step

            ckpt = read_checkpoint_step(run_dir)
            if ckpt:
                display.note(
                    f"the steps up to {ckpt} are saved in {run_dir} (checkpoint, metrics, summary); "
                    f"continue with: tinkex train --resume {run_dir}"
                )
        raise
    finally:
        display.stop()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    extra = {
        "session": {
            "stopped": result.stopped,
            "first_step": result.first_step,
            "last_step": result.last_step,
            "total_steps": result.total_steps,
            "checkpoint_step": result.checkpoint_step,
            "wall_time_s": result.wall_time_s,
        }
    }
    if result.last_step == 0:
        display.note("no step was run; nothing to report")
        return result
    summary = write_report(run_dir, extra=extra)
    _print_summary(display, summary, run_dir, result)
    return result


def _report_after_failure(run_dir: Path) -> bool:
    """After a failed step: summary and plots of the steps that did complete (best effort).

    Returns whether there was anything to report."""
    from ._report import METRICS_FILE, write_report

    metrics = run_dir / METRICS_FILE
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return False
    with contextlib.suppress(Exception):
        write_report(run_dir, extra={"session": {"stopped": "failed"}})
    return True


def _print_summary(display: _Display, summary: dict[str, Any], run_dir: Path, result: Any) -> None:
    from ._report import loss_line, terms_table

    if display.quiet:
        return
    display.out.print(terms_table(summary))
    display.out.print(loss_line(summary), highlight=False, soft_wrap=True)
    tps = summary.get("tokens_per_s")
    display.out.print(
        f"{summary['wall_time_s']:.1f}s in steps, {tps:,.0f} tokens/s; session {result.wall_time_s:.1f}s"
        if tps
        else f"session {result.wall_time_s:.1f}s",
        highlight=False,
        soft_wrap=True,
    )
    display.out.print(
        f"wrote {run_dir}/: metrics.jsonl, summary.json, loss_components.png, grad_share.png, "
        f"config.toml, checkpoint/ (step {result.checkpoint_step})",
        highlight=False,
        soft_wrap=True,
    )
    if result.stopped == "interrupted":
        display.out.print(
            f"stopped at step {result.last_step} of {result.total_steps}; continue with: "
            f"tinkex train --resume {run_dir}",
            highlight=False,
            soft_wrap=True,
        )


# --------------------------------------------------------------------------- report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--no-plots", is_flag=True, help="Do not re-draw loss_components.png and grad_share.png."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print summary.json to stdout instead of the table."
)
def report(run_dir: Path, no_plots: bool, as_json: bool) -> None:
    """Summarise a run directory from its metrics.jsonl.

    Re-writes summary.json, re-draws loss_components.png and grad_share.png, and
    prints the table of the terms. Works for finished, interrupted and
    Tinker-backend runs alike.
    """

    def run() -> dict[str, Any]:
        import json
        import warnings

        from ._report import SUMMARY_FILE, write_report

        previous: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = (
                {"session": previous["session"]}
                if isinstance(previous.get("session"), dict)
                else None
            )
            return write_report(run_dir, plots=not no_plots, extra=extra)

    summary = _run_edge(run)
    if as_json:
        import json

        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console

    from ._report import loss_line, terms_table

    console = Console()
    console.print(terms_table(summary))
    console.print(loss_line(summary), highlight=False, soft_wrap=True)
    written = "summary.json" if no_plots else "summary.json, loss_components.png, grad_share.png"
    console.print(f"wrote {run_dir}/: {written}", highlight=False, soft_wrap=True)
