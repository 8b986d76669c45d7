"""The plugin registry: look up regularizers and backends, list plugin distributions.

``tinkex.regularizer(kind, weight=...)`` is how a loss gets its terms; this
module is the registry underneath it, for tools, tests and backends that need
more. Everything here is stable and documented in ``docs/plugins.md``
("The registry API"). Loading is lazy, happens once per process, and is redone
when ``TINKEX_LOAD_PLUGINS``, ``TINKEX_DISABLE_PLUGINS`` or
``TINKEX_STRICT_PLUGINS`` change.

Importing this module imports pluggy and attrs, but neither torch nor any plugin.
"""

from ._plugins import (
    PluginInfo,
    backend_names,
    check_regularizer_class,
    get_backend_factory,
    get_plugin_manager,
    get_regularizer_class,
    load_plugins,
    plugin_infos,
    regularizer_classes,
    reset_plugins,
)

__all__ = [
    "PluginInfo",
    "backend_names",
    "check_regularizer_class",
    "get_backend_factory",
    "get_plugin_manager",
    "get_regularizer_class",
    "load_plugins",
    "plugin_infos",
    "regularizer_classes",
    "reset_plugins",
]

# Report the public home in reprs, tracebacks and pickles (the trio/httpx habit).
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name


def __dir__() -> list[str]:
    return sorted(__all__)
