"""tinkex.testing's helpers for plugin authors: wiring checks, the real registry, README examples."""

from __future__ import annotations

import os
import types

import pytest
import tinkex_reg_norms
from tinkex_reg_norms import L1, L2, ElasticNet

import tinkex
import tinkex.testing


def check_norms(**overrides):
    kwargs = {
        "distribution": "tinkex-reg-norms",
        "entry_point": "norms",
        "registers": [L1, L2, ElasticNet],
    }
    tinkex.testing.check_plugin_module(
        overrides.pop("module", tinkex_reg_norms), **kwargs | overrides
    )


def test_check_plugin_module_passes_for_an_installed_plugin():
    check_norms()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"entry_point": "nope"},
            r"one entry point 'nope' .* found 0; is the distribution installed",
        ),
        (
            {"distribution": "other"},
            r"belongs to distribution 'tinkex-reg-norms', expected 'other'",
        ),
        ({"registers": [L2, L1, ElasticNet]}, r"registered \[.*L1.*\], expected \[.*L2.*\]"),
        (
            {"module": types.ModuleType("elsewhere")},
            r"points at 'tinkex_reg_norms', expected 'elsewhere'",
        ),
        (
            {"module": types.ModuleType("tinkex_reg_norms")},
            "has no tinkex_register_regularizers hook",
        ),
    ],
)
def test_check_plugin_module_says_what_is_wrong(overrides, message):
    with pytest.raises(AssertionError, match=message):
        check_norms(**overrides)


def test_installed_plugins_ignores_and_then_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TINKEX_DISABLE_PLUGINS", "tinkex-reg-norms")
    monkeypatch.setenv("TINKEX_STRICT_PLUGINS", "1")
    with tinkex.testing.installed_plugins():
        assert "TINKEX_DISABLE_PLUGINS" not in os.environ
        assert isinstance(tinkex.regularizer("l2", weight=0.5).fn, L2)
    assert os.environ["TINKEX_DISABLE_PLUGINS"] == "tinkex-reg-norms"
    assert os.environ["TINKEX_STRICT_PLUGINS"] == "1"
    with pytest.raises(tinkex.UnknownRegularizerError):
        tinkex.regularizer("l2", weight=0.5)  # the registry was reset: the deny list applies again


def test_run_readme_example(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n```python\nskipped = True\n```\n\n## Example\n\nText.\n\n"
        "```python\nimport math\nanswer = math.sqrt(16)\n```\n"
    )
    ns = tinkex.testing.run_readme_example(readme)
    assert ns["answer"] == 4.0 and "skipped" not in ns
    with pytest.raises(AssertionError, match="no heading '## Usage'"):
        tinkex.testing.run_readme_example(readme, section="## Usage")
    readme.write_text("## Example\n\nno code\n")
    with pytest.raises(AssertionError, match="no ```python block"):
        tinkex.testing.run_readme_example(readme)
