"""The ``tinkex`` command line.

Sub-commands live in their own modules and are imported only when invoked, so
``tinkex --help`` and ``tinkex --version`` never import torch or load plugins.
The CLI (not the library) configures logging: see :mod:`tinkex.telemetry`.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# command name -> "module:attribute"; listed in the order `--help` shows them
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tinkex._cli_train:train", "Fine-tune with a composed loss (the main job)."),
    "report": (
        "tinkex._cli_train:report",
        "Re-draw the plots and print the table of a run directory.",
    ),
    "sweep": (
        "tinkex._cli_experiments:sweep",
        "Train every combination of grid values and seeds (resumable, --jobs N).",
    ),
    "compare": (
        "tinkex._cli_experiments:compare",
        "Compare runs and sweeps: a table per variant and overlaid curves.",
    ),
    "plugins": ("tinkex._cli_plugins:plugins", "List and inspect installed tinkex plugins."),
    "models": (
        "tinkex._cli_models:models",
        "Fetch and list known pretrained models (the model cache).",
    ),
}


class _LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*_LAZY_COMMANDS, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attr = target[0].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above, so `tinkex --help` imports no sub-command module.
        rows = [(name, help_text) for name, (_, help_text) in _LAZY_COMMANDS.items()]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinkex")
    except PackageNotFoundError:  # pragma: no cover
        return "0.0.0+unknown"


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="tinkex", message="%(prog)s %(version)s")
def cli() -> None:
    """tinkex: compose training losses from weighted regularizer plugins, and train with them."""


#: set it to 1 (or true, yes, on) for JSON lines on stderr instead of text
LOG_JSON_ENV = "TINKEX_LOG_JSON"


def json_logs() -> bool:
    """Whether the command writes JSON lines on stderr (``TINKEX_LOG_JSON=1``)."""
    import os

    return os.environ.get(LOG_JSON_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _one_line_warnings(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show a warning as one ``warning: ...`` line on stderr (a JSON line with
    TINKEX_LOG_JSON=1), not Python's file-and-line form meant for developers."""
    import json
    import sys

    text = " ".join(str(message).split())
    if json_logs():
        out = json.dumps({"event": "tinkex.warning", "level": "warning", "warning": text})
    else:
        out = f"warning: {text}"
    print(out, file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    import warnings

    warnings.showwarning = _one_line_warnings
    try:
        return cli.main(args=argv, prog_name="tinkex", standalone_mode=False)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:  # a bad command line: one line, like every error
        import json
        import sys

        text = " ".join(exc.format_message().split())
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            text += f" (see `{exc.ctx.command_path} --help`)"
        if json_logs():
            line = {"event": "tinkex.error", "level": "error", "error": text}
            print(json.dumps({**line, "exit_code": exc.exit_code}), file=sys.stderr)
        else:
            print(f"Error: {text}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        raise SystemExit(130) from None
