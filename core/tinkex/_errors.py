"""Exceptions raised by tinkex.

The hierarchy::

    TinkexError
    ├── SpecError (also ValueError)             a spec, parameter, config or input is invalid
    │   └── ConfigError                         a `tinkex train` config file is invalid
    ├── RegularizerError                        a term (regularizer or base loss) failed; `.name` says which
    │   └── RegularizerTimeoutError             a term ran past its timeout
    ├── PluginError                             a plugin is broken, or two plugins collide
    │   └── UnknownRegularizerError (also LookupError)
    └── BackendError                            a training backend cannot be created or failed

Every message says what was wrong, the offending value and, where there is one,
how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "PluginError",
    "RegularizerError",
    "RegularizerTimeoutError",
    "SpecError",
    "TinkexError",
    "UnknownRegularizerError",
]


class TinkexError(Exception):
    """Base class of every error tinkex raises on purpose."""


class SpecError(TinkexError, ValueError):
    """A regularizer spec, a parameter, or an input is invalid.

    Raised before anything runs, with a message naming the field and the bad value.
    """


class ConfigError(SpecError):
    """A `tinkex train` configuration is invalid (unknown key, bad value, missing file)."""


class RegularizerError(TinkexError):
    """A term of the composed loss failed.

    Attributes:
        name: the failing term's name; ``"base_loss"`` for the base loss.

    ``__cause__`` holds the original exception (for a timeout, the
    :class:`trio.TooSlowError`).
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working
        return (type(self), (self.name, self.args[0]))


class RegularizerTimeoutError(RegularizerError):
    """A term ran longer than the ``timeout`` given to the pipeline.

    Attributes:
        name: the term's name.
        timeout: the limit, in seconds.
    """

    def __init__(self, name: str, message: str, timeout: float | None = None) -> None:
        super().__init__(name, message)
        self.timeout = timeout

    def __reduce__(self):
        return (type(self), (self.name, self.args[0], self.timeout))


class PluginError(TinkexError):
    """A plugin failed to load, registered something invalid, or collides with another."""


class UnknownRegularizerError(PluginError, LookupError):
    """No installed plugin provides the requested regularizer.

    Attributes:
        kind: the name that was looked up.
        available: the names that are installed.
    """

    def __init__(self, kind: str, available: list[str] | tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.available = tuple(available)
        installed = ", ".join(self.available) if self.available else "none"
        super().__init__(
            f"unknown regularizer {kind!r}; installed: {installed}. "
            f"If it comes from a plugin, install it (e.g. `pip install tinkex-reg-{kind}`) "
            f"and check `tinkex plugins list`."
        )

    def __reduce__(self):
        return (type(self), (self.kind, self.available))

    def __str__(self) -> str:  # LookupError/KeyError-style repr quoting would be noisy
        return str(self.args[0])


class BackendError(TinkexError):
    """A training backend could not be created, or one of its operations failed."""
