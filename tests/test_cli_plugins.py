"""`tinkex plugins ...` through click's CliRunner, and the CLI's import cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

import tinkex
import tinkex.testing
from tinkex._cli import cli


class Scale:
    name = "tt_cli_scale"
    description = "a test regularizer"

    def __init__(self, *, factor: float = 1.0, mode: str = "sum") -> None:
        self.factor = factor

    def __call__(self, data, logprobs):
        return 0.0, {}


class Raising:
    @tinkex.hookimpl
    def tinkex_register_regularizers(self, register):
        raise RuntimeError("cli boom")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def plugins_installed():
    with (
        tinkex.testing.register_regularizers(Scale, name="tt-cli-good", version="2.0.1"),
        tinkex.testing.register_plugin(Raising(), name="tt-cli-broken", version="0.0.9"),
    ):
        yield


def _json(runner: CliRunner, *args: str) -> list[dict]:
    result = runner.invoke(cli, ["plugins", "list", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_list_json_reports_good_and_broken_with_exit_0(runner, plugins_installed):
    result = runner.invoke(cli, ["plugins", "list", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}  # stdout is pure JSON
    assert rows["tt-cli-good"] == {
        "name": "tt-cli-good",
        "version": "2.0.1",
        "hooks": ["tinkex_register_backends", "tinkex_register_regularizers"],
        "regularizers": ["tt_cli_scale"],
        "backends": [],
        "error": None,
    }
    assert (
        rows["tt-cli-broken"]["error"]
        == "tinkex_register_regularizers raised RuntimeError: cli boom"
    )
    assert rows["tt-cli-broken"]["regularizers"] == []
    assert "tinkex" not in rows
    assert "warning: tinkex plugin 'tt-cli-broken' is broken" in result.stderr
    assert "cli boom" in result.stderr


def test_list_all_includes_builtins_as_tinkex(runner):
    rows = {r["name"]: r for r in _json(runner, "--all")}
    assert rows["tinkex"]["version"] == tinkex.__version__
    assert {"local", "tinker"} <= set(rows["tinkex"]["backends"])
    assert rows["tinkex"]["hooks"] == ["tinkex_register_backends"]


def test_list_table(runner, plugins_installed):
    result = runner.invoke(cli, ["plugins", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any("distribution" in line and "version" in line and "status" in line for line in lines)
    (good,) = [line for line in lines if "tt-cli-good" in line]
    assert "2.0.1" in good and "tt_cli_scale" in good and "ok" in good
    (broken,) = [line for line in lines if "tt-cli-broken" in line]
    assert "broken" in broken and "0.0.9" in broken
    assert "warning:" not in result.stdout


def test_allow_list_applies_to_the_cli(runner, plugins_installed, monkeypatch):
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "TT_CLI_GOOD")
    assert [r["name"] for r in _json(runner)] == ["tt-cli-good"]
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "")
    assert _json(runner) == []
    assert [r["name"] for r in _json(runner, "--all")] == ["tinkex"]


def test_strict_mode_fails_with_a_clear_message(runner, plugins_installed, monkeypatch):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    result = runner.invoke(cli, ["plugins", "list", "--json"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert (
        "Error: plugin distribution 'tt-cli-broken' is broken (TINKEX_STRICT_PLUGINS=1)"
        in result.stderr
    )
    assert "cli boom" in result.stderr


def test_regularizers_command(runner, plugins_installed):
    result = runner.invoke(cli, ["plugins", "regularizers", "--json"])
    assert result.exit_code == 0
    (row,) = [r for r in json.loads(result.stdout) if r["name"] == "tt_cli_scale"]
    assert row == {
        "name": "tt_cli_scale",
        "distribution": "tt-cli-good",
        "description": "a test regularizer",
        "parameters": [
            {"name": "factor", "required": False, "default": 1.0},
            {"name": "mode", "required": False, "default": "sum"},
        ],
        "conflict": False,
    }
    table = runner.invoke(cli, ["plugins", "regularizers"], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "factor=1.0, mode='sum'" in table.stdout


def test_show_command(runner, plugins_installed):
    result = runner.invoke(cli, ["plugins", "show", "TT_CLI_GOOD"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:2] == ["tt-cli-good 2.0.1", "  status:       ok"]
    assert "tt_cli_scale(factor=1.0, mode='sum'): a test regularizer" in result.stdout
    data = json.loads(runner.invoke(cli, ["plugins", "show", "tt-cli-broken", "--json"]).stdout)
    assert data["error"] == "tinkex_register_regularizers raised RuntimeError: cli boom"
    missing = runner.invoke(cli, ["plugins", "show", "nope"])
    assert missing.exit_code == 1
    assert "no plugin distribution named 'nope'" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [["--help"], ["plugins", "--help"], ["plugins", "list", "--help"], ["plugins", "show", "-h"]],
)
def test_help_everywhere(runner, args):
    result = runner.invoke(cli, args)
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"tinkex {tinkex.__version__}\n"


# --------------------------------------------------------------------------- import cost

_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from tinkex._cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    loaded = [m for m in ("torch", "tinkex._types", "rich") if m in sys.modules]
    plugins = sys.modules.get("tinkex._plugins")
    registry = getattr(plugins, "_registry", None) if plugins else None
    sys.stderr.write(json.dumps({"loaded": loaded, "plugins_loaded": registry is not None}))
    """
)


def _probe(*args: str, env: dict[str, str] | None = None) -> dict:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["plugins", "--help"], ["plugins", "list", "--help"]]
)
def test_help_and_version_import_neither_torch_nor_plugins(args):
    assert _probe(*args) == {"loaded": [], "plugins_loaded": False}


def test_plugins_list_without_external_plugins_does_not_import_torch():
    # Built-ins only: what `tinkex plugins list` costs beyond the plugins' own imports.
    result = _probe("plugins", "list", "--json", env={"TINKEX_LOAD_PLUGINS": ""})
    assert result["plugins_loaded"] is True
    assert "torch" not in result["loaded"] and "tinkex._types" not in result["loaded"]
