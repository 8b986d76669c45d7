"""tinkex's exceptions on their own: messages, attributes, pickling, the first-party table.

How the registry raises them is covered in test_plugins.py.
"""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path

import pytest

import tinkex
import tinkex.testing
from tinkex import _plugins
from tinkex._errors import FIRST_PARTY_REGULARIZERS

_PLUGINS_DIR = Path(__file__).resolve().parents[1] / "plugins"

# --------------------------------------------------------------------------- the first-party table


def test_first_party_table_names_exactly_the_distributions_in_plugins_folder():
    names = {
        tomllib.loads((d / "pyproject.toml").read_text())["project"]["name"]
        for d in _PLUGINS_DIR.glob("tinkex-reg-*")
    }
    assert names == set(FIRST_PARTY_REGULARIZERS.values())
    assert len(FIRST_PARTY_REGULARIZERS) == 7
    with pytest.raises(TypeError):
        FIRST_PARTY_REGULARIZERS["typo"] = "tinkex-reg-typo"  # type: ignore[index]


def test_first_party_table_matches_what_the_installed_plugins_register():
    with tinkex.testing.installed_plugins():
        infos = {
            i.name: i
            for i in _plugins.plugin_infos()
            if i.name in FIRST_PARTY_REGULARIZERS.values()
        }
    assert set(infos) == set(FIRST_PARTY_REGULARIZERS.values())  # make setup installs them
    for name, info in infos.items():
        expected = {k for k, dist in FIRST_PARTY_REGULARIZERS.items() if dist == name}
        assert set(info.regularizers) == expected, name


# --------------------------------------------------------------------------- UnknownRegularizerError


def test_unknown_regularizer_error_is_a_plugin_error_and_a_lookup_error():
    err = tinkex.UnknownRegularizerError("nope", ["kl"])
    assert isinstance(err, tinkex.PluginError) and isinstance(err, LookupError)
    assert (err.kind, err.available, err.hint, err.suggestion) == ("nope", ("kl",), None, None)
    assert str(err) == (
        "unknown regularizer 'nope'. Installed: kl. "
        "If it comes from a plugin, install that plugin and check `tinkex plugins list`."
    )
    assert tinkex.UnknownRegularizerError("nope").available == ()
    assert "Installed: none." in str(tinkex.UnknownRegularizerError("nope"))


@pytest.mark.parametrize(
    ("kind", "available", "suggestion"),
    [
        ("entorpy", ("entropy", "kl"), "entropy"),  # installed
        ("kll", ("entropy",), "kl"),  # first-party, not installed
        ("L2", (), "l2"),  # case-insensitive
        ("elastic-net", (), "elastic_net"),
        ("my_regg", ("my_reg",), "my_reg"),  # any installed plugin's name
        ("zzz", ("entropy",), None),
        ("kl", ("kl2",), None),  # a first-party kind gets the install hint instead
    ],
)
def test_did_you_mean(kind, available, suggestion):
    err = tinkex.UnknownRegularizerError(kind, available)
    assert err.suggestion == suggestion
    if suggestion is None:
        assert "did you mean" not in str(err)
    else:
        assert f"did you mean {suggestion!r}" in str(err)


@pytest.mark.parametrize("kind", ["entorpy", "kll", "L2", "tinkex-reg-evil", "nope; rm -rf /"])
def test_no_pip_command_for_a_name_that_is_not_first_party(kind):
    assert "pip install" not in str(tinkex.UnknownRegularizerError(kind, ["entropy"]))


def test_first_party_kind_gets_its_distribution_and_nothing_else():
    msg = str(tinkex.UnknownRegularizerError("elastic_net", ["entropy"]))
    assert msg == (
        "unknown regularizer 'elastic_net'. Installed: entropy. 'elastic_net' is a first-party "
        "regularizer of tinkex-reg-norms: `pip install tinkex-reg-norms`, then check "
        "`tinkex plugins list`."
    )


def test_hint_replaces_the_generic_advice_and_the_pip_line():
    err = tinkex.UnknownRegularizerError("l2", ["kl"], "left out by the environment.")
    assert str(err) == "unknown regularizer 'l2'. Installed: kl. left out by the environment."
    assert err.hint == "left out by the environment."


def test_unknown_regularizer_error_pickles_with_every_attribute():
    err = tinkex.UnknownRegularizerError("entorpy", ["entropy", "kl"], "a hint.")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is tinkex.UnknownRegularizerError
    assert (back.kind, back.available, back.hint, back.suggestion, str(back)) == (
        "entorpy",
        ("entropy", "kl"),
        "a hint.",
        "entropy",
        str(err),
    )
