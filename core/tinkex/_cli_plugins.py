"""``tinkex plugins``: list and inspect the installed plugin distributions.

stdout carries only the table or the JSON; warnings about broken plugins (and
about ``TINKEX_LOAD_PLUGINS``/``TINKEX_DISABLE_PLUGINS`` entries that name no
installed distribution) go to stderr as ``warning: ...`` lines. Broken plugins
never change the exit code, except under ``TINKEX_STRICT_PLUGINS=1``, where
loading fails with exit code 1.

Tables never truncate a value. On a terminal they are rich tables whose cells
fold; otherwise (a pipe, a file) they are plain rows, one per line, header
first, fields separated by tabs -- full values, for ``grep``/``cut``. rich is
imported only to draw a table on a terminal.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import _plugins
from ._errors import PluginError

_T = TypeVar("_T")


def _load(fn: Callable[[], _T]) -> _T:
    """Run a registry call, sending plugin warnings to stderr and strict failures to click.

    The warnings are printed even when the call fails (a warning about a
    misspelt allow-list entry explains a strict-mode failure that follows).
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", _plugins.PluginWarning)
            try:
                return fn()
            except PluginError as exc:
                raise click.ClickException(str(exc)) from exc
    finally:
        for w in caught:
            if issubclass(w.category, _plugins.PluginWarning):
                click.echo(f"warning: {w.message}", err=True)
            else:  # pragma: no cover - other warnings raised by plugin imports
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return False


def _plain(text: str) -> str:
    """One field of a plain row: tabs and line breaks become spaces, nothing is cut."""
    return " ".join(text.split("\n")).replace("\t", " ").replace("\r", " ")


def _print_table(title: str, header: list[str], rows: list[list[tuple[str, str]]]) -> None:
    """Print ``rows`` in full: a folding rich table on a terminal, plain tab-separated rows otherwise.

    Each cell is ``(plain text, rich markup)``; the markup is used only on a terminal.
    """
    if not _stdout_is_terminal():
        click.echo("\t".join(header))
        for row in rows:
            click.echo("\t".join(_plain(text) for text, _ in row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        # fold: a value too long for its column continues on the next line, never "…"
        table.add_column(name, style="bold" if i == 0 else None, overflow="fold")
    for row in rows:
        table.add_row(*(markup for _, markup in row))
    Console(soft_wrap=False).print(table)


def _status(info: _plugins.PluginInfo) -> str:
    return "ok" if info.error is None else f"broken: {info.error}"


@click.group("plugins", context_settings={"help_option_names": ["-h", "--help"]})
def plugins() -> None:
    """List and inspect installed tinkex plugins.

    Plugins are distributions with entry points in the `tinkex` group. The
    environment variables TINKEX_LOAD_PLUGINS (comma-separated allowlist;
    empty: none), TINKEX_DISABLE_PLUGINS (comma-separated denylist) and
    TINKEX_STRICT_PLUGINS=1 (a broken plugin is an error) apply to every
    sub-command. Tables are plain tab-separated rows when stdout is not a
    terminal; nothing is ever truncated.
    """


@plugins.command("list", short_help="List plugin distributions and their status.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option(
    "--all", "include_builtin", is_flag=True, help="Include the built-in plugins (as 'tinkex')."
)
def list_plugins(as_json: bool, include_builtin: bool) -> None:
    """List plugin distributions: version, regularizers, backends and status.

    Exits 0 even when a plugin is broken; its status (and the JSON "error")
    says why.
    """
    infos = _load(lambda: _plugins.plugin_infos(include_builtin=include_builtin))
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        if os.environ.get(_plugins.ENV_LOAD) is not None or os.environ.get(_plugins.ENV_DISABLE):
            click.echo(
                f"No plugin distributions loaded ({_plugins.ENV_LOAD} / {_plugins.ENV_DISABLE} are set).",
                err=True,
            )
        else:
            click.echo(
                "No tinkex plugins installed. Try `pip install tinkex-reg-entropy`.", err=True
            )
        return
    rows = []
    for info in infos:
        cells = [
            info.name,
            info.version or "?",
            ", ".join(info.regularizers) or "-",
            ", ".join(info.backends) or "-",
        ]
        status = (
            "[green]ok[/green]" if info.ok else f"[red]broken[/red]: {_escape(info.error or '')}"
        )
        rows.append([*((c, _escape(c)) for c in cells), (_status(info), status)])
    _print_table(
        "tinkex plugins", ["distribution", "version", "regularizers", "backends", "status"], rows
    )


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _parameters(cls: type) -> list[dict[str, Any]]:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return []
    out = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        out.append(
            {
                "name": p.name,
                "required": p.default is inspect.Parameter.empty,
                "default": default
                if isinstance(default, str | int | float | bool | None)
                else repr(default),
            }
        )
    return out


def _regularizer_rows() -> list[dict[str, Any]]:
    registry = _plugins._get_registry()
    rows = []
    for name, found in sorted(registry.regularizers.items()):
        for dist, cls in found:
            rows.append(
                {
                    "name": name,
                    "distribution": dist,
                    "description": getattr(cls, "description", ""),
                    "parameters": _parameters(cls),
                    "conflict": len(found) > 1,
                }
            )
    return rows


@plugins.command("regularizers", short_help="List installed regularizers and their parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_regularizers(as_json: bool) -> None:
    """List the regularizers you can build with tinkex.regularizer(kind, ...).

    One row per regularizer: its name (the `kind`), the distribution providing
    it, its description and its constructor parameters with their defaults.
    """
    rows = _load(_regularizer_rows)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No regularizers installed. Try `pip install tinkex-reg-entropy`.", err=True)
        return
    lines = []
    for row in rows:
        params = (
            ", ".join(
                p["name"] if p["required"] else f"{p['name']}={p['default']!r}"
                for p in row["parameters"]
            )
            or "-"
        )
        dist = row["distribution"]
        lines.append(
            [
                (row["name"], _escape(row["name"])),
                (
                    dist + (" (conflict)" if row["conflict"] else ""),
                    _escape(dist) + (" [red](conflict)[/red]" if row["conflict"] else ""),
                ),
                (params, _escape(params)),
                (row["description"], _escape(row["description"])),
            ]
        )
    _print_table(
        "tinkex regularizers", ["name", "distribution", "parameters", "description"], lines
    )


@plugins.command("show", short_help="Show one plugin distribution in detail.")
@click.argument("distribution")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show_plugin(distribution: str, as_json: bool) -> None:
    """Show one plugin distribution in detail (name as `tinkex plugins list` shows it).

    Exits 1 if no loaded plugin distribution has that name.
    """
    key = _plugins.normalize_distribution_name(distribution)
    infos = _load(lambda: _plugins.plugin_infos(include_builtin=True))
    match = [i for i in infos if _plugins.normalize_distribution_name(i.name) == key]
    if not match:
        names = ", ".join(i.name for i in infos) or "none"
        raise click.ClickException(
            f"no plugin distribution named {distribution!r} is loaded; loaded: {names}"
        )
    info = match[0]
    rows = [r for r in _load(_regularizer_rows) if r["distribution"] == info.name]
    if as_json:
        click.echo(json.dumps({**info.to_dict(), "regularizer_details": rows}, indent=2))
        return
    click.echo(f"{info.name} {info.version or '?'}" + (" (built-in)" if info.builtin else ""))
    click.echo(f"  status:       {_status(info)}")
    click.echo(f"  hooks:        {', '.join(info.hooks) or '-'}")
    click.echo(f"  backends:     {', '.join(info.backends) or '-'}")
    click.echo(f"  regularizers: {'-' if not rows else ''}")
    for row in rows:
        params = ", ".join(
            p["name"] if p["required"] else f"{p['name']}={p['default']!r}"
            for p in row["parameters"]
        )
        click.echo(f"    {row['name']}({params}): {row['description']}")
