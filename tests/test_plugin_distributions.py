"""Plugins installed for real, checked through the `tinkex` executable.

One module-scoped fixture builds a temporary venv that sees the test venv's
packages (a .pth file calling ``site.addsitedir`` on its site-packages, so
editable installs there keep working), writes the venv's own ``tinkex``
console script (from tinkex's ``console_scripts`` metadata, as pip would), and
pip-installs three throwaway plugin distributions built with hatchling from ``tmp_path``:

- ``tinkex-test-good`` 1.2.3: regularizers ``tt_good`` and ``tt_shared``;
- ``tinkex_test_broken`` 0.0.1: raises at import;
- ``tinkex-test-clash`` 0.5.0: registers ``tt_shared`` too;
- a distribution with a very long name and version (:data:`LONG_NAME`), whose
  hook calls ``sys.exit()``;

and a copy of ``examples/plugin-template`` (whose own tests run here, in that
venv, against the installed copy: examples/ is not in the suite's testpaths).

pip runs with ``--no-deps --no-build-isolation --no-index``: offline, and quick.
These tests are marked ``slow`` (about 20 s in all) but run by default.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "examples" / "plugin-template"

FIRST_PARTY = {
    "tinkex-reg-norms": ["elastic_net", "l1", "l2"],
    "tinkex-reg-entropy": ["entropy"],
    "tinkex-reg-kl": ["kl"],
    "tinkex-reg-consistency": ["consistency"],
    "tinkex-reg-orthogonality": ["orthogonality"],
}

GOOD_PLUGIN = """
import tinkex


class Good:
    name = "tt_good"
    description = "factor times the sum of the logprobs"

    def __init__(self, *, factor=1.0):
        self.factor = factor

    def __call__(self, data, logprobs):
        return self.factor * logprobs.sum(), {}


class Shared:
    name = "tt_shared"
    description = "a name tinkex-test-clash uses too"

    def __call__(self, data, logprobs):
        return 0.0, {}


@tinkex.hookimpl
def tinkex_register_regularizers(register):
    register(Good)
    register(Shared)
"""

CLASH_PLUGIN = """
import tinkex


class Shared:
    name = "tt_shared"
    description = "collides with tinkex-test-good"

    def __call__(self, data, logprobs):
        return 1.0, {}


@tinkex.hookimpl
def tinkex_register_regularizers(register):
    register(Shared)
"""

BROKEN_PLUGIN = 'raise RuntimeError("boom at import")\n'

EXITING_PLUGIN = """
import sys

import tinkex


@tinkex.hookimpl
def tinkex_register_regularizers(register):
    sys.exit("plugin exits in its hook")
"""

LONG_NAME = "tinkex-test-" + "-".join(["averyveryverylongfamilyname"] * 5)
LONG_VERSION = "10.20.30.post40+local.build.identifier.that.is.rather.long"


def _write_dist(root: Path, dist: str, version: str, source: str) -> Path:
    package = dist.replace("-", "_").lower()
    folder = root / dist
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(textwrap.dedent(source))
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "{dist}"
            version = "{version}"

            [project.entry-points.tinkex]
            {package} = "{package}"

            [tool.hatch.build.targets.wheel]
            packages = ["{package}"]
            """
        )
    )
    return folder


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plugin-venv")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(ours))
    Path(site_packages, "_tinkex_test_parent.pth").write_text(lines)

    dists = root / "dists"
    folders = [
        _write_dist(dists, "tinkex-test-good", "1.2.3", GOOD_PLUGIN),
        _write_dist(dists, "tinkex_test_broken", "0.0.1", BROKEN_PLUGIN),
        _write_dist(dists, "tinkex-test-clash", "0.5.0", CLASH_PLUGIN),
        _write_dist(dists, LONG_NAME, LONG_VERSION, EXITING_PLUGIN),
        shutil.copytree(TEMPLATE, dists / "plugin-template"),
    ]
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    pip += ["--disable-pip-version-check", *map(str, folders)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _write_console_script(env_dir, python)
    return env_dir


def _write_console_script(env_dir: Path, python: Path) -> None:
    """The venv's own `tinkex` executable, from tinkex's console_scripts metadata (as pip writes it)."""
    (script,) = importlib.metadata.distribution("tinkex").entry_points.select(
        group="console_scripts", name="tinkex"
    )
    module, _, attr = script.value.partition(":")
    path = env_dir / "bin" / "tinkex"
    path.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n")
    path.chmod(0o755)


def _run(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TINKEX_")}
    clean.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "COLUMNS": "200", **env},
        cwd=venv.parent,  # not the repo: nothing importable by accident
    )


def _list_json(venv: Path, *flags: str, **env: str) -> tuple[dict[str, dict], str]:
    proc = _run(venv, "tinkex", "plugins", "list", "--json", *flags, **env)
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}, proc.stderr


ONLY_TEST_DISTS = "tinkex-test-good,tinkex-test-broken,tinkex-test-clash"


def test_third_party_plugin_is_listed_and_a_broken_one_does_not_stop_it(venv):
    rows, stderr = _list_json(venv, TINKEX_LOAD_PLUGINS=ONLY_TEST_DISTS)
    assert list(rows) == ["tinkex_test_broken", "tinkex-test-clash", "tinkex-test-good"]
    assert rows["tinkex-test-good"] == {
        "name": "tinkex-test-good",
        "version": "1.2.3",
        "hooks": ["tinkex_register_regularizers"],
        "regularizers": ["tt_good", "tt_shared"],
        "backends": [],
        "error": None,
    }
    broken = rows["tinkex_test_broken"]
    assert broken["version"] == "0.0.1" and broken["regularizers"] == []
    assert broken["error"] == (
        "entry point 'tinkex_test_broken' (tinkex_test_broken) failed to import: "
        "RuntimeError: boom at import"
    )
    assert "warning: tinkex plugin 'tinkex_test_broken' is broken" in stderr


def test_table_through_the_executable(venv):
    proc = _run(venv, "tinkex", "plugins", "list", TINKEX_LOAD_PLUGINS=ONLY_TEST_DISTS)
    assert proc.returncode == 0
    (good,) = [line for line in proc.stdout.splitlines() if "tinkex-test-good" in line]
    assert "1.2.3" in good and "tt_good, tt_shared" in good and "ok" in good
    (broken,) = [line for line in proc.stdout.splitlines() if "tinkex_test_broken" in line]
    assert "broken" in broken and "boom at import" in broken
    assert "warning:" in proc.stderr and "warning:" not in proc.stdout


def test_strict_mode_fails_naming_the_distribution(venv):
    proc = _run(
        venv,
        "tinkex",
        "plugins",
        "list",
        TINKEX_LOAD_PLUGINS=ONLY_TEST_DISTS,
        TINKEX_STRICT_PLUGINS="1",
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "'tinkex_test_broken' is broken (TINKEX_STRICT_PLUGINS=1)" in proc.stderr
    assert "RuntimeError: boom at import" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_allow_and_deny_lists(venv):
    rows, stderr = _list_json(venv, TINKEX_LOAD_PLUGINS="Tinkex_Test_Good")
    assert list(rows) == ["tinkex-test-good"] and stderr == ""
    rows, _ = _list_json(venv, "--all", TINKEX_LOAD_PLUGINS="")
    assert list(rows) == ["tinkex"] and {"local", "tinker"} <= set(rows["tinkex"]["backends"])
    rows, stderr = _list_json(
        venv,
        TINKEX_LOAD_PLUGINS=ONLY_TEST_DISTS,
        TINKEX_DISABLE_PLUGINS="tinkex-test-broken,TINKEX.TEST.CLASH",
    )
    assert list(rows) == ["tinkex-test-good"] and stderr == ""


def test_collision_names_both_distributions_and_other_regularizers_work(venv):
    script = textwrap.dedent(
        """
        import torch, tinkex
        spec = tinkex.regularizer("tt_good", weight=0.5, name="good", factor=2.0)
        loss, _ = spec.fn(None, torch.tensor([-1.0, -2.0]))
        print(spec.name, spec.weight, float(loss))
        try:
            tinkex.regularizer("tt_shared", weight=1.0)
        except tinkex.PluginError as exc:
            print(f"{type(exc).__name__}: {exc}")
        """
    )
    proc = _run(venv, "python", "-c", script, TINKEX_LOAD_PLUGINS=ONLY_TEST_DISTS)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == "good 0.5 -6.0"
    assert second.startswith("PluginError: regularizer 'tt_shared' is registered by more than one")
    assert "'tinkex-test-clash' and 'tinkex-test-good'" in second


def test_first_party_distributions_are_listed_with_their_regularizers(venv):
    rows, _ = _list_json(venv, TINKEX_DISABLE_PLUGINS="tinkex-test-broken")
    for dist, names in FIRST_PARTY.items():
        assert dist in rows, f"{dist} is not installed: run `make setup` (it installs plugins/*)"
        assert rows[dist]["regularizers"] == names
        assert rows[dist]["error"] is None
        assert rows[dist]["version"]
    assert "tinkex-test-good" in rows  # third-party plugins sit beside them


def test_plugin_template_installs_is_listed_and_its_tests_pass(venv, tmp_path):
    rows, stderr = _list_json(venv, TINKEX_LOAD_PLUGINS="tinkex-reg-logprob-floor")
    assert rows == {
        "tinkex-reg-logprob-floor": {
            "name": "tinkex-reg-logprob-floor",
            "version": "0.1.0",
            "hooks": ["tinkex_register_regularizers"],
            "regularizers": ["logprob_floor"],
            "backends": [],
            "error": None,
        }
    }
    assert stderr == ""
    tests = shutil.copytree(TEMPLATE / "tests", tmp_path / "template" / "tests")
    shutil.copy(TEMPLATE / "pyproject.toml", tmp_path / "template")
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path / "template",
        env={k: v for k, v in os.environ.items() if not k.startswith(("TINKEX_", "PYTEST_"))},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_tests = sum(
        f.read_text().count("\ndef test_") for f in Path(tests).glob("test_*.py")
    )  # every one ran (the wiring check needs the installed copy): none skipped
    assert n_tests >= 5 and f"{n_tests} passed" in proc.stdout


def test_list_piped_shows_full_names_versions_and_errors(venv):
    # stdout is a pipe (capture_output) and COLUMNS is small: plain rows, nothing cut
    proc = _run(
        venv,
        "tinkex",
        "plugins",
        "list",
        TINKEX_LOAD_PLUGINS=f"tinkex-test-good,{LONG_NAME}",
        COLUMNS="40",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "distribution\tversion\tregularizers\tbackends\tstatus"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows == {
        "tinkex-test-good": ["tinkex-test-good", "1.2.3", "tt_good, tt_shared", "-", "ok"],
        LONG_NAME: [
            LONG_NAME,
            LONG_VERSION,
            "-",
            "-",
            "broken: tinkex_register_regularizers raised SystemExit: plugin exits in its hook",
        ],
    }
    (warning,) = proc.stderr.splitlines()
    assert warning.startswith(f"warning: tinkex plugin {LONG_NAME!r} is broken")


def test_misspelt_allow_list_warns_and_lists_what_is_installed(venv):
    rows, stderr = _list_json(venv, TINKEX_LOAD_PLUGINS="tinkex-test-good;tinkex-reg-norms")
    assert rows == {}
    (line,) = stderr.splitlines()
    assert line.startswith(
        "warning: TINKEX_LOAD_PLUGINS entry 'tinkex-test-good;tinkex-reg-norms' names no "
        "installed tinkex plugin distribution (installed: "
    )
    for dist in ["tinkex-test-good", "tinkex-reg-norms", "tinkex-reg-logprob-floor"]:
        assert dist in line
    assert line.endswith("; separate distribution names with ','.")
    proc = _run(
        venv,
        "python",
        "-c",
        "import tinkex\ntry:\n    tinkex.regularizer('l2', weight=1.0)\n"
        "except tinkex.UnknownRegularizerError as exc:\n    print(exc)",
        TINKEX_LOAD_PLUGINS="tinkex-test-good;tinkex-reg-norms",
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install" not in proc.stdout
    assert "tinkex-reg-norms is installed but not loaded" in proc.stdout


_IMPORTS_PROBE = """
import json, sys
from tinkex._cli import main
try:
    main(["plugins", "list", "--json"])
except SystemExit:
    pass
print(json.dumps({"torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_listing_the_first_party_plugins_and_the_template_does_not_import_torch(venv):
    light = _run(venv, "python", "-c", "import sys, tinkex.regkit; print('torch' in sys.modules)")
    assert light.stdout.strip() == "False", light.stderr
    wanted = [*FIRST_PARTY, "tinkex-reg-logprob-floor"]
    proc = _run(venv, "python", "-c", _IMPORTS_PROBE, TINKEX_LOAD_PLUGINS=",".join(wanted))
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert sorted(rows) == sorted(wanted)
    assert all(row["error"] is None for row in rows.values()), rows
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"torch": False}
