"""The public surface of tinkex: nothing missing, nothing leaking by accident."""

from __future__ import annotations

import importlib

import tinkex

CONTRACT = {
    # DESIGN.md names
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
    "ForwardBackwardOutput",
    "loss_input",
    "model_input_ints",
    "hookspecs",
    "regkit",
    "testing",
    "PluginWarning",
    "__version__",
}


def test_public_names_are_exactly_the_contract_plus_documented_extras():
    assert set(tinkex.__all__) == CONTRACT | EXTRAS


def test_every_public_name_resolves():
    for name in tinkex.__all__:
        assert getattr(tinkex, name) is not None, name


def test_public_classes_claim_the_tinkex_namespace_module():
    # Every exported object comes from a tinkex module (no third-party re-exports).
    for name in tinkex.__all__:
        obj = getattr(tinkex, name)
        module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
        if name == "hookimpl":
            continue  # a pluggy marker instance
        if isinstance(obj, str):
            continue
        assert module.startswith("tinkex"), (name, module)


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
    err = tinkex.UnknownRegularizerError("entropyy", ["entropy", "kl"])
    assert "entropy, kl" in str(err) and "pip install tinkex-reg-entropyy" in str(err)
    assert tinkex.RegularizerError("kl", "x").name == "kl"


def test_unknown_attribute_raises_attribute_error():
    try:
        tinkex.does_not_exist  # noqa: B018
    except AttributeError as exc:
        assert "does_not_exist" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_import_is_lazy_and_does_not_pull_torch():
    import subprocess
    import sys

    code = "import sys, tinkex; print('torch' in sys.modules); tinkex.hookimpl; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]
    assert importlib.import_module("tinkex.telemetry") is tinkex.telemetry
