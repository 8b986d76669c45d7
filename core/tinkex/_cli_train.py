"""``tinkex train`` and ``tinkex report``: the main job on the command line.

Kept light to import: torch, transformers and the training code are imported
inside the command bodies, so ``tinkex --help`` stays fast.

Exit codes, one rule:

- 0: done (or nothing left to do);
- 2: refused before training started -- a bad config, data file, regularizer entry
  or command line, a locked run directory, a resume that does not match its run,
  a missing or corrupt checkpoint -- and nothing was written;
- 1: failed after training started (a term, the backend, a full disk); the last
  good step is checkpointed;
- 130: interrupted by Ctrl-C (after the step in progress: checkpoint and report
  written; a second Ctrl-C aborts at once; during start-up nothing is kept).

Every error is one line naming the culprit, never a traceback; with
``TINKEX_LOG_JSON=1`` stderr carries JSON lines only.
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

from ._cli import LOG_JSON_ENV, json_logs
from ._display import Display

__all__ = ["report", "train"]

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _say(message: str, *, level: str, **fields: Any) -> None:
    """One line on stderr: ``Error: ...``/``warning: ...``, or a JSON line with TINKEX_LOG_JSON=1."""
    if json_logs():
        import json

        key = "error" if level == "error" else "message"
        line = {"event": f"tinkex.{level}", "level": level, key: message, **fields}
        click.echo(json.dumps(line), err=True)
    else:
        prefix = {"error": "Error: ", "warning": "warning: "}.get(level, "")
        click.echo(f"{prefix}{message}", err=True)


def _fail(message: str, code: int) -> None:
    """Say what went wrong in one line (a JSON line with TINKEX_LOG_JSON=1) and exit."""
    if _INTERRUPTED and code != EXIT_INTERRUPTED:
        # Ctrl-C landed inside a library import, which turned it into another error
        message, code = "interrupted", EXIT_INTERRUPTED
    _say(" ".join(message.split()), level="error", exit_code=code)
    sys.exit(code)


#: set when Ctrl-C arrives during start-up (see :func:`_startup_sigint`)
_INTERRUPTED: list[bool] = []


def _startup_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C before training: remember it (libraries may wrap the KeyboardInterrupt)."""
    _INTERRUPTED.append(True)
    raise KeyboardInterrupt


def _message(exc: BaseException) -> str:
    """One line for any error: tinkex's own say everything; others get their type."""
    from ._errors import RegularizerError, TinkexError

    text = str(exc)
    if isinstance(exc, RegularizerError):
        if repr(exc.name) not in text and exc.name not in text:
            text = f"term {exc.name!r} failed: {text}"
        cause = exc.__cause__
        if cause is not None and str(cause) and str(cause) not in text:
            text += f" ({type(cause).__name__}: {cause})"
    elif not isinstance(exc, TinkexError):
        text = f"{type(exc).__name__}: {text}"
    return " ".join(text.split())  # one line


def _refusing(fn: Any) -> Any:
    """Call ``fn()`` before training starts: any error is a refusal (exit 2)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        _fail(_message(exc), EXIT_CONFIG)


def _default_run_dir() -> Path:
    """``runs/<timestamp>``: the name to claim (``-2``... when taken) once training starts."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------- display


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
    "--force",
    is_flag=True,
    help="Resume even when the batch size, data seed, data file or model differ from the run's.",
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
    "--log-to",
    "log_to",
    metavar="NAMES",
    help="Metrics loggers, comma-separated: csv, tensorboard, mlflow, wandb or a plugin's (overrides logging.to; '' for none).",
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
    help=f"Log level [default: info with {LOG_JSON_ENV}=1, else no log events].",
)
def train(
    config: Path | None,
    steps: int | None,
    out: Path | None,
    resume: Path | None,
    force: bool,
    backend: str | None,
    device: str | None,
    seed: int | None,
    sets: tuple[str, ...],
    log_to: str | None,
    dry_run: bool,
    quiet: bool,
    log_level: str | None,
) -> None:
    """Fine-tune with a composed loss (base loss + weighted regularizers).

    CONFIG is a TOML file (see docs/config.md); without one, the shipped example
    (examples/configs/regularized_sft.toml: the tiny model on the shipped
    instruction data, offline) runs. The run directory gets metrics.jsonl (one
    line per step, with the held-out metrics on evaluated steps), samples.jsonl
    (greedy generations), config.toml, summary.json, loss_components.png,
    grad_share.png and checkpoint/; the loggers of logging.to (--log-to) get the
    same metrics (metrics.csv, tensorboard/, MLflow, W&B). Ctrl-C stops after the
    current step, writes a checkpoint and the report; continue with --resume RUN_DIR.

    Set TINKEX_LOG_JSON=1 for JSON log lines on stderr.
    """
    if resume is not None and config is not None:
        raise click.UsageError(
            "give either CONFIG or --resume RUN_DIR (a resumed run uses its own config.toml)"
        )
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise click.UsageError(
            "--out and --resume name different directories; --resume continues in place"
        )
    _INTERRUPTED.clear()
    if out is not None and str(out).strip() in ("", "."):
        raise click.UsageError("--out needs the name of a run directory, not the current one")
    as_json = json_logs()
    display = Display(quiet=quiet, bar=not as_json, text_on_stderr=not as_json)
    # The per-term error events repeat what the one `Error:` line says: without
    # JSON logs they are shown only when asked for (--log-level).
    level = log_level or ("info" if as_json else "critical")
    with _sigint(_startup_sigint), _quiet_trackers():  # Ctrl-C before training: exit 130
        try:
            cfg, run_dir = _refusing(
                lambda: _prepare(config, resume, out, steps, backend, device, seed, sets, log_to)
            )
            pairs, eval_pairs, specs = _refusing(lambda: _inputs(cfg))
            loggers = _refusing(lambda: _loggers(cfg, from_option=log_to is not None))
            if dry_run:
                _refusing(lambda: _dry_run(cfg, pairs, eval_pairs, specs, loggers))
                return
            with _logging(json=as_json, level=level, stream=display.log_stream()):
                claim = out is None and resume is None  # the default runs/<timestamp>
                code = _train(
                    cfg,
                    run_dir,
                    pairs,
                    eval_pairs,
                    specs,
                    resume is not None,
                    force,
                    claim,
                    display,
                    loggers,
                )
        except KeyboardInterrupt:  # Ctrl-C during start-up: nothing was kept
            display.stop()
            _fail("interrupted", EXIT_INTERRUPTED)
        if code:
            sys.exit(code)


def _prepare(
    config: Path | None,
    resume: Path | None,
    out: Path | None,
    steps: int | None,
    backend: str | None,
    device: str | None,
    seed: int | None,
    sets: tuple[str, ...],
    log_to: str | None = None,
) -> tuple[Any, Path]:
    """The config (file, --set, then the dedicated options) and the run directory."""
    from ._config import apply_overrides, load_config
    from ._errors import RunDirError

    if resume is not None:
        if not (resume / "config.toml").is_file():
            raise RunDirError(
                f"{resume} is not a tinkex run directory (no config.toml); nothing to resume"
            )
        cfg = load_config(resume / "config.toml")
        run_dir = resume
    else:
        cfg = load_config(config)
        run_dir = out if out is not None else _default_run_dir()
    # --set first, then the dedicated options (they win over --set)
    cfg = apply_overrides(cfg, sets, base_dir=Path.cwd())
    cfg = cfg.with_overrides(
        training__steps=steps,
        model__backend=backend,
        model__device=device,
        model__seed=seed,
        training__seed=seed,
    )
    if log_to is not None:  # --log-to csv,tensorboard; --log-to '' for none
        names = tuple(n.strip() for n in log_to.split(",") if n.strip())
        cfg = _override_option(cfg, "--log-to", logging__to=names)
    _check_backend(cfg.model.backend)
    cfg.backend_kwargs()  # model.dtype / model.gguf_file only for the local backend
    return cfg, run_dir


def _override_option(cfg: Any, option: str, **changes: Any) -> Any:
    """``cfg.with_overrides(**changes)``, an error naming ``option`` rather than the key."""
    from ._errors import ConfigError

    try:
        return cfg.with_overrides(**changes)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("command line: ", f"{option}: ", 1)) from None


def _loggers(cfg: Any, *, from_option: bool) -> Any:
    """The metrics loggers of ``logging.to``, built (not started): an unknown one, or
    one whose package is missing, is refused here."""
    from ._config import config_to_dict
    from ._loggers import build_loggers

    if from_option:
        where = "--log-to"
    else:
        where = f"{cfg.source}: logging.to" if cfg.source else "logging.to"
    return build_loggers(cfg.logging.to, config_to_dict(cfg), where=where)


@contextlib.contextmanager
def _quiet_trackers() -> Any:
    """MLflow's INFO lines (database set-up) off during the command, unless the user
    set MLFLOW_LOGGING_LEVEL: the progress display is the command's output."""
    key = "MLFLOW_LOGGING_LEVEL"
    was = os.environ.get(key)
    if was is None:
        os.environ[key] = "WARNING"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop(key, None)


def _check_backend(name: str) -> None:
    import difflib

    from ._errors import BackendError, ConfigError
    from .plugins import backend_names, get_backend_factory

    try:
        get_backend_factory(name)
    except BackendError:
        known = sorted(backend_names())
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"model.backend: unknown backend {name!r}{hint}; available: {', '.join(known) or 'none'}"
        ) from None


def _inputs(cfg: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None, list[Any]]:
    """The data pairs, the ``[eval] path`` pairs and the regularizer specs: everything
    that can be checked without a model."""
    from ._config import build_regularizers
    from ._dataset import load_eval_examples, load_examples

    pairs = load_examples(cfg)
    eval_pairs = load_eval_examples(cfg)
    return pairs, eval_pairs, build_regularizers(cfg)


@contextlib.contextmanager
def _logging(**options: Any) -> Any:
    """Configure structlog for the command, and put the previous configuration back
    afterwards (a command run in-process, e.g. by click's CliRunner, leaves no trace).

    transformers' own progress bars ("Loading weights") are off meanwhile: the
    command shows its own progress, and a bar per model load would break it up.
    """
    import structlog
    from transformers.utils import logging as hf_logging

    from . import telemetry

    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    telemetry.configure(**options)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


def _dry_run(
    cfg: Any,
    pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]] | None,
    specs: list[Any],
    loggers: Any = None,
) -> None:
    """Everything a step needs except the weights, and one composed-loss step on
    stand-in logprobs (:func:`tinkex._loop.check_one_step`); print the resolved config."""
    from ._config import config_to_dict, dumps_toml
    from ._loop import check_one_step, schedule_text

    if cfg.model.backend == "local":  # the stat-only checks the local backend runs first
        from ._backends.local import _resolve_base_model

        _resolve_base_model(cfg.model.base_model, cfg.model.gguf_file)
    prep = check_one_step(cfg, pairs, specs, eval_pairs)
    click.echo(
        dumps_toml(config_to_dict(cfg), header="resolved config (dry run: nothing was trained)"),
        nl=False,
    )
    enabled = [s.name for s in specs if s.enabled]
    held = ""
    if cfg.eval.fraction is not None:
        held = f"; eval: {len(prep.held_out)} held out"
    elif cfg.eval_path is not None:
        held = (
            f"; eval: {len(prep.held_out)} examples from {cfg.eval_path} "
            f"({prep.held_out_dropped} dropped)"
        )
    first, last = cfg.learning_rate(1), cfg.learning_rate(cfg.training.steps)
    logs = f"; loggers: {', '.join(loggers.names)}" if loggers is not None and loggers.names else ""
    _say(
        f"ok: {len(prep.train)} examples from {cfg.data_path} ({prep.dropped} dropped){held}; "
        f"terms: {', '.join(['base_loss', *enabled])}; {schedule_text(cfg)} (step 1: {first:.4g}, "
        f"step {cfg.training.steps}: {last:.4g}){logs}; one composed-loss step checked",
        level="info",
    )


def _train(
    cfg: Any,
    run_dir: Path,
    pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]] | None,
    specs: list[Any],
    resume: bool,
    force: bool,
    claim: bool,
    display: Display,
    loggers: Any = None,
) -> int:
    import trio

    from ._loggers import LoggerSet
    from ._loop import Callbacks, Session, StopFlag, run_training
    from ._plots import write_report

    loggers = loggers if loggers is not None else LoggerSet()

    stop, session = StopFlag(), Session()
    presses = 0

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            stop.set()
            display.note(
                "\n[yellow]Ctrl-C: stopping after this step (checkpoint and report follow); "
                "Ctrl-C again aborts now[/]"
            )
            return
        display.stop()
        with contextlib.suppress(OSError):
            ((session.run_dir or run_dir) / ".tinkex.pid").unlink()
        _say("aborted (no checkpoint of the step in progress)", level="error")
        os._exit(EXIT_INTERRUPTED)

    callbacks = Callbacks(on_start=display.start, on_step=display.step, on_note=display.note)
    # Installed for the whole session, report included: the first Ctrl-C always
    # means "stop after this step, then checkpoint and report".
    with _sigint(on_sigint):
        try:
            result = trio.run(
                lambda: run_training(
                    cfg,
                    run_dir,
                    pairs,
                    specs,
                    eval_pairs=eval_pairs,
                    resume=resume,
                    force=force,
                    claim=claim,
                    stop=stop,
                    callbacks=callbacks,
                    session=session,
                    loggers=loggers,
                )
            )
        except KeyboardInterrupt:
            display.stop()
            if not session.started:
                raise
            loggers.finish(session.run_dir or run_dir)
            return EXIT_INTERRUPTED
        except Exception as exc:
            display.stop()
            run_dir = session.run_dir or run_dir
            if not session.started:
                _fail(_message(exc), EXIT_INTERRUPTED if stop.requested else EXIT_CONFIG)
            if session.last_step and _report_after_failure(run_dir):
                display.note(
                    f"the steps up to {session.checkpoint_step} are saved in {run_dir} "
                    f"(checkpoint, metrics, summary); continue with: tinkex train --resume {run_dir}"
                )
            loggers.finish(run_dir)  # after the report: the trackers get its files
            _fail(_message(exc), EXIT_FAILED)
        finally:
            display.stop()

        run_dir = result.run_dir
        interrupted = result.stopped == "interrupted" or stop.requested
        if result.stopped == "nothing to do":
            display.note(
                f"{run_dir} is already at step {result.last_step} of {result.total_steps}: "
                f"nothing to train, nothing written (give a larger --steps to go on)"
            )
            return 0
        if result.last_step == 0:
            display.note("no step was run; nothing to report")
            return EXIT_INTERRUPTED if interrupted else 0
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
        try:
            summary = write_report(run_dir, extra=extra)
        except Exception as exc:
            loggers.finish(run_dir)
            _fail(_message(exc), EXIT_FAILED)
        loggers.finish(run_dir)  # after the report: the trackers get summary.json and the plots
        _print_summary(display, summary, run_dir, result, loggers)
        return EXIT_INTERRUPTED if interrupted else 0


@contextlib.contextmanager
def _sigint(handler: Any) -> Any:
    """Use ``handler`` for SIGINT inside the block (main thread only), then put back the old one."""
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _report_after_failure(run_dir: Path) -> bool:
    """After a failed step: summary and plots of the steps that did complete (best effort).

    Returns whether there was anything to report."""
    from ._plots import write_report
    from ._report import METRICS_FILE

    metrics = run_dir / METRICS_FILE
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return False
    with contextlib.suppress(Exception):
        write_report(run_dir, extra={"session": {"stopped": "failed"}})
    return True


def _print_summary(
    display: Display, summary: dict[str, Any], run_dir: Path, result: Any, loggers: Any = None
) -> None:
    from ._report import loss_line, terms_table

    if display.quiet:
        return
    display.out.print(terms_table(summary))
    display.out.print(loss_line(summary), highlight=False, soft_wrap=True)
    _print_eval_and_samples(display.out, summary)
    tps = summary.get("tokens_per_s")
    display.out.print(
        f"{summary['wall_time_s']:.1f}s in steps, {tps:,.0f} tokens/s; session {result.wall_time_s:.1f}s"
        if tps
        else f"session {result.wall_time_s:.1f}s",
        highlight=False,
        soft_wrap=True,
    )
    samples = "samples.jsonl, " if (run_dir / "samples.jsonl").is_file() else ""
    logged = [n for n in (loggers.names if loggers is not None else ()) if n not in loggers.failed]
    display.out.print(
        f"wrote {run_dir}/: metrics.jsonl, {samples}summary.json, loss_components.png, "
        f"grad_share.png, config.toml, checkpoint/ (step {result.checkpoint_step})"
        + (f"; logged to: {', '.join(logged)}" if logged else ""),
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


def _printable(text: str) -> str:
    """``text`` for one terminal line: newlines, tabs and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_eval_and_samples(console: Any, summary: dict[str, Any]) -> None:
    """The held-out line and the last samples of a summary, when it has them."""
    from ._report import eval_line

    line = eval_line(summary)
    if line is not None:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    samples = summary.get("samples")
    if samples and samples.get("samples"):
        console.print(f"samples at step {samples['step']} (greedy):", highlight=False, markup=False)
        for row in samples["samples"]:
            prompt = _printable(" ".join(row["prompt"].split()))
            completion = _printable(row["completion"])
            console.print(
                f"  {prompt} -> {completion}", highlight=False, soft_wrap=True, markup=False
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

    torn: list[int] = []

    def run() -> dict[str, Any]:
        import json
        import warnings

        from ._plots import write_report
        from ._report import SUMMARY_FILE

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
            return write_report(run_dir, plots=not no_plots, extra=extra, torn=torn)

    summary = _refusing(run)
    for line in torn:
        _say(
            f"{run_dir / 'metrics.jsonl'}: line {line} was cut short (a crash while writing it) "
            f"and is left out; `tinkex train --resume` repairs it",
            level="warning",
        )
    if as_json:
        import json

        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console

    from ._report import loss_line, terms_table

    console = Console()
    console.print(terms_table(summary))
    console.print(loss_line(summary), highlight=False, soft_wrap=True)
    _print_eval_and_samples(console, summary)
    written = "summary.json" if no_plots else "summary.json, loss_components.png, grad_share.png"
    console.print(f"wrote {run_dir}/: {written}", highlight=False, soft_wrap=True)
