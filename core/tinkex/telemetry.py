"""Telemetry: structlog events for composed losses and their terms.

The library only ever calls ``structlog.get_logger("tinkex")`` and never
configures logging. Until the application configures structlog (or calls
:func:`configure`), tinkex emits nothing and spends one boolean check per call:
a library must not print to a user's stdout by default.
``structlog.testing.capture_logs()`` counts as configuring, so tests see every event.

Events (start/stop are ``debug``, exceptions ``error``; ``duration_s`` in seconds)::

    custom_loss.start             regularizer_count, track_grad_norms
    custom_loss.stop              duration_s, loss_total, regularizer_total, regularizer_count
    custom_loss.exception         duration_s, error
    regularizer.compute.start     regularizer_name, weight, is_async
    regularizer.compute.stop      regularizer_name, weight, is_async, duration_s, value, contribution, grad_norm
    regularizer.compute.exception regularizer_name, weight, is_async, duration_s, error   (timeouts too)

The base loss emits no ``regularizer.*`` events.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

__all__ = ["configure", "enabled", "get_logger"]

_LOGGER_NAME = "tinkex"


def get_logger() -> Any:
    """The ``tinkex`` structlog logger (a lazy proxy; configuration is the application's)."""
    return structlog.get_logger(_LOGGER_NAME)


def enabled() -> bool:
    """Whether events should be emitted: True once structlog has been configured."""
    return structlog.is_configured()


def emit(level: str, event: str, **fields: Any) -> None:
    """Emit one event at ``level`` if structlog is configured; otherwise do nothing."""
    if structlog.is_configured():
        getattr(structlog.get_logger(_LOGGER_NAME), level)(event, **fields)


def configure(
    *, json: bool | None = None, level: str | int = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog for an application or the CLI (the library never calls this).

    Args:
        json: ``True`` renders one JSON object per line, ``False`` a human console
            format; ``None`` (default) picks console on a TTY and JSON otherwise.
        level: the lowest level shown (``"debug"`` shows the per-term start/stop events).
        stream: where to write; defaults to ``sys.stderr`` so stdout stays clean for
            program output.
    """
    stream = stream if stream is not None else sys.stderr
    tty = bool(hasattr(stream, "isatty") and stream.isatty())
    if json is None:
        json = not tty
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
        level = numeric
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=tty)  # colour codes only on a terminal
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
