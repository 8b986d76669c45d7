"""The `tinkex train` config: defaults, validation messages, paths, round trips, data."""

from __future__ import annotations

import datetime
import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinkex
import tinkex.testing
from tinkex._config import (
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    SamplesConfig,
    SchedulerConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
    build_regularizers,
    config_from_dict,
    config_to_dict,
    default_config_path,
    dumps_toml,
    load_config,
    shipped_data_path,
)
from tinkex._dataset import load_eval_examples, load_examples

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
    assert (cfg.model.dtype, cfg.model.gguf_file, cfg.data.format) == ("auto", None, "plain")
    assert cfg.scheduler == SchedulerConfig(warmup_steps=0, decay="constant", min_lr_ratio=0.0)
    assert cfg.eval == EvalConfig(fraction=None, path=None, every=0, batch_size=32)
    assert cfg.eval.enabled is False and cfg.eval_path is None
    assert cfg.samples == SamplesConfig(prompts=None, every=None, max_new_tokens=48)
    assert cfg.backend_kwargs() == {}
    assert [cfg.learning_rate(s) for s in (1, 50, 100)] == [1e-4, 1e-4, 1e-4]


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
        ("[optimizer]\nlearning_rate = -1\n", ["optimizer.learning_rate", ">= 0"]),
        ("[optimizer]\nlearning_rate = nan\n", ["optimizer.learning_rate", "finite"]),
        ("[optimizer]\nbeta1 = 1.0\n", ["optimizer.beta1", ">= 0 and < 1", "got 1.0"]),
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
        ("regularizers = 3\n", ["regularizers must be an array of tables", "got 3 (int)"]),
        ("regularizers = [1]\n", ["regularizers[0] must be a table", "got 1 (int)"]),
        ("[optimizer]\nlearning_rate = -0.5\n", ["optimizer.learning_rate must be >= 0, got -0.5"]),
        ("[optimizer]\nlearning_rate = true\n", ["optimizer.learning_rate", "got True (bool)"]),
        ("[optimizer]\neps = 0.0\n", ["optimizer.eps must be > 0, got 0.0"]),
        ("[optimizer]\nbeta2 = -0.1\n", ["optimizer.beta2 must be >= 0 and < 1, got -0.1"]),
        ("[training]\ntimeout = inf\n", ["training.timeout", "finite", "got inf"]),
        (
            "[model]\nseed = 1.5\n",
            ["model.seed must be an integer >= 0 and <= 9223372036854775807, got 1.5 (float)"],
        ),
        ("[data]\nlimit = false\n", ["data.limit", "got False (bool)"]),
        ("[loss]\nreference_keys = 'abc'\n", ["loss.reference_keys", "list", "got 'abc' (str)"]),
        ("[[regularizers]]\nname = 3\nweight = 1\n", ["regularizers[0]: 'name'", "got 3 (int)"]),
        ("[[regularizers]]\nname = 'kl'\nweight = nan\n", ["regularizers[0] (kl): 'weight'"]),
        ("[[regularizers]]\nname = 'kl'\nas = ''\nweight = 1\n", ["regularizers[0] (kl): 'as'"]),
        ("[training\n", ["invalid TOML"]),
        ("[model]\ndtype = 'fp8'\n", ["model.dtype must be one of 'auto', 'float32'", "'fp8'"]),
        ("[model]\ngguf_file = ''\n", ["model.gguf_file must be a non-empty string"]),
        ("[data]\nformat = 'chatml'\n", ["data.format must be one of 'plain', 'chat'"]),
        (
            "[eval]\nfraction = 0.2\npath = 'dev.jsonl'\n",
            ["eval.fraction (0.2) and eval.path ('dev.jsonl') are both set; set one of them"],
        ),
        ("[eval]\nfraction = 0\n", ["eval.fraction must be > 0 and < 1, got 0.0"]),
        ("[eval]\nfraction = 1\n", ["eval.fraction must be > 0 and < 1, got 1.0"]),
        ("[eval]\nfraction = '10%'\n", ["eval.fraction must be a finite real number > 0"]),
        ("[eval]\nevery = -1\n", ["eval.every must be >= 0, got -1"]),
        ("[eval]\nbatch_size = 0\n", ["eval.batch_size must be >= 1, got 0"]),
        ("[eval]\nevry = 2\n", ["unknown key 'eval.evry'", "did you mean 'every'"]),
        ("[samples]\nprompts = 'hi'\n", ["samples.prompts must be a list of non-empty strings"]),
        ("[samples]\nprompts = ['']\n", ["samples.prompts must be a list of non-empty strings"]),
        ("[samples]\nevery = 1.5\n", ["samples.every must be an integer >= 0, got 1.5 (float)"]),
        ("[samples]\nmax_new_tokens = 0\n", ["samples.max_new_tokens must be >= 1, got 0"]),
        ("[scheduler]\nwarmup_steps = -1\n", ["scheduler.warmup_steps must be >= 0, got -1"]),
        (
            "[scheduler]\ndecay = 'exponential'\n",
            ["scheduler.decay must be one of 'constant', 'linear', 'cosine', got 'exponential'"],
        ),
        ("[scheduler]\nmin_lr_ratio = 1.5\n", ["scheduler.min_lr_ratio must be >= 0 and <= 1"]),
        (
            "[sheduler]\ndecay = 'linear'\n",
            ["unknown section [sheduler]", "did you mean 'scheduler'"],
        ),
        ("[logging]\nto = 'csv'\n", ["logging.to must be a list of distinct non-empty strings"]),
        (
            "[logging]\nto = ['csv', 'csv']\n",
            ["logging.to must be a list of distinct non-empty strings, got ('csv', 'csv')"],
        ),
        ("[logging]\nwandb_mode = 'cloud'\n", ["logging.wandb_mode must be one of 'offline'"]),
        ("[logging]\nmlflow_uri = ''\n", ["logging.mlflow_uri must be a non-empty string"]),
        ("[loging]\nto = []\n", ["unknown section [loging]", "did you mean 'logging'"]),
        (
            "[logging]\nwandb_projet = 'x'\n",
            ["logging.wandb_projet", "did you mean 'wandb_project'"],
        ),
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


# --------------------------------------------------------------------------- rules


def test_messages_name_the_key_the_requirement_and_the_value(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 'ten'\n")
    with pytest.raises(tinkex.ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: training.steps must be an integer >= 1, got 'ten' (str)"
    with pytest.raises(tinkex.ConfigError) as info:
        config_from_dict({"training": {"steps": 0}}, source="run.toml")
    assert str(info.value) == "run.toml: training.steps must be >= 1, got 0"
    with pytest.raises(tinkex.ConfigError) as info:
        config_from_dict({"regularizers": [{"name": "kl", "weight": -0.5}]}, source="run.toml")
    assert str(info.value) == "run.toml: regularizers[0] (kl): 'weight' must be >= 0, got -0.5"


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "minus_huge"])
def test_numbers_that_overflow_a_float_are_errors_not_crashes(value):
    with pytest.raises(tinkex.ConfigError, match="optimizer.weight_decay must be a finite real"):
        config_from_dict({"optimizer": {"weight_decay": value}})
    with pytest.raises(tinkex.ConfigError, match="training.timeout must be a finite real"):
        config_from_dict({"training": {"timeout": value}})
    with pytest.raises(tinkex.ConfigError, match=r"regularizers\[0\] \(l2\): 'weight'"):
        config_from_dict({"regularizers": [{"name": "l2", "weight": value}]})
    with pytest.raises(tinkex.SpecError, match="AdamParams.learning_rate must be a finite real"):
        tinkex.AdamParams(learning_rate=value)


def test_optimizer_section_is_adam_params():
    assert OptimizerConfig is tinkex.AdamParams
    cfg = config_from_dict({"optimizer": {"learning_rate": 1, "beta1": 0}})
    assert isinstance(cfg.optimizer, tinkex.AdamParams)
    assert cfg.optimizer.learning_rate == 1.0 and type(cfg.optimizer.learning_rate) is float
    assert type(cfg.optimizer.beta1) is float


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", -1, "AdamParams.learning_rate must be >= 0, got -1.0"),
        ("learning_rate", -0.0001, "AdamParams.learning_rate must be >= 0, got -0.0001"),
        ("eps", 0.0, "AdamParams.eps must be > 0, got 0.0"),
        ("beta1", 1, "AdamParams.beta1 must be >= 0 and < 1, got 1.0"),
        ("weight_decay", -1e-3, "AdamParams.weight_decay must be >= 0, got -0.001"),
        (
            "grad_clip_norm",
            True,
            "AdamParams.grad_clip_norm must be a finite real number >= 0, got True (bool)",
        ),
        (
            "learning_rate",
            "1e-3",
            "AdamParams.learning_rate must be a finite real number >= 0, got '1e-3' (str)",
        ),
    ],
)
def test_adam_params_and_the_optimizer_section_share_one_rule(field, value, message):
    with pytest.raises(tinkex.SpecError) as info:
        tinkex.AdamParams(**{field: value})
    assert str(info.value) == message
    with pytest.raises(tinkex.ConfigError) as info:
        config_from_dict({"optimizer": {field: value}}, source="c.toml")
    assert str(info.value) == "c.toml: " + message.replace("AdamParams.", "optimizer.")


def test_a_learning_rate_of_zero_is_a_step_that_moves_no_weight():
    # the last step of a schedule decaying to min_lr_ratio = 0 has learning rate 0.0
    assert tinkex.AdamParams(learning_rate=0).learning_rate == 0.0
    assert config_from_dict({"optimizer": {"learning_rate": 0}}).optimizer.learning_rate == 0.0


def test_sections_validate_when_built_in_python_too():
    with pytest.raises(tinkex.SpecError, match=r"^TrainingConfig.steps must be >= 1, got 0$"):
        TrainingConfig(steps=0)
    with pytest.raises(tinkex.SpecError, match=r"^ModelConfig.device must be a non-empty string"):
        ModelConfig(device=" ")
    with pytest.raises(tinkex.SpecError, match=r"RegularizerConfig.enabled must be true or false"):
        RegularizerConfig(kind="l2", weight=1, enabled="yes")
    with pytest.raises(
        tinkex.SpecError, match=r"RegularizerConfig.params must be .*'center' is not"
    ):
        RegularizerConfig(kind="l2", weight=1, params={"center": None})  # TOML has no None
    with pytest.raises(tinkex.SpecError, match=r"keyed by strings other than name, weight"):
        RegularizerConfig(kind="l2", weight=1, params={"weight": 2})
    with pytest.raises(tinkex.SpecError, match=r"eval.fraction \(0.5\) and eval.path"):
        EvalConfig(fraction=0.5, path="dev.jsonl")
    with pytest.raises(tinkex.SpecError, match=r"^SchedulerConfig.decay must be one of"):
        SchedulerConfig(decay="step")
    entry = RegularizerConfig(kind="l2", weight=1)
    with pytest.raises(tinkex.ConfigError, match=r"'l2' is already used by regularizers\[0\]"):
        TrainConfig(regularizers=[entry, entry])
    assert DataConfig(max_length=2).max_length == 2


def test_a_section_that_is_not_a_table():
    with pytest.raises(
        tinkex.ConfigError, match=r"^\[training\] must be a table, got 'abc' \(str\)$"
    ):
        config_from_dict({"training": "abc"})
    with pytest.raises(tinkex.ConfigError, match=r"regularizers must be an array of tables"):
        config_from_dict({"regularizers": "abc"})


# --------------------------------------------------------------------------- paths, round trip


def test_relative_data_path_resolves_against_the_config_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "[data]\npath = '../data/pairs.jsonl'\n")
    cfg = load_config(path)
    assert cfg.data.path == str((tmp_path / "data" / "pairs.jsonl").resolve())
    absolute = write(tmp_path, f"[data]\npath = '{tmp_path / 'abs.jsonl'}'\n", "abs.toml")
    assert load_config(absolute).data.path == str(tmp_path / "abs.jsonl")


def test_eval_path_gguf_file_and_a_gguf_base_model_resolve_against_the_config_directory(
    tmp_path,
):
    (tmp_path / "sub").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "sub" / "w.gguf").write_bytes(b"GGUF")
    path = write(
        tmp_path / "sub",
        "[model]\nbase_model = '../models/m.gguf'\n[eval]\npath = 'dev.jsonl'\n",
    )
    cfg = load_config(path)
    assert cfg.eval.path == str(tmp_path / "sub" / "dev.jsonl")  # always, like data.path
    assert cfg.eval_path == tmp_path / "sub" / "dev.jsonl"
    assert cfg.model.base_model == str(tmp_path / "models" / "m.gguf")
    # a bare .gguf name next to the config resolves; a file name that is not there
    # (a name inside the base_model directory) stays as written
    local = write(tmp_path / "sub", "[model]\nbase_model = 'w.gguf'\n", "b.toml")
    assert load_config(local).model.base_model == str(tmp_path / "sub" / "w.gguf")
    named = write(
        tmp_path / "sub",
        "[model]\nbase_model = '../models'\ngguf_file = 'm.gguf'\n",
        "c.toml",
    )
    got = load_config(named).model
    assert (got.base_model, got.gguf_file) == (str(tmp_path / "models"), "m.gguf")
    beside = write(tmp_path / "sub", "[model]\ngguf_file = 'w.gguf'\n", "d.toml")
    assert load_config(beside).model.gguf_file == str(tmp_path / "sub" / "w.gguf")
    # a known name or a hub id is never taken for a path
    hub = write(tmp_path / "sub", "[model]\nbase_model = 'smollm2-135m-instruct'\n", "e.toml")
    assert load_config(hub).model.base_model == "smollm2-135m-instruct"


def test_dtype_and_gguf_file_reach_only_the_local_backend(tmp_path):
    cfg = config_from_dict({"model": {"dtype": "bfloat16", "gguf_file": "m.gguf"}})
    assert cfg.backend_kwargs() == {"dtype": "bfloat16", "gguf_file": "m.gguf"}
    assert config_from_dict({"model": {"dtype": "float16"}}).backend_kwargs() == {
        "dtype": "float16"
    }
    remote = config_from_dict(
        {"model": {"backend": "tinker", "dtype": "bfloat16"}}, source="run.toml"
    )
    with pytest.raises(tinkex.ConfigError) as info:
        remote.backend_kwargs()
    assert str(info.value) == (
        "run.toml: model.dtype = 'bfloat16' applies to the local backend only, and "
        "model.backend is 'tinker'; remove model.dtype"
    )
    assert config_from_dict({"model": {"backend": "tinker"}}).backend_kwargs() == {}


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


def test_non_ascii_keys_and_del_characters_round_trip_through_a_file(tmp_path):
    cfg = config_from_dict(
        {
            "data": {"template": 'Q\x7f: {prompt}\n\t"A": ', "prompt_field": "frage\x7f"},
            "regularizers": [
                {"name": "l2", "as": "größe", "weight": 1, "stärke": "a\x7fb", "ключ": 1.5},
                {"name": "kl", "weight": 0.5, "": "empty key", "a b": [1, 2]},
            ],
        }
    )
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(config_to_dict(cfg), header="résumé\nnext"), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    assert again.regularizers[0].params == {"stärke": "a\x7fb", "ключ": 1.5}
    assert again.data.prompt_field == "frage\x7f"


def test_dumps_toml_writes_regularizers_as_array_of_tables_after_the_sections():
    cfg = config_from_dict({"regularizers": [{"name": "l2", "weight": 1, "sub": {"a": 1}}]})
    text = dumps_toml(config_to_dict(cfg))
    assert tomllib.loads(text)["regularizers"] == [
        {"name": "l2", "weight": 1.0, "enabled": True, "sub": {"a": 1}}
    ]
    plain = dumps_toml(
        config_to_dict(config_from_dict({"regularizers": [{"name": "l2", "weight": 1}]}))
    )
    assert plain.index("[training]") < plain.index('[[regularizers]]\nname = "l2"')
    empty = dumps_toml(config_to_dict(TrainConfig()))
    assert tomllib.loads(empty)["regularizers"] == []  # before the first [section]
    with pytest.raises(tinkex.ConfigError, match="cannot write"):
        dumps_toml({"a": {"b": None}})


_TEXT = st.text(min_size=1).filter(lambda t: t.strip() != "")
_INT = st.integers(-(2**63), 2**63 - 1)
_FINITE = {"allow_nan": False, "allow_infinity": False}


def _positive():
    return st.one_of(st.floats(min_value=0, exclude_min=True, **_FINITE), st.integers(1, 2**53))


def _non_negative():
    return st.one_of(st.floats(min_value=0, **_FINITE), st.integers(0, 2**53))


def _unit():
    return st.one_of(st.floats(min_value=0, max_value=1, exclude_max=True), st.just(0))


_TOML_SCALAR = st.one_of(
    st.text(),
    _INT,
    st.floats(allow_nan=False),  # +/-inf are TOML floats; NaN is never equal to itself
    st.booleans(),
    st.dates(),
    st.times(),
    st.datetimes(),
    st.datetimes(timezones=st.just(datetime.UTC)),
)


def _section(**strategies):
    return st.fixed_dictionaries({}, optional=strategies)


_SCHEDULE = st.fixed_dictionaries(
    {
        "schedule": st.sampled_from(["constant", "linear", "cosine", "step"]),
        "start": st.floats(**_FINITE),
        "end": st.floats(**_FINITE),
        "steps": st.integers(1, 2**31),
    }
)

_ENTRY = st.fixed_dictionaries(
    {"name": _TEXT, "weight": st.one_of(_non_negative(), _SCHEDULE)},
    optional={"as": _TEXT, "enabled": st.booleans()},
).flatmap(
    lambda entry: st.dictionaries(
        st.text().filter(lambda k: k not in ("name", "weight", "as", "enabled")),
        _TOML_SCALAR,
        max_size=4,
    ).map(lambda params: {**params, **entry})
)

_CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "model": _section(
            backend=_TEXT,
            base_model=_TEXT,
            device=_TEXT,
            lora_rank=st.integers(1, 2**63 - 1),
            seed=st.integers(0, 2**63 - 1),
            dtype=st.sampled_from(["auto", "float32", "bfloat16", "float16"]),
            gguf_file=_TEXT,
        ),
        "data": _section(
            path=_TEXT,
            prompt_field=_TEXT,
            response_field=_TEXT,
            template=st.tuples(st.text(), st.text()).map(
                lambda t: (
                    t[0].replace("{", "{{").replace("}", "}}")
                    + "{prompt}"
                    + t[1].replace("{", "{{").replace("}", "}}")
                )
            ),
            max_length=st.integers(2, 2**63 - 1),
            limit=st.integers(1, 2**63 - 1),
            format=st.sampled_from(["plain", "chat"]),
        ),
        "loss": _section(
            base=st.just("cross_entropy"),
            normalize=st.sampled_from(["tokens", "sum"]),
            reference=st.sampled_from(["auto", "initial_model", "none"]),
            reference_keys=st.lists(_TEXT, max_size=3),
        ),
        "optimizer": _section(
            learning_rate=_positive(),
            beta1=_unit(),
            beta2=_unit(),
            eps=_positive(),
            weight_decay=_non_negative(),
            grad_clip_norm=_non_negative(),
        ),
        "training": _section(
            steps=st.integers(1, 2**63 - 1),
            batch_size=st.integers(1, 2**63 - 1),
            seed=st.integers(0, 2**63 - 1),
            track_grad_norms=st.booleans(),
            mode=st.sampled_from(["auto", "fused", "linearized"]),
            parallel=st.booleans(),
            timeout=_positive(),
            log_every=st.integers(1, 2**63 - 1),
            checkpoint_every=st.integers(0, 2**63 - 1),
        ),
        "scheduler": _section(
            warmup_steps=st.integers(0, 2**63 - 1),
            decay=st.sampled_from(["constant", "linear", "cosine"]),
            min_lr_ratio=st.one_of(st.floats(0, 1), st.just(0), st.just(1)),
        ),
        "eval": st.one_of(
            _section(fraction=st.floats(0, 1, exclude_min=True, exclude_max=True)),
            _section(path=_TEXT),
        ).flatmap(
            lambda first: _section(
                every=st.integers(0, 2**63 - 1), batch_size=st.integers(1, 2**63 - 1)
            ).map(lambda rest: {**first, **rest})
        ),
        "samples": _section(
            prompts=st.lists(_TEXT, max_size=3),
            every=st.integers(0, 2**63 - 1),
            max_new_tokens=st.integers(1, 2**63 - 1),
        ),
        "logging": _section(
            to=st.lists(_TEXT, max_size=4, unique=True),
            mlflow_uri=_TEXT,
            mlflow_experiment=_TEXT,
            wandb_project=_TEXT,
            wandb_mode=st.sampled_from(["offline", "online"]),
        ),
        "regularizers": st.lists(
            _ENTRY, max_size=4, unique_by=lambda e: e.get("as", e["name"])
        ).filter(lambda regs: all(e.get("as", e["name"]) != "base_loss" for e in regs)),
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(_CONFIG)
def test_every_accepted_config_round_trips_through_toml(data):
    cfg = config_from_dict(data)
    text = dumps_toml(config_to_dict(cfg), header="a header")
    assert config_from_dict(tomllib.loads(text)) == cfg


def test_new_sections_round_trip_and_their_defaults_are_written():
    cfg = config_from_dict(
        {
            "model": {"dtype": "bfloat16", "gguf_file": "m.gguf"},
            "data": {"format": "chat"},
            "scheduler": {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1},
            "eval": {"fraction": 0.25, "every": 5},
            "samples": {"prompts": ["What is 2+2?", "Reverse abc"], "max_new_tokens": 8},
        }
    )
    text = dumps_toml(config_to_dict(cfg))
    written = tomllib.loads(text)
    assert written["scheduler"] == {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1}
    assert written["eval"] == {"fraction": 0.25, "every": 5, "batch_size": 32}
    assert written["samples"] == {
        "prompts": ["What is 2+2?", "Reverse abc"],
        "max_new_tokens": 8,
    }
    assert written["model"]["dtype"] == "bfloat16" and written["data"]["format"] == "chat"
    assert config_from_dict(written) == cfg
    # every section is written, in the documented order; unset keys are left out
    plain = tomllib.loads(dumps_toml(config_to_dict(TrainConfig())))
    assert list(plain) == [
        "regularizers",
        "model",
        "data",
        "loss",
        "optimizer",
        "scheduler",
        "training",
        "eval",
        "samples",
        "logging",
    ]
    assert plain["eval"] == {"every": 0, "batch_size": 32}
    assert plain["samples"] == {"max_new_tokens": 48}
    assert plain["logging"] == {
        "to": [],
        "mlflow_experiment": "tinkex",
        "wandb_project": "tinkex",
        "wandb_mode": "offline",
    }
    # no samples at all: an empty list, kept as such
    off = config_from_dict({"samples": {"prompts": []}})
    assert off.samples.prompts == () and config_from_dict(config_to_dict(off)) == off


def test_learning_rate_of_a_config_follows_the_scheduler():
    cfg = config_from_dict(
        {
            "optimizer": {"learning_rate": 1e-3},
            "training": {"steps": 10},
            "scheduler": {"warmup_steps": 2, "decay": "linear", "min_lr_ratio": 0.1},
        }
    )
    assert cfg.learning_rate(1) == 5e-4
    assert cfg.learning_rate(2) == 1e-3
    assert cfg.learning_rate(6) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 0.5)
    assert cfg.learning_rate(10) == pytest.approx(1e-4)


def test_overrides_validate_and_ignore_none():
    cfg = TrainConfig().with_overrides(training__steps=5, model__device="cpu", model__backend=None)
    assert cfg.training.steps == 5 and cfg.model.device == "cpu" and cfg.model.backend == "local"
    with pytest.raises(tinkex.ConfigError, match=r"training.steps.*>= 1"):
        TrainConfig().with_overrides(training__steps=0)
    with pytest.raises(tinkex.ConfigError, match=r"unknown key 'training.nope'"):
        TrainConfig().with_overrides(training__nope=1)


# --------------------------------------------------------------------------- --set


SHIPPED_TERMS = ("entropy", "kl_ref", "l2")


def test_set_reaches_section_keys_with_toml_values(tmp_path):
    cfg = apply_overrides(
        load_config(),
        [
            "training.steps=3",
            "model.device=cpu",
            "optimizer.learning_rate=1e-3",
            "training.parallel=false",
            "loss.reference_keys=['a', 'b']",
            'data.template="<{prompt}>\\n"',
            "model.lora_rank = 4",
        ],
        base_dir=tmp_path,
    )
    assert cfg.training.steps == 3 and cfg.model.device == "cpu"
    assert cfg.optimizer.learning_rate == 1e-3 and cfg.training.parallel is False
    assert cfg.loss.reference_keys == ("a", "b") and cfg.data.template == "<{prompt}>\n"
    assert cfg.model.lora_rank == 4
    assert cfg.source == load_config().source


def test_set_reaches_regularizers_by_term_name(tmp_path):
    base = load_config()
    assert tuple(r.term_name for r in base.regularizers) == SHIPPED_TERMS
    cfg = apply_overrides(
        base,
        [
            "regularizers.kl_ref.weight=0.5",
            "regularizers.entropy.enabled=false",
            "regularizers.l2.reduction=sum",
            "regularizers.kl.estimator=k1",  # the kind alone: one entry is a kl
        ],
        base_dir=tmp_path,
    )
    entropy, kl, l2 = cfg.regularizers
    assert (kl.term_name, kl.weight, kl.params["estimator"]) == ("kl_ref", 0.5, "k1")
    assert entropy.enabled is False and entropy.weight == base.regularizers[0].weight
    assert l2.params == {"reduction": "sum"}
    assert (
        apply_overrides(cfg, ["regularizers.kl_ref.as=kl2"], base_dir=tmp_path)
        .regularizers[1]
        .term_name
        == "kl2"
    )
    build_regularizers(cfg)  # still buildable


@pytest.mark.parametrize(
    ("item", "needles"),
    [
        ("training.steps", ["SECTION.KEY=VALUE", "'training.steps'"]),
        (
            "training.stpes=3",
            [
                "unknown key 'training.stpes'",
                "did you mean 'training.steps'?",
                "Can be overridden",
                "training.{steps, batch_size",
            ],
        ),
        ("nosuch.key=3", ["unknown key 'nosuch.key'.", "regularizers.<term>.<key>", "kl_ref"]),
        ("regularizers.kl_rf.weight=1", ["did you mean 'regularizers.kl_ref.weight'?"]),
        (
            "regularizers.kl_ref.wieght=1",
            ["did you mean 'regularizers.kl_ref.weight'?", "estimator"],
        ),
        (
            "regularizers.l2.reductoin=sum",
            ["did you mean 'regularizers.l2.reduction'?", "reduction, target"],
        ),
        ("training.steps=ten", ["--set: training.steps must be an integer >= 1, got 'ten' (str)"]),
        ("training.steps=0", ["--set: training.steps must be >= 1, got 0"]),
        ("optimizer.eps=0", ["--set: optimizer.eps must be > 0, got 0.0"]),
        ("regularizers.kl_ref.weight=-1", ["regularizers.kl_ref.weight must be >= 0, got -1.0"]),
        (
            "regularizers.kl_ref.enabled=1",
            ["regularizers.kl_ref.enabled must be true or false, got 1 (int)"],
        ),
        ("regularizers.kl_ref.as=entropy", ["'entropy' is already used by regularizers[0]"]),
        ("eval.fraction=1.5", ["--set: eval.fraction must be > 0 and < 1, got 1.5"]),
        ("scheduler.decay=step", ["--set: scheduler.decay must be one of 'constant'"]),
        ("scheduler.warmup_steps=-2", ["--set: scheduler.warmup_steps must be >= 0, got -2"]),
        ("samples.prompts=hi", ["--set: samples.prompts must be a list of non-empty strings"]),
        ("model.dtype=half", ["--set: model.dtype must be one of"]),
        ("data.format=chatml", ["--set: data.format must be one of 'plain', 'chat'"]),
        ("scheduler.warmup=2", ["did you mean 'scheduler.warmup_steps'?", "scheduler.{"]),
    ],
)
def test_set_errors_say_what_can_be_overridden(tmp_path, item, needles):
    with pytest.raises(tinkex.ConfigError) as info:
        apply_overrides(load_config(), [item], base_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_set_by_a_kind_two_entries_share_asks_for_the_term_name(tmp_path):
    cfg = config_from_dict(
        {
            "regularizers": [
                {"name": "kl", "as": "kl_a", "weight": 1},
                {"name": "kl", "as": "kl_b", "weight": 1},
            ]
        }
    )
    with pytest.raises(tinkex.ConfigError, match=r"2 entries are 'kl' regularizers \(kl_a, kl_b\)"):
        apply_overrides(cfg, ["regularizers.kl.weight=2"], base_dir=tmp_path)
    assert (
        apply_overrides(cfg, ["regularizers.kl_b.weight=2"], base_dir=tmp_path)
        .regularizers[1]
        .weight
        == 2.0
    )


def test_set_paths_resolve_against_base_dir_and_survive_a_resume(tmp_path, monkeypatch):
    (tmp_path / "work" / "data").mkdir(parents=True)
    (tmp_path / "work" / "model").mkdir()
    cfg = apply_overrides(
        TrainConfig(),
        ["data.path=data/pairs.jsonl", "model.base_model=./model"],
        base_dir=tmp_path / "work",
    )
    assert cfg.data.path == str((tmp_path / "work" / "data" / "pairs.jsonl").resolve())
    assert cfg.model.base_model == str((tmp_path / "work" / "model").resolve())
    kept = apply_overrides(
        cfg, ["model.base_model=tiny", f"data.path={tmp_path / 'abs.jsonl'}"], base_dir=tmp_path
    )
    assert kept.model.base_model == "tiny" and kept.data.path == str(tmp_path / "abs.jsonl")
    # the resolved config, read back from another directory, finds the same files
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(dumps_toml(config_to_dict(cfg)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    again = load_config(run / "config.toml")
    assert again == cfg and again.data_path == cfg.data_path


def test_set_reaches_the_new_sections(tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        [
            "eval.fraction=0.2",
            "eval.every=5",
            "samples.prompts=['a', 'b']",
            "samples.every=0",
            "samples.max_new_tokens=8",
            "scheduler.decay=cosine",
            "scheduler.warmup_steps=10",
            "scheduler.min_lr_ratio=0.1",
            "model.dtype=bfloat16",
            "data.format=chat",
        ],
        base_dir=tmp_path,
    )
    assert cfg.eval == EvalConfig(fraction=0.2, every=5)
    assert cfg.samples == SamplesConfig(prompts=("a", "b"), every=0, max_new_tokens=8)
    assert cfg.scheduler == SchedulerConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert (cfg.model.dtype, cfg.data.format) == ("bfloat16", "chat")
    with pytest.raises(tinkex.ConfigError) as info:
        apply_overrides(cfg, ["eval.path=dev.jsonl"], base_dir=tmp_path)
    assert str(info.value) == (
        f"--set: eval.path: eval.fraction (0.2) and eval.path ('{tmp_path / 'dev.jsonl'}') are "
        f"both set; set one of them: fraction holds part of the training data out, path reads "
        f"a separate file"
    )
    held = apply_overrides(TrainConfig(), ["eval.path=dev/held.jsonl"], base_dir=tmp_path)
    assert held.eval.path == str(tmp_path / "dev" / "held.jsonl")


def test_set_values_that_are_not_toml_are_strings(tmp_path):
    cfg = apply_overrides(
        TrainConfig(), ["model.device=cuda:1", "model.backend=my-backend"], base_dir=tmp_path
    )
    assert (cfg.model.device, cfg.model.backend) == ("cuda:1", "my-backend")


# --------------------------------------------------------------------------- data


def test_load_examples_keeps_prompts_as_written_and_applies_the_limit(tmp_path):
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
    # the template is applied when the prompts are tokenized (tinkex._dataset.Renderer)
    assert load_examples(cfg) == [("2+2", "4"), ("hi", "yo")]
    limited = cfg.with_overrides(data__limit=1)
    assert load_examples(limited) == [("2+2", "4")]
    assert load_eval_examples(cfg) is None
    held = cfg.with_overrides(eval__path=str(data), data__limit=1)
    assert load_eval_examples(held) == [("2+2", "4"), ("hi", "yo")]  # no limit on eval
    missing = cfg.with_overrides(eval__path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(tinkex.ConfigError, match=r"^eval.path: data file not found: .*nope"):
        load_eval_examples(missing)


def test_shipped_examples_load():
    pairs = load_examples(load_config())
    assert len(pairs) == len(shipped_data_path().read_text().splitlines())
    prompt, response = pairs[0]
    assert prompt and not prompt.startswith("Q: ") and response


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


def _doc_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """section -> key -> (default, valid values), from the tables of docs/config.md."""
    import re

    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    section = None
    for line in text.splitlines():
        heading = re.fullmatch(r"## `\[{1,2}(\w+)\]{1,2}`", line.strip())
        if heading:
            section = heading.group(1)
            tables[section] = {}
            continue
        row = re.match(r"\| `([a-z_][a-z0-9_]*)` \| ([^|]*) \| ([^|]*) \|", line)
        if section is not None and row:
            tables[section][row.group(1)] = (row.group(2).strip(), row.group(3).strip())
    return tables


def test_docs_config_lists_every_key_and_default():
    import attrs

    from tinkex._config import SECTIONS

    tables = _doc_tables()
    assert set(tables) == {*SECTIONS, "regularizers"}
    for name, cls in SECTIONS.items():
        fields = attrs.fields(cls)
        assert list(tables[name]) == [f.name for f in fields], name
        for field in fields:
            default, valid = tables[name][field.name]
            if field.default is None:
                assert default == "not set", (name, field.name, default)
            else:
                assert default.startswith("`") and default.endswith("`"), (name, field.name)
                written = tomllib.loads(f"v = {default[1:-1]}")["v"]
                expected = field.default
                if isinstance(expected, tuple):
                    assert written == list(expected), (name, field.name)
                else:  # same value and type: `30.0`, not `30`, for a float
                    assert written == expected and type(written) is type(expected), field.name
            # the valid values are the validator's own words (what an error message says)
            assert valid == field.validator.requirement, (name, field.name, valid)
    regs = tables["regularizers"]
    assert list(regs) == ["name", "weight", "as", "enabled"]
    assert regs["enabled"][0] == "`true`"
    fields = attrs.fields_dict(RegularizerConfig)
    for key, attribute in {
        "name": "kind",
        "weight": "weight",
        "as": "alias",
        "enabled": "enabled",
    }.items():
        assert regs[key][1] == fields[attribute].validator.requirement, key


def test_docs_config_documents_overrides_and_paths():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert "--set regularizers.<term>.<key>=value" in text
    assert "--set regularizers.kl_ref.weight=0.5" in text
    assert "resolve against the current directory" in text


@pytest.mark.parametrize(
    ("template", "found"),
    [
        ("{prompt:1000000000000}", "{prompt:1000000000000}"),
        ("{prompt} {other}", "{other}"),
        ("{prompt!r}", "{prompt!r}"),
    ],
)
def test_a_template_with_another_field_or_a_format_spec_is_refused_cheaply(template, found):
    with pytest.raises(tinkex.ConfigError, match="whose only field is {prompt}") as info:
        config_from_dict({"data": {"template": template}})
    assert found in str(info.value)


# --------------------------------------------------------------------------- [logging]


def test_logging_section_defaults_and_overrides(tmp_path):
    from tinkex._config import LoggingConfig

    cfg = config_from_dict({})
    assert cfg.logging == LoggingConfig(
        to=(), mlflow_uri=None, mlflow_experiment="tinkex", wandb_project="tinkex"
    )
    assert cfg.logging.wandb_mode == "offline"
    path = write(
        tmp_path, "[logging]\nto = ['csv', 'tensorboard']\nmlflow_uri = 'sqlite:///x.db'\n"
    )
    cfg = load_config(path)
    assert cfg.logging.to == ("csv", "tensorboard") and cfg.logging.mlflow_uri == "sqlite:///x.db"
    again = apply_overrides(
        cfg, ['logging.to=["mlflow"]', "logging.wandb_mode=online"], base_dir=tmp_path
    )
    assert again.logging.to == ("mlflow",) and again.logging.wandb_mode == "online"
    assert config_from_dict(tomllib.loads(dumps_toml(config_to_dict(again)))) == again
    assert cfg.with_overrides(logging__to=()).logging.to == ()


# --------------------------------------------------------------------------- weight schedules

LINEAR = '{ schedule = "linear", start = 0.0, end = 0.1, steps = 200 }'


def test_a_weight_may_be_a_schedule_table(tmp_path):
    import tinkex.schedules

    path = write(
        tmp_path,
        f"[[regularizers]]\nname = 'kl'\nas = 'kl_ref'\nweight = {LINEAR}\n"
        "[[regularizers]]\nname = 'l2'\nweight = { schedule = 'constant', start = 0.5 }\n"
        "[[regularizers]]\nname = 'entropy'\nweight = 0.05\n",
    )
    cfg = load_config(path)
    kl, l2, entropy = (r.weight for r in cfg.regularizers)
    assert kl == tinkex.schedules.linear(0.0, 0.1, 200)
    assert [kl(s) for s in (1, 101, 201, 500)] == [0.0, 0.05, 0.1, 0.1]
    assert l2 == tinkex.schedules.constant(0.5) and l2(7) == 0.5
    assert entropy == 0.05 and isinstance(entropy, float)
    # the specs carry the schedule; the weight at a step is the schedule's value there
    kl_spec, l2_spec, entropy_spec = build_regularizers(cfg)
    assert kl_spec.weight == kl and kl_spec.is_scheduled and kl_spec.weight_at(101) == 0.05
    assert l2_spec.weight_at(3) == 0.5
    assert entropy_spec.weight == 0.05 and not entropy_spec.is_scheduled


def test_a_schedule_weight_round_trips_through_toml(tmp_path):
    cfg = config_from_dict(
        {
            "regularizers": [
                {
                    "name": "kl",
                    "as": "kl_ref",
                    "weight": {"schedule": "cosine", "start": 0.2, "end": 0.0, "steps": 50},
                },
                {"name": "l2", "weight": 1, "sub": {"a": 1}},
            ]
        }
    )
    written = config_to_dict(cfg)
    assert written["regularizers"][0]["weight"] == {
        "schedule": "cosine",
        "start": 0.2,
        "end": 0.0,
        "steps": 50,
    }
    text = dumps_toml(written)
    # one line, an inline table: the entry reads as the user would write it
    assert 'weight = { schedule = "cosine", start = 0.2, end = 0.0, steps = 50 }\n' in text
    assert "sub = { a = 1 }\n" in text and "[regularizers." not in text
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == cfg
    assert config_from_dict(tomllib.loads(text)) == cfg


def test_set_reaches_a_schedule_weight(tmp_path):
    import tinkex.schedules

    cfg = load_config(
        write(tmp_path, "[[regularizers]]\nname = 'kl'\nas = 'kl_ref'\nweight = 0.2\n")
    )
    scheduled = apply_overrides(
        cfg,
        ['regularizers.kl_ref.weight={schedule="linear", start=0.0, end=0.1, steps=200}'],
        base_dir=tmp_path,
    )
    assert scheduled.regularizers[0].weight == tinkex.schedules.linear(0.0, 0.1, 200)
    back = apply_overrides(scheduled, ["regularizers.kl_ref.weight=0.3"], base_dir=tmp_path)
    assert back.regularizers[0].weight == 0.3


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (
            "{ schedule = 'linaer', start = 0.0, end = 0.1, steps = 200 }",
            "run.toml: regularizers[0] (kl): weight.schedule must be one of 'constant', "
            "'linear', 'cosine', 'step', got 'linaer'; did you mean 'linear'?",
        ),
        (
            "{ schedule = 'linear', start = 'a', end = 0.1, steps = 200 }",
            "run.toml: regularizers[0] (kl): weight.start must be a finite real number, got 'a' (str)",
        ),
        (
            "{ schedule = 'linear', start = 0.0, end = 0.1, steps = 0 }",
            "run.toml: regularizers[0] (kl): weight.steps must be >= 1, got 0",
        ),
        (
            "{ schedule = 'linear', start = 0.0, end = 0.1 }",
            "run.toml: regularizers[0] (kl): weight (schedule 'linear') is missing 'steps'",
        ),
        (
            "{ start = 0.0 }",
            "run.toml: regularizers[0] (kl): weight has no 'schedule' key",
        ),
        (
            "{ schedule = 'linear', start = 0.0, end = 0.1, steps = 2, stesp = 3 }",
            "run.toml: regularizers[0] (kl): weight has unknown key(s) 'stesp'",
        ),
        (
            "'high'",
            "run.toml: regularizers[0] (kl): 'weight' must be a finite real number >= 0, or a "
            "schedule table, got 'high' (str)",
        ),
    ],
)
def test_a_bad_schedule_weight_is_one_line_naming_file_key_and_problem(tmp_path, weight, message):
    path = write(tmp_path, f"[[regularizers]]\nname = 'kl'\nweight = {weight}\n")
    with pytest.raises(tinkex.ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(str(path) + ": ") and "\n" not in text
    assert text.replace(str(path), "run.toml", 1).startswith(message), text


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            'regularizers.kl_ref.weight={schedule="cosine", start="x", end=0.0, steps=10}',
            "--set: regularizers.kl_ref.weight.start must be a finite real number, got 'x' (str)",
        ),
        (
            'regularizers.kl_ref.weight={schedule="expo", start=1.0, end=0.0, steps=10}',
            "--set: regularizers.kl_ref.weight.schedule must be one of 'constant', 'linear', "
            "'cosine', 'step', got 'expo'",
        ),
        (
            "regularizers.kl_ref.weight=-1",
            "--set: regularizers.kl_ref.weight must be >= 0, got -1.0",
        ),
    ],
)
def test_set_schedule_errors_name_the_key(tmp_path, item, message):
    cfg = load_config(
        write(tmp_path, "[[regularizers]]\nname = 'kl'\nas = 'kl_ref'\nweight = 0.2\n")
    )
    with pytest.raises(tinkex.ConfigError) as info:
        apply_overrides(cfg, [item], base_dir=tmp_path)
    assert str(info.value).startswith(message), str(info.value)


def test_a_schedule_kind_from_a_plugin_is_found_by_the_config(tmp_path):
    import tinkex.schedules

    def sawtooth(step, *, start, end, steps):
        return start if (step - 1) % steps < steps / 2 else end

    class SchedulePlugin:
        @tinkex.hookimpl
        def tinkex_register_schedules(self, register):
            register("sawtooth", sawtooth)

    path = write(
        tmp_path,
        "[[regularizers]]\nname = 'l2'\nweight = { schedule = 'sawtooth', start = 1.0, end = 0.0, steps = 4 }\n",
    )
    with tinkex.testing.register_plugin(SchedulePlugin(), name="tinkex-sched-saw"):
        cfg = load_config(path)
        weight = cfg.regularizers[0].weight
        assert [weight(s) for s in range(1, 6)] == [1.0, 1.0, 0.0, 0.0, 1.0]
        assert tinkex.schedules.kinds()["sawtooth"] == "tinkex-sched-saw"
        assert config_from_dict(tomllib.loads(dumps_toml(config_to_dict(cfg)))) == cfg
    with pytest.raises(
        tinkex.ConfigError, match=r"weight.schedule must be one of .*got 'sawtooth'"
    ):
        load_config(path)  # the plugin is gone, and its kind with it


@pytest.mark.parametrize("key", ["data.path", "eval.path", "model.gguf_file"])
def test_an_empty_path_with_set_is_refused_not_read_as_the_current_directory(key):
    cfg = load_config(None)
    with pytest.raises(tinkex.ConfigError, match=rf"{key} must be a non-empty string, got ''"):
        apply_overrides(cfg, [f'{key}=""'], base_dir=Path.cwd())
