"""tinkex: compose a training loss from a base loss and weighted regularizer plugins.

The public names are imported lazily on first use, so ``import tinkex`` (and the
``tinkex`` command's ``--help``) stays fast and does not pull in torch until a
name that needs it is touched. ``from tinkex import X`` works as usual.

Every public object reports ``__module__ == "tinkex"`` (as trio and httpx do), so
reprs and tracebacks show ``tinkex.RegularizerError``, not the private module
that defines it. The exceptions are imported eagerly (they are cheap) so that
this holds even for an error raised before anyone touched ``tinkex.<Name>``.
"""

from importlib import import_module as _import_module
from types import FunctionType as _FunctionType
from typing import Any as _Any

# public name -> private module that defines it: the one list of the public API
_EXPORTS: dict[str, str] = {
    # errors (imported eagerly, below)
    "TinkexError": "._errors",
    "SpecError": "._errors",
    "ConfigError": "._errors",
    "RegularizerError": "._errors",
    "RegularizerTimeoutError": "._errors",
    "PluginError": "._errors",
    "UnknownRegularizerError": "._errors",
    "BackendError": "._errors",
    "RunDirError": "._errors",
    "StorageError": "._errors",
    # value types
    "RegularizerSpec": "._types",
    "RegularizerOutput": "._types",
    "BaseLossOutput": "._types",
    "CustomLossOutput": "._types",
    "ComposedLoss": "._types",
    "Datum": "._types",
    # loss inputs
    "loss_input": "._inputs",
    "model_input_ints": "._inputs",
    # training data
    "sft_datums": "._dataset",
    # composing a loss
    "compute_loss": "._pipeline",
    "compose_loss": "._pipeline",
    "Pipeline": "._pipeline",
    "drop_in_metrics": "._pipeline",
    # plugins
    "hookimpl": ".hookspecs",
    "regularizer": "._plugins",
    "PluginWarning": "._plugins",
    # training
    "TrainingClient": "._training",
    "AdamParams": "._training",
    "ForwardBackwardOutput": "._training",
}

# public submodules
_SUBMODULES = ("hookspecs", "loggers", "plugins", "regkit", "schedules", "telemetry", "testing")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def _get_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinkex")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "0.0.0+unknown"


__version__ = _get_version()


def _resolve(name: str) -> _Any:
    """Import the export ``name``, claim it for ``tinkex``, and cache it here."""
    value = getattr(_import_module(_EXPORTS[name], __name__), name)
    # Classes and functions only: `hookimpl` is a pluggy marker instance.
    if isinstance(value, (type, _FunctionType)):
        value.__module__ = __name__
    globals()[name] = value
    return value


def __getattr__(name: str) -> _Any:
    if name in _EXPORTS:
        return _resolve(name)
    if name in _SUBMODULES:
        module = _import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tinkex' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)


for _name, _module in _EXPORTS.items():
    if _module == "._errors":
        _resolve(_name)
del _name, _module
