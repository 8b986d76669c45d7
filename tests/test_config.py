"""The `tinkex train` config: defaults, validation messages, paths, round trips, data."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import tinkex
import tinkex.testing
from tinkex._config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    TrainingConfig,
    build_regularizers,
    config_from_dict,
    config_to_dict,
    default_config_path,
    dumps_toml,
    load_config,
    load_examples,
    shipped_data_path,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_empty_config_is_all_defaults():
    cfg = config_from_dict({})
    assert cfg == TrainConfig()
    assert cfg.model == ModelConfig(
        backend="local", base_model="tiny", device="auto", lora_rank=None, seed=0
    )
    assert cfg.training.steps == 100 and cfg.training.batch_size == 8
    assert cfg.training.track_grad_norms is True and cfg.training.mode == "auto"
    assert cfg.loss.base == "cross_entropy" and cfg.loss.normalize == "tokens"
    assert cfg.regularizers == ()
    assert cfg.data_path == shipped_data_path()


def test_optimizer_defaults_match_adam_params():
    import attrs

    adam = tinkex.AdamParams()
    for field in attrs.fields(OptimizerConfig):
        assert getattr(OptimizerConfig(), field.name) == getattr(adam, field.name), field.name


def test_a_config_names_only_what_it_changes(tmp_path):
    cfg = load_config(write(tmp_path, "[training]\nsteps = 7\n[optimizer]\nlearning_rate = 1\n"))
    assert cfg.training == TrainingConfig(steps=7)
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model == ModelConfig() and cfg.data == DataConfig() and cfg.loss == LossConfig()


def test_shipped_default_config_is_the_example_and_composes_four_terms():
    example = REPO / "examples" / "configs" / "regularized_sft.toml"
    assert default_config_path().read_bytes() == example.read_bytes()
    cfg = load_config()
    kinds = [r.kind for r in cfg.regularizers]
    assert {"entropy", "kl"} <= set(kinds)
    assert {"l1", "l2", "elastic_net"} & set(kinds)
    assert cfg.uses_reference is True
    assert cfg.training.track_grad_norms is True
    assert cfg.model.backend == "local" and cfg.model.base_model == "tiny"


def test_shipped_dataset_is_the_generated_example():
    example = REPO / "examples" / "data" / "instructions.jsonl"
    assert shipped_data_path().read_bytes() == example.read_bytes()
    rows = [json.loads(line) for line in example.read_text().splitlines()]
    assert 200 <= len(rows) <= 1000
    assert all(set(r) == {"prompt", "response", "task"} for r in rows)
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_dataset_generator_is_deterministic():
    import subprocess
    import sys

    script = REPO / "examples" / "data" / "make_instructions.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[training]\nstpes = 3\n", ["training.stpes", "did you mean 'steps'"]),
        ("[trainig]\nsteps = 3\n", ["[trainig]", "did you mean 'training'"]),
        ("[training]\nsteps = 0\n", ["training.steps", ">= 1", "0"]),
        ("[training]\nsteps = '3'\n", ["training.steps", "integer", "'3'"]),
        ("[training]\nsteps = 3.0\n", ["training.steps", "integer"]),
        ("[training]\ntrack_grad_norms = 1\n", ["training.track_grad_norms", "true or false"]),
        ("[training]\nmode = 'fast'\n", ["training.mode", "'fused'", "'fast'"]),
        ("[optimizer]\nlearning_rate = -1\n", ["optimizer.learning_rate", "> 0"]),
        ("[optimizer]\nlearning_rate = nan\n", ["optimizer.learning_rate", "finite"]),
        ("[optimizer]\nbeta1 = 1.0\n", ["optimizer.beta1", "[0, 1)"]),
        ("[loss]\nbase = 'mse'\n", ["loss.base", "'cross_entropy'"]),
        ("[loss]\nreference = 'init'\n", ["loss.reference", "'initial_model'"]),
        ("[data]\ntemplate = 'no placeholder'\n", ["data.template", "{prompt}"]),
        ("[model]\nlora_rank = 0\n", ["model.lora_rank", ">= 1"]),
        ("training = 3\n", ["[training] must be a table"]),
        ("[[regularizers]]\nweight = 0.1\n", ["regularizers[0]", "no 'name'"]),
        ("[[regularizers]]\nname = 'kl'\n", ["regularizers[0] (kl)", "no 'weight'"]),
        (
            "[[regularizers]]\nname = 'kl'\nweight = -0.5\n",
            ["regularizers[0] (kl)", "weight", "-0.5"],
        ),
        ("[[regularizers]]\nname = 'kl'\nweight = true\n", ["regularizers[0] (kl)", "weight"]),
        ("[[regularizers]]\nname = 'kl'\nweight = 1\nenabled = 'no'\n", ["'enabled'", "'no'"]),
        (
            "[[regularizers]]\nname = 'kl'\nweight = 1\n[[regularizers]]\nname = 'kl'\nweight = 2\n",
            ["regularizers[1] (kl)", "'kl' is already used by regularizers[0]", "as ="],
        ),
        (
            "[[regularizers]]\nname = 'l2'\nas = 'base_loss'\nweight = 1\n",
            ["'base_loss' is reserved"],
        ),
        ("regularizers = 3\n", ["'regularizers' must be an array of tables"]),
        ("[training\n", ["invalid TOML"]),
    ],
)
def test_bad_configs_name_the_culprit(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(tinkex.ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message or "invalid TOML" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_unknown_key_lists_the_known_keys(tmp_path):
    with pytest.raises(tinkex.ConfigError, match=r"Known keys in \[data\]: path, prompt_field"):
        load_config(write(tmp_path, "[data]\nfile = 'x.jsonl'\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(tinkex.ConfigError, match=r"config file not found: .*nope\.toml"):
        load_config(tmp_path / "nope.toml")


def test_config_error_is_a_spec_error_and_value_error():
    assert issubclass(tinkex.ConfigError, tinkex.SpecError)
    assert issubclass(tinkex.ConfigError, ValueError)


# --------------------------------------------------------------------------- paths, round trip


def test_relative_data_path_resolves_against_the_config_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "[data]\npath = '../data/pairs.jsonl'\n")
    cfg = load_config(path)
    assert cfg.data.path == str((tmp_path / "data" / "pairs.jsonl").resolve())
    absolute = write(tmp_path, f"[data]\npath = '{tmp_path / 'abs.jsonl'}'\n", "abs.toml")
    assert load_config(absolute).data.path == str(tmp_path / "abs.jsonl")


def test_regularizer_entries_keep_alias_enabled_and_params(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            """
[[regularizers]]
name = "kl"
as = "kl_ref"
weight = 0.1
estimator = "k1"
clip = 5.0

[[regularizers]]
name = "l2"
weight = 2
enabled = false
""",
        )
    )
    kl, l2 = cfg.regularizers
    assert (kl.kind, kl.term_name, kl.weight, kl.enabled) == ("kl", "kl_ref", 0.1, True)
    assert kl.params == {"estimator": "k1", "clip": 5.0}
    assert (l2.kind, l2.term_name, l2.weight, l2.enabled, l2.params) == ("l2", "l2", 2.0, False, {})
    assert cfg.uses_reference is True  # an enabled kl entry and reference = "auto"


@pytest.mark.parametrize(
    ("reference", "regs", "expected"),
    [
        ("auto", [("l2", True)], False),
        ("auto", [("kl", False)], False),
        ("auto", [("consistency", True)], True),
        ("none", [("kl", True)], False),
        ("initial_model", [], True),
    ],
)
def test_uses_reference(reference, regs, expected):
    data = {
        "loss": {"reference": reference},
        "regularizers": [{"name": k, "weight": 1.0, "enabled": e} for k, e in regs],
    }
    assert config_from_dict(data).uses_reference is expected


def test_resolved_config_round_trips_through_toml():
    cfg = load_config()
    text = dumps_toml(config_to_dict(cfg), header="resolved\nconfig")
    assert text.startswith("# resolved\n# config\n")
    again = config_from_dict(tomllib.loads(text))
    assert again == cfg
    # None values are left out, so the written file parses back to None
    assert "lora_rank" not in text and again.model.lora_rank is None


def test_dumps_toml_escapes_strings_and_writes_floats_as_floats():
    text = dumps_toml({"data": {"template": 'Q: "{prompt}"\n', "x": 1.0, "y": 1e-12, "z": [1, 2]}})
    assert tomllib.loads(text) == {
        "data": {"template": 'Q: "{prompt}"\n', "x": 1.0, "y": 1e-12, "z": [1, 2]}
    }
    assert "x = 1.0" in text


def test_overrides_validate_and_ignore_none():
    cfg = TrainConfig().with_overrides(training__steps=5, model__device="cpu", model__backend=None)
    assert cfg.training.steps == 5 and cfg.model.device == "cpu" and cfg.model.backend == "local"
    with pytest.raises(tinkex.ConfigError, match=r"training.steps.*>= 1"):
        TrainConfig().with_overrides(training__steps=0)
    with pytest.raises(tinkex.ConfigError, match="unknown override"):
        TrainConfig().with_overrides(training__nope=1)


# --------------------------------------------------------------------------- data


def test_load_examples_applies_template_and_limit(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"q": "2+2", "a": "4"}) + "\n\n" + json.dumps({"q": "hi", "a": "yo"}) + "\n",
        encoding="utf-8",
    )
    cfg = config_from_dict(
        {
            "data": {
                "path": str(data),
                "prompt_field": "q",
                "response_field": "a",
                "template": "<{prompt}>",
            }
        }
    )
    assert load_examples(cfg) == [("<2+2>", "4"), ("<hi>", "yo")]
    limited = cfg.with_overrides(data__limit=1)
    assert load_examples(limited) == [("<2+2>", "4")]


def test_shipped_examples_load():
    pairs = load_examples(load_config())
    assert len(pairs) == len(shipped_data_path().read_text().splitlines())
    prompt, response = pairs[0]
    assert prompt.startswith("Q: ") and prompt.endswith("\nA: ") and response


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "data file not found"),
        ("not json\n", ":1: not valid JSON"),
        ("[1, 2]\n", ":1: each line must be a JSON object"),
        ('{"prompt": "x"}\n', ":1: field 'response' missing"),
        ("\n\n", "has no examples"),
    ],
)
def test_bad_data_files(tmp_path, content, needle):
    data = tmp_path / "pairs.jsonl"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    cfg = config_from_dict({"data": {"path": str(data)}})
    with pytest.raises(tinkex.ConfigError, match=needle):
        load_examples(cfg)


# --------------------------------------------------------------------------- specs


class Scale:
    """A test regularizer: factor * mean(logprobs)."""

    name = "scale"
    description = "factor times the mean logprob"

    def __init__(self, *, factor: float = 1.0) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor

    def __call__(self, data, logprobs):
        import torch

        return self.factor * torch.cat(list(logprobs)).mean(), {}


def test_build_regularizers_through_the_registry():
    cfg = config_from_dict(
        {
            "regularizers": [
                {"name": "scale", "as": "s1", "weight": 0.5, "factor": 2.0},
                {"name": "scale", "weight": 1, "enabled": False},
            ]
        }
    )
    with tinkex.testing.register_regularizers(Scale):
        s1, s2 = build_regularizers(cfg)
    assert (s1.name, s1.weight, s1.enabled, s1.fn.factor) == ("s1", 0.5, True, 2.0)
    assert (s2.name, s2.weight, s2.enabled, s2.fn.factor) == ("scale", 1.0, False, 1.0)


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        (
            {"name": "nosuch", "weight": 1},
            ["regularizers[0] (nosuch)", "unknown regularizer 'nosuch'", "scale"],
        ),
        (
            {"name": "scale", "weight": 1, "fctor": 2},
            ["regularizers[0] (scale)", "unknown parameter 'fctor'"],
        ),
        (
            {"name": "scale", "weight": 1, "factor": -1.0},
            ["regularizers[0] (scale)", "factor must be > 0"],
        ),
    ],
)
def test_build_regularizers_names_the_entry(entry, needles):
    cfg = config_from_dict({"regularizers": [entry]}, source="my.toml")
    with tinkex.testing.register_regularizers(Scale), pytest.raises(tinkex.ConfigError) as info:
        build_regularizers(cfg)
    message = str(info.value)
    assert message.startswith("my.toml: ")
    for needle in needles:
        assert needle in message, (needle, message)


# --------------------------------------------------------------------------- docs/config.md


def _doc_tables() -> dict[str, dict[str, str]]:
    import re

    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        heading = re.fullmatch(r"## `\[{1,2}(\w+)\]{1,2}`", line.strip())
        if heading:
            section = heading.group(1)
            tables[section] = {}
            continue
        row = re.match(r"\| `([a-z_][a-z0-9_]*)` \| ([^|]*) \|", line)
        if section is not None and row:
            tables[section][row.group(1)] = row.group(2).strip()
    return tables


def test_docs_config_lists_every_key_and_default():
    import attrs

    from tinkex._config import SECTIONS, _toml_value

    tables = _doc_tables()
    assert set(tables) == {*SECTIONS, "regularizers"}
    for name, cls in SECTIONS.items():
        fields = attrs.fields(cls)
        assert list(tables[name]) == [f.name for f in fields], name
        for field in fields:
            default = field.default
            expected = "not set" if default is None else f"`{_toml_value(default)}`"
            assert tables[name][field.name] == expected, (
                name,
                field.name,
                tables[name][field.name],
            )
    assert list(tables["regularizers"]) == ["name", "weight", "as", "enabled"]
    assert tables["regularizers"]["enabled"] == "`true`"
