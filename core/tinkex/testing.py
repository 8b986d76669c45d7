"""Helpers for testing tinkex plugins in-process, without installing them.

A plugin registered here behaves exactly like an installed distribution of that
name: it is listed by ``tinkex plugins list``, the allow/deny lists apply to
it, a hook that raises makes it broken, and its regularizers are found by
:func:`tinkex.regularizer`. Leaving the ``with`` block unregisters it and
resets the registry. Typical use in a plugin's own tests::

    import pytest
    import tinkex
    import tinkex.testing
    import my_plugin

    @pytest.fixture
    def registered():
        with tinkex.testing.register_plugin(my_plugin, name="tinkex-reg-mine"):
            yield

    def test_builds(registered):
        spec = tinkex.regularizer("mine", weight=0.5)
        assert spec.name == "mine"

Once the plugin is installed (editable is enough), :func:`check_plugin_module`
checks its wiring -- entry point, distribution, hook -- in one call,
:func:`installed_plugins` gives a test the real registry whatever the
developer's ``TINKEX_*`` variables say, and :func:`run_readme_example` keeps
the README's example honest.

A regularizer must work on both kinds of datum, :class:`tinkex.Datum` and the
Tinker SDK's ``tinker.Datum`` (whose loss inputs are ``TensorData``);
:func:`tinkex_datum` and :func:`tinker_datum` build the same datum either way::

    @pytest.mark.parametrize("make", [tinkex.testing.tinkex_datum, tinkex.testing.tinker_datum])
    def test_counts_only_weighted_tokens(make):
        data = [make(3, target_tokens=[1, 2, 3], weights=[0.0, 1.0, 1.0])]
        ...
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import _plugins
from ._plugins import check_regularizer_class, reset_plugins
from .hookspecs import hookimpl

__all__ = [
    "check_plugin_module",
    "check_regularizer_class",
    "installed_plugins",
    "register_plugin",
    "register_regularizers",
    "reset_plugins",
    "run_readme_example",
    "tinker_datum",
    "tinkex_datum",
]

#: The variables that change which plugins load (see docs/plugins.md).
PLUGIN_ENV_VARS = ("TINKEX_LOAD_PLUGINS", "TINKEX_DISABLE_PLUGINS", "TINKEX_STRICT_PLUGINS")


@contextmanager
def register_plugin(
    plugin: object, *, name: str = "tinkex-test-plugin", version: str | None = "0.0.0"
) -> Iterator[object]:
    """Register ``plugin`` as if it were an installed distribution called ``name``.

    Args:
        plugin: a module, or an instance of a class, with functions marked
            ``@tinkex.hookimpl``.
        name: the distribution name it is listed under (several plugins may share one).
        version: the version it is listed with.

    Yields:
        ``plugin`` itself.

    The registry is reset on entry and on exit, so lookups inside the block see
    the plugin and lookups after it do not.
    """
    entry = (name, version, plugin)
    _plugins._in_process.append(entry)
    reset_plugins()
    try:
        yield plugin
    finally:
        for i, item in enumerate(_plugins._in_process):
            if item is entry:
                del _plugins._in_process[i]
                break
        reset_plugins()


class _RegistersClasses:
    """A plugin object whose hooks register fixed classes and backends."""

    def __init__(self, classes: tuple[Any, ...], backends: dict[str, Any]) -> None:
        self._classes = classes
        self._backends = backends

    @hookimpl
    def tinkex_register_regularizers(self, register: Any) -> None:
        for cls in self._classes:
            register(cls)

    @hookimpl
    def tinkex_register_backends(self, register: Any) -> None:
        for backend_name, factory in self._backends.items():
            register(backend_name, factory)

    def __repr__(self) -> str:
        names = [getattr(c, "name", c) for c in self._classes] + list(self._backends)
        return f"<test plugin registering {', '.join(map(str, names))}>"


@contextmanager
def register_regularizers(
    *classes: type,
    name: str = "tinkex-test-plugin",
    version: str | None = "0.0.0",
    backends: dict[str, Any] | None = None,
) -> Iterator[object]:
    """Register regularizer classes (and optionally backends) under a test distribution.

    A shortcut for :func:`register_plugin` with a plugin object whose hooks call
    ``register(cls)`` for each class and ``register(name, factory)`` for each
    backend. Contract violations make that distribution broken, as they would
    for an installed plugin (check them directly with :func:`check_regularizer_class`).

    Args:
        *classes: the regularizer classes.
        name: the distribution name they are listed under.
        version: the version they are listed with.
        backends: backend name -> factory.

    Yields:
        the plugin object.
    """
    with register_plugin(
        _RegistersClasses(classes, dict(backends or {})), name=name, version=version
    ) as p:
        yield p


@contextmanager
def installed_plugins() -> Iterator[None]:
    """The real registry -- installed distributions only -- whatever ``TINKEX_*`` says.

    Unsets ``TINKEX_LOAD_PLUGINS``, ``TINKEX_DISABLE_PLUGINS`` and
    ``TINKEX_STRICT_PLUGINS`` and resets the registry; on exit puts the variables
    back and resets it again. For a pytest fixture::

        @pytest.fixture
        def registry():
            with tinkex.testing.installed_plugins():
                yield
    """
    saved = {var: os.environ.pop(var) for var in PLUGIN_ENV_VARS if var in os.environ}
    reset_plugins()
    try:
        yield
    finally:
        for var in PLUGIN_ENV_VARS:
            os.environ.pop(var, None)
        os.environ.update(saved)
        reset_plugins()


def check_plugin_module(
    module: Any, *, distribution: str, entry_point: str, registers: Sequence[type]
) -> None:
    """Check an installed plugin's wiring; raise ``AssertionError`` saying what is wrong.

    - the ``tinkex`` entry-point group has exactly one entry point called
      ``entry_point``; it points at ``module`` and belongs to ``distribution``;
    - ``module.tinkex_register_regularizers`` registers exactly ``registers``, in
      that order, and each passes :func:`check_regularizer_class` (which raises
      :class:`tinkex.PluginError` for a contract violation).

    Args:
        module: the plugin module (what the entry point names).
        distribution: the distribution name in its ``pyproject.toml``.
        entry_point: the entry point's name.
        registers: the regularizer classes its hook should register.
    """
    eps = [ep for ep in importlib.metadata.entry_points(group="tinkex") if ep.name == entry_point]
    if len(eps) != 1:
        raise AssertionError(
            f"expected one entry point {entry_point!r} in group 'tinkex', found {len(eps)}"
            + ("" if eps else "; is the distribution installed (pip install -e .)?")
        )
    ep = eps[0]
    if ep.value != module.__name__:
        raise AssertionError(
            f"entry point {entry_point!r} points at {ep.value!r}, expected {module.__name__!r}"
        )
    owner = ep.dist.name if ep.dist is not None else None
    if owner != distribution:
        raise AssertionError(
            f"entry point {entry_point!r} belongs to distribution {owner!r}, expected {distribution!r}"
        )
    hook = getattr(module, "tinkex_register_regularizers", None)
    if hook is None:
        raise AssertionError(f"{module.__name__} has no tinkex_register_regularizers hook")
    registered: list[Any] = []
    hook(registered.append)
    if registered != list(registers):
        raise AssertionError(
            f"{module.__name__}.tinkex_register_regularizers registered {registered!r}, "
            f"expected {list(registers)!r}"
        )
    for cls in registered:
        check_regularizer_class(cls)


def run_readme_example(
    readme: str | os.PathLike[str], *, section: str = "## Example"
) -> dict[str, Any]:
    """Run the first fenced ``python`` block after the heading ``section``; return its globals.

    Raises:
        AssertionError: no such heading, or no ``python`` block after it.
    """
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if section not in text:
        raise AssertionError(f"{path} has no heading {section!r}")
    after = text.split(section, 1)[1]
    if "```python\n" not in after:
        raise AssertionError(f"{path} has no ```python block after {section!r}")
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    exec(compile(code, str(path), "exec"), namespace)
    return namespace


# --------------------------------------------------------------------------- data


def tinkex_datum(n_tokens: int, **loss_fn_inputs: Any) -> Any:
    """A :class:`tinkex.Datum` with input ids ``0 .. n_tokens-1`` and these loss inputs.

    Loss inputs are lists of numbers (nested for ``(N, K)`` top-K inputs) or tensors.
    """
    from ._types import Datum

    return Datum(model_input=list(range(n_tokens)), loss_fn_inputs=loss_fn_inputs)


def tinker_datum(n_tokens: int, **loss_fn_inputs: Any) -> Any:
    """The same datum as :func:`tinkex_datum`, as the Tinker SDK's ``tinker.Datum``.

    Loss inputs become ``tinker.TensorData`` of the same shape (``int64`` for integer
    values, ``float32`` otherwise). Under pytest, the test is skipped when the SDK is
    not installed (``pip install 'tinkex[tinker]'``).

    Raises:
        ImportError: the SDK is not installed, outside pytest.
    """
    import torch

    try:
        import tinker
    except ImportError:
        try:
            import pytest
        except ImportError:
            raise ImportError(
                "tinker_datum needs the Tinker SDK: pip install 'tinkex[tinker]'"
            ) from None
        pytest.skip("the Tinker SDK is not installed (pip install 'tinkex[tinker]')")
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(list(range(n_tokens))),
        loss_fn_inputs={
            key: tinker.TensorData.from_torch(torch.as_tensor(value))
            for key, value in loss_fn_inputs.items()
        },
    )
