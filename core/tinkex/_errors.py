"""Exceptions raised by tinkex.

The hierarchy::

    TinkexError
    ├── SpecError (also ValueError)             a spec, parameter, config or input is invalid
    │   └── ConfigError                         a `tinkex train` config file is invalid
    ├── RegularizerError                        a term (regularizer or base loss) failed; `.name` says which
    │   └── RegularizerTimeoutError             a term ran past its timeout
    ├── PluginError                             a plugin is broken, or two plugins collide
    │   └── UnknownRegularizerError (also LookupError)
    ├── BackendError                            a training backend cannot be created or failed
    ├── RunDirError                             a run directory is locked, corrupt, or does not match
    └── StorageError (also OSError)             writing a file failed: disk full, no permission

Every message says what was wrong, the offending value and, where there is one,
how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "BackendError",
    "ConfigError",
    "PluginError",
    "RegularizerError",
    "RegularizerTimeoutError",
    "RunDirError",
    "SpecError",
    "StorageError",
    "TinkexError",
    "UnknownRegularizerError",
]

#: The first-party regularizers: kind -> the distribution (in ``plugins/``) that
#: registers it. The one copy of this table: :class:`UnknownRegularizerError`
#: turns it into an install hint, and the registry uses it to tell "not
#: installed" from "installed but broken" or "left out by the environment".
#: Only these distribution names ever appear in a ``pip install`` hint; an
#: unknown kind is never pasted into one (a typo could name a squatted package).
FIRST_PARTY_REGULARIZERS: Mapping[str, str] = MappingProxyType(
    {
        "l1": "tinkex-reg-norms",
        "l2": "tinkex-reg-norms",
        "elastic_net": "tinkex-reg-norms",
        "entropy": "tinkex-reg-entropy",
        "kl": "tinkex-reg-kl",
        "consistency": "tinkex-reg-consistency",
        "orthogonality": "tinkex-reg-orthogonality",
    }
)


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
    """No loaded plugin provides the requested regularizer.

    The message lists the installed names and, where one is close, asks "did you
    mean ...?" (matching installed and first-party names). For a first-party
    kind that is not installed it names the distribution to install (``pip
    install tinkex-reg-norms`` for ``l2``); any other kind gets no ``pip``
    command, since a typo must not become a package name.

    Attributes:
        kind: the name that was looked up.
        available: the names that are installed.
        hint: what the registry knows about why ``kind`` is missing (a
            distribution left out by ``TINKEX_LOAD_PLUGINS``, a broken one...),
            or None; it replaces the generic advice at the end of the message.
        suggestion: the closest installed or first-party name, or None.
    """

    def __init__(
        self, kind: str, available: list[str] | tuple[str, ...] = (), hint: str | None = None
    ) -> None:
        self.kind = kind
        self.available = tuple(available)
        self.hint = hint
        distribution = FIRST_PARTY_REGULARIZERS.get(kind)
        self.suggestion = None if distribution is not None else _closest(kind, self.available)
        installed = ", ".join(self.available) if self.available else "none"
        parts = [f"unknown regularizer {kind!r}"]
        if self.suggestion is None:
            parts.append(".")
        elif self.suggestion in self.available:
            parts.append(f"; did you mean {self.suggestion!r}?")
        else:  # a first-party name that is not installed either
            parts.append(
                f"; did you mean {self.suggestion!r} (not installed; it comes with "
                f"{FIRST_PARTY_REGULARIZERS[self.suggestion]})?"
            )
        parts.append(f" Installed: {installed}.")
        if hint is not None:
            parts.append(f" {hint}")
        elif distribution is not None:
            parts.append(
                f" {kind!r} is a first-party regularizer of {distribution}: "
                f"`pip install {distribution}`, then check `tinkex plugins list`."
            )
        else:
            parts.append(
                " If it comes from a plugin, install that plugin and check `tinkex plugins list`."
            )
        super().__init__("".join(parts))

    def __reduce__(self):
        return (type(self), (self.kind, self.available, self.hint))

    def __str__(self) -> str:  # LookupError/KeyError-style repr quoting would be noisy
        return str(self.args[0])


def _closest(kind: str, available: tuple[str, ...]) -> str | None:
    """The installed or first-party name closest to ``kind`` (case-insensitive), or None."""
    import difflib  # only on this error path: `import tinkex` stays cheap

    candidates = sorted((set(available) | set(FIRST_PARTY_REGULARIZERS)) - {kind})
    key = kind.lower()
    if key in candidates:  # "L2" -> "l2"
        return key
    matches = difflib.get_close_matches(key, candidates, n=1)
    return matches[0] if matches else None


class BackendError(TinkexError):
    """A training backend could not be created, or one of its operations failed."""


class RunDirError(TinkexError):
    """A ``tinkex train`` run directory cannot be used as asked.

    Another process holds its lock, a file in it is corrupt, or a resume does not
    match the run (checkpoint, data, batch size, seed, model). The message names
    the file or the setting and says what to do.
    """


class StorageError(TinkexError, OSError):
    """Writing a file failed (the disk is full, a directory is not writable, ...).

    No partial file is left behind; ``__cause__`` is the original ``OSError``.
    """
