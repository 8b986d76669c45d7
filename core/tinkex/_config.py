"""The ``tinkex train`` configuration: a TOML file read into frozen attrs classes.

Every section has defaults, so a config names only what it changes::

    [model]        backend, base_model, device, lora_rank, seed, dtype, gguf_file
    [data]         path, prompt_field, response_field, format, template, max_length, limit
    [loss]         base, normalize, reference, reference_keys
    [[regularizers]]   name, weight, as, enabled, <the regularizer's own parameters>
    [optimizer]    learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm
    [scheduler]    warmup_steps, decay, min_lr_ratio
    [training]     steps, batch_size, seed, track_grad_norms, mode, parallel, timeout,
                   log_every, checkpoint_every
    [eval]         fraction, path, every, batch_size
    [samples]      prompts, every, max_new_tokens
    [logging]      to, mlflow_uri, mlflow_experiment, wandb_project, wandb_mode

Each section is declared once, as an attrs class whose validators are the rules
(``[optimizer]`` is :class:`AdamParams` itself). One cattrs converter turns the
parsed TOML into those classes and back (TOML ``name``/``as`` are the attributes
``kind``/``alias`` of a regularizer entry); ``tomli_w`` writes the TOML.

The keys, their defaults, valid values and meanings are documented in
``docs/config.md`` (a test keeps that page and these classes in step). Reading a
config never imports torch or loads plugins; :func:`build_regularizers` does,
when the specs are built.

Errors are one-line :class:`tinkex.ConfigError` naming the file, the
``section.key`` and the bad value, with close matches suggested for unknown keys.
The message format of a rejected value, ``<what> must be <requirement>, got
<value>`` (the value's type named when the type was wrong), is :func:`problem`;
:mod:`tinkex.regkit`'s ``check_*`` helpers use it too.
"""

from __future__ import annotations

import datetime
import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
import tomli_w
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._errors import ConfigError, PluginError, SpecError
from ._files import decode_utf8
from ._rules import (
    Found,
    InvalidValue,
    Rule,
    boolean,
    key_list,
    number,
    one_of,
    optional,
    problem,
    template,
    text,
)
from ._rules import to_float as _float
from ._rules import to_tuple as _tuple

__all__ = [
    "AdamParams",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RegularizerConfig",
    "SamplesConfig",
    "SchedulerConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "build_regularizers",
    "config_from_dict",
    "config_to_dict",
    "default_config_path",
    "dumps_toml",
    "load_config",
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


@attrs.frozen
class ModelConfig:
    """``[model]``: which model trains, where.

    Attributes:
        backend: a registered training backend ("local", "tinker", or a plugin's).
        base_model: "tiny" (the embedded random-initialised model), a local
            Hugging Face model directory, a ``.gguf`` file, a known name such as
            "smollm2-135m-instruct" (fetched with ``tinkex models fetch``) or a hub
            id (a relative path that exists resolves against the config file's
            directory).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps".
        lora_rank: train LoRA adapters of this rank (peft) instead of all weights.
        seed: seeds the model's random initialisation.
        dtype: the dtype the local backend loads the weights in ("auto": as saved).
        gguf_file: a GGUF file to load the model from (local backend; a relative
            path that exists resolves against the config file's directory).
    """

    backend: str = attrs.field(default="local", validator=text)
    base_model: str = attrs.field(default="tiny", validator=text)
    device: str = attrs.field(default="auto", validator=text)
    lora_rank: int | None = attrs.field(
        default=None, validator=optional(number(integer=True, ge=1))
    )
    seed: int = attrs.field(default=0, validator=number(integer=True, ge=0, le=2**63 - 1))
    dtype: str = attrs.field(
        default="auto", validator=one_of("auto", "float32", "bfloat16", "float16")
    )
    gguf_file: str | None = attrs.field(default=None, validator=optional(text))


@attrs.frozen
class DataConfig:
    """``[data]``: a JSONL file of instruction/response pairs.

    Each line is an object with a prompt and a response field. With ``format =
    "plain"`` the text the model sees is ``template.format(prompt=...) + response
    + EOS``; with ``"chat"`` the prompt is a user message rendered by the
    tokenizer's chat template (with the generation prompt) and the response is
    followed by the template's end-of-turn token(s). Only the response tokens
    count in the loss (``weights`` 1), the prompt is masked (0).

    Attributes:
        path: the JSONL file; ``None`` (the default) is the dataset shipped with
            tinkex. A relative path resolves against the config file's directory.
        prompt_field: key of the prompt in each line.
        response_field: key of the response in each line.
        format: "plain" (``template``) or "chat" (the tokenizer's chat template;
            a tokenizer without one falls back to ``template``, with a warning).
        template: how a prompt is shown to the model; must contain ``{prompt}``.
        max_length: longest sequence in tokens; longer examples are truncated
            from the end (an example whose response is cut away entirely is dropped).
        limit: use only the first ``limit`` examples.
    """

    path: str | None = attrs.field(default=None, validator=optional(text))
    prompt_field: str = attrs.field(default="prompt", validator=text)
    response_field: str = attrs.field(default="response", validator=text)
    format: str = attrs.field(default="plain", validator=one_of("plain", "chat"))
    template: str = attrs.field(default="Q: {prompt}\nA: ", validator=template)
    max_length: int = attrs.field(default=64, validator=number(integer=True, ge=2))
    limit: int | None = attrs.field(default=None, validator=optional(number(integer=True, ge=1)))


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

    base: str = attrs.field(default="cross_entropy", validator=one_of("cross_entropy"))
    normalize: str = attrs.field(default="tokens", validator=one_of("tokens", "sum"))
    reference: str = attrs.field(default="auto", validator=one_of("auto", "initial_model", "none"))
    reference_keys: tuple[str, ...] = attrs.field(
        default=("reference_logprobs", "original_logprobs"), converter=_tuple, validator=key_list
    )


@attrs.frozen
class AdamParams:
    """AdamW hyper-parameters for one :meth:`tinkex.TrainingClient.optim_step`, with
    Tinker's defaults; also the ``[optimizer]`` section of a ``tinkex train`` config.

    Args:
        learning_rate: step size (>= 0; 0 updates Adam's moments and moves no
            weight, as the last step of a schedule decaying to 0 does).
        beta1, beta2: running-average coefficients, in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0; Tinker's default 0, unlike torch).
        grad_clip_norm: clip the parameters' global gradient norm to this value
            (>= 0); 0 disables.

    Ints are accepted and stored as floats; bools, NaN, +/-inf and ints too large
    for a float are not.

    Raises:
        SpecError: a value is not a finite number in its range, e.g.
            ``AdamParams.learning_rate must be >= 0, got -1.0``.
    """

    learning_rate: float = attrs.field(default=1e-4, converter=_float, validator=number(ge=0))
    beta1: float = attrs.field(default=0.9, converter=_float, validator=number(ge=0, lt=1))
    beta2: float = attrs.field(default=0.95, converter=_float, validator=number(ge=0, lt=1))
    eps: float = attrs.field(default=1e-12, converter=_float, validator=number(gt=0))
    weight_decay: float = attrs.field(default=0.0, converter=_float, validator=number(ge=0))
    grad_clip_norm: float = attrs.field(default=0.0, converter=_float, validator=number(ge=0))


#: ``[optimizer]``: Adam, as :class:`tinkex.AdamParams` (the same class).
OptimizerConfig = AdamParams


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

    steps: int = attrs.field(default=100, validator=number(integer=True, ge=1))
    batch_size: int = attrs.field(default=8, validator=number(integer=True, ge=1))
    seed: int = attrs.field(default=0, validator=number(integer=True, ge=0, le=2**63 - 1))
    track_grad_norms: bool = attrs.field(default=True, validator=boolean)
    mode: str = attrs.field(default="auto", validator=one_of("auto", "fused", "linearized"))
    parallel: bool = attrs.field(default=True, validator=boolean)
    timeout: float = attrs.field(default=30.0, converter=_float, validator=number(gt=0))
    log_every: int = attrs.field(default=10, validator=number(integer=True, ge=1))
    checkpoint_every: int = attrs.field(default=50, validator=number(integer=True, ge=0))


@attrs.frozen
class SchedulerConfig:
    """``[scheduler]``: the learning rate of each step (:mod:`tinkex.schedules`).

    Step ``s`` (1-based) of ``T = training.steps`` trains with
    ``tinkex.schedules.learning_rate(s, optimizer.learning_rate, total_steps=T,
    warmup_steps=..., decay=..., min_lr_ratio=...)``: a linear warm-up from
    ``lr / warmup_steps`` at step 1 to ``lr`` at step ``warmup_steps``, then
    ``decay`` to ``min_lr_ratio * lr`` at step ``T``.

    Attributes:
        warmup_steps: steps of linear warm-up (0: none).
        decay: "constant" (no decay), "linear" or "cosine".
        min_lr_ratio: the last step's learning rate as a fraction of
            ``optimizer.learning_rate`` (not used by "constant").
    """

    warmup_steps: int = attrs.field(default=0, validator=number(integer=True, ge=0))
    decay: str = attrs.field(default="constant", validator=one_of("constant", "linear", "cosine"))
    min_lr_ratio: float = attrs.field(default=0.0, converter=_float, validator=number(ge=0, le=1))


@attrs.frozen
class EvalConfig:
    """``[eval]``: held-out evaluation (off unless ``fraction`` or ``path`` is set).

    Attributes:
        fraction: hold this fraction of the training examples out (chosen by
            ``training.seed``, never trained on).
        path: a JSONL file of its own, in the ``[data]`` format (a relative path
            resolves against the config file's directory). Not with ``fraction``.
        every: evaluate every this many steps, and after the last step (0: only
            after the last step).
        batch_size: examples per forward pass of an evaluation.
    """

    fraction: float | None = attrs.field(
        default=None, converter=_float, validator=optional(number(gt=0, lt=1))
    )
    path: str | None = attrs.field(default=None, validator=optional(text))
    every: int = attrs.field(default=0, validator=number(integer=True, ge=0))
    batch_size: int = attrs.field(default=32, validator=number(integer=True, ge=1))

    def __attrs_post_init__(self) -> None:
        if self.fraction is not None and self.path is not None:
            raise SpecError(
                f"eval.fraction ({self.fraction!r}) and eval.path ({self.path!r}) are both "
                f"set; set one of them: fraction holds part of the training data out, "
                f"path reads a separate file"
            )

    @property
    def enabled(self) -> bool:
        """Whether there is a held-out set."""
        return self.fraction is not None or self.path is not None


@attrs.frozen
class SamplesConfig:
    """``[samples]``: greedy generations from fixed prompts while training.

    Attributes:
        prompts: the prompts (rendered like the training prompts); not set: the
            first few held-out prompts, else the first training prompts; ``[]``:
            no samples.
        every: generate every this many steps (and at step 0 and after the last
            step); not set: ``eval.every``; 0: only at step 0 and the end.
        max_new_tokens: the most tokens generated per prompt.
    """

    prompts: tuple[str, ...] | None = attrs.field(
        default=None, converter=_tuple, validator=optional(key_list)
    )
    every: int | None = attrs.field(default=None, validator=optional(number(integer=True, ge=0)))
    max_new_tokens: int = attrs.field(default=48, validator=number(integer=True, ge=1))


def _names_problem(value: Any) -> Found | None:
    requirement = "a list of distinct non-empty strings"
    found = key_list.check(value)
    if found is not None:
        return requirement, found[1]
    return None if len(set(value)) == len(value) else (requirement, False)


@attrs.frozen
class LoggingConfig:
    """``[logging]``: where each step's metrics go besides ``metrics.jsonl``.

    Attributes:
        to: the metrics loggers: "csv", "tensorboard", "mlflow", "wandb" or one a
            plugin registers (``tinkex.loggers.logger_names()``); ``--log-to`` overrides it.
        mlflow_uri: the MLflow tracking URI; not set: a sqlite store in the run
            directory (``mlflow/mlflow.db``).
        mlflow_experiment: the MLflow experiment the run is logged under.
        wandb_project: the W&B project.
        wandb_mode: "offline" (files under the run directory, no account needed) or
            "online".
    """

    to: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple,
        validator=Rule("a list of distinct non-empty strings", _names_problem),
    )
    mlflow_uri: str | None = attrs.field(default=None, validator=optional(text))
    mlflow_experiment: str = attrs.field(default="tinkex", validator=text)
    wandb_project: str = attrs.field(default="tinkex", validator=text)
    wandb_mode: str = attrs.field(default="offline", validator=one_of("offline", "online"))


#: the keys of a ``[[regularizers]]`` entry that are not the regularizer's parameters
ENTRY_KEYS = ("name", "weight", "as", "enabled")
_TOML_SCALARS = (str, int, float, bool, datetime.date, datetime.time)  # datetime is a date


def _toml_value_ok(value: Any) -> bool:
    if isinstance(value, _TOML_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_toml_value_ok(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _toml_value_ok(v) for k, v in value.items())
    return False


def _params_problem(value: Any) -> Found | None:
    requirement = "a table of the regularizer's parameters"
    if not isinstance(value, Mapping):
        return requirement, True
    for key, item in value.items():
        if not isinstance(key, str) or key in ENTRY_KEYS:
            return f"{requirement}, keyed by strings other than {', '.join(ENTRY_KEYS)}", False
        if not _toml_value_ok(item):
            return f"{requirement}, each a TOML value ({key!r} is not)", False
    return None


def _dict(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


class ScheduleValueError(SpecError):
    """A ``weight`` table that :func:`tinkex.schedules.from_dict` refused (its message
    says why); ``field`` is the attribute, for the config's error message."""

    field = "weight"


def _weight(value: Any) -> Any:
    """A number as a float; a table (TOML's inline table) as a :class:`tinkex.schedules.Schedule`."""
    if isinstance(value, Mapping):
        from .schedules import from_dict

        try:
            return from_dict(dict(value), subject="weight")
        except SpecError as exc:
            raise ScheduleValueError(str(exc)) from None
    return _float(value)


def _is_schedule(value: Any) -> bool:
    from . import schedules

    schedule_type = getattr(schedules, "Schedule", None)
    return schedule_type is not None and isinstance(value, schedule_type)


_weight_number = number(ge=0)
_WEIGHT = f"{_weight_number.requirement}, or a schedule table"


def _weight_problem(value: Any) -> Found | None:
    if _is_schedule(value):
        return None
    found = _weight_number.check(value)
    return (_WEIGHT, True) if found is not None and found[1] else found


@attrs.frozen
class RegularizerConfig:
    """One ``[[regularizers]]`` entry.

    Attributes:
        kind: the registered regularizer (TOML key ``name``), e.g. "entropy".
        weight: its weight: a finite number >= 0, or a
            :class:`tinkex.schedules.Schedule` of the step (TOML: an inline table
            ``{ schedule = "linear", start = 0.0, end = 0.1, steps = 200 }``, read
            by :func:`tinkex.schedules.from_dict`).
        alias: the term's own name (TOML key ``as``); defaults to ``kind``. Two
            entries of one kind need different aliases.
        enabled: ``false`` keeps the entry but skips it (an ablation).
        params: every other key, passed to the regularizer's constructor (which
            validates them).
    """

    kind: str = attrs.field(
        validator=text,
        metadata={"missing": 'set name = "<regularizer>" (see `tinkex plugins list`)'},
    )
    weight: Any = attrs.field(
        converter=_weight,
        validator=Rule(_WEIGHT, _weight_problem),
        metadata={"missing": "set e.g. weight = 0.01"},
    )
    alias: str | None = attrs.field(default=None, validator=optional(text))
    enabled: bool = attrs.field(default=True, validator=boolean)
    params: dict[str, Any] = attrs.field(
        factory=dict, converter=_dict, validator=Rule("a table", _params_problem)
    )

    @property
    def term_name(self) -> str:
        """The name the term has in outputs and metrics."""
        return self.alias or self.kind


#: attribute -> TOML key, where they differ
_TOML_KEYS = {"kind": "name", "alias": "as"}
_ATTRIBUTES = {v: k for k, v in _TOML_KEYS.items()}


def _unique_terms(inst: Any, attribute: attrs.Attribute, regs: tuple[Any, ...]) -> None:
    seen: dict[str, int] = {}
    for i, reg in enumerate(regs):
        if not isinstance(reg, RegularizerConfig):
            raise InvalidValue(
                f"TrainConfig.regularizers[{i}]", "a RegularizerConfig", reg, True, "regularizers"
            )
        if reg.term_name == "base_loss":
            raise ConfigError(
                f"regularizers[{i}]: the name 'base_loss' is reserved; set as = \"...\""
            )
        if reg.term_name in seen:
            raise ConfigError(
                f"regularizers[{i}] ({reg.kind}): the term name {reg.term_name!r} is already used "
                f'by regularizers[{seen[reg.term_name]}]; give one of them a different name with as = "..."'
            )
        seen[reg.term_name] = i


#: section name -> class, in the order a resolved config is written
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "training": TrainingConfig,
    "eval": EvalConfig,
    "samples": SamplesConfig,
    "logging": LoggingConfig,
}


@attrs.frozen
class TrainConfig:
    """A whole ``tinkex train`` configuration.

    Attributes:
        model, data, loss, optimizer, scheduler, training, eval, samples, logging: the sections.
        regularizers: the ``[[regularizers]]`` entries, in file order (term names unique).
        source: the file it was read from (``None`` when built in code).
    """

    model: ModelConfig = attrs.field(factory=ModelConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    loss: LossConfig = attrs.field(factory=LossConfig)
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    training: TrainingConfig = attrs.field(factory=TrainingConfig)
    eval: EvalConfig = attrs.field(factory=EvalConfig)
    samples: SamplesConfig = attrs.field(factory=SamplesConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    regularizers: tuple[RegularizerConfig, ...] = attrs.field(
        default=(), converter=_tuple, validator=_unique_terms
    )
    source: str | None = attrs.field(default=None, eq=False)

    @property
    def data_path(self) -> Path:
        """The dataset file (the shipped one when ``[data] path`` is not set)."""
        return Path(self.data.path) if self.data.path is not None else shipped_data_path()

    @property
    def eval_path(self) -> Path | None:
        """The held-out file (``[eval] path``), when set."""
        return Path(self.eval.path) if self.eval.path is not None else None

    def learning_rate(self, step: int) -> float:
        """The learning rate of ``step`` (1-based) under ``[scheduler]``."""
        from .schedules import learning_rate

        sch = self.scheduler
        return learning_rate(
            step,
            self.optimizer.learning_rate,
            total_steps=self.training.steps,
            warmup_steps=sch.warmup_steps,
            decay=sch.decay,
            min_lr_ratio=sch.min_lr_ratio,
        )

    def backend_kwargs(self) -> dict[str, Any]:
        """The keywords ``TrainingClient.create`` gets besides base_model, device,
        lora_rank and seed: ``dtype`` and ``gguf_file``, for the local backend, when set.

        Raises:
            ConfigError: ``model.dtype`` or ``model.gguf_file`` set for another backend.
        """
        m = self.model
        kwargs: dict[str, Any] = {}
        if m.dtype != "auto":
            kwargs["dtype"] = m.dtype
        if m.gguf_file is not None:
            kwargs["gguf_file"] = m.gguf_file
        if kwargs and m.backend != "local":
            key, value = next(iter(kwargs.items()))
            raise ConfigError(
                f"{_where(self.source)}model.{key} = {value!r} applies to the local backend "
                f"only, and model.backend is {m.backend!r}; remove model.{key}"
            )
        return kwargs

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
        Values are Python values, validated like the file's; paths are taken as
        given. :func:`apply_overrides` is the ``--set`` form.

        Raises:
            ConfigError: an unknown key or a bad value.
        """
        result = self
        for dotted, value in changes.items():
            if value is not None:
                key = dotted.replace("__", ".", 1)
                result = _override(result, key, value, base_dir=None, where="command line")
        return result


# Resolved here, while the classes live in this module (AdamParams is reported as
# `tinkex.AdamParams`, where its annotations' names are not to be found).
for _cls in (
    ModelConfig,
    DataConfig,
    LossConfig,
    AdamParams,
    SchedulerConfig,
    TrainingConfig,
    EvalConfig,
    SamplesConfig,
    LoggingConfig,
    RegularizerConfig,
    TrainConfig,
):
    attrs.resolve_types(_cls)
del _cls


# --------------------------------------------------------------------------- the converter

_converter = cattrs.Converter(
    forbid_extra_keys=True, unstruct_collection_overrides={Sequence: list}
)


def _as_is(value: Any, _type: Any) -> Any:
    return value


def _table_hook(cls: type, **renames: str) -> Callable[[Any, Any], Any]:
    """Structure a table into ``cls``: unknown keys are rejected, every value reaches
    the class as given, and the class's validators judge it."""
    gen = make_dict_structure_fn(
        cls,
        _converter,
        **{
            f.name: override(struct_hook=_as_is, rename=renames.get(f.name))
            for f in attrs.fields(cls)
        },
    )

    def structure(data: Any, _type: Any) -> Any:
        if not isinstance(data, Mapping):
            raise InvalidValue(cls.__name__, "a table", data, True)
        return gen(data, cls)

    return structure


def _omit_none(cls: type, **renames: str) -> Callable[[Any], dict[str, Any]]:
    """Unstructure ``cls``, leaving out the attributes that are ``None`` by default and now."""
    return make_dict_unstructure_fn(
        cls,
        _converter,
        **{
            f.name: override(omit_if_default=f.default is None, rename=renames.get(f.name))
            for f in attrs.fields(cls)
        },
    )


for _cls in SECTIONS.values():
    _converter.register_structure_hook(_cls, _table_hook(_cls))
    _converter.register_unstructure_hook(_cls, _omit_none(_cls))

_entry_structure = _table_hook(RegularizerConfig, **_TOML_KEYS)
_entry_unstructure = make_dict_unstructure_fn(
    RegularizerConfig,
    _converter,
    kind=override(rename=_TOML_KEYS["kind"]),
    alias=override(rename=_TOML_KEYS["alias"], omit_if_default=True),
    params=override(omit=True),
)


def _structure_entry(data: Any, _type: Any) -> RegularizerConfig:
    """A ``[[regularizers]]`` table: the entry keys, and every other key a parameter."""
    if not isinstance(data, Mapping):
        raise InvalidValue("regularizer entry", "a table ([[regularizers]])", data, True)
    entry = {k: data[k] for k in ENTRY_KEYS if k in data}
    params = {k: v for k, v in data.items() if k not in ENTRY_KEYS}
    return _entry_structure({**entry, "params": params}, RegularizerConfig)


_converter.register_structure_hook(RegularizerConfig, _structure_entry)


def _unstructure_entry(reg: RegularizerConfig) -> dict[str, Any]:
    entry = _entry_unstructure(reg)
    if _is_schedule(reg.weight):  # TOML: weight = { schedule = "linear", ... }
        entry["weight"] = reg.weight.to_dict()
    return {**{k: entry[k] for k in ENTRY_KEYS if k in entry}, **reg.params}


_converter.register_unstructure_hook(RegularizerConfig, _unstructure_entry)


def _structure_entries(data: Any, type_: Any) -> tuple[RegularizerConfig, ...]:
    if not isinstance(data, (list, tuple)):
        raise InvalidValue("regularizers", "an array of tables ([[regularizers]])", data, True)
    return _converter.structure(data, type_)


_converter.register_structure_hook(
    TrainConfig,
    make_dict_structure_fn(
        TrainConfig,
        _converter,
        regularizers=override(struct_hook=_structure_entries),
        source=override(omit=True),
    ),
)
_converter.register_unstructure_hook(
    TrainConfig,
    make_dict_unstructure_fn(TrainConfig, _converter, source=override(omit=True)),
)


# --------------------------------------------------------------------------- reading


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'steps'?"`` for the closest choice, or ``"."`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "."


def _path_parts(path: str) -> list[str | int]:
    """``".regularizers[0].kind"`` (a cattrs.transform_error path) -> ``["regularizers", 0, "kind"]``."""
    return [name or int(index) for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", path)]


def _explain(exc: BaseException, parts: list[str | int], data: Mapping[str, Any]) -> str:
    """One line about one error of structuring ``data``, found at ``parts``."""
    if not parts:  # the document itself
        if isinstance(exc, ForbiddenExtraKeysError):
            name = next(k for k in data if k in exc.extra_fields)
            known = [*SECTIONS, "regularizers"]
            return (
                f"unknown section [{name}]{_suggest(name, known)} "
                f"Known sections: {', '.join(known)}."
            )
    elif parts[0] in SECTIONS and len(parts) == 1:
        section = str(parts[0])
        if isinstance(exc, ForbiddenExtraKeysError):
            name = next(k for k in data[section] if k in exc.extra_fields)
            fields = [f.name for f in attrs.fields(SECTIONS[section])]
            return (
                f"unknown key '{section}.{name}'{_suggest(name, fields)} "
                f"Known keys in [{section}]: {', '.join(fields)}."
            )
        if isinstance(exc, InvalidValue):
            return exc.at(f"{section}.{exc.field}" if exc.field else f"[{section}]")
    elif parts == ["regularizers"] and isinstance(exc, InvalidValue):
        return exc.at("regularizers")
    elif parts[0] == "regularizers" and len(parts) > 1:
        index = int(parts[1])
        entry = data["regularizers"][index]
        kind = entry.get("name") if isinstance(entry, Mapping) else None
        where = f"regularizers[{index}]"
        label = f"{where} ({kind})" if isinstance(kind, str) else where
        if isinstance(exc, KeyError) and len(parts) == 3:
            field = attrs.fields_dict(RegularizerConfig)[str(parts[2])]
            key = _TOML_KEYS.get(field.name, field.name)
            return f"{label} has no {key!r}; {field.metadata['missing']}"
        if isinstance(exc, ScheduleValueError):
            return f"{label}: {exc}"
        if isinstance(exc, InvalidValue):
            if exc.field is None:
                return exc.at(where)
            return f"{label}: {exc.at(repr(_TOML_KEYS.get(exc.field, exc.field)))}"
    if isinstance(exc, SpecError):
        return str(exc)
    return f"{'.'.join(map(str, parts)) or 'config'}: {type(exc).__name__}: {exc}"


def _config_error(exc: BaseException, data: Mapping[str, Any], source: str | None) -> ConfigError:
    """The first error of a failed structuring, as a one-line ConfigError."""
    found: list[BaseException] = []

    def remember(error: BaseException, _type: Any) -> str:
        found.append(error)
        return str(len(found) - 1)

    first = cattrs.transform_error(exc, path="", format_exception=remember)[0]
    token, _, path = first.partition(" @ ")
    return ConfigError(_where(source) + _explain(found[int(token)], _path_parts(path), data))


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "~")) or "/" in text or "\\" in text


def _absolute(section: str, key: str, value: Any, base_dir: Path) -> Any:
    """A path value resolved against ``base_dir``: ``data.path`` and ``eval.path``
    always; a ``model.base_model`` that looks like a path (or names a ``.gguf``
    file) and a ``model.gguf_file``, where that file or directory exists."""
    if not isinstance(value, str) or not value.strip():
        return value  # not a path: left for the key's own check ("a non-empty string")
    if (section, key) in (("data", "path"), ("eval", "path")):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())
    pathlike = _looks_like_path(value) or value.lower().endswith(".gguf")
    if (section, key) == ("model", "base_model") and value != "tiny" and pathlike:
        candidate = (base_dir / Path(value).expanduser()).resolve()
        return str(candidate) if candidate.exists() else value
    if (section, key) == ("model", "gguf_file"):
        candidate = (base_dir / Path(value).expanduser()).resolve()
        return str(candidate) if candidate.exists() else value
    return value


_PATH_KEYS = (("data", "path"), ("model", "base_model"), ("model", "gguf_file"), ("eval", "path"))


def config_from_dict(
    data: Mapping[str, Any], *, source: str | None = None, base_dir: Path | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed TOML.

    Args:
        data: the parsed document (``tomllib.loads`` output, or an equivalent dict).
        source: the file name, for error messages.
        base_dir: relative ``data.path``, ``eval.path``, ``model.base_model`` and
            ``model.gguf_file`` paths resolve against it (the config file's
            directory); ``None`` keeps them as given.

    Raises:
        ConfigError: an unknown section or key (with a close match suggested), a
            value of the wrong type or out of range, a malformed regularizer entry,
            or two terms with the same name.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(_where(source) + problem("a config", "a table", data, wrong_type=True))
    try:
        cfg = _converter.structure(data, TrainConfig)
    except (cattrs.BaseValidationError, SpecError) as exc:
        raise _config_error(exc, data, source) from None
    if base_dir is not None:
        changes = {}
        for section, key in _PATH_KEYS:
            old = getattr(getattr(cfg, section), key)
            new = _absolute(section, key, old, base_dir)
            if new != old:
                changes[section] = attrs.evolve(getattr(cfg, section), **{key: new})
        cfg = attrs.evolve(cfg, **changes)
    return attrs.evolve(cfg, source=source)


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
    except UnicodeDecodeError:
        decode_utf8(p.read_bytes(), p, ConfigError, "save the config as UTF-8")
        raise
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return config_from_dict(data, source=str(p), base_dir=p.resolve().parent)


# --------------------------------------------------------------------------- overrides


def _parse_value(raw: str) -> Any:
    """A ``--set`` value: a TOML value when it is one, else the text itself."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["v"] if set(parsed) == {"v"} else raw


def apply_overrides(cfg: TrainConfig, items: Sequence[str], *, base_dir: Path) -> TrainConfig:
    """Apply ``--set`` items, in order, to ``cfg``.

    Each item is ``KEY=VALUE``. ``KEY`` is ``section.key`` (any key of a section)
    or ``regularizers.<term>.<key>``, where ``<term>`` is an entry's term name
    (its ``as``, which defaults to its ``name``; the ``name`` alone also works
    where one entry has it) and ``<key>`` is ``weight``, ``as``, ``enabled``,
    ``name`` or any parameter of the regularizer. ``VALUE`` is read as TOML
    (``3``, ``1e-3``, ``false``, ``"text"``, ``['a', 'b']``); text that is not
    TOML is taken as a string (``model.device=cpu``). ``data.path``, ``eval.path``
    and ``model.base_model``/``model.gguf_file`` paths resolve against ``base_dir`` (the current
    directory, for the command line), as a file's resolve against its directory.

    Raises:
        ConfigError: an item without ``=``, an unknown key (listing what can be
            overridden, with a close match suggested), a term that is not there
            or is ambiguous, or a value the config rejects.
    """
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        cfg = _override(cfg, key, _parse_value(raw.strip()), base_dir=base_dir, where="--set")
    return cfg


def _overridable(cfg: TrainConfig) -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in attrs.fields(cls)]
    for reg in cfg.regularizers:
        keys += [f"regularizers.{reg.term_name}.{k}" for k in ("weight", "as", "enabled", "name")]
    return keys


def _unknown(cfg: TrainConfig, key: str, where: str) -> ConfigError:
    sections = ", ".join(f"{s}.{{{', '.join(attrs.fields_dict(c))}}}" for s, c in SECTIONS.items())
    terms = ", ".join(r.term_name for r in cfg.regularizers) or "none in this config"
    return ConfigError(
        f"{where}: unknown key {key!r}{_suggest(key, _overridable(cfg))} Can be overridden: "
        f"{sections}; regularizers.<term>.<key> with <key> weight, as, enabled, name or a "
        f"parameter of the regularizer (terms: {terms})."
    )


def _override(
    cfg: TrainConfig, key: str, value: Any, *, base_dir: Path | None, where: str
) -> TrainConfig:
    section, _, name = key.partition(".")
    try:
        if section == "regularizers":
            return _override_entry(cfg, key, name, value, where=where)
        cls = SECTIONS.get(section)
        if cls is None or name not in attrs.fields_dict(cls):
            raise _unknown(cfg, key, where)
        if base_dir is not None:
            value = _absolute(section, name, value, base_dir)
        changed = attrs.evolve(getattr(cfg, section), **{name: value})
        return attrs.evolve(cfg, **{section: changed})
    except InvalidValue as exc:
        raise ConfigError(f"{where}: {exc.at(key)}") from None
    except ConfigError:
        raise
    except ScheduleValueError as exc:  # "weight.start must be ..." -> "<key>.start must be ..."
        text = str(exc)
        text = key + text[len("weight") :] if text.startswith("weight") else f"{key}: {text}"
        raise ConfigError(f"{where}: {text}") from None
    except SpecError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


def _find_entry(cfg: TrainConfig, rest: str, key: str, where: str) -> tuple[int, str]:
    """The entry ``rest`` (``<term>.<key>``) addresses, and the key inside it."""
    regs = cfg.regularizers
    by_term = [
        (len(r.term_name), i) for i, r in enumerate(regs) if rest.startswith(r.term_name + ".")
    ]
    if by_term:
        size, index = max(by_term)
        return index, rest[size + 1 :]
    kinds = {r.kind for r in regs if rest.startswith(r.kind + ".")}
    for kind in sorted(kinds, key=len, reverse=True):
        matches = [i for i, r in enumerate(regs) if r.kind == kind]
        if len(matches) == 1:
            return matches[0], rest[len(kind) + 1 :]
        names = ", ".join(regs[i].term_name for i in matches)
        raise ConfigError(
            f"{where}: {key!r}: {len(matches)} entries are {kind!r} regularizers ({names}); "
            f"address one by its term name, e.g. regularizers.{regs[matches[0]].term_name}."
            f"{rest[len(kind) + 1 :]}"
        )
    raise _unknown(cfg, key, where)


def _parameters(kind: str) -> list[str] | None:
    """The constructor parameters of the regularizer ``kind`` (``None``: any, or not known here)."""
    import inspect

    from ._plugins import get_regularizer_class

    try:
        sig = inspect.signature(get_regularizer_class(kind))
    except (PluginError, TypeError, ValueError):
        return None  # an unknown kind is reported when the specs are built
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def _override_entry(
    cfg: TrainConfig, key: str, rest: str, value: Any, *, where: str
) -> TrainConfig:
    index, name = _find_entry(cfg, rest, key, where)
    reg = cfg.regularizers[index]
    if name in ENTRY_KEYS:
        changed = attrs.evolve(reg, **{_ATTRIBUTES.get(name, name): value})
    else:
        accepted = _parameters(reg.kind)
        if accepted is not None and name not in accepted:
            prefix = f"regularizers.{reg.term_name}."
            choices = [prefix + k for k in (*ENTRY_KEYS, *accepted)]
            raise ConfigError(
                f"{where}: unknown key {key!r}{_suggest(prefix + name, choices)} Keys of "
                f"{prefix}<key> ({reg.kind}): {', '.join((*ENTRY_KEYS, *accepted))}."
            )
        changed = attrs.evolve(reg, params={**reg.params, name: value})
    regs = list(cfg.regularizers)
    regs[index] = changed
    # later errors about the entries (its parameters are checked when the specs are
    # built) then say the value came from the command line, not from the file
    source = f"{cfg.source or 'the config'} with {where} {key}"
    try:
        return attrs.evolve(cfg, regularizers=regs, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


# --------------------------------------------------------------------------- writing


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a TOML-shaped dict (``None`` values left out; regularizer
    entries flattened back to ``name``/``weight``/``as``/``enabled``/params).
    ``config_from_dict(config_to_dict(c)) == c``."""
    return _converter.unstructure(cfg)


def _has_table(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    return isinstance(value, (list, tuple)) and any(_has_table(v) for v in value)


def _toml_key(key: str) -> str:
    """``key`` as TOML writes it (bare, or quoted and escaped)."""
    return tomli_w.dumps({key: 0})[: -len(" = 0\n")]


def _toml_inline(value: Any) -> str:
    """``value`` on one line: a table as an inline table, ``{ a = 1, b = "x" }``."""
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_inline(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[len("v = ") :].rstrip("\n")


def _toml_entry(entry: Mapping[str, Any]) -> str:
    """The body of one ``[[name]]`` block, its keys in order; a value holding a table
    is written inline (``weight = { schedule = "linear", ... }``)."""
    lines = []
    for key, value in entry.items():
        if _has_table(value):
            lines.append(f"{_toml_key(key)} = {_toml_inline(value)}\n")
        else:
            lines.append(tomli_w.dumps({key: value}))
    return "".join(lines)


def dumps_toml(data: Mapping[str, Any], *, header: str = "") -> str:
    """``data`` (as :func:`config_to_dict` returns) as TOML text, written by ``tomli_w``,
    after ``header`` as ``#`` comment lines.

    Each top-level key is written in the order given, a list of tables as
    ``[[name]]`` blocks (``tomli_w`` alone would write short ones inline), the
    tables inside an entry (a scheduled ``weight``) as inline tables.

    Raises:
        ConfigError: a value TOML cannot hold (``None``, an object).
    """
    chunks = ["\n".join(f"# {line}".rstrip() for line in header.splitlines())]

    def blocks(key: str, value: Any) -> bool:
        return (
            isinstance(value, list)
            and bool(value)
            and re.fullmatch(r"[A-Za-z0-9_-]+", key) is not None
            and all(isinstance(v, Mapping) for v in value)
        )

    try:
        # top-level values first: after a [table] header they would belong to it
        literals = {
            k: v for k, v in data.items() if not isinstance(v, Mapping) and not blocks(k, v)
        }
        chunks.append(tomli_w.dumps(literals))
        for key, value in data.items():
            if isinstance(value, Mapping):
                chunks.append(tomli_w.dumps({key: value}))
            elif blocks(key, value):
                chunks += [f"[[{key}]]\n{_toml_entry(entry)}" for entry in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot write the config as TOML: {exc}") from None
    return "\n".join(c.rstrip("\n") + "\n" for c in chunks if c)


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
