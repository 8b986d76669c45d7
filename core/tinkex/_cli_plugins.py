"""``tinkex plugins``: list and inspect the installed plugin distributions.

stdout carries only the table or the JSON; warnings about broken plugins go to
stderr as ``warning: ...`` lines. Broken plugins never change the exit code,
except under ``TINKEX_STRICT_PLUGINS=1``, where loading fails with exit code 1.
rich is imported only to draw a table.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import _plugins
from ._errors import PluginError

_T = TypeVar("_T")


def _load(fn: Callable[[], _T]) -> _T:
    """Run a registry call, sending plugin warnings to stderr and strict failures to click."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", _plugins.PluginWarning)
        try:
            result = fn()
        except PluginError as exc:
            raise click.ClickException(str(exc)) from exc
    for w in caught:
        if issubclass(w.category, _plugins.PluginWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:  # pragma: no cover - other warnings raised by plugin imports
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return result


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=False)


def _status(info: _plugins.PluginInfo) -> str:
    return "ok" if info.error is None else f"broken: {info.error}"


@click.group("plugins", context_settings={"help_option_names": ["-h", "--help"]})
def plugins() -> None:
    """List and inspect installed tinkex plugins.

    Plugins are distributions with entry points in the `tinkex` group. The
    environment variables TINKEX_LOAD_PLUGINS (allowlist; empty: none),
    TINKEX_DISABLE_PLUGINS (denylist) and TINKEX_STRICT_PLUGINS=1 (a broken
    plugin is an error) apply to every sub-command.
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
    from rich.table import Table

    table = Table(title="tinkex plugins", title_justify="left")
    table.add_column("distribution", style="bold")
    table.add_column("version")
    table.add_column("regularizers")
    table.add_column("backends")
    table.add_column("status")
    for info in infos:
        status = (
            "[green]ok[/green]" if info.ok else f"[red]broken[/red]: {_escape(info.error or '')}"
        )
        table.add_row(
            info.name,
            info.version or "?",
            ", ".join(info.regularizers) or "-",
            ", ".join(info.backends) or "-",
            status,
        )
    _console().print(table)


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
    from rich.table import Table

    table = Table(title="tinkex regularizers", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("distribution")
    table.add_column("parameters")
    table.add_column("description")
    for row in rows:
        params = ", ".join(
            p["name"] if p["required"] else f"{p['name']}={p['default']!r}"
            for p in row["parameters"]
        )
        dist = row["distribution"] + (" [red](conflict)[/red]" if row["conflict"] else "")
        table.add_row(row["name"], dist, _escape(params) or "-", _escape(row["description"]))
    _console().print(table)


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
