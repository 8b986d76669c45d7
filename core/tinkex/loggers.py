"""Metrics loggers: the interface a logger plugin implements, and the logger registry.

``tinkex train`` writes every step to ``metrics.jsonl``; the loggers named by
``[logging] to`` (or ``--log-to``) get the same numbers too. ``csv``,
``tensorboard``, ``mlflow`` and ``wandb`` are built in; a plugin adds one with
the ``tinkex_register_loggers(register)`` hook, calling ``register(name,
factory)``, where ``factory()`` returns an object with the methods of
:class:`Logger`. See ``docs/loggers.md``.

Importing this module imports pluggy and attrs, but neither torch nor any
tracker's package nor any plugin.
"""

from ._loggers import Logger, LoggerWarning, step_metrics
from ._plugins import get_logger_factory, logger_names

__all__ = ["Logger", "LoggerWarning", "get_logger_factory", "logger_names", "step_metrics"]

# Report the public home in reprs, tracebacks and pickles (as tinkex.plugins does).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name


def __dir__() -> list[str]:
    return sorted(__all__)
