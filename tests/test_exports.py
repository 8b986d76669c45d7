"""The public surface of tinkex: nothing missing, nothing leaking by accident."""

from __future__ import annotations

import importlib
import inspect
import pickle
import subprocess
import sys
import traceback

import tinkex
import tinkex.plugins
from tinkex import _plugins

CONTRACT = {
    # the documented public names
    "RegularizerSpec",
    "RegularizerOutput",
    "BaseLossOutput",
    "CustomLossOutput",
    "Datum",
    "ComposedLoss",
    "compute_loss",
    "compose_loss",
    "Pipeline",
    "regularizer",
    "hookimpl",
    "TrainingClient",
    "AdamParams",
    "TinkexError",
    "SpecError",
    "RegularizerError",
    "RegularizerTimeoutError",
    "PluginError",
    "UnknownRegularizerError",
    "BackendError",
    "telemetry",
}

EXTRAS = {
    "ConfigError",
    "RunDirError",
    "StorageError",
    "sft_datums",
    "drop_in_metrics",
    "ForwardBackwardOutput",
    "loss_input",
    "model_input_ints",
    "hookspecs",
    "regkit",
    "schedules",
    "loggers",
    "testing",
    "PluginWarning",
    "plugins",
    "__version__",
}

SUBMODULES = {"telemetry", "hookspecs", "loggers", "plugins", "regkit", "schedules", "testing"}

# The stable registry API of docs/plugins.md ("The registry API").
PLUGINS_API = {
    "PluginInfo",
    "backend_names",
    "check_regularizer_class",
    "get_backend_factory",
    "get_plugin_manager",
    "get_regularizer_class",
    "load_plugins",
    "plugin_infos",
    "regularizer_classes",
    "reset_plugins",
}


def test_public_names_are_exactly_the_contract_plus_documented_extras():
    assert set(tinkex.__all__) == CONTRACT | EXTRAS


def test_every_public_name_resolves():
    for name in tinkex.__all__:
        assert getattr(tinkex, name) is not None, name


def _own_objects(module, names):
    """The classes and functions among ``names`` (those that carry a ``__module__``)."""
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


def test_public_classes_and_functions_report_module_tinkex():
    owned = dict(_own_objects(tinkex, tinkex.__all__))
    assert {"RegularizerError", "RegularizerSpec", "regularizer", "compute_loss"} <= set(owned)
    for name, obj in owned.items():
        assert (obj.__module__, obj.__name__, obj.__qualname__) == ("tinkex", name, name)
    assert repr(tinkex.RegularizerError) == "<class 'tinkex.RegularizerError'>"
    # the rest: submodules, the pluggy marker, the version string
    others = set(tinkex.__all__) - set(owned)
    assert others == SUBMODULES | {"hookimpl", "__version__"}
    for name in SUBMODULES:
        assert getattr(tinkex, name).__name__ == f"tinkex.{name}"


def test_error_raised_by_a_private_module_prints_as_tinkex_before_any_lookup():
    # A fresh interpreter: nobody has touched tinkex.<Name>; only `import tinkex._errors`.
    code = (
        "import traceback, tinkex._errors as e\n"
        "try:\n"
        "    raise e.RegularizerError('kl', 'boom')\n"
        "except e.TinkexError as exc:\n"
        "    print(''.join(traceback.format_exception_only(exc)).strip())\n"
        "print(e.UnknownRegularizerError.__module__, e.PluginError.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == ["tinkex.RegularizerError: boom", "tinkex tinkex"]


def test_errors_print_and_pickle_as_tinkex():
    errors = [
        tinkex.TinkexError("t"),
        tinkex.SpecError("s"),
        tinkex.ConfigError("c"),
        tinkex.RegularizerError("kl", "failed"),
        tinkex.RegularizerTimeoutError("kl", "slow", timeout=2.5),
        tinkex.PluginError("p"),
        tinkex.UnknownRegularizerError("entorpy", ["entropy"]),
        tinkex.BackendError("b"),
    ]
    for err in errors:
        name = type(err).__name__
        assert traceback.format_exception_only(err)[0] == f"tinkex.{name}: {err}\n"
        data = pickle.dumps(err)
        assert b"tinkex._errors" not in data
        back = pickle.loads(data)
        assert type(back) is type(err) and str(back) == str(err)
    assert pickle.loads(pickle.dumps(errors[3])).name == "kl"
    assert pickle.loads(pickle.dumps(errors[4])).timeout == 2.5


def test_lazily_resolved_function_pickles_by_its_public_name():
    # Unpickling in a fresh interpreter goes through tinkex's lazy __getattr__.
    data = pickle.dumps(tinkex.regularizer)
    assert b"tinkex._plugins" not in data
    code = (
        "import pickle, sys, tinkex._plugins as p\n"
        "obj = pickle.loads(sys.stdin.buffer.read())\n"
        "print(obj is p.regularizer, obj.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, check=True
    ).stdout
    assert out.decode().split() == ["True", "tinkex"]


def test_dir_shows_only_public_names():
    _ = tinkex._plugins  # private submodules already imported stay out of dir()
    assert dir(tinkex) == sorted(tinkex.__all__)
    for helper in ("Any", "importlib", "TYPE_CHECKING", "annotations", "version", "_errors"):
        assert helper not in dir(tinkex)


def test_export_list_is_written_once():
    # One table maps each public name to its module; no TYPE_CHECKING import block repeats it.
    source = inspect.getsource(tinkex)
    assert "TYPE_CHECKING" not in source
    assert set(tinkex._EXPORTS) | set(tinkex._SUBMODULES) | {"__version__"} == set(tinkex.__all__)


def test_plugins_module_is_the_public_registry_api():
    assert set(tinkex.plugins.__all__) == PLUGINS_API
    assert dir(tinkex.plugins) == sorted(PLUGINS_API)
    for name, obj in _own_objects(tinkex.plugins, PLUGINS_API):
        assert (obj.__module__, obj.__name__) == ("tinkex.plugins", name)
        assert getattr(_plugins, name) is obj  # the same objects tinkex uses internally
    assert len(dict(_own_objects(tinkex.plugins, PLUGINS_API))) == len(PLUGINS_API)
    info = tinkex.plugins.PluginInfo(name="d", version="1")
    assert pickle.loads(pickle.dumps(info)) == info
    assert repr(tinkex.plugins.PluginInfo) == "<class 'tinkex.plugins.PluginInfo'>"


def test_error_tree():
    assert issubclass(tinkex.SpecError, tinkex.TinkexError) and issubclass(
        tinkex.SpecError, ValueError
    )
    assert issubclass(tinkex.ConfigError, tinkex.SpecError)
    assert issubclass(tinkex.RegularizerTimeoutError, tinkex.RegularizerError)
    assert issubclass(tinkex.RegularizerError, tinkex.TinkexError)
    assert issubclass(tinkex.UnknownRegularizerError, tinkex.PluginError)
    assert issubclass(tinkex.UnknownRegularizerError, LookupError)
    assert issubclass(tinkex.BackendError, tinkex.TinkexError)
    assert issubclass(tinkex.RunDirError, tinkex.TinkexError)
    assert issubclass(tinkex.StorageError, tinkex.TinkexError)
    assert issubclass(tinkex.StorageError, OSError)
    err = tinkex.UnknownRegularizerError("entropyy", ["entropy", "kl"])
    assert "entropy, kl" in str(err) and "did you mean 'entropy'?" in str(err)
    assert "pip install" not in str(err)
    assert tinkex.RegularizerError("kl", "x").name == "kl"


def test_unknown_attribute_raises_attribute_error():
    try:
        tinkex.does_not_exist  # noqa: B018
    except AttributeError as exc:
        assert "does_not_exist" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_import_is_lazy_and_does_not_pull_torch():
    code = (
        "import sys, tinkex; print('torch' in sys.modules); tinkex.hookimpl; "
        "import tinkex.plugins; print('torch' in sys.modules); "
        "print(sorted(m for m in sys.modules if m.startswith('tinkex')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "False",
        "False",
        "['tinkex', 'tinkex._errors', 'tinkex._plugins', 'tinkex.hookspecs', 'tinkex.plugins']",
    ]
    assert importlib.import_module("tinkex.telemetry") is tinkex.telemetry


def test_the_package_uses_no_trio_lowlevel():
    import pathlib

    root = pathlib.Path(tinkex.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "lowlevel" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_types_reported_as_tinkex_still_structure_from_json():
    # Their annotations name classes of their private module; once a class reports
    # `tinkex` as its module, resolving them there failed with NameError.
    code = (
        "import tinkex\n"
        "cls = tinkex.CustomLossOutput\n"
        "out = cls.from_dict({'loss_total': 1.0, 'regularizer_total': 0.0,\n"
        "    'base_loss': {'value': 1.0, 'grad_norm': None, 'custom': {}}, 'regularizers': {}})\n"
        "assert out.base_loss.value == 1.0\n"
        "from tinkex._config import config_from_dict\n"
        "tinkex.AdamParams\n"
        "assert config_from_dict({'optimizer': {'learning_rate': 0.5}}).optimizer.learning_rate == 0.5\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
