"""The ``tinkex train`` configuration: a TOML file read into frozen attrs classes.

Every section has defaults, so a config names only what it changes::

    [model]        backend, base_model, device, lora_rank, seed
    [data]         path, prompt_field, response_field, template, max_length, limit
    [loss]         base, normalize, reference, reference_keys
    [[regularizers]]   name, weight, as, enabled, <the regularizer's own parameters>
    [optimizer]    learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm
    [training]     steps, batch_size, seed, track_grad_norms, mode, parallel, timeout,
                   log_every, checkpoint_every

The keys, their defaults and meanings are documented in ``docs/config.md`` (a test
keeps that page and these classes in step). Reading a config never imports torch
or loads plugins; :func:`build_regularizers` does, when the specs are built.

Errors are :class:`tinkex.ConfigError` naming the file, the ``section.key`` and the
bad value, with close matches suggested for unknown keys.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ._errors import ConfigError, PluginError, SpecError

__all__ = [
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RegularizerConfig",
    "TrainConfig",
    "TrainingConfig",
    "build_regularizers",
    "config_from_dict",
    "config_to_dict",
    "default_config_path",
    "dumps_toml",
    "load_config",
    "load_examples",
    "shipped_data_path",
]

_DATA_DIR = Path(__file__).resolve().parent / "_data"

#: regularizer kinds whose default inputs are reference log-probabilities
#: (``reference = "auto"`` switches the initial-model reference on for them)
REFERENCE_KINDS = frozenset({"kl", "consistency"})


def default_config_path() -> Path:
    """The config ``tinkex train`` runs when none is given (a copy of
    ``examples/configs/regularized_sft.toml`` installed inside the package)."""
    return _DATA_DIR / "regularized_sft.toml"


def shipped_data_path() -> Path:
    """The instruction/response dataset shipped inside the package (a copy of
    ``examples/data/instructions.jsonl``); the default ``[data] path``."""
    return _DATA_DIR / "instructions.jsonl"


# --------------------------------------------------------------------------- sections


def _one_of(*choices: str):
    def check(where: str, value: Any) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def _int_at_least(lo: int):
    def check(where: str, value: Any) -> str | None:
        return None if value >= lo else f"must be an integer >= {lo}"

    return check


def _positive(where: str, value: Any) -> str | None:
    return None if value > 0 else "must be a number > 0"


def _non_negative(where: str, value: Any) -> str | None:
    return None if value >= 0 else "must be a number >= 0"


def _unit_interval(where: str, value: Any) -> str | None:
    return None if 0 <= value < 1 else "must be a number in [0, 1)"


def _non_empty(where: str, value: Any) -> str | None:
    return None if value.strip() else "must be a non-empty string"


def _template(where: str, value: Any) -> str | None:
    if "{prompt}" not in value:
        return "must contain the placeholder {prompt}"
    try:
        value.format(prompt="")
    except (KeyError, IndexError, ValueError) as exc:
        return f"is not a valid format string ({exc}); write literal braces as {{{{ and }}}}"
    return None


def _key_list(where: str, value: Any) -> str | None:
    if all(isinstance(v, str) and v for v in value):
        return None
    return "must be a list of non-empty strings"


def _field(
    default: Any, kind: type | tuple[type, ...], check: Any = None, optional: bool = False
) -> Any:
    return attrs.field(
        default=default, metadata={"kind": kind, "check": check, "optional": optional}
    )


@attrs.frozen
class ModelConfig:
    """``[model]``: which model trains, where.

    Attributes:
        backend: a registered training backend ("local", "tinker", or a plugin's).
        base_model: "tiny" (the embedded random-initialised model) or a local
            Hugging Face model directory (a relative path resolves against the
            config file's directory).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps".
        lora_rank: train LoRA adapters of this rank (peft) instead of all weights.
        seed: seeds the model's random initialisation.
    """

    backend: str = _field("local", str, _non_empty)
    base_model: str = _field("tiny", str, _non_empty)
    device: str = _field("auto", str, _non_empty)
    lora_rank: int | None = _field(None, int, _int_at_least(1), optional=True)
    seed: int = _field(0, int)


@attrs.frozen
class DataConfig:
    """``[data]``: a JSONL file of instruction/response pairs.

    Each line is an object with a prompt and a response field. The text the model
    sees is ``template.format(prompt=...) + response + EOS``; only the response
    and EOS tokens count in the loss (``weights`` 1), the prompt is masked (0).

    Attributes:
        path: the JSONL file; ``None`` (the default) is the dataset shipped with
            tinkex. A relative path resolves against the config file's directory.
        prompt_field: key of the prompt in each line.
        response_field: key of the response in each line.
        template: how a prompt is shown to the model; must contain ``{prompt}``.
        max_length: longest sequence in tokens; longer examples are truncated
            from the end (an example whose response is cut away entirely is dropped).
        limit: use only the first ``limit`` examples.
    """

    path: str | None = _field(None, str, _non_empty, optional=True)
    prompt_field: str = _field("prompt", str, _non_empty)
    response_field: str = _field("response", str, _non_empty)
    template: str = _field("Q: {prompt}\nA: ", str, _template)
    max_length: int = _field(64, int, _int_at_least(2))
    limit: int | None = _field(None, int, _int_at_least(1), optional=True)


@attrs.frozen
class LossConfig:
    """``[loss]``: the base loss and the reference log-probabilities.

    Attributes:
        base: the base loss; "cross_entropy" (weighted negative log-likelihood of
            the target tokens) is the one built in.
        normalize: "tokens" divides the base loss by the number of counted
            (response) tokens in the batch, so it reads as nats per token;
            "sum" is Tinker's ``-(weights * logprobs).sum()`` over the batch.
        reference: "initial_model" computes each example's target-token
            log-probabilities once, with the model as it is before the first step,
            and attaches them to the datum under every key of ``reference_keys``
            (this is KL-to-reference for the ``kl`` regularizer). "none" attaches
            nothing. "auto" means "initial_model" when an enabled regularizer is
            of a kind that reads reference log-probabilities (``kl``,
            ``consistency``), else "none". Resumed runs reuse the reference saved
            in the checkpoint.
        reference_keys: the loss-input keys the reference is attached under; the
            defaults are what ``kl`` and ``consistency`` read.
    """

    base: str = _field("cross_entropy", str, _one_of("cross_entropy"))
    normalize: str = _field("tokens", str, _one_of("tokens", "sum"))
    reference: str = _field("auto", str, _one_of("auto", "initial_model", "none"))
    reference_keys: tuple[str, ...] = attrs.field(
        default=("reference_logprobs", "original_logprobs"),
        converter=tuple,
        metadata={"kind": list, "check": _key_list, "optional": False},
    )


@attrs.frozen
class OptimizerConfig:
    """``[optimizer]``: Adam, as :class:`tinkex.AdamParams` (same fields, same defaults)."""

    learning_rate: float = _field(1e-4, (int, float), _positive)
    beta1: float = _field(0.9, (int, float), _unit_interval)
    beta2: float = _field(0.95, (int, float), _unit_interval)
    eps: float = _field(1e-12, (int, float), _positive)
    weight_decay: float = _field(0.0, (int, float), _non_negative)
    grad_clip_norm: float = _field(0.0, (int, float), _non_negative)


@attrs.frozen
class TrainingConfig:
    """``[training]``: the loop.

    Attributes:
        steps: optimizer steps in the whole run (``--steps`` overrides it; a
            resumed run stops at this total).
        batch_size: examples per step.
        seed: seeds the order of the examples (a fresh shuffle every epoch).
        track_grad_norms: measure each term's gradient norm (needed for the
            gradient-share plot and columns).
        mode: "auto", "fused" (local backend) or "linearized" (Tinker's method).
        parallel: run the regularizers concurrently.
        timeout: seconds each regularizer may run per step.
        log_every: emit a ``train.step`` log event every this many steps.
        checkpoint_every: write a checkpoint every this many steps (0: only at
            the end); the end of the run and Ctrl-C always write one.
    """

    steps: int = _field(100, int, _int_at_least(1))
    batch_size: int = _field(8, int, _int_at_least(1))
    seed: int = _field(0, int)
    track_grad_norms: bool = _field(True, bool)
    mode: str = _field("auto", str, _one_of("auto", "fused", "linearized"))
    parallel: bool = _field(True, bool)
    timeout: float = _field(30.0, (int, float), _positive)
    log_every: int = _field(10, int, _int_at_least(1))
    checkpoint_every: int = _field(50, int, _int_at_least(0))


@attrs.frozen
class RegularizerConfig:
    """One ``[[regularizers]]`` entry.

    Attributes:
        kind: the registered regularizer (TOML key ``name``), e.g. "entropy".
        weight: its weight (a finite number >= 0).
        alias: the term's own name (TOML key ``as``); defaults to ``kind``. Two
            entries of one kind need different aliases.
        enabled: ``false`` keeps the entry but skips it (an ablation).
        params: every other key, passed to the regularizer's constructor.
    """

    kind: str
    weight: float
    alias: str | None = None
    enabled: bool = True
    params: dict[str, Any] = attrs.field(factory=dict)

    @property
    def term_name(self) -> str:
        """The name the term has in outputs and metrics."""
        return self.alias or self.kind


#: section name -> class, in the order a resolved config is written
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
}
_REGULARIZER_KEYS = ("name", "weight", "as", "enabled")


@attrs.frozen
class TrainConfig:
    """A whole ``tinkex train`` configuration.

    Attributes:
        model, data, loss, optimizer, training: the sections.
        regularizers: the ``[[regularizers]]`` entries, in file order.
        source: the file it was read from (``None`` when built in code).
    """

    model: ModelConfig = attrs.field(factory=ModelConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    loss: LossConfig = attrs.field(factory=LossConfig)
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    training: TrainingConfig = attrs.field(factory=TrainingConfig)
    regularizers: tuple[RegularizerConfig, ...] = attrs.field(default=(), converter=tuple)
    source: str | None = attrs.field(default=None, eq=False)

    @property
    def data_path(self) -> Path:
        """The dataset file (the shipped one when ``[data] path`` is not set)."""
        return Path(self.data.path) if self.data.path is not None else shipped_data_path()

    @property
    def uses_reference(self) -> bool:
        """Whether reference log-probabilities are taken from the initial model."""
        if self.loss.reference == "initial_model":
            return True
        if self.loss.reference == "none":
            return False
        return any(r.enabled and r.kind in REFERENCE_KINDS for r in self.regularizers)

    def with_overrides(self, **changes: Any) -> TrainConfig:
        """A copy with ``section__key=value`` changes (``None`` values are ignored).

        Example: ``cfg.with_overrides(training__steps=10, model__device="cpu")``.

        Raises:
            ConfigError: an unknown key or a bad value.
        """
        result = self
        for dotted, value in changes.items():
            if value is None:
                continue
            section, _, key = dotted.partition("__")
            cls = SECTIONS.get(section)
            if cls is None or key not in attrs.fields_dict(cls):
                raise ConfigError(f"unknown override {section}.{key}")
            current = getattr(result, section)
            values = attrs.asdict(current, recurse=False)
            values[key] = value
            new = _build_section(section, cls, values, where="command line")
            result = attrs.evolve(result, **{section: new})
        return result


# --------------------------------------------------------------------------- reading


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_ok(value: Any, kind: Any) -> bool:
    if isinstance(value, bool):
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    if kind is list:
        return isinstance(value, (list, tuple))
    if not isinstance(value, kind):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def _kind_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return "a finite number"
    return _KIND_NAMES.get(kind, kind.__name__)


def _build_section(section: str, cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    fields = attrs.fields_dict(cls)
    kwargs: dict[str, Any] = {}
    prefix = f"{where}: " if where and not where.endswith(": ") else where
    for key, value in values.items():
        field = fields.get(key)
        if field is None:
            known = ", ".join(fields)
            raise ConfigError(
                f"{prefix}unknown key '{section}.{key}'{_suggest(key, list(fields))} "
                f"Known keys in [{section}]: {known}."
            )
        meta = field.metadata
        if value is None and meta.get("optional"):
            kwargs[key] = None
            continue
        if not _type_ok(value, meta["kind"]):
            raise ConfigError(
                f"{prefix}'{section}.{key}' must be {_kind_name(meta['kind'])}, got {_describe(value)}"
            )
        if isinstance(meta["kind"], tuple) and not isinstance(value, bool):
            value = float(value)
        check = meta.get("check")
        problem = check(f"{section}.{key}", value) if check is not None else None
        if problem:
            raise ConfigError(f"{prefix}'{section}.{key}' {problem}, got {_describe(value)}")
        kwargs[key] = value
    return cls(**kwargs)


def _build_regularizer(index: int, entry: Any, source: str | None) -> RegularizerConfig:
    where = f"{_where(source)}regularizers[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a table ([[regularizers]]), got {_describe(entry)}")
    kind = entry.get("name")
    label = f"{where} ({kind})" if isinstance(kind, str) else where
    if "name" not in entry:
        raise ConfigError(
            f"{where} has no 'name'; set name = \"<regularizer>\" (see `tinkex plugins list`)"
        )
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string, got {_describe(kind)}")
    if "weight" not in entry:
        raise ConfigError(f"{label} has no 'weight'; set e.g. weight = 0.01")
    weight = entry["weight"]
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ConfigError(
            f"{label}: 'weight' must be a finite number >= 0, got {_describe(weight)}"
        )
    alias = entry.get("as")
    if alias is not None and (not isinstance(alias, str) or not alias.strip()):
        raise ConfigError(f"{label}: 'as' must be a non-empty string, got {_describe(alias)}")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{label}: 'enabled' must be true or false, got {_describe(enabled)}")
    params = {k: v for k, v in entry.items() if k not in _REGULARIZER_KEYS}
    return RegularizerConfig(
        kind=kind, weight=float(weight), alias=alias, enabled=enabled, params=params
    )


def config_from_dict(
    data: Mapping[str, Any], *, source: str | None = None, base_dir: Path | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed TOML.

    Args:
        data: the parsed document (``tomllib.loads`` output, or an equivalent dict).
        source: the file name, for error messages.
        base_dir: relative ``data.path`` and ``model.base_model`` paths resolve
            against it (the config file's directory); ``None`` keeps them as given.

    Raises:
        ConfigError: an unknown section or key (with a close match suggested), a
            value of the wrong type or out of range, a malformed regularizer entry,
            or two terms with the same name.
    """
    where = _where(source)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name == "regularizers":
            continue
        cls = SECTIONS.get(name)
        if cls is None:
            known = [*SECTIONS, "regularizers"]
            raise ConfigError(
                f"{where}unknown section [{name}]{_suggest(name, known)} "
                f"Known sections: {', '.join(known)}."
            )
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}[{name}] must be a table, got {_describe(value)}")
        sections[name] = _build_section(name, cls, value, where=where)

    raw_regs = data.get("regularizers", [])
    if not isinstance(raw_regs, list):
        raise ConfigError(
            f"{where}'regularizers' must be an array of tables ([[regularizers]]), got {_describe(raw_regs)}"
        )
    regs = tuple(_build_regularizer(i, entry, source) for i, entry in enumerate(raw_regs))
    seen: dict[str, int] = {}
    for i, reg in enumerate(regs):
        if reg.term_name == "base_loss":
            raise ConfigError(
                f"{where}regularizers[{i}]: the name 'base_loss' is reserved; set as = \"...\""
            )
        if reg.term_name in seen:
            raise ConfigError(
                f"{where}regularizers[{i}] ({reg.kind}): the term name {reg.term_name!r} is already used "
                f'by regularizers[{seen[reg.term_name]}]; give one of them a different name with as = "..."'
            )
        seen[reg.term_name] = i

    cfg = TrainConfig(**sections, regularizers=regs, source=source)
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: TrainConfig, base_dir: Path) -> TrainConfig:
    data = cfg.data
    if data.path is not None and not Path(data.path).expanduser().is_absolute():
        data = attrs.evolve(data, path=str((base_dir / data.path).resolve()))
    elif data.path is not None:
        data = attrs.evolve(data, path=str(Path(data.path).expanduser()))
    model = cfg.model
    bm = model.base_model
    looks_like_path = bm.startswith((".", "~")) or "/" in bm or "\\" in bm
    if bm != "tiny" and looks_like_path and not Path(bm).expanduser().is_absolute():
        candidate = (base_dir / bm).resolve()
        if candidate.exists():
            model = attrs.evolve(model, base_model=str(candidate))
    return attrs.evolve(cfg, data=data, model=model)


def load_config(path: str | Path | None = None) -> TrainConfig:
    """Read a config file (the shipped default when ``path`` is None).

    Raises:
        ConfigError: the file is missing or is not valid TOML, or
            :func:`config_from_dict` rejects it.
    """
    p = Path(path) if path is not None else default_config_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return config_from_dict(data, source=str(p), base_dir=p.resolve().parent)


# --------------------------------------------------------------------------- writing


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a TOML-shaped dict (``None`` values left out; regularizer
    entries flattened back to ``name``/``weight``/``as``/``enabled``/params).
    ``config_from_dict(config_to_dict(c)) == c``."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        values = {}
        for field in attrs.fields(type(section)):
            value = getattr(section, field.name)
            if value is None:
                continue
            values[field.name] = list(value) if isinstance(value, tuple) else value
        out[name] = values
    regs = []
    for reg in cfg.regularizers:
        entry: dict[str, Any] = {"name": reg.kind, "weight": reg.weight}
        if reg.alias is not None:
            entry["as"] = reg.alias
        entry["enabled"] = reg.enabled
        entry.update(reg.params)
        regs.append(entry)
    out["regularizers"] = regs
    return out


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {_describe(value)} to TOML")


def dumps_toml(data: Mapping[str, Any], *, header: str = "") -> str:
    """Write a TOML-shaped dict (as :func:`config_to_dict` returns) as TOML text.

    Tables of scalars become ``[section]`` tables; lists of tables become
    ``[[name]]`` arrays. Enough for configs; not a general TOML writer.
    """
    lines: list[str] = [f"# {line}".rstrip() for line in header.splitlines()]
    scalars = {
        k: v for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)
    }
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
        elif _is_table_array(value):
            for entry in value:
                lines += ["", f"[[{_toml_key(key)}]]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


# --------------------------------------------------------------------------- data


def load_examples(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Read the dataset as ``(prompt_text, response)`` pairs, the template applied.

    Raises:
        ConfigError: the file is missing or unreadable, a line is not a JSON
            object, a field is missing or not a string, or no example is left.
    """
    path = cfg.data_path
    d = cfg.data
    where = f"[data] path = {str(path)!r}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(
            f"data file not found: {path} (set by {where}; a relative path in a config file resolves against the file's directory)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    pairs: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}:{lineno}: each line must be a JSON object, got {_describe(row)}"
            )
        for key in (d.prompt_field, d.response_field):
            if not isinstance(row.get(key), str):
                raise ConfigError(
                    f"{path}:{lineno}: field {key!r} missing or not a string "
                    f"(fields are named by data.prompt_field / data.response_field)"
                )
        pairs.append((d.template.format(prompt=row[d.prompt_field]), row[d.response_field]))
        if d.limit is not None and len(pairs) >= d.limit:
            break
    if not pairs:
        raise ConfigError(f"data file {path} has no examples")
    return pairs


# --------------------------------------------------------------------------- specs


def build_regularizers(cfg: TrainConfig) -> list[Any]:
    """Build the :class:`tinkex.RegularizerSpec` list through the plugin registry.

    Every entry is built, enabled or not (a disabled one is kept with
    ``enabled=False``), so a typo in a disabled entry is still reported.

    Raises:
        ConfigError: naming the entry, for an unknown regularizer (listing the
            installed ones) or a bad parameter; ``__cause__`` is the registry's
            :class:`tinkex.UnknownRegularizerError` / :class:`tinkex.SpecError`.
    """
    from ._plugins import regularizer

    where = _where(cfg.source)
    specs = []
    for i, reg in enumerate(cfg.regularizers):
        try:
            spec = regularizer(
                reg.kind, weight=reg.weight, name=reg.term_name, enabled=reg.enabled, **reg.params
            )
        except (SpecError, PluginError) as exc:
            raise ConfigError(f"{where}regularizers[{i}] ({reg.kind}): {exc}") from exc
        specs.append(spec)
    return specs
