"""The plugin manager and registry (tinkex._plugins), in-process.

Plugins are registered with tinkex.testing (no installation), or faked as
installed distributions by replacing importlib.metadata.entry_points; the real
installed-distribution path is covered by test_plugin_distributions.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

import tinkex
import tinkex.testing
from tinkex import _plugins
from tinkex._errors import FIRST_PARTY_REGULARIZERS
from tinkex._plugins import PluginWarning

# --------------------------------------------------------------------------- test regularizers


class Scale:
    name = "tt_scale"
    description = "factor times the sum of logprobs"

    def __init__(self, *, factor: float = 1.0, offset: float = 0.0) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor
        self.offset = offset

    def __call__(self, data: Any, logprobs: Any) -> tuple[Any, dict[str, float]]:
        loss = self.factor * logprobs.sum() + self.offset
        return loss, {"raw": float(logprobs.sum())}


class NeedsRef:
    name = "tt_needs_ref"
    description = "has a required parameter"

    def __init__(self, *, reference: str) -> None:
        self.reference = reference

    def __call__(self, data: Any, logprobs: Any) -> tuple[float, dict[str, float]]:
        return 0.0, {}


class AsyncReg:
    name = "tt_async"
    description = "an async regularizer"

    async def __call__(self, data: Any, logprobs: Any) -> tuple[float, dict[str, float]]:
        return 1.0, {}


def _make(name: str = "tt_other", **attrs_: Any) -> type:
    ns: dict[str, Any] = {"name": name, "description": "a test regularizer"}
    ns["__call__"] = lambda self, data, logprobs: (0.0, {})
    ns.update(attrs_)
    return type("Made", (), ns)


@pytest.fixture
def scale_plugin():
    with tinkex.testing.register_regularizers(
        Scale, NeedsRef, AsyncReg, name="tinkex-test-scale", version="1.2.3"
    ):
        yield


def _info(name: str) -> _plugins.PluginInfo:
    (info,) = [i for i in _plugins.plugin_infos(include_builtin=True) if i.name == name]
    return info


# --------------------------------------------------------------------------- regularizer()


def test_regularizer_builds_a_spec_whose_fn_is_the_plugin_instance(scale_plugin):
    spec = tinkex.regularizer("tt_scale", weight=0.5, factor=2.0, offset=1.0)
    assert isinstance(spec, tinkex.RegularizerSpec)
    assert (spec.name, spec.weight, spec.enabled, spec.is_async) == ("tt_scale", 0.5, True, None)
    assert isinstance(spec.fn, Scale)
    assert (spec.fn.factor, spec.fn.offset) == (2.0, 1.0)
    loss, metrics = spec.fn(None, torch.tensor([-1.0, -2.0, -3.0]))
    assert float(loss) == pytest.approx(2.0 * -6.0 + 1.0)
    assert metrics == {"raw": -6.0}


def test_regularizer_name_defaults_to_kind_and_can_be_overridden(scale_plugin):
    a = tinkex.regularizer("tt_scale", weight=1, name="scale_a", factor=1.0)
    b = tinkex.regularizer("tt_scale", weight=0, name="scale_b", enabled=False, is_async=False)
    assert (a.name, b.name) == ("scale_a", "scale_b")
    assert (b.enabled, b.is_async, b.weight) == (False, False, 0)
    assert a.fn is not b.fn


def test_async_call_is_inferred(scale_plugin):
    assert tinkex.regularizer("tt_async", weight=1.0).runs_async is True
    assert tinkex.regularizer("tt_scale", weight=1.0).runs_async is False


def test_public_name_is_the_registry_builder():
    assert tinkex.regularizer is _plugins.regularizer


def test_unknown_kind_lists_installed_names_and_never_pastes_it_into_pip(scale_plugin):
    with pytest.raises(tinkex.UnknownRegularizerError) as info:
        tinkex.regularizer("nope_reg", weight=1.0)
    err = info.value
    assert isinstance(err, tinkex.PluginError) and isinstance(err, LookupError)
    assert err.kind == "nope_reg" and err.suggestion is None
    assert {"tt_scale", "tt_needs_ref", "tt_async"} <= set(err.available)
    assert "tt_async, tt_needs_ref, tt_scale" in str(err)
    assert "pip install" not in str(err) and "tinkex-reg-nope_reg" not in str(err)
    assert str(err).endswith("install that plugin and check `tinkex plugins list`.")


def test_unknown_parameter_names_regularizer_and_parameter(scale_plugin):
    with pytest.raises(tinkex.SpecError) as info:
        tinkex.regularizer("tt_scale", weight=1.0, name="mine", fatcor=2.0)
    msg = str(info.value)
    assert "'fatcor'" in msg and "'mine'" in msg and "'tt_scale'" in msg
    assert "factor, offset" in msg  # what it accepts


def test_missing_required_parameter(scale_plugin):
    with pytest.raises(
        tinkex.SpecError,
        match=r"missing required parameter 'reference' for regularizer 'tt_needs_ref'",
    ):
        tinkex.regularizer("tt_needs_ref", weight=1.0)
    assert tinkex.regularizer("tt_needs_ref", weight=1.0, reference="ref").fn.reference == "ref"


def test_constructor_value_error_becomes_spec_error(scale_plugin):
    with pytest.raises(tinkex.SpecError) as info:
        tinkex.regularizer("tt_scale", weight=1.0, factor=-1.0)
    assert "regularizer 'tt_scale'" in str(info.value)
    assert "factor must be > 0, got -1.0" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


class Strict:
    name = "tt_strict"
    description = "raises SpecError itself"

    def __init__(self, *, mode: str = "a") -> None:
        if mode not in ("a", "b"):
            raise tinkex.SpecError(
                f"parameter 'mode' of regularizer 'tt_strict' must be 'a' or 'b', got {mode!r}"
            )

    def __call__(self, data: Any, logprobs: Any) -> tuple[float, dict[str, float]]:
        return 0.0, {}


def test_constructor_spec_error_passes_through_or_gains_the_spec_name():
    with tinkex.testing.register_regularizers(Strict, name="tt-strict"):
        with pytest.raises(tinkex.SpecError) as plain:
            tinkex.regularizer("tt_strict", weight=1.0, mode="c")
        assert (
            str(plain.value)
            == "parameter 'mode' of regularizer 'tt_strict' must be 'a' or 'b', got 'c'"
        )
        with pytest.raises(tinkex.SpecError) as named:
            tinkex.regularizer("tt_strict", weight=1.0, name="strict_b", mode="c")
        assert str(named.value) == f"regularizer 'strict_b' (kind 'tt_strict'): {plain.value}"
        assert isinstance(named.value.__cause__, tinkex.SpecError)


def test_bad_weight_is_a_spec_error_naming_the_spec(scale_plugin):
    with pytest.raises(tinkex.SpecError, match=r"weight must be .* -0.5.*'w'"):
        tinkex.regularizer("tt_scale", weight=-0.5, name="w")


def test_kind_is_positional_only(scale_plugin):
    with pytest.raises(TypeError):
        tinkex.regularizer(kind="tt_scale", weight=1.0)  # type: ignore[call-arg]


def test_registry_forgets_test_plugin_afterwards():
    with tinkex.testing.register_regularizers(Scale, name="tinkex-test-scale"):
        assert _plugins.get_regularizer_class("tt_scale") is Scale
    with pytest.raises(tinkex.UnknownRegularizerError):
        _plugins.get_regularizer_class("tt_scale")
    assert "tinkex-test-scale" not in [i.name for i in _plugins.plugin_infos()]


# --------------------------------------------------------------------------- listing


def test_plugin_infos_lists_version_hooks_and_names(scale_plugin):
    info = _info("tinkex-test-scale")
    assert info.version == "1.2.3"
    assert info.regularizers == ("tt_async", "tt_needs_ref", "tt_scale")
    assert info.error is None and info.ok and not info.builtin
    assert "tinkex_register_regularizers" in info.hooks
    assert set(info.to_dict()) == {"name", "version", "hooks", "regularizers", "backends", "error"}
    assert "tinkex-test-scale" in [i.name for i in _plugins.plugin_infos()]


def test_builtins_are_listed_only_on_request():
    names = [i.name for i in _plugins.plugin_infos()]
    assert "tinkex" not in names
    builtin = _info("tinkex")
    assert builtin.builtin and builtin.version == tinkex.__version__
    assert {"local", "tinker"} <= set(builtin.backends)


def test_broken_builtin_is_reported_not_raised(monkeypatch, fresh_plugins):
    monkeypatch.setattr(_plugins, "BUILTIN_PLUGINS", ("tinkex._no_such_builtin",))
    with pytest.warns(PluginWarning, match="'tinkex' is broken"):
        builtin = _info("tinkex")
    assert builtin.error == (
        "built-in plugin tinkex._no_such_builtin failed to import: "
        "ModuleNotFoundError: No module named 'tinkex._no_such_builtin'"
    )
    assert _plugins.backend_names() == []
    with pytest.raises(tinkex.BackendError, match=r"unknown backend 'local'; available: none"):
        _plugins.get_backend_factory("local")


def test_module_plugin_with_hookimpl_functions():
    mod = types.ModuleType("tt_module_plugin")

    @tinkex.hookimpl
    def tinkex_register_regularizers(register):
        register(Scale)

    mod.tinkex_register_regularizers = tinkex_register_regularizers
    with tinkex.testing.register_plugin(mod, name="tt-module"):
        assert _plugins.get_regularizer_class("tt_scale") is Scale
        assert _info("tt-module").hooks == ("tinkex_register_regularizers",)
        assert _plugins.get_plugin_manager().is_registered(mod)


def test_regularizer_classes_maps_names_to_classes(scale_plugin):
    classes = _plugins.regularizer_classes()
    assert classes["tt_scale"] is Scale and classes["tt_async"] is AsyncReg


# --------------------------------------------------------------------------- broken plugins


class _RaisingHook:
    @tinkex.hookimpl
    def tinkex_register_regularizers(self, register):
        register(_make("tt_half"))  # registered before the failure: must not survive it
        raise RuntimeError("boom in hook")


def test_hook_that_raises_is_broken_and_others_keep_working(scale_plugin):
    with tinkex.testing.register_plugin(_RaisingHook(), name="tt-raising"):
        with pytest.warns(
            PluginWarning, match=r"'tt-raising' is broken.*RuntimeError: boom in hook"
        ):
            info = _info("tt-raising")
        assert info.error == "tinkex_register_regularizers raised RuntimeError: boom in hook"
        assert info.regularizers == () and not info.ok
        assert info.hooks == ("tinkex_register_regularizers",)
        assert _info("tinkex-test-scale").ok
        assert tinkex.regularizer("tt_scale", weight=1.0).name == "tt_scale"
        with pytest.raises(
            tinkex.PluginError, match=r"broken plugin distribution, tt-raising: .*boom in hook"
        ):
            _plugins.get_regularizer_class("tt_half")
        assert not _plugins.get_plugin_manager().is_registered(_RaisingHook)


def test_broken_plugin_logs_through_structlog_when_configured():
    with (
        tinkex.testing.register_plugin(_RaisingHook(), name="tt-raising"),
        structlog.testing.capture_logs() as logs,
        pytest.warns(PluginWarning),
    ):
        _plugins.load_plugins()
    (event,) = [e for e in logs if e["event"] == "plugin.broken"]
    assert event["log_level"] == "warning"
    assert event["distribution"] == "tt-raising"
    assert "boom in hook" in event["error"]


def test_strict_mode_makes_a_broken_plugin_fatal(monkeypatch):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    with (
        tinkex.testing.register_plugin(_RaisingHook(), name="tt-raising"),
        pytest.raises(tinkex.PluginError) as info,
    ):
        _plugins.plugin_infos()
    assert "'tt-raising'" in str(info.value) and "boom in hook" in str(info.value)
    assert "TINKEX_STRICT_PLUGINS=1" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def _bad_call(self, data):
    return 0.0, {}


def _positional_init(self, factor=1.0):
    self.factor = factor


def _reserved_init(self, *, weight=1.0):
    pass


@pytest.mark.parametrize(
    ("registered", "fragment"),
    [
        (
            _make(name=None),
            "`name` must be a class attribute str matching [a-z][a-z0-9_]*, got None",
        ),
        (_make(name="Bad-Name"), "got 'Bad-Name'"),
        (_make(name="9lives"), "got '9lives'"),
        (_make(description=None), "`description` must be a non-empty one-line str, got None"),
        (_make(description="two\nlines"), "`description` must be one line"),
        (
            type("NoCall", (), {"name": "tt_nocall", "description": "d"}),
            "instances must be callable",
        ),
        (_make(__call__=_bad_call), "__call__ must accept (self, data, logprobs)"),
        (_make(__init__=_positional_init), "constructor parameters must be keyword-only"),
        (_make(__init__=_reserved_init), "constructor parameter 'weight' clashes"),
        (Scale(), "register() expects a regularizer class, got <"),
    ],
    ids=[
        "no-name",
        "bad-name",
        "digit-name",
        "no-description",
        "multiline",
        "not-callable",
        "call-arity",
        "positional-init",
        "reserved-param",
        "instance",
    ],
)
def test_contract_violation_breaks_that_plugin_only(scale_plugin, registered, fragment):
    with tinkex.testing.register_regularizers(registered, name="tt-bad"):
        with pytest.warns(PluginWarning, match="'tt-bad' is broken"):
            info = _info("tt-bad")
        assert info.error is not None and fragment in info.error, info.error
        assert _info("tinkex-test-scale").ok
        assert _plugins.get_regularizer_class("tt_scale") is Scale


def test_check_regularizer_class_accepts_the_contract():
    for cls in (Scale, NeedsRef, AsyncReg):
        tinkex.testing.check_regularizer_class(cls)
    with pytest.raises(tinkex.PluginError, match="keyword-only"):
        tinkex.testing.check_regularizer_class(_make(__init__=_positional_init))


def test_same_name_twice_in_one_plugin_is_broken():
    with (
        tinkex.testing.register_regularizers(_make("tt_dup"), _make("tt_dup"), name="tt-dup"),
        pytest.warns(PluginWarning),
    ):
        assert "registered two different classes as regularizer 'tt_dup'" in _info("tt-dup").error


def test_unknown_hook_name_is_broken():
    class Typo:
        @tinkex.hookimpl
        def tinkex_register_regularizer(self, register):  # missing "s"
            pass

    with tinkex.testing.register_plugin(Typo(), name="tt-typo"), pytest.warns(PluginWarning):
        assert "unknown hook 'tinkex_register_regularizer'" in _info("tt-typo").error


def test_plugin_without_hooks_is_broken():
    with (
        tinkex.testing.register_plugin(types.ModuleType("empty"), name="tt-empty"),
        pytest.warns(PluginWarning),
    ):
        assert "implements no tinkex hook" in _info("tt-empty").error


def test_hookimpl_with_wrong_argument_is_broken():
    class WrongArg:
        @tinkex.hookimpl
        def tinkex_register_regularizers(self, registry):
            pass

    with (
        tinkex.testing.register_plugin(WrongArg(), name="tt-wrongarg"),
        pytest.warns(PluginWarning),
    ):
        assert "not a valid tinkex plugin" in _info("tt-wrongarg").error
        assert "registry" in _info("tt-wrongarg").error


# --------------------------------------------------------------------------- collisions


def test_collision_names_both_distributions_and_listing_still_works():
    with (
        tinkex.testing.register_regularizers(_make("tt_same"), name="tt-first"),
        tinkex.testing.register_regularizers(_make("tt_same"), Scale, name="tt-second"),
    ):
        with pytest.raises(tinkex.PluginError) as info:
            tinkex.regularizer("tt_same", weight=1.0)
        assert not isinstance(info.value, tinkex.UnknownRegularizerError)
        msg = str(info.value)
        assert "'tt_same'" in msg and "'tt-first'" in msg and "'tt-second'" in msg
        assert "TINKEX_DISABLE_PLUGINS=" in msg
        assert _info("tt-first").regularizers == ("tt_same",) and _info("tt-first").ok
        assert _info("tt-second").regularizers == ("tt_same", "tt_scale")
        assert "tt_same" not in _plugins.regularizer_classes()
        assert tinkex.regularizer("tt_scale", weight=1.0).fn.factor == 1.0  # the rest works


# --------------------------------------------------------------------------- backends


def test_backend_lookup_and_unknown_backend():
    assert {"local", "tinker"} <= set(_plugins.backend_names())
    assert callable(_plugins.get_backend_factory("local"))
    with pytest.raises(
        tinkex.BackendError, match=r"unknown backend 'cloud'; available: .*local.*tinker"
    ):
        _plugins.get_backend_factory("cloud")


def test_plugin_backend_and_collision_with_builtin():
    def factory(**kwargs):
        return ("made", kwargs)

    with tinkex.testing.register_regularizers(backends={"tt_remote": factory}, name="tt-backends"):
        assert _plugins.get_backend_factory("tt_remote") is factory
        assert _info("tt-backends").backends == ("tt_remote",)
    with (
        tinkex.testing.register_regularizers(backends={"local": factory}, name="tt-shadow"),
        pytest.raises(tinkex.PluginError, match=r"backend 'local' .*'tinkex' and 'tt-shadow'"),
    ):
        _plugins.get_backend_factory("local")


@pytest.mark.parametrize(
    ("name", "factory", "fragment"),
    [("Bad", print, "backend name must be"), ("ok_name", 3, "factory must be callable")],
)
def test_invalid_backend_registration_is_broken(name, factory, fragment):
    with (
        tinkex.testing.register_regularizers(backends={name: factory}, name="tt-badbackend"),
        pytest.warns(PluginWarning),
    ):
        assert fragment in _info("tt-badbackend").error


# --------------------------------------------------------------------------- allow/deny lists


def test_allow_and_deny_lists_take_normalised_distribution_names(monkeypatch, scale_plugin):
    with tinkex.testing.register_regularizers(_make("tt_other"), name="tt-other"):
        monkeypatch.setenv("TINKEX_LOAD_PLUGINS", " TT_Other ")
        assert [i.name for i in _plugins.plugin_infos()] == ["tt-other"]
        assert {"local", "tinker"} <= set(_plugins.backend_names())  # built-ins always load
        monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "")
        assert _plugins.plugin_infos() == []
        with pytest.raises(tinkex.UnknownRegularizerError):
            tinkex.regularizer("tt_other", weight=1.0)
        monkeypatch.delenv("TINKEX_LOAD_PLUGINS")
        monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "tinkex.test_scale,nothing-such")
        with pytest.warns(PluginWarning, match="entry 'nothing-such' names no installed"):
            names = [i.name for i in _plugins.plugin_infos()]
        assert "tt-other" in names and "tinkex-test-scale" not in names
        monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "tt-other,tinkex-test-scale")
        monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "tt-other")
        assert [i.name for i in _plugins.plugin_infos()] == ["tinkex-test-scale"]


def test_registry_is_cached_until_env_changes_or_reset(monkeypatch, fresh_plugins):
    calls = []

    class Counting:
        @tinkex.hookimpl
        def tinkex_register_regularizers(self, register):
            calls.append(1)
            register(Scale)

    with tinkex.testing.register_plugin(Counting(), name="tt-counting"):
        _plugins.get_regularizer_class("tt_scale")
        _plugins.plugin_infos()
        tinkex.regularizer("tt_scale", weight=1.0)
        assert len(calls) == 1
        monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "unrelated")
        with pytest.warns(PluginWarning, match="'unrelated' names no installed"):
            _plugins.get_regularizer_class("tt_scale")
        assert len(calls) == 2
        with pytest.warns(PluginWarning, match="'unrelated' names no installed"):
            _plugins.load_plugins(reload=True)
        assert len(calls) == 3


# --------------------------------------------------------------------------- faked installed distributions


class _FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.name = name


def _ep(name: str, value: str, dist: _FakeDist) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name, value, "tinkex")._for(dist)


@pytest.fixture
def fake_installed(monkeypatch, fresh_plugins):
    """Three fake distributions: one good, one failing at import, one calling sys.exit."""
    good = types.ModuleType("tt_fake_good")

    @tinkex.hookimpl
    def tinkex_register_regularizers(register):
        register(Scale)

    good.tinkex_register_regularizers = tinkex_register_regularizers
    monkeypatch.setitem(sys.modules, "tt_fake_good", good)
    eps = [
        _ep("good", "tt_fake_good", _FakeDist("Fake-Good", "3.1.4")),
        _ep("broken", "tt_fake_missing_module_xyz", _FakeDist("fake_broken", "0.1")),
        _ep("exits", "tt_fake_exits:plugin", _FakeDist("fake-exits", "0.2")),
    ]
    exits = types.ModuleType("tt_fake_exits")
    exits.__getattr__ = lambda attr: sys.exit(3)  # "import" calls sys.exit
    monkeypatch.setitem(sys.modules, "tt_fake_exits", exits)

    def entry_points(**kwargs):
        assert kwargs == {"group": "tinkex"}
        return importlib.metadata.EntryPoints(eps)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_installed_distributions_import_failures_are_recorded(fake_installed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = {i.name: i for i in _plugins.plugin_infos()}
    assert list(infos) == ["fake_broken", "fake-exits", "Fake-Good"]  # sorted by normalised name
    assert infos["Fake-Good"].version == "3.1.4" and infos["Fake-Good"].regularizers == (
        "tt_scale",
    )
    assert infos["Fake-Good"].ok
    broken = infos["fake_broken"]
    assert broken.version == "0.1"
    assert broken.error == (
        "entry point 'broken' (tt_fake_missing_module_xyz) failed to import: "
        "ModuleNotFoundError: No module named 'tt_fake_missing_module_xyz'"
    )
    assert "SystemExit: 3" in infos["fake-exits"].error
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert len(messages) == 2 and any("'fake_broken' is broken" in m for m in messages)
    assert tinkex.regularizer("tt_scale", weight=2.0).weight == 2.0


def test_installed_allow_list_skips_import_entirely(fake_installed, monkeypatch):
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "fake-good")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broken ones are never imported, so no warning
        assert [i.name for i in _plugins.plugin_infos()] == ["Fake-Good"]
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "fake-good,fake-broken")
    monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "FAKE_GOOD")
    with pytest.warns(PluginWarning):
        assert [i.name for i in _plugins.plugin_infos()] == ["fake_broken"]


def test_installed_strict_mode_names_distribution_and_cause(fake_installed, monkeypatch):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "true")
    monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "fake-exits")
    with pytest.raises(
        tinkex.PluginError, match=r"'fake_broken' is broken .*No module named"
    ) as info:
        _plugins.load_plugins()
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# --------------------------------------------------------------------------- unknown kinds


class Entropy:
    name = "entropy"
    description = "a stand-in for the first-party entropy regularizer"

    def __call__(self, data: Any, logprobs: Any) -> tuple[float, dict[str, float]]:
        return 0.0, {}


def _installed(monkeypatch, *eps: importlib.metadata.EntryPoint) -> None:
    """Pretend exactly these entry points are installed (none: no plugin at all)."""
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: importlib.metadata.EntryPoints(eps)
    )


def _unknown(kind: str) -> tinkex.UnknownRegularizerError:
    with pytest.raises(tinkex.UnknownRegularizerError) as info:
        tinkex.regularizer(kind, weight=1.0)
    return info.value


def test_typo_suggests_the_installed_name_and_no_pip_line(monkeypatch, fresh_plugins):
    _installed(monkeypatch)
    with tinkex.testing.register_regularizers(Entropy, Scale, name="tt-entropy"):
        err = _unknown("entorpy")
    assert (err.kind, err.available, err.suggestion) == (
        "entorpy",
        ("entropy", "tt_scale"),
        "entropy",
    )
    assert str(err) == (
        "unknown regularizer 'entorpy'; did you mean 'entropy'? Installed: entropy, tt_scale. "
        "If it comes from a plugin, install that plugin and check `tinkex plugins list`."
    )


def test_typo_of_a_first_party_name_that_is_not_installed(monkeypatch, fresh_plugins):
    _installed(monkeypatch)
    err = _unknown("entorpy")
    assert (err.available, err.suggestion) == ((), "entropy")
    assert str(err).startswith(
        "unknown regularizer 'entorpy'; did you mean 'entropy' "
        "(not installed; it comes with tinkex-reg-entropy)? Installed: none."
    )
    assert "pip install" not in str(err)
    assert _unknown("L2").suggestion == "l2"  # case does not hide the match
    assert "pip install" not in str(_unknown("L2"))


@pytest.mark.parametrize("kind", sorted(FIRST_PARTY_REGULARIZERS))
def test_first_party_kind_not_installed_names_its_distribution(monkeypatch, fresh_plugins, kind):
    _installed(monkeypatch)
    with tinkex.testing.register_regularizers(Scale, name="tt-scale"):
        err = _unknown(kind)
    distribution = FIRST_PARTY_REGULARIZERS[kind]
    assert err.suggestion is None and err.available == ("tt_scale",)
    assert str(err) == (
        f"unknown regularizer {kind!r}. Installed: tt_scale. {kind!r} is a first-party "
        f"regularizer of {distribution}: `pip install {distribution}`, then check "
        f"`tinkex plugins list`."
    )


def test_l2_without_norms_says_pip_install_tinkex_reg_norms(monkeypatch, fresh_plugins):
    _installed(monkeypatch)
    assert "`pip install tinkex-reg-norms`" in str(_unknown("l2"))
    assert str(_unknown("l2")).count("pip install") == 1


def test_first_party_distribution_left_out_by_the_env_is_not_missing(monkeypatch, fresh_plugins):
    norms = _FakeDist("tinkex_reg_norms", "0.1.0")  # never imported: the deny list skips it
    _installed(monkeypatch, _ep("norms", "tt_never_imported_norms", norms))
    monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "tinkex-reg-norms")
    err = _unknown("l2")
    assert "tt_never_imported_norms" not in sys.modules
    assert str(err) == (
        "unknown regularizer 'l2'. Installed: none. tinkex-reg-norms is installed but not "
        "loaded: TINKEX_LOAD_PLUGINS / TINKEX_DISABLE_PLUGINS leave it out."
    )
    monkeypatch.delenv("TINKEX_DISABLE_PLUGINS")
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "")
    assert "installed but not loaded" in str(_unknown("elastic_net"))


def test_first_party_distribution_that_fails_to_import_is_named_as_broken(
    monkeypatch, fresh_plugins
):
    _installed(monkeypatch, _ep("kl", "tt_kl_missing_module", _FakeDist("tinkex-reg-kl", "0.1.0")))
    with pytest.warns(PluginWarning), pytest.raises(tinkex.PluginError) as info:
        tinkex.regularizer("kl", weight=1.0)
    assert not isinstance(info.value, tinkex.UnknownRegularizerError)
    assert str(info.value) == (
        "regularizer 'kl' comes from a broken plugin distribution, tinkex-reg-kl: "
        "entry point 'kl' (tt_kl_missing_module) failed to import: "
        "ModuleNotFoundError: No module named 'tt_kl_missing_module'"
    )
    with pytest.raises(tinkex.PluginError, match="broken plugin distribution, tinkex-reg-kl"):
        _plugins.get_regularizer_class("kl")


def test_first_party_distribution_without_the_kind_is_not_missing(monkeypatch, fresh_plugins):
    _installed(monkeypatch)
    older = _make("l1")
    with tinkex.testing.register_regularizers(older, name="tinkex-reg-norms", version="0.0.1"):
        err = _unknown("elastic_net")
    assert err.available == ("l1",)
    assert str(err).endswith(
        "tinkex-reg-norms 0.0.1 is loaded but does not register 'elastic_net'; "
        "check its version with `tinkex plugins show tinkex-reg-norms`."
    )
    assert "pip install" not in str(err)


def test_unknown_kind_lists_the_broken_distributions(monkeypatch, fresh_plugins):
    _installed(monkeypatch, _ep("x", "tt_missing_xyz", _FakeDist("tt-third-party", "1.0")))
    with pytest.warns(PluginWarning):
        err = _unknown("mystery")
    assert str(err) == (
        "unknown regularizer 'mystery'. Installed: none. Broken plugin distributions "
        "(one of them may provide it): tt-third-party: entry point 'x' (tt_missing_xyz) "
        "failed to import: ModuleNotFoundError: No module named 'tt_missing_xyz'. "
        "See `tinkex plugins list`."
    )


def test_unknown_regularizer_error_from_the_registry_pickles(monkeypatch, fresh_plugins):
    import pickle

    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "")
    err = _unknown("l2")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.kind, back.available, back.hint, str(back)) == (
        tinkex.UnknownRegularizerError,
        "l2",
        err.available,
        err.hint,
        str(err),
    )


# --------------------------------------------------------------------------- the docs' examples

_DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _DOCS.read_text(), flags=re.S)


def test_docs_have_examples():
    assert len(_BLOCKS) >= 4


def test_docs_examples_use_no_private_module():
    # What the docs present as API must be importable without a `tinkex._` module.
    for block in _BLOCKS:
        assert not re.search(r"tinkex\._|import _\w", block), block
    assert "tinkex._plugins" not in _DOCS.read_text()


@pytest.mark.parametrize("block", _BLOCKS, ids=[f"block{i}" for i in range(len(_BLOCKS))])
def test_docs_python_blocks_run(block, fresh_plugins):
    exec(compile(block, str(_DOCS), "exec"), {"__name__": "docs_plugins"})


# --------------------------------------------------------------------------- BaseException from plugins


class PluginAbort(BaseException):
    """What a plugin might raise to stop: a BaseException that is not an Exception."""


def _abort(message: str) -> None:
    raise PluginAbort(message)


def _stopping_plugin(stop: Any) -> object:
    class Stops:
        @tinkex.hookimpl
        def tinkex_register_regularizers(self, register):
            register(_make("tt_never"))  # registered before stopping: must not survive it
            stop()

    return Stops()


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (lambda: sys.exit("plugin says bye"), "SystemExit: plugin says bye"),
        (lambda: sys.exit(3), "SystemExit: 3"),
        (lambda: sys.exit(), "SystemExit"),
        (lambda: _abort("custom stop"), "PluginAbort: custom stop"),
    ],
    ids=["exit-message", "exit-code", "exit-bare", "base-exception"],
)
def test_hook_raising_a_base_exception_is_broken_and_the_rest_works(scale_plugin, stop, expected):
    with tinkex.testing.register_plugin(_stopping_plugin(stop), name="tt-stops"):
        with pytest.warns(PluginWarning, match="'tt-stops' is broken"):
            info = _info("tt-stops")
        assert info.error == f"tinkex_register_regularizers raised {expected}"
        assert info.regularizers == () and not info.ok
        assert _info("tinkex-test-scale").ok
        assert tinkex.regularizer("tt_scale", weight=1.0, factor=3.0).fn.factor == 3.0
        assert {"local", "tinker"} <= set(_plugins.backend_names())
        with pytest.raises(tinkex.PluginError, match=r"broken plugin distribution, tt-stops: .*"):
            tinkex.regularizer("tt_never", weight=1.0)


class _FakeBackend:
    """Conforms to the backend protocol; does nothing."""

    name = "fake"
    step = 0
    tokenizer = None

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def forward(self, data): ...
    async def forward_backward(self, data, loss_fn): ...
    async def optim_step(self, params): ...
    async def save_state(self, path): ...
    async def load_state(self, path): ...
    async def aclose(self): ...


async def _create_fake(**kwargs: Any) -> _FakeBackend:
    return _FakeBackend(**kwargs)


async def test_training_client_create_works_beside_a_backend_plugin_that_exits():
    class ExitsInBackends:
        @tinkex.hookimpl
        def tinkex_register_backends(self, register):
            register("tt_gone", _create_fake)
            sys.exit("no backends today")

    with (
        tinkex.testing.register_regularizers(
            backends={"tt_fake": _create_fake}, name="tt-fake-backend"
        ),
        tinkex.testing.register_plugin(ExitsInBackends(), name="tt-exits"),
    ):
        with pytest.warns(PluginWarning, match=r"'tt-exits' is broken.*SystemExit: no backends"):
            tc = await tinkex.TrainingClient.create(backend="tt_fake", base_model="m", seed=1)
        assert isinstance(tc.backend, _FakeBackend)
        assert tc.backend.kwargs == {
            "base_model": "m",
            "device": "auto",
            "lora_rank": None,
            "seed": 1,
        }
        assert _info("tt-exits").error == (
            "tinkex_register_backends raised SystemExit: no backends today"
        )
        with pytest.raises(tinkex.BackendError, match="unknown backend 'tt_gone'"):
            await tinkex.TrainingClient.create(backend="tt_gone")


def test_builtin_plugin_exiting_at_import_is_broken_not_fatal(monkeypatch, tmp_path, fresh_plugins):
    (tmp_path / "tt_builtin_exits.py").write_text("import sys\nsys.exit('builtin bye')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_plugins, "BUILTIN_PLUGINS", ("tt_builtin_exits",))
    with pytest.warns(PluginWarning, match="'tinkex' is broken"):
        builtin = _info("tinkex")
    assert builtin.error == (
        "built-in plugin tt_builtin_exits failed to import: SystemExit: builtin bye"
    )
    with tinkex.testing.register_regularizers(Scale, name="tt-scale"), pytest.warns(PluginWarning):
        assert tinkex.regularizer("tt_scale", weight=1.0).name == "tt_scale"


class _ExitsWhenInspected:
    """pluggy lists a plugin's attributes to find its hooks: this one exits then."""

    def __dir__(self):
        sys.exit("inspected")

    def __repr__(self) -> str:
        return "<exits when inspected>"


def test_plugin_exiting_while_it_is_registered_is_broken(scale_plugin):
    with tinkex.testing.register_plugin(_ExitsWhenInspected(), name="tt-inspected"):
        with pytest.warns(PluginWarning, match="'tt-inspected' is broken"):
            info = _info("tt-inspected")
        assert info.error == (
            "in-process plugin <exits when inspected> is not a valid tinkex plugin: "
            "SystemExit: inspected"
        )
        assert tinkex.regularizer("tt_scale", weight=1.0).name == "tt_scale"


def test_strict_mode_names_the_distribution_that_exited(monkeypatch, scale_plugin):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    with (
        tinkex.testing.register_plugin(_stopping_plugin(lambda: sys.exit("bye")), name="tt-stops"),
        pytest.raises(tinkex.PluginError) as info,
    ):
        tinkex.regularizer("tt_scale", weight=1.0)
    assert str(info.value) == (
        "plugin distribution 'tt-stops' is broken (TINKEX_STRICT_PLUGINS=1): "
        "tinkex_register_regularizers raised SystemExit: bye"
    )
    assert isinstance(info.value.__cause__, SystemExit)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _interrupt_in_group() -> None:
    raise BaseExceptionGroup("several", [ValueError("x"), KeyboardInterrupt()])


@pytest.mark.parametrize("stop", [_interrupt, _interrupt_in_group], ids=["plain", "in-group"])
def test_keyboard_interrupt_in_a_hook_still_stops_the_program(scale_plugin, stop):
    with tinkex.testing.register_plugin(_stopping_plugin(stop), name="tt-ctrl-c"):
        with pytest.raises((KeyboardInterrupt, BaseExceptionGroup)) as info:
            _plugins.load_plugins()
        assert isinstance(info.value, KeyboardInterrupt) or info.value.subgroup(KeyboardInterrupt)
    assert tinkex.regularizer("tt_scale", weight=1.0).name == "tt_scale"  # nothing half-loaded


@pytest.mark.parametrize("where", ["entry-point", "builtin", "register"])
def test_keyboard_interrupt_while_loading_still_stops_the_program(
    monkeypatch, tmp_path, fresh_plugins, where
):
    if where == "entry-point":
        module = types.ModuleType("tt_ctrl_c_at_import")
        module.__getattr__ = lambda attr: _interrupt()
        monkeypatch.setitem(sys.modules, "tt_ctrl_c_at_import", module)
        _installed(monkeypatch, _ep("x", "tt_ctrl_c_at_import:plugin", _FakeDist("tt-x", "1")))
    elif where == "builtin":
        (tmp_path / "tt_builtin_ctrl_c.py").write_text("raise KeyboardInterrupt\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(_plugins, "BUILTIN_PLUGINS", ("tt_builtin_ctrl_c",))
    else:

        class Interrupts:
            def __dir__(self):
                raise KeyboardInterrupt

        monkeypatch.setattr(_plugins, "_in_process", [("tt-x", "1", Interrupts())])
    with pytest.raises(KeyboardInterrupt):
        _plugins.plugin_infos()


# --------------------------------------------------------------------------- list entries that match nothing


def test_list_entry_naming_no_installed_distribution_warns_once(monkeypatch, fresh_plugins):
    _installed(monkeypatch)  # only the in-process distributions below are installed
    with (
        tinkex.testing.register_regularizers(_make("tt_one"), name="tt-one"),
        tinkex.testing.register_regularizers(_make("tt_two"), name="tt_Two"),
    ):
        monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "tt-one;tt-two")  # the wrong separator
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _plugins.plugin_infos() == []
            with pytest.raises(tinkex.UnknownRegularizerError):
                tinkex.regularizer("tt_one", weight=1.0)
            assert {"local", "tinker"} <= set(_plugins.backend_names())
        (warning,) = [w for w in caught if issubclass(w.category, PluginWarning)]
        assert str(warning.message) == (
            "TINKEX_LOAD_PLUGINS entry 'tt-one;tt-two' names no installed tinkex plugin "
            "distribution (installed: tt-one, tt_Two); separate distribution names with ','."
        )


def test_unknown_entries_of_both_lists_share_one_warning(monkeypatch, fresh_plugins):
    _installed(monkeypatch)
    with (
        tinkex.testing.register_regularizers(_make("tt_one"), name="tt-one"),
        tinkex.testing.register_regularizers(_make("tt_two"), name="tt_Two"),
    ):
        monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "tt-one, tt-tow")
        monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "tinkex,tt-won")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [i.name for i in _plugins.plugin_infos()] == ["tt-one"]
        (warning,) = [w for w in caught if issubclass(w.category, PluginWarning)]
        assert str(warning.message) == (
            "TINKEX_LOAD_PLUGINS entry 'tt-tow' and TINKEX_DISABLE_PLUGINS entries 'tinkex' "
            "and 'tt-won' name no installed tinkex plugin distribution (installed: tt-one, "
            "tt_Two); the built-in plugins ('tinkex') always load."
        )


def test_list_entries_naming_installed_distributions_do_not_warn(monkeypatch, fresh_plugins):
    _installed(monkeypatch, _ep("n", "tt_never_imported_n", _FakeDist("tinkex_reg_norms", "1")))
    with tinkex.testing.register_regularizers(_make("tt_one"), name="tt-one"):
        monkeypatch.setenv("TINKEX_LOAD_PLUGINS", " TT.ONE ,, tinkex-reg-norms")
        monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "Tinkex.Reg.Norms")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert [i.name for i in _plugins.plugin_infos()] == ["tt-one"]


def test_first_party_left_out_by_a_misspelt_allow_list_gets_no_pip_install(
    monkeypatch, fresh_plugins
):
    _installed(
        monkeypatch,
        _ep("norms", "tt_never_imported_norms", _FakeDist("tinkex-reg-norms", "0.1.0")),
        _ep("kl", "tt_never_imported_kl", _FakeDist("tinkex-reg-kl", "0.1.0")),
    )
    monkeypatch.setenv("TINKEX_LOAD_PLUGINS", "tinkex-reg-norms;tinkex-reg-kl")
    with pytest.warns(
        PluginWarning,
        match=r"entry 'tinkex-reg-norms;tinkex-reg-kl' names no installed tinkex plugin "
        r"distribution \(installed: tinkex-reg-kl, tinkex-reg-norms\); separate",
    ):
        err = _unknown("l2")
    assert "pip install" not in str(err)
    assert str(err) == (
        "unknown regularizer 'l2'. Installed: none. tinkex-reg-norms is installed but not "
        "loaded: TINKEX_LOAD_PLUGINS / TINKEX_DISABLE_PLUGINS leave it out."
    )
    assert "pip install" not in str(_unknown("kl"))
    assert "tt_never_imported_norms" not in sys.modules


# --------------------------------------------------------------------------- TINKEX_STRICT_PLUGINS values


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_strict_mode_values(monkeypatch, value):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", value)
    with (
        tinkex.testing.register_plugin(_RaisingHook(), name="tt-raising"),
        pytest.raises(tinkex.PluginError, match="'tt-raising' is broken"),
    ):
        _plugins.plugin_infos()


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "No", "off", "OFF", "", "  "])
def test_not_strict_values(monkeypatch, value):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", value)
    with (
        tinkex.testing.register_plugin(_RaisingHook(), name="tt-raising"),
        pytest.warns(PluginWarning, match="'tt-raising' is broken"),
    ):
        assert not _info("tt-raising").ok


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", "y", "true!"])
def test_any_other_strict_value_is_a_plugin_error(monkeypatch, fresh_plugins, value):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", value)
    expected = (
        f"TINKEX_STRICT_PLUGINS={value!r} is not a valid value; accepted (case-insensitive): "
        "1, true, yes, on (strict); 0, false, no, off or empty (not strict)"
    )
    lookups = [
        _plugins.plugin_infos,
        lambda: tinkex.regularizer("l2", weight=1.0),
        lambda: _plugins.get_backend_factory("local"),
    ]
    for lookup in lookups:
        with pytest.raises(tinkex.PluginError) as info:
            lookup()
        assert str(info.value) == expected
        assert not isinstance(info.value, tinkex.UnknownRegularizerError)


# --------------------------------------------------------------------------- strict mode: who is blamed


async def test_strict_mode_blames_the_broken_distribution_in_every_lookup(
    monkeypatch, scale_plugin
):
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    expected = (
        "plugin distribution 'tt-raising' is broken (TINKEX_STRICT_PLUGINS=1): "
        "tinkex_register_regularizers raised RuntimeError: boom in hook"
    )
    with tinkex.testing.register_plugin(_RaisingHook(), name="tt-raising"):
        lookups = [
            lambda: tinkex.regularizer("tt_scale", weight=1.0),
            lambda: tinkex.regularizer("nope_reg", weight=1.0),
            lambda: _plugins.get_regularizer_class("tt_half"),
            lambda: _plugins.get_backend_factory("local"),
            _plugins.backend_names,
        ]
        for lookup in lookups:
            with pytest.raises(tinkex.PluginError) as info:
                lookup()
            assert str(info.value) == expected
            assert not isinstance(info.value, tinkex.UnknownRegularizerError)
        with pytest.raises(tinkex.PluginError) as info:
            await tinkex.TrainingClient.create(backend="local")
        assert str(info.value) == expected


# --------------------------------------------------------------------------- torch is imported lazily

_REPO = Path(__file__).resolve().parents[1]


def _eager_torch_imports(source: str, filename: str) -> list[str]:
    """Imports of torch that run when the module is imported (``if TYPE_CHECKING:`` excepted)."""
    found = []

    def visit(statements: list[ast.AST]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not when imported
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names.append(getattr(node, "module", None) or "")
                if any(n == "torch" or n.startswith("torch.") for n in names):
                    found.append(f"{filename}:{node.lineno}")
            else:  # class bodies, try/with/if blocks... run at import
                visit(list(ast.iter_child_nodes(node)))

    visit(ast.parse(source).body)
    return found


def _plugin_sources() -> list[Path]:
    roots = [*sorted((_REPO / "plugins").glob("tinkex-reg-*/src")), _REPO / "examples"]
    return sorted(p for root in roots for p in root.rglob("*.py") if "src" in p.parts)


def test_eager_import_check_sees_module_level_imports():
    assert _eager_torch_imports("import torch\n", "a") == ["a:1"]
    assert _eager_torch_imports(
        "try:\n    from torch import nn\nexcept ImportError:\n    pass\n", "b"
    )
    lazy = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\ndef f():\n    import torch\n"
    assert _eager_torch_imports(lazy, "c") == []


def test_first_party_plugins_and_the_template_import_torch_lazily():
    sources = _plugin_sources()
    names = {p.parent.name for p in sources}
    assert {"tinkex_reg_norms", "tinkex_reg_kl", "tinkex_reg_logprob_floor"} <= names
    eager = [hit for p in sources for hit in _eager_torch_imports(p.read_text(), str(p))]
    assert eager == [], (
        f"import torch inside the functions that compute, not at module top: {eager}"
    )


def test_docs_plugin_pattern_imports_torch_lazily():
    plugin_blocks = [b for b in _BLOCKS if "tinkex_register_regularizers" in b]
    assert plugin_blocks
    for block in plugin_blocks:
        assert _eager_torch_imports(block, "docs/plugins.md") == [], block


# --------------------------------------------------------------------------- loggers and schedule kinds


class _NullLogger:
    def start(self, run_dir, config):
        pass

    def log(self, step, metrics):
        pass

    def finish(self, run_dir):
        pass


def _sawtooth(step, *, start, end, steps):
    return start if (step - 1) % steps < steps / 2 else end


class LoggerAndSchedulePlugin:
    @tinkex.hookimpl
    def tinkex_register_loggers(self, register):
        register("tt_null", _NullLogger)

    @tinkex.hookimpl
    def tinkex_register_schedules(self, register):
        register("tt_saw", _sawtooth)


def test_builtin_loggers_are_registered_by_tinkex_itself():
    import tinkex.loggers

    info = _info("tinkex")
    assert info.loggers == ("csv", "mlflow", "tensorboard", "wandb")
    assert "tinkex_register_loggers" in info.hooks and info.schedules == ()
    assert tinkex.loggers.logger_names() == ["csv", "mlflow", "tensorboard", "wandb"]
    assert isinstance(tinkex.loggers.get_logger_factory("csv")(), tinkex.loggers.Logger)


def test_a_plugin_registers_a_logger_and_a_schedule_kind():
    import tinkex.loggers
    import tinkex.schedules

    with tinkex.testing.register_plugin(LoggerAndSchedulePlugin(), name="tt-extras", version="0.3"):
        info = _info("tt-extras")
        assert (info.loggers, info.schedules, info.ok) == (("tt_null",), ("tt_saw",), True)
        assert info.hooks == ("tinkex_register_loggers", "tinkex_register_schedules")
        assert info.to_dict()["hooks"] == list(info.hooks)
        assert tinkex.loggers.get_logger_factory("tt_null") is _NullLogger
        assert "tt_null" in tinkex.loggers.logger_names()
        assert _plugins.load_schedule_kinds() == {"tt_saw": "tt-extras"}
        assert tinkex.schedules.kinds()["tt_saw"] == "tt-extras"
        saw = tinkex.schedules.from_dict({"schedule": "tt_saw", "start": 1, "end": 0, "steps": 2})
        assert [saw(s) for s in (1, 2, 3)] == [1.0, 0.0, 1.0]
    # gone with the plugin
    assert "tt_saw" not in tinkex.schedules.kinds()
    assert _plugins.load_schedule_kinds() == {}
    with pytest.raises(tinkex.PluginError, match=r"unknown logger 'tt_null'; available: csv, "):
        tinkex.loggers.get_logger_factory("tt_null")


def test_schedules_asks_the_plugins_for_a_kind_it_does_not_know(fresh_plugins):
    import tinkex.schedules

    with tinkex.testing.register_plugin(LoggerAndSchedulePlugin(), name="tt-extras"):
        # nothing has loaded the plugins yet: from_dict makes tinkex.schedules ask
        assert _plugins._registry is None
        saw = tinkex.schedules.from_dict({"schedule": "tt_saw", "start": 2, "end": 1, "steps": 4})
        assert saw(3) == 1.0 and _plugins._registry is not None


def test_unknown_logger_suggests_a_close_name():
    import tinkex.loggers

    with pytest.raises(tinkex.PluginError) as info:
        tinkex.loggers.get_logger_factory("tensorbord")
    assert str(info.value) == (
        "unknown logger 'tensorbord' (did you mean 'tensorboard'?); "
        "available: csv, mlflow, tensorboard, wandb"
    )


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (
            lambda r: r("Bad-Name", _NullLogger),
            "tinkex_register_loggers raised PluginError: logger name must be a str matching "
            "[a-z][a-z0-9_]*, got 'Bad-Name'",
        ),
        (
            lambda r: r("tt_x", 3),
            "tinkex_register_loggers raised PluginError: logger 'tt_x': factory must be callable, got 3",
        ),
        (
            lambda r: (r("tt_x", _NullLogger), r("tt_x", dict)),
            "tinkex_register_loggers raised PluginError: registered two different factories "
            "as logger 'tt_x'",
        ),
    ],
    ids=["bad-name", "not-callable", "twice"],
)
def test_a_bad_logger_registration_breaks_the_plugin(action, error):
    import tinkex.loggers

    class Bad:
        @tinkex.hookimpl
        def tinkex_register_loggers(self, register):
            action(register)

    with tinkex.testing.register_plugin(Bad(), name="tt-bad-logger"), pytest.warns(PluginWarning):
        assert _info("tt-bad-logger").error == error
        assert _info("tt-bad-logger").loggers == ()
        assert "tt_x" not in tinkex.loggers.logger_names()


@pytest.mark.parametrize(
    ("name", "fn", "error"),
    [
        ("linear", _sawtooth, "schedule kind 'linear' is built into tinkex"),
        ("Saw", _sawtooth, "schedule kind name must be a lower-case name"),
        ("tt_saw", 3, "schedule kind 'tt_saw' must be a callable"),
    ],
    ids=["builtin-name", "bad-name", "not-callable"],
)
def test_a_schedule_kind_tinkex_schedules_refuses_breaks_the_plugin(name, fn, error):
    import tinkex.schedules

    class Bad:
        @tinkex.hookimpl
        def tinkex_register_schedules(self, register):
            register(name, fn)

    with tinkex.testing.register_plugin(Bad(), name="tt-bad-sched"), pytest.warns(PluginWarning):
        info = _info("tt-bad-sched")
        assert info.error.startswith(f"tinkex_register_schedules: {error}"), info.error
        assert info.schedules == () and "tt_saw" not in tinkex.schedules.kinds()


class LoggerOnly:
    @tinkex.hookimpl
    def tinkex_register_loggers(self, register):
        register("tt_null", _NullLogger)


def test_two_plugins_with_one_logger_name_collide_on_lookup():
    import tinkex.loggers

    with (
        tinkex.testing.register_plugin(LoggerOnly(), name="tt-a"),
        tinkex.testing.register_plugin(LoggerOnly(), name="tt-b"),
    ):
        assert _info("tt-a").ok and _info("tt-b").ok
        with pytest.raises(tinkex.PluginError) as info:
            tinkex.loggers.get_logger_factory("tt_null")
        assert str(info.value).startswith(
            "logger 'tt_null' is registered by more than one plugin distribution: 'tt-a' and 'tt-b'."
        )
        assert tinkex.loggers.get_logger_factory("csv")  # the others still work


def test_a_schedule_kind_two_plugins_register_breaks_the_second():
    import tinkex.schedules

    with (
        tinkex.testing.register_plugin(LoggerAndSchedulePlugin(), name="tt-a"),
        tinkex.testing.register_plugin(LoggerAndSchedulePlugin(), name="tt-b"),
        pytest.warns(PluginWarning, match="'tt-b' is broken"),
    ):
        # schedule kinds are refused on registration: the second distribution is broken
        assert "'tt_saw' is registered by both tt-a and tt-b" in _info("tt-b").error
        assert _info("tt-b").loggers == () and _info("tt-a").ok
        assert tinkex.schedules.kinds()["tt_saw"] == "tt-a"


def test_logger_protocol_and_warning_report_their_public_module():
    import pickle

    import tinkex.loggers

    assert set(tinkex.loggers.__all__) == {
        "Logger",
        "LoggerWarning",
        "get_logger_factory",
        "logger_names",
        "step_metrics",
    }
    for name in tinkex.loggers.__all__:
        assert getattr(tinkex.loggers, name).__module__ == "tinkex.loggers"
    assert issubclass(tinkex.loggers.LoggerWarning, UserWarning)
    assert pickle.loads(pickle.dumps(tinkex.loggers.LoggerWarning("x"))).args == ("x",)
    assert isinstance(_NullLogger(), tinkex.loggers.Logger)
    assert not isinstance(object(), tinkex.loggers.Logger)
