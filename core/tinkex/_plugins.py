"""The plugin manager and the registry of regularizers, training backends, metrics
loggers and weight-schedule kinds.

Plugins are pluggy plugins of the project ``tinkex`` (hooks in
:mod:`tinkex.hookspecs`). They come from three places, loaded in this order:

1. **Built-ins**: the modules in :data:`BUILTIN_PLUGINS` (the "local" and
   "tinker" training backends; the "csv", "tensorboard", "mlflow" and "wandb"
   loggers), listed under the distribution name ``tinkex``.
   They always load; the allow/deny lists do not apply to them.
2. **Installed distributions**: every entry point of the ``tinkex`` group,
   imported one entry point at a time, grouped by the distribution that
   declares it.
3. **In-process plugins** registered by :mod:`tinkex.testing` (tests), which
   behave exactly like installed distributions.

Loading happens lazily, once per process, on the first lookup; it is redone
automatically when ``TINKEX_LOAD_PLUGINS``, ``TINKEX_DISABLE_PLUGINS`` or
``TINKEX_STRICT_PLUGINS`` change, and on :func:`reset_plugins`. An entry of the
two lists that names no installed plugin distribution (a typo, ``a;b``) gets
one :class:`PluginWarning` listing what is installed. ``TINKEX_STRICT_PLUGINS``
takes ``1/true/yes/on`` or ``0/false/no/off``/empty (any case); anything else
is a :class:`tinkex.PluginError`.

A distribution is **broken** when one of its entry points fails to import, it
fails pluggy's validation, one of its hooks raises, or it registers something
that breaks the contract (see :func:`check_regularizer_class`). "Fails" and
"raises" include every ``BaseException`` -- ``SystemExit`` from a plugin's
``sys.exit()`` too -- except ``KeyboardInterrupt``, which propagates. A broken
distribution contributes nothing: its regularizers, backends and loggers are
not registered, and schedule kinds it forwarded to
:func:`tinkex.schedules.register_kind` are unregistered again. It is listed
with its ``error`` (the original message), and a :class:`PluginWarning` is issued through :mod:`warnings` (Python prints it to
stderr once; ``tinkex`` prints it as a one-line ``warning:``), plus a
``plugin.broken`` structlog warning on the ``tinkex`` logger when structlog is
configured. Everything else keeps working. With ``TINKEX_STRICT_PLUGINS=1``
the first broken distribution raises :class:`tinkex.PluginError` instead, from
every lookup, naming that distribution and its error.

Two distributions registering the same regularizer (or backend, or logger) name
is not an error until that name is looked up: then :class:`tinkex.PluginError`
names both. Schedule kinds go straight to :mod:`tinkex.schedules`
(``register_kind(name, fn, source=<distribution>)``), which refuses a second
source for a kind: that distribution is then broken.

This module imports neither torch nor the value types at import time, so
``tinkex plugins list`` costs little more than the plugins' own imports.

Public API, documented in ``docs/plugins.md``: :func:`regularizer` and
:class:`PluginWarning` are re-exported as ``tinkex.regularizer`` and
``tinkex.PluginWarning``; the registry functions -- :func:`get_regularizer_class`,
:func:`regularizer_classes`, :func:`get_backend_factory`, :func:`backend_names`,
:func:`plugin_infos`, :func:`load_plugins`, :func:`reset_plugins`,
:func:`get_plugin_manager`, :func:`check_regularizer_class` -- and
:class:`PluginInfo` as :mod:`tinkex.plugins`; :func:`logger_names` and
:func:`get_logger_factory` as :mod:`tinkex.loggers`. :func:`load_schedule_kinds`
is what :mod:`tinkex.schedules` calls when it meets a kind it does not know.
Code outside tinkex should import them from there; this module stays importable
for tinkex's own callers.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from . import hookspecs
from ._errors import (
    FIRST_PARTY_REGULARIZERS,
    BackendError,
    PluginError,
    SpecError,
    UnknownRegularizerError,
)

if TYPE_CHECKING:  # pragma: no cover
    from ._types import RegularizerSpec
    from .schedules import Schedule

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "RESERVED_PARAMETERS",
    "PluginInfo",
    "PluginWarning",
    "backend_names",
    "check_regularizer_class",
    "get_backend_factory",
    "get_logger_factory",
    "get_plugin_manager",
    "get_regularizer_class",
    "load_plugins",
    "load_schedule_kinds",
    "logger_names",
    "plugin_infos",
    "regularizer",
    "regularizer_classes",
    "reset_plugins",
]

#: pluggy project name and entry-point group.
ENTRY_POINT_GROUP = "tinkex"
#: Modules registered as internal plugins, the way pytest and llm register theirs.
BUILTIN_PLUGINS: tuple[str, ...] = ("tinkex._backends._plugin", "tinkex._loggers")
#: The distribution name built-in plugins are listed under.
BUILTIN_DISTRIBUTION = "tinkex"
#: Keywords of :func:`regularizer` itself; a regularizer's constructor may not use them.
RESERVED_PARAMETERS = frozenset({"weight", "name", "enabled", "is_async"})

ENV_LOAD = "TINKEX_LOAD_PLUGINS"
ENV_DISABLE = "TINKEX_DISABLE_PLUGINS"
ENV_STRICT = "TINKEX_STRICT_PLUGINS"

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_HOOK_NAMES = (
    "tinkex_register_regularizers",
    "tinkex_register_backends",
    "tinkex_register_loggers",
    "tinkex_register_schedules",
)


class PluginWarning(UserWarning):
    """Issued (through :mod:`warnings`) for each broken plugin distribution."""


@attrs.frozen
class PluginInfo:
    """What one plugin distribution provides, as ``tinkex plugins list`` shows it.

    Attributes:
        name: the distribution name (``"tinkex"`` for the built-ins).
        version: the distribution's version from its metadata (None if unknown).
        hooks: the hooks it implements, sorted.
        regularizers: the regularizer names it registered, sorted (empty when broken).
        backends: the backend names it registered, sorted (empty when broken).
        error: None, or why the distribution is broken (the original message).
        builtin: True for the built-in plugins shipped inside tinkex.
        loggers: the metrics logger names it registered, sorted (empty when broken).
        schedules: the weight-schedule kinds it registered, sorted (empty when broken).
    """

    name: str
    version: str | None
    hooks: tuple[str, ...] = ()
    regularizers: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    error: str | None = None
    builtin: bool = False
    loggers: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the distribution loaded and registered without error."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``tinkex plugins list --json``."""
        return {
            "name": self.name,
            "version": self.version,
            "hooks": list(self.hooks),
            "regularizers": list(self.regularizers),
            "backends": list(self.backends),
            "error": self.error,
        }


# --------------------------------------------------------------------------- names and env


def normalize_distribution_name(name: str) -> str:
    """PEP 503 normal form: lower case, runs of ``-``, ``_`` and ``.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_entries(value: str | None) -> tuple[str, ...] | None:
    """The comma-separated entries of a list variable, stripped, as written (None: unset)."""
    if value is None:
        return None
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _names(entries: tuple[str, ...] | None) -> frozenset[str] | None:
    if entries is None:
        return None
    return frozenset(normalize_distribution_name(e) for e in entries)


def _strict_flag(value: str | None) -> bool:
    """``TINKEX_STRICT_PLUGINS``: unset or one of :data:`_FALSE` is False, :data:`_TRUE` True.

    Raises:
        PluginError: any other value, naming the variable, the value and the accepted ones.
    """
    key = (value or "").strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise PluginError(
        f"{ENV_STRICT}={value!r} is not a valid value; accepted (case-insensitive): "
        f"{', '.join(_TRUE)} (strict); {', '.join(_FALSE[:-1])} or empty (not strict)"
    )


@attrs.frozen
class _Settings:
    allow: frozenset[str] | None  # None: every distribution
    deny: frozenset[str]
    strict: bool
    # the entries as the user wrote them, to name those that match no distribution
    allow_entries: tuple[str, ...] | None = None
    deny_entries: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> _Settings:
        allow_entries = _env_entries(os.environ.get(ENV_LOAD))
        deny_entries = _env_entries(os.environ.get(ENV_DISABLE)) or ()
        return cls(
            allow=_names(allow_entries),
            deny=_names(deny_entries) or frozenset(),
            strict=_strict_flag(os.environ.get(ENV_STRICT)),
            allow_entries=allow_entries,
            deny_entries=deny_entries,
        )

    def selects(self, dist_name: str) -> bool:
        key = normalize_distribution_name(dist_name)
        if self.allow is not None and key not in self.allow:
            return False
        return key not in self.deny


# --------------------------------------------------------------------------- contract checks


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a plugin object with a failing __repr__ is still described
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


def check_regularizer_class(cls: Any) -> None:
    """Check that ``cls`` meets the regularizer-class contract of ``docs/plugins.md``.

    The contract: a class with a ``name`` class attribute matching
    ``[a-z][a-z0-9_]*``, a one-line non-empty ``description`` str, a constructor
    whose parameters are all keyword-only (none of them ``weight``, ``name``,
    ``enabled`` or ``is_async``, the keywords of :func:`tinkex.regularizer`), and a
    ``__call__(self, data, logprobs)`` (sync or ``async``).

    Args:
        cls: the object a plugin passed to ``register``.

    Raises:
        PluginError: saying which rule is broken and by which value.
    """
    if not inspect.isclass(cls):
        raise PluginError(f"register() expects a regularizer class, got {_describe(cls)}")
    label = f"regularizer class {cls.__module__}.{cls.__qualname__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(
            f"{label}: `name` must be a class attribute str matching [a-z][a-z0-9_]*, "
            f"got {_describe(name)}"
        )
    label = f"regularizer {name!r} ({cls.__module__}.{cls.__qualname__})"
    description = getattr(cls, "description", None)
    if not isinstance(description, str) or not description.strip():
        raise PluginError(
            f"{label}: `description` must be a non-empty one-line str, got {_describe(description)}"
        )
    if "\n" in description.strip():
        raise PluginError(f"{label}: `description` must be one line, got {_describe(description)}")
    if not any("__call__" in vars(k) for k in cls.__mro__ if k is not object):
        raise PluginError(
            f"{label}: instances must be callable: define __call__(self, data, logprobs)"
        )
    try:
        call_sig = inspect.signature(cls.__call__)
    except (TypeError, ValueError):
        call_sig = None
    if call_sig is not None:
        try:
            call_sig.bind(object(), object(), object())
        except TypeError:
            raise PluginError(
                f"{label}: __call__ must accept (self, data, logprobs), got __call__{call_sig}"
            ) from None
    try:
        init_sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    for param in init_sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise PluginError(
                f"{label}: constructor parameters must be keyword-only "
                f"(put them after `*`), got {param.name!r} in {cls.__qualname__}{init_sig}"
            )
        if param.name in RESERVED_PARAMETERS:
            raise PluginError(
                f"{label}: constructor parameter {param.name!r} clashes with a keyword of "
                f"tinkex.regularizer() ({', '.join(sorted(RESERVED_PARAMETERS))}); rename it"
            )


def _check_backend(name: Any, factory: Any, what: str = "backend") -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(
            f"{what} name must be a str matching [a-z][a-z0-9_]*, got {_describe(name)}"
        )
    if not callable(factory):
        raise PluginError(f"{what} {name!r}: factory must be callable, got {_describe(factory)}")


# --------------------------------------------------------------------------- loading


@attrs.define
class _Dist:
    """Mutable loading state of one plugin distribution."""

    name: str
    version: str | None
    builtin: bool = False
    plugins: list[Any] = attrs.field(factory=list)
    regularizers: dict[str, type] = attrs.field(factory=dict)
    backends: dict[str, Callable[..., Any]] = attrs.field(factory=dict)
    loggers: dict[str, Callable[[], Any]] = attrs.field(factory=dict)
    schedules: dict[str, Callable[..., float]] = attrs.field(factory=dict)
    hooks: set[str] = attrs.field(factory=set)
    attempted: set[str] = attrs.field(factory=set)  # regularizer names, kept even when broken
    error: str | None = None
    exception: BaseException | None = None

    def fail(self, message: str, exc: BaseException | None) -> None:
        if self.error is None:  # the first failure is the one worth reading
            self.error = message
            self.exception = exc

    def info(self) -> PluginInfo:
        broken = self.error is not None
        return PluginInfo(
            name=self.name,
            version=self.version,
            hooks=tuple(sorted(self.hooks)),
            regularizers=() if broken else tuple(sorted(self.regularizers)),
            backends=() if broken else tuple(sorted(self.backends)),
            error=self.error,
            builtin=self.builtin,
            loggers=() if broken else tuple(sorted(self.loggers)),
            schedules=() if broken else tuple(sorted(self.schedules)),
        )


@attrs.define
class _Registry:
    """Everything one load produced."""

    settings: _Settings
    pm: pluggy.PluginManager
    dists: list[_Dist]
    regularizers: dict[str, list[tuple[str, type]]]
    backends: dict[str, list[tuple[str, Callable[..., Any]]]]
    loggers: dict[str, list[tuple[str, Callable[[], Any]]]]
    schedules: dict[str, str]  # kind -> distribution, as forwarded to tinkex.schedules
    broken_regularizers: dict[str, str]  # name -> "dist: error", for better lookup errors
    skipped: frozenset[str]  # normalised names of distributions the allow/deny lists left out

    def find_dist(self, name: str) -> _Dist | None:
        """The loaded external distribution called ``name`` (normalised), or None."""
        key = normalize_distribution_name(name)
        for dist in self.dists:
            if not dist.builtin and normalize_distribution_name(dist.name) == key:
                return dist
        return None


# In-process plugins (tinkex.testing): list of (distribution name, version, plugin object).
_in_process: list[tuple[str, str | None, Any]] = []
_registry: _Registry | None = None
_lock = threading.RLock()


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _must_propagate(exc: BaseException) -> bool:
    """True for Ctrl-C (alone or inside an exception group): it stops the program.

    Everything else a plugin raises -- any ``Exception``, ``SystemExit`` from a
    ``sys.exit()``, another ``BaseException`` subclass -- breaks only that plugin.
    """
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return False


def _tinkex_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tinkex")
    except PackageNotFoundError:  # pragma: no cover - bare source tree
        return None


def _register_object(pm: pluggy.PluginManager, dist: _Dist, plugin: Any, label: str) -> None:
    """pm.register one plugin object for ``dist``; failures become ``dist``'s error."""
    if pm.is_registered(plugin):  # two entry points naming the same module
        return
    try:
        pm.register(plugin, name=f"{dist.name}:{label}")
    except BaseException as exc:  # PluginValidationError, a duplicate name, a plugin's getattr
        if _must_propagate(exc):
            raise
        dist.fail(f"{label} is not a valid tinkex plugin: {_error_text(exc)}", exc)
        return
    dist.plugins.append(plugin)
    for caller in pm.get_hookcallers(plugin) or ():
        dist.hooks.add(caller.name)
        if caller.name not in _HOOK_NAMES and not caller.has_spec():
            opts = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            if any(not i.optionalhook for i in opts):
                dist.fail(
                    f"{label} implements unknown hook {caller.name!r} "
                    f"(known: {', '.join(_HOOK_NAMES)}); mark it optionalhook=True if intended",
                    None,
                )


def _discover(
    settings: _Settings, pm: pluggy.PluginManager
) -> tuple[list[_Dist], frozenset[str], dict[str, str]]:
    """Import built-ins, then each selected entry point one at a time.

    Returns the distributions, built-ins first; the normalised names of the
    distributions the allow/deny lists left out (never imported); and every
    installed plugin distribution, selected or not (normalised name -> name).
    """
    from importlib.metadata import entry_points

    builtin = _Dist(name=BUILTIN_DISTRIBUTION, version=_tinkex_version(), builtin=True)
    for module_name in BUILTIN_PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except BaseException as exc:
            if _must_propagate(exc):
                raise
            builtin.fail(f"built-in plugin {module_name} failed to import: {_error_text(exc)}", exc)
            continue
        _register_object(pm, builtin, module, module_name)

    by_dist: dict[str, _Dist] = {}
    skipped: set[str] = set()
    installed: dict[str, str] = {}
    # per distribution: ("ep", EntryPoint) or ("obj", plugin object) items
    items: dict[str, list[tuple[str, Any]]] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.value, e.name)):
        dist_meta = getattr(ep, "dist", None)
        dist_name = dist_meta.metadata["Name"] if dist_meta is not None else ep.module
        installed.setdefault(normalize_distribution_name(dist_name), dist_name)
        if not settings.selects(dist_name):
            skipped.add(normalize_distribution_name(dist_name))
            continue
        key = normalize_distribution_name(dist_name)
        if key not in by_dist:
            by_dist[key] = _Dist(name=dist_name, version=dist_meta.version if dist_meta else None)
        items.setdefault(key, []).append(("ep", ep))
    for dist_name, version, plugin in _in_process:
        installed.setdefault(normalize_distribution_name(dist_name), dist_name)
        if not settings.selects(dist_name):
            skipped.add(normalize_distribution_name(dist_name))
            continue
        key = normalize_distribution_name(dist_name)
        if key not in by_dist:
            by_dist[key] = _Dist(name=dist_name, version=version)
        items.setdefault(key, []).append(("obj", plugin))

    externals = [by_dist[k] for k in sorted(by_dist)]
    for dist in externals:
        for kind, item in items[normalize_distribution_name(dist.name)]:
            if kind == "ep":
                label = f"entry point {item.name!r} ({item.value})"
                try:
                    plugin = item.load()
                except BaseException as exc:  # a plugin calling sys.exit() must not kill us
                    if _must_propagate(exc):
                        raise
                    dist.fail(f"{label} failed to import: {_error_text(exc)}", exc)
                    continue
            else:
                plugin, label = item, f"in-process plugin {_describe(item)}"
            _register_object(pm, dist, plugin, label)
        if dist.error is None and not any(pm.get_hookcallers(p) for p in dist.plugins):
            dist.fail(
                "implements no tinkex hook (are its functions decorated with @tinkex.hookimpl?)",
                None,
            )
    return [builtin, *externals], frozenset(skipped), installed


def _call_hooks(pm: pluggy.PluginManager, dist: _Dist) -> None:
    """Call this distribution's own hook implementations, collecting what they register."""

    def register_regularizer(cls: Any) -> None:
        name = getattr(cls, "name", None)
        if isinstance(name, str):
            dist.attempted.add(name)
        check_regularizer_class(cls)
        previous = dist.regularizers.get(cls.name)
        if previous is not None and previous is not cls:
            raise PluginError(f"registered two different classes as regularizer {cls.name!r}")
        dist.regularizers[cls.name] = cls

    def register_backend(name: Any, factory: Any) -> None:
        _check_backend(name, factory)
        previous = dist.backends.get(name)
        if previous is not None and previous is not factory:
            raise PluginError(f"registered two different factories as backend {name!r}")
        dist.backends[name] = factory

    def register_logger(name: Any, factory: Any) -> None:
        _check_backend(name, factory, "logger")
        previous = dist.loggers.get(name)
        if previous is not None and previous is not factory:
            raise PluginError(f"registered two different factories as logger {name!r}")
        dist.loggers[name] = factory

    def register_schedule(name: Any, fn: Any) -> None:
        # the name and fn are checked by tinkex.schedules.register_kind when forwarded
        if not isinstance(name, str):
            raise PluginError(f"schedule kind name must be a str, got {_describe(name)}")
        previous = dist.schedules.get(name)
        if previous is not None and previous is not fn:
            raise PluginError(f"registered two different functions as schedule kind {name!r}")
        dist.schedules[name] = fn

    callbacks = {
        "tinkex_register_regularizers": register_regularizer,
        "tinkex_register_backends": register_backend,
        "tinkex_register_loggers": register_logger,
        "tinkex_register_schedules": register_schedule,
    }
    for hook_name, callback in callbacks.items():
        # Call only this distribution's implementations, in pluggy's order (LIFO,
        # tryfirst/trylast respected), so a failure is charged to the right plugin.
        impls = [
            impl
            for impl in getattr(pm.hook, hook_name).get_hookimpls()
            if any(impl.plugin is p for p in dist.plugins)
        ]
        for impl in reversed(impls):
            if dist.error is not None:
                return
            if impl.wrapper or impl.hookwrapper:
                dist.fail(
                    f"{hook_name} in {impl.plugin_name} is a hook wrapper, which tinkex does not support",
                    None,
                )
                return
            kwargs = {"register": callback}
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except BaseException as exc:  # sys.exit() in a hook breaks the plugin, not us
                if _must_propagate(exc):
                    raise
                dist.fail(f"{hook_name} raised {_error_text(exc)}", exc)


def _warn_broken(dist: _Dist) -> None:
    message = f"tinkex plugin {dist.name!r} is broken and was skipped: {dist.error}"
    warnings.warn(message, PluginWarning, stacklevel=2)
    import structlog

    if structlog.is_configured():
        structlog.get_logger("tinkex").warning(
            "plugin.broken", distribution=dist.name, version=dist.version, error=dist.error
        )


def _quoted(entries: list[str]) -> str:
    quoted = [repr(e) for e in entries]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _warn_unknown_entries(settings: _Settings, installed: dict[str, str]) -> None:
    """One :class:`PluginWarning` naming every list entry that matches no installed distribution.

    A typo (``tinkex-reg-entrpy``) or the wrong separator (``a;b``) would otherwise
    select nothing, silently.
    """
    groups = []
    unknown: list[str] = []
    for var, entries in (
        (ENV_LOAD, settings.allow_entries or ()),
        (ENV_DISABLE, settings.deny_entries),
    ):
        missing = [
            e for e in dict.fromkeys(entries) if normalize_distribution_name(e) not in installed
        ]
        if missing:
            word = "entry" if len(missing) == 1 else "entries"
            groups.append(f"{var} {word} {_quoted(missing)}")
            unknown += missing
    if not groups:
        return
    names = ", ".join(installed[k] for k in sorted(installed)) or "none"
    verb = "names" if len(unknown) == 1 else "name"
    message = (
        f"{' and '.join(groups)} {verb} no installed tinkex plugin distribution "
        f"(installed: {names})"
    )
    if any(re.search(r"[;:|/\\\s]", e) for e in unknown):
        message += "; separate distribution names with ','"
    if BUILTIN_DISTRIBUTION in {normalize_distribution_name(e) for e in unknown}:
        message += f"; the built-in plugins ({BUILTIN_DISTRIBUTION!r}) always load"
    warnings.warn(message + ".", PluginWarning, stacklevel=3)


#: schedule kind -> distribution: what the last load forwarded to tinkex.schedules
_forwarded_schedules: dict[str, str] = {}


def _forward_schedules(dist: _Dist) -> None:
    """``tinkex.schedules.register_kind`` for each kind ``dist`` registered; a refusal
    (a bad name or function, a built-in name, another source's kind) breaks ``dist``."""
    if not dist.schedules:
        return
    from . import schedules

    for name, fn in dist.schedules.items():
        try:
            schedules.register_kind(name, fn, source=dist.name)
        except (SpecError, PluginError) as exc:
            dist.fail(f"tinkex_register_schedules: {exc}", exc)
            return
        _forwarded_schedules[name] = dist.name


def _withdraw_schedules(dist_name: str | None = None) -> None:
    """Unregister the kinds forwarded for ``dist_name`` (every distribution: None)."""
    names = [n for n, d in _forwarded_schedules.items() if dist_name in (None, d)]
    if not names:
        return
    from . import schedules

    for name in names:
        schedules.unregister_kind(name)
        del _forwarded_schedules[name]


def _build(settings: _Settings) -> _Registry:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    dists, skipped, installed = _discover(settings, pm)
    _warn_unknown_entries(settings, installed)
    regularizers: dict[str, list[tuple[str, type]]] = {}
    backends: dict[str, list[tuple[str, Callable[..., Any]]]] = {}
    loggers: dict[str, list[tuple[str, Callable[[], Any]]]] = {}
    broken_regularizers: dict[str, str] = {}
    _withdraw_schedules()  # the previous load's kinds; this load registers its own again
    for dist in dists:
        if dist.error is None:
            _call_hooks(pm, dist)
        if dist.error is None:
            _forward_schedules(dist)
        if dist.error is not None:
            _withdraw_schedules(dist.name)
            for plugin in dist.plugins:  # a broken distribution contributes nothing
                if pm.is_registered(plugin):
                    pm.unregister(plugin)
            for reg_name in dist.attempted:
                broken_regularizers.setdefault(reg_name, f"{dist.name}: {dist.error}")
            if settings.strict:
                raise PluginError(
                    f"plugin distribution {dist.name!r} is broken ({ENV_STRICT}=1): {dist.error}"
                ) from dist.exception
            _warn_broken(dist)
            continue
        for reg_name, cls in dist.regularizers.items():
            regularizers.setdefault(reg_name, []).append((dist.name, cls))
        for backend_name, factory in dist.backends.items():
            backends.setdefault(backend_name, []).append((dist.name, factory))
        for logger_name, factory in dist.loggers.items():
            loggers.setdefault(logger_name, []).append((dist.name, factory))
    return _Registry(
        settings=settings,
        pm=pm,
        dists=dists,
        regularizers=regularizers,
        backends=backends,
        loggers=loggers,
        schedules=dict(_forwarded_schedules),
        broken_regularizers=broken_regularizers,
        skipped=skipped,
    )


def _get_registry() -> _Registry:
    global _registry
    settings = _Settings.from_env()
    registry = _registry
    if registry is not None and registry.settings == settings:
        return registry
    with _lock:
        if _registry is None or _registry.settings != settings:
            _registry = _build(settings)
        return _registry


def load_plugins(*, reload: bool = False) -> None:
    """Load the plugins now, if not already loaded (lookups do this lazily).

    Args:
        reload: forget what was loaded and load again (modules already imported
            stay imported; hooks are called again).

    Raises:
        PluginError: only with ``TINKEX_STRICT_PLUGINS=1``, for the first broken
            distribution (its original exception is the ``__cause__``).
    """
    if reload:
        reset_plugins()
    _get_registry()


def reset_plugins() -> None:
    """Forget the loaded plugins; the next lookup loads them again.

    The schedule kinds they registered are unregistered from :mod:`tinkex.schedules`
    too (which loads the plugins again when it next meets a kind it does not know).
    """
    global _registry
    with _lock:
        _registry = None
        _withdraw_schedules()


def get_plugin_manager() -> pluggy.PluginManager:
    """The loaded pluggy ``PluginManager`` (project ``tinkex``; broken plugins are not in it)."""
    return _get_registry().pm


def plugin_infos(*, include_builtin: bool = False) -> list[PluginInfo]:
    """One :class:`PluginInfo` per plugin distribution, sorted by name.

    Args:
        include_builtin: also list the built-in plugins, under the name ``tinkex``.

    Raises:
        PluginError: only with ``TINKEX_STRICT_PLUGINS=1`` and a broken plugin.
    """
    registry = _get_registry()
    return [d.info() for d in registry.dists if include_builtin or not d.builtin]


# --------------------------------------------------------------------------- lookups


def _collision(what: str, name: str, providers: list[str]) -> PluginError:
    quoted = " and ".join(repr(p) for p in providers)
    externals = [p for p in providers if p != BUILTIN_DISTRIBUTION]
    return PluginError(
        f"{what} {name!r} is registered by more than one plugin distribution: {quoted}. "
        f"Uninstall one of them, or skip one with {ENV_DISABLE}={externals[-1] if externals else providers[-1]}."
    )


def regularizer_classes() -> dict[str, type]:
    """Every registered regularizer name mapped to its class, sorted by name.

    Names registered by two distributions are left out (looking them up with
    :func:`get_regularizer_class` explains the collision).
    """
    registry = _get_registry()
    return {
        name: found[0][1]
        for name, found in sorted(registry.regularizers.items())
        if len(found) == 1
    }


def get_regularizer_class(kind: str) -> type:
    """The regularizer class registered under ``kind``.

    Raises:
        UnknownRegularizerError: no loaded plugin registers ``kind`` (lists the
            installed names, suggests a close one, and names the distribution to
            install when ``kind`` is a first-party regularizer).
        PluginError: two distributions register ``kind`` (names both), or the
            distribution that registers it -- the one that tried to, or for a
            first-party kind its known distribution -- is broken (says why).
    """
    registry = _get_registry()
    found = registry.regularizers.get(kind)
    if not found:
        raise _missing_regularizer(registry, kind)
    if len(found) > 1:
        raise _collision("regularizer", kind, [dist for dist, _ in found])
    return found[0][1]


def _missing_regularizer(registry: _Registry, kind: str) -> PluginError:
    """The error for a ``kind`` nothing registers: say broken when it is, not missing."""
    broken = registry.broken_regularizers.get(kind)
    distribution = FIRST_PARTY_REGULARIZERS.get(kind)
    dist = registry.find_dist(distribution) if distribution is not None else None
    if broken is None and dist is not None and dist.error is not None:
        broken = f"{dist.name}: {dist.error}"  # e.g. it failed to import, before registering
    if broken is not None:
        return PluginError(
            f"regularizer {kind!r} comes from a broken plugin distribution, {broken}"
        )
    hint = None
    if distribution is not None:
        if dist is not None:  # loaded fine, but does not register this kind
            label = dist.name if dist.version is None else f"{dist.name} {dist.version}"
            hint = (
                f"{label} is loaded but does not register {kind!r}; "
                f"check its version with `tinkex plugins show {dist.name}`."
            )
        elif normalize_distribution_name(distribution) in registry.skipped:
            hint = (
                f"{distribution} is installed but not loaded: {ENV_LOAD} / {ENV_DISABLE} "
                f"leave it out."
            )
    else:
        broken_dists = [d for d in registry.dists if d.error is not None]
        if broken_dists:
            listed = "; ".join(f"{d.name}: {d.error}" for d in broken_dists)
            hint = (
                f"Broken plugin distributions (one of them may provide it): {listed}. "
                f"See `tinkex plugins list`."
            )
    return UnknownRegularizerError(kind, sorted(registry.regularizers), hint)


def backend_names() -> list[str]:
    """The registered training backend names, sorted (collisions included)."""
    return sorted(_get_registry().backends)


def get_backend_factory(name: str) -> Callable[..., Any]:
    """The factory registered for the training backend ``name``.

    Raises:
        BackendError: no plugin registers ``name`` (lists the available backends).
        PluginError: two distributions register ``name`` (names both).
    """
    registry = _get_registry()
    found = registry.backends.get(name)
    if not found:
        available = ", ".join(sorted(registry.backends)) or "none"
        raise BackendError(
            f"unknown backend {name!r}; available: {available}. "
            f"A backend plugin may be missing or broken: check `tinkex plugins list --all`."
        )
    if len(found) > 1:
        raise _collision("backend", name, [dist for dist, _ in found])
    return found[0][1]


def logger_names() -> list[str]:
    """The registered metrics logger names, sorted (collisions included)."""
    return sorted(_get_registry().loggers)


def get_logger_factory(name: str) -> Callable[[], Any]:
    """The factory registered for the metrics logger ``name`` (``factory()`` returns a
    :class:`tinkex.loggers.Logger`).

    Raises:
        PluginError: no plugin registers ``name`` (lists the available loggers, with
            a close one suggested), or two distributions register it (names both).
    """
    registry = _get_registry()
    found = registry.loggers.get(name)
    if not found:
        import difflib

        known = sorted(registry.loggers)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PluginError(f"unknown logger {name!r}{hint}; available: {', '.join(known) or 'none'}")
    if len(found) > 1:
        raise _collision("logger", name, [dist for dist, _ in found])
    return found[0][1]


def load_schedule_kinds() -> dict[str, str]:
    """Load the plugins, if not loaded yet, so that the weight-schedule kinds they
    register (``tinkex_register_schedules``) are known to :mod:`tinkex.schedules`.

    :mod:`tinkex.schedules` calls this when it meets a kind it does not know.

    Returns:
        ``{kind: distribution}`` for the kinds plugins registered.

    Raises:
        PluginError: only with ``TINKEX_STRICT_PLUGINS=1`` and a broken plugin.
    """
    return dict(_get_registry().schedules)


# --------------------------------------------------------------------------- the builder


def _bind_params(cls: type, spec_name: str, kind: str, params: dict[str, Any]) -> None:
    """Reject unknown or missing constructor parameters before calling it."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    where = f"regularizer {spec_name!r}" + (f" (kind {kind!r})" if spec_name != kind else "")
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    accepted = [
        p.name for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    if not accepts_any:
        for key in params:
            if key not in sig.parameters:
                raise SpecError(
                    f"unknown parameter {key!r} for {where}; accepted parameters: "
                    f"{', '.join(accepted) or 'none'}"
                )
    for param in sig.parameters.values():
        if (
            param.default is inspect.Parameter.empty
            and param.kind
            in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and param.name not in params
        ):
            raise SpecError(f"missing required parameter {param.name!r} for {where}")


def regularizer(
    kind: str,
    /,
    *,
    weight: float | Schedule,
    name: str | None = None,
    enabled: bool = True,
    is_async: bool | None = None,
    **params: Any,
) -> RegularizerSpec:
    """Build a :class:`tinkex.RegularizerSpec` from an installed regularizer plugin.

    ``tinkex.regularizer("kl", weight=0.1, name="kl_base", reference="base_logprobs")``
    instantiates the class registered as ``"kl"`` with ``reference=...`` and wraps
    the instance in a spec named ``"kl_base"``.

    Args:
        kind: the registered regularizer name (``tinkex plugins regularizers`` lists them).
        weight: the term's weight, a finite real number >= 0, or a
            :class:`tinkex.schedules.Schedule` of the step.
        name: the spec's name (unique within a pipeline); defaults to ``kind``.
        enabled: ``False`` keeps the term in the list but skips it.
        is_async: ``None`` infers it from the instance's ``__call__``.
        **params: keyword arguments for the regularizer class's constructor.

    Raises:
        UnknownRegularizerError: no installed plugin provides ``kind`` (the message
            lists the installed names, asks "did you mean ...?" when one is close,
            and for a first-party kind names its distribution, e.g.
            ``pip install tinkex-reg-norms`` for ``l2``).
        PluginError: two plugin distributions provide ``kind`` (names both), or the
            plugin that provides it is broken.
        SpecError: an unknown, missing or invalid parameter (naming the regularizer
            and the parameter), or an invalid ``weight``/``name``/``is_async``/``enabled``.
    """
    if not isinstance(kind, str):
        raise SpecError(f"regularizer kind must be a str, got {_describe(kind)}")
    cls = get_regularizer_class(kind)
    spec_name = kind if name is None else name
    _bind_params(cls, spec_name if isinstance(spec_name, str) else kind, kind, params)
    try:
        instance = cls(**params)
    except SpecError as exc:
        if spec_name == kind:  # the plugin's message already names the regularizer and parameter
            raise
        raise SpecError(f"regularizer {spec_name!r} (kind {kind!r}): {exc}") from exc
    except (TypeError, ValueError) as exc:
        where = f"regularizer {spec_name!r}" + (f" (kind {kind!r})" if spec_name != kind else "")
        raise SpecError(f"invalid parameters for {where}: {exc}") from exc

    from ._types import RegularizerSpec

    return RegularizerSpec(
        fn=instance, weight=weight, name=spec_name, is_async=is_async, enabled=enabled
    )
