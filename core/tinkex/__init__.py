"""tinkex: compose a training loss from a base loss and weighted regularizer plugins.

The public names are imported lazily on first use, so ``import tinkex`` (and the
``tinkex`` command's ``--help``) stays fast and does not pull in torch until a
name that needs it is touched. ``from tinkex import X`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("tinkex")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "TinkexError": "._errors",
    "SpecError": "._errors",
    "ConfigError": "._errors",
    "RegularizerError": "._errors",
    "RegularizerTimeoutError": "._errors",
    "PluginError": "._errors",
    "UnknownRegularizerError": "._errors",
    "BackendError": "._errors",
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
    # composing a loss
    "compute_loss": "._pipeline",
    "compose_loss": "._pipeline",
    "Pipeline": "._pipeline",
    # plugins
    "hookimpl": ".hookspecs",
    "regularizer": "._plugins",
    "PluginWarning": "._plugins",
    # training
    "TrainingClient": "._training",
    "AdamParams": "._training",
    "ForwardBackwardOutput": "._training",
}

_SUBMODULES = ("telemetry", "hookspecs", "regkit", "testing")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'tinkex' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import hookspecs as hookspecs
    from . import regkit as regkit
    from . import telemetry as telemetry
    from . import testing as testing
    from ._errors import BackendError as BackendError
    from ._errors import ConfigError as ConfigError
    from ._errors import PluginError as PluginError
    from ._errors import RegularizerError as RegularizerError
    from ._errors import RegularizerTimeoutError as RegularizerTimeoutError
    from ._errors import SpecError as SpecError
    from ._errors import TinkexError as TinkexError
    from ._errors import UnknownRegularizerError as UnknownRegularizerError
    from ._inputs import loss_input as loss_input
    from ._inputs import model_input_ints as model_input_ints
    from ._pipeline import Pipeline as Pipeline
    from ._pipeline import compose_loss as compose_loss
    from ._pipeline import compute_loss as compute_loss
    from ._plugins import PluginWarning as PluginWarning
    from ._plugins import regularizer as regularizer
    from ._training import AdamParams as AdamParams
    from ._training import ForwardBackwardOutput as ForwardBackwardOutput
    from ._training import TrainingClient as TrainingClient
    from ._types import BaseLossOutput as BaseLossOutput
    from ._types import ComposedLoss as ComposedLoss
    from ._types import CustomLossOutput as CustomLossOutput
    from ._types import Datum as Datum
    from ._types import RegularizerOutput as RegularizerOutput
    from ._types import RegularizerSpec as RegularizerSpec
    from .hookspecs import hookimpl as hookimpl
