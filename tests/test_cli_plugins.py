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
    assert rows["tinkex"]["hooks"] == ["tinkex_register_backends", "tinkex_register_loggers"]


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


def _core_light_modules_import_torch() -> bool:
    """Whether ``tinkex.regkit`` (what the first-party plugins build on) imports torch itself."""
    import os

    proc = subprocess.run(
        [sys.executable, "-c", "import sys, tinkex.regkit; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("TINKEX_")},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip() == "True"


def test_plugins_list_with_the_first_party_plugins_does_not_import_torch():
    # Every installed plugin (the first-party ones at least) imported, hooks called.
    assert not _core_light_modules_import_torch()
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKEX_")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "plugins", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"tinkex-reg-norms", "tinkex-reg-kl"} <= set(rows)
    assert all(r["error"] is None for r in rows.values()), rows
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["plugins_loaded"] is True
    assert "torch" not in result["loaded"]


# --------------------------------------------------------------------------- plugins that exit


class Exits:
    @tinkex.hookimpl
    def tinkex_register_regularizers(self, register):
        sys.exit(7)


def test_list_survives_a_plugin_that_calls_sys_exit(runner, plugins_installed):
    with tinkex.testing.register_plugin(Exits(), name="tt-cli-exits", version="0.1"):
        result = runner.invoke(cli, ["plugins", "list", "--json"])
        assert result.exit_code == 0, result.output
        rows = {r["name"]: r for r in json.loads(result.stdout)}
        assert rows["tt-cli-exits"]["error"] == "tinkex_register_regularizers raised SystemExit: 7"
        assert rows["tt-cli-good"]["error"] is None
        assert rows["tt-cli-good"]["regularizers"] == ["tt_cli_scale"]
        assert "warning: tinkex plugin 'tt-cli-exits' is broken" in result.stderr
        table = runner.invoke(cli, ["plugins", "list"])
        assert table.exit_code == 0
        assert "broken: tinkex_register_regularizers raised SystemExit: 7" in table.stdout


# --------------------------------------------------------------------------- env values


def test_allow_list_with_the_wrong_separator_warns_on_one_line(
    runner, plugins_installed, monkeypatch
):
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "tt-cli-good;tt-cli-broken")
    result = runner.invoke(cli, ["plugins", "list", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "warning: TINKEX_LOAD_PLUGINS entry 'tt-cli-good;tt-cli-broken' names no installed "
        "tinkex plugin distribution (installed: "
    )
    assert "tt-cli-broken, tt-cli-good" in line  # what is installed, sorted
    assert line.endswith("; separate distribution names with ','.")


def test_misspelt_deny_list_entry_warns_even_when_strict_mode_fails(
    runner, plugins_installed, monkeypatch
):
    monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "tt-cli-brokne")
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    result = runner.invoke(cli, ["plugins", "list", "--json"])
    assert result.exit_code == 1 and result.stdout == ""
    warning, error = result.stderr.splitlines()
    assert warning.startswith("warning: TINKEX_DISABLE_PLUGINS entry 'tt-cli-brokne' names no")
    assert error.startswith("Error: plugin distribution 'tt-cli-broken' is broken")


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_invalid_strict_value_exits_1_naming_variable_value_and_choices(runner, monkeypatch, value):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", value)
    result = runner.invoke(cli, ["plugins", "list", "--json"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"Error: TINKEX_STRICT_PLUGINS={value!r} is not a valid value; accepted "
        "(case-insensitive): 1, true, yes, on (strict); 0, false, no, off or empty (not strict)\n"
    )


def test_train_under_strict_mode_blames_the_broken_distribution_not_a_regularizer(
    runner, plugins_installed, monkeypatch, tmp_path
):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["train", "--dry-run"])
    assert result.exit_code != 0
    assert result.stderr.startswith(
        "Error: plugin distribution 'tt-cli-broken' is broken (TINKEX_STRICT_PLUGINS=1): "
        "tinkex_register_regularizers raised RuntimeError: cli boom"
    ), result.stderr
    assert "regularizers[" not in result.stderr


# --------------------------------------------------------------------------- nothing truncated

LONG_NAME = "tinkex-reg-" + "-".join(["averyveryverylongfamilyname"] * 5)
LONG_VERSION = "10.20.30.post40+local.build.identifier.that.is.rather.long"


@pytest.fixture
def long_plugin():
    with (
        tinkex.testing.register_regularizers(Scale, name=LONG_NAME, version=LONG_VERSION),
        tinkex.testing.register_plugin(Raising(), name="tt-cli-broken", version="0.0.9"),
    ):
        yield


def test_list_without_a_terminal_prints_plain_rows_in_full(runner, long_plugin):
    result = runner.invoke(cli, ["plugins", "list"], env={"COLUMNS": "40"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "distribution\tversion\tregularizers\tbackends\tstatus"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows[LONG_NAME] == [LONG_NAME, LONG_VERSION, "tt_cli_scale", "-", "ok"]
    assert rows["tt-cli-broken"] == [
        "tt-cli-broken",
        "0.0.9",
        "-",
        "-",
        "broken: tinkex_register_regularizers raised RuntimeError: cli boom",
    ]
    assert "…" not in result.stdout


def test_regularizers_without_a_terminal_prints_plain_rows_in_full(runner, long_plugin):
    result = runner.invoke(cli, ["plugins", "regularizers"], env={"COLUMNS": "40"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "name\tdistribution\tparameters\tdescription"
    (row,) = [line.split("\t") for line in lines if line.startswith("tt_cli_scale\t")]
    assert row == ["tt_cli_scale", LONG_NAME, "factor=1.0, mode='sum'", "a test regularizer"]


def test_list_piped_from_the_executable_shows_the_full_name():
    script = textwrap.dedent(
        f"""
        import tinkex, tinkex.testing
        from tinkex._cli import main

        class Scale:
            name = "tt_cli_scale"
            description = "a test regularizer"

            def __call__(self, data, logprobs):
                return 0.0, {{}}

        with tinkex.testing.register_regularizers(
            Scale, name={LONG_NAME!r}, version={LONG_VERSION!r}
        ):
            main(["plugins", "list"])
        """
    )
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKEX_")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,  # stdout is a pipe, as in `tinkex plugins list | grep ...`
        text=True,
        timeout=120,
        env={**env, "COLUMNS": "40"},
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith(LONG_NAME)]
    assert row.split("\t") == [LONG_NAME, LONG_VERSION, "tt_cli_scale", "-", "ok"]


def test_list_on_a_narrow_terminal_folds_instead_of_cutting(runner, monkeypatch):
    from tinkex import _cli_plugins

    monkeypatch.setattr(_cli_plugins, "_stdout_is_terminal", lambda: True)
    name = "tt-" + "q" * 150
    with tinkex.testing.register_regularizers(Scale, name=name, version="1.0"):
        result = runner.invoke(cli, ["plugins", "list"], env={"COLUMNS": "60"})
    assert result.exit_code == 0
    assert result.stdout.startswith("tinkex plugins") and "┃" in result.stdout  # a rich table
    assert "…" not in result.stdout
    assert result.stdout.count("q") == 150  # every character, folded over several lines
    assert max(len(line) for line in result.stdout.splitlines()) <= 60
