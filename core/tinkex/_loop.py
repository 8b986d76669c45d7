"""The ``tinkex train`` loop: checks -> start -> composed-loss steps -> checkpoints.

:func:`run_training` does, in this order:

1. **Checks, writing nothing**: the data and the regularizers (already read by
   the caller), the run directory's lock, the model (created), the examples
   against the model's context, and on resume the checkpoint and its settings
   against the run's. Any refusal here raises before a byte is written, and a
   directory created for a fresh run is removed again.
2. **Start** (:attr:`Session.started`): ``config.toml`` is written (fresh run,
   or a resume that changes the step count), ``metrics.jsonl`` and
   ``samples.jsonl`` are cut back to the checkpoint (resume), reference
   log-probabilities are computed for the training and the held-out examples
   (fresh run), and the step-0 samples are generated (fresh run).
3. **Steps**: each trains with the learning rate of its step
   (:mod:`tinkex.schedules`; a scheduled regularizer weight takes its value at
   the step too), evaluates the held-out set when due (``[eval]``), writes its
   line to ``metrics.jsonl`` (flushed) as it ends, hands the same numbers to the
   metrics loggers (``[logging]``, :mod:`tinkex._loggers`; the first step of the
   session starts them), and generates the samples when due (``[samples]``); a
   checkpoint every ``checkpoint_every`` steps, at the end, when stopped (Ctrl-C)
   and after a failed step (of the last good one). The caller finishes the
   loggers once the report is written.

The data order, the held-out split and the learning rate are pure functions of
``(training.seed, step)`` and the config, so a checkpoint needs only its step to
continue exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from . import telemetry
from ._config import TrainConfig, config_to_dict, dumps_toml
from ._dataset import (
    Example,
    Renderer,
    batch_indices,
    eval_split,
    file_sha256,
    tokenize_examples,
)
from ._errors import RunDirError
from ._loggers import LoggerSet
from ._report import StepRecord
from ._rundir import RunDir, Trainer, resume_mismatches

__all__ = ["Callbacks", "Session", "StopFlag", "TrainResult", "make_base_loss", "run_training"]


@attrs.define
class StopFlag:
    """Set to ask the loop to stop after the step in progress (checkpoint first)."""

    requested: bool = False

    def set(self) -> None:
        self.requested = True


@attrs.define
class Callbacks:
    """What the loop tells its caller (the CLI's progress display); all optional."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[StepRecord], None] | None = None
    on_samples: Callable[[int, list[dict[str, Any]]], None] | None = None
    on_checkpoint: Callable[[int], None] | None = None
    on_note: Callable[[str], None] | None = None


@attrs.define
class Session:
    """What the caller needs to know when :func:`run_training` raises.

    ``started``: the run directory was written (a failure now is a failed run,
    exit 1, not a refusal, exit 2); ``last_step`` / ``checkpoint_step``: how far
    this run got.
    """

    started: bool = False
    last_step: int = 0
    checkpoint_step: int | None = None
    run_dir: Path | None = None  # the directory trained into (a claimed one's real name)


@attrs.frozen
class TrainResult:
    """How a run ended.

    Attributes:
        run_dir: the run directory.
        first_step: the first step this session ran (``start_step + 1``).
        last_step: the last completed step (== ``start_step`` when none ran).
        total_steps: the run's target step count.
        stopped: ``"completed"``, ``"interrupted"`` (Ctrl-C) or ``"nothing to do"``.
        wall_time_s: this session's wall time, set-up included.
        checkpoint_step: the step of the last checkpoint written (or resumed from).
    """

    run_dir: Path
    first_step: int
    last_step: int
    total_steps: int
    stopped: str
    wall_time_s: float
    checkpoint_step: int | None


def make_base_loss(normalize: str) -> Callable[[Any, Any], Any]:
    """The cross-entropy base loss ``(data, logprobs) -> (loss, metrics)``.

    ``-(weights * logprobs)`` summed over the batch; with ``normalize="tokens"``
    divided by the summed weights (so it is the mean negative log-likelihood per
    response token, in nats; an all-zero batch gives 0). Metrics:
    ``response_tokens`` (summed weights) and ``nll_per_token``.
    """
    from ._inputs import loss_input

    def cross_entropy(data: Any, logprobs: Any) -> Any:
        import torch

        lps = [logprobs] if isinstance(logprobs, torch.Tensor) else list(logprobs)
        total = None
        count = None
        for datum, lp in zip(data, lps, strict=True):
            w = loss_input(datum, "weights", like=lp)
            if w is None:
                w = torch.ones_like(lp)
            term = -(w.reshape(lp.shape) * lp).sum()
            total = term if total is None else total + term
            count = w.sum() if count is None else count + w.sum()
        if total is None:
            raise ValueError("cross_entropy got no data")
        tokens = float(count.detach())
        nll = float(total.detach())
        loss = total / max(tokens, 1.0) if normalize == "tokens" else total
        return loss, {"response_tokens": tokens, "nll_per_token": nll / tokens if tokens else 0.0}

    cross_entropy.__name__ = "cross_entropy"
    return cross_entropy


#: how many prompts ``[samples]`` takes from the data when ``samples.prompts`` is not set
DEFAULT_SAMPLE_PROMPTS = 3


def model_context_length(model: Any) -> int | None:
    """Positions the model was built for (``max_position_embeddings``), when it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _sha256_of(examples: list[Any]) -> str:
    return hashlib.sha256(json.dumps(examples, separators=(",", ":")).encode()).hexdigest()


def _fingerprint(
    cfg: TrainConfig, data_path: Path, examples: list[Any], held_out: list[Any] | None = None
) -> dict[str, Any]:
    """The settings a resume must match (see :func:`tinkex._rundir.resume_mismatches`)."""
    return {
        "batch_size": cfg.training.batch_size,
        "data_seed": cfg.training.seed,
        "data_path": str(data_path.resolve()),
        "data_sha256": file_sha256(data_path),
        "examples_sha256": _sha256_of(examples),
        "examples": len(examples),
        "eval_sha256": _sha256_of(held_out) if held_out else None,
        "eval_examples": len(held_out or ()),
        "model": {
            "backend": cfg.model.backend,
            "base_model": cfg.model.base_model,
            "lora_rank": cfg.model.lora_rank,
            "seed": cfg.model.seed,
            "dtype": cfg.model.dtype,
            "gguf_file": cfg.model.gguf_file,
        },
    }


@attrs.frozen
class Prepared:
    """The tokenized data of a run: what it trains on, what it holds out, its prompts.

    Attributes:
        renderer: how prompts are rendered for this tokenizer.
        train: the training examples (``model_input, target_tokens, weights``).
        held_out: the held-out examples (empty without ``[eval]``).
        train_prompts, held_out_prompts: their prompts, as written in the data.
        dropped: data examples dropped for want of a response token.
        held_out_indices: with ``eval.fraction``, the indices (among the
            tokenized data examples) held out; ``train_indices`` the others.
    """

    renderer: Renderer
    train: list[Example]
    held_out: list[Example]
    train_prompts: list[str]
    held_out_prompts: list[str]
    dropped: int
    train_indices: list[int]
    held_out_indices: list[int]
    held_out_dropped: int = 0  # eval.path examples dropped (no response token left)

    def sample_prompts(self, cfg: TrainConfig) -> list[str]:
        """``samples.prompts``, else the first held-out prompts, else the first training ones."""
        if cfg.samples.prompts is not None:
            return list(cfg.samples.prompts)
        source = self.held_out_prompts or self.train_prompts
        return source[:DEFAULT_SAMPLE_PROMPTS]


def prepare_data(
    cfg: TrainConfig,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]] | None = None,
    *,
    context_length: int | None = None,
    warn: bool = True,
) -> Prepared:
    """Tokenize the data (and ``[eval] path``'s) and split the held-out set off.

    With ``eval.fraction`` the held-out examples are :func:`tinkex._dataset.eval_split`
    of the tokenized data examples under ``training.seed``; with ``eval.path``
    they are that file's.

    Raises:
        ConfigError: no tokenizer, ``max_length`` beyond the model's context, no
            example that fits (of the data, or of ``eval.path``), or a fraction
            that leaves nothing to train on.
    """
    renderer = Renderer.for_config(cfg, tokenizer, warn=warn)
    max_length = cfg.data.max_length
    examples, kept = tokenize_examples(pairs, renderer, max_length, context_length=context_length)
    prompts = [pairs[i][0] for i in kept]
    train_idx, held_idx = list(range(len(examples))), []
    held: list[Example] = []
    held_prompts: list[str] = []
    if cfg.eval.fraction is not None:
        train_idx, held_idx = eval_split(len(examples), cfg.eval.fraction, cfg.training.seed)
        held = [examples[i] for i in held_idx]
        held_prompts = [prompts[i] for i in held_idx]
    elif eval_pairs is not None:
        held, ekept = tokenize_examples(
            eval_pairs, renderer, max_length, context_length=context_length, what="eval.path"
        )
        held_prompts = [eval_pairs[i][0] for i in ekept]
    return Prepared(
        renderer=renderer,
        train=[examples[i] for i in train_idx],
        held_out=held,
        train_prompts=[prompts[i] for i in train_idx],
        held_out_prompts=held_prompts,
        dropped=len(pairs) - len(kept),
        train_indices=train_idx,
        held_out_indices=held_idx,
        held_out_dropped=len(eval_pairs) - len(held)
        if eval_pairs is not None and not held_idx
        else 0,
    )


async def _target_logprobs(tc: Any, examples: list[Example], chunk: int = 64) -> list[Any]:
    """Each example's target-token log-probabilities under the model as it is now (CPU)."""
    from ._types import Datum

    out: list[Any] = []
    for i in range(0, len(examples), chunk):
        batch = [
            Datum(model_input=m, loss_fn_inputs={"target_tokens": t})
            for m, t, _ in examples[i : i + chunk]
        ]
        out.extend(lp.detach().to("cpu") for lp in await tc.forward(batch))
    return out


def _datums(
    examples: list[Example], reference: list[Any] | None, keys: tuple[str, ...]
) -> list[Any]:
    from ._types import Datum

    data = []
    for i, (model_input, targets, weights) in enumerate(examples):
        inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
        for key in keys:
            inputs[key] = reference[i]  # type: ignore[index]
        data.append(Datum(model_input=model_input, loss_fn_inputs=inputs))
    return data


async def evaluate(
    tc: Any,
    data: list[Any],
    specs: list[Any],
    *,
    batch_size: int = 32,
    parallel: bool = True,
    timeout: float | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The held-out metrics of the model as it is now, without gradients.

    The logprobs come from ``tc.forward`` in batches of ``batch_size``; then
    :func:`tinkex.compute_loss` runs once over the whole set, with the
    cross-entropy base loss normalised per response token (whatever
    ``loss.normalize`` says) and every enabled regularizer, a scheduled weight
    taken at ``step`` (the training step just completed).

    Returns:
        ``{"base_loss": mean NLL per response token, "loss_total": base + sum of
        weight * value, "terms": {name: value}}`` (what a metrics line's ``"eval"`` holds).
    """
    from ._pipeline import compute_loss

    logprobs: list[Any] = []
    for i in range(0, len(data), batch_size):
        logprobs.extend(lp.detach().to("cpu") for lp in await tc.forward(data[i : i + batch_size]))
    out = await compute_loss(
        data,
        logprobs,
        make_base_loss("tokens"),
        regularizers=[s for s in specs if s.enabled],
        track_grad_norms=False,
        parallel=parallel,
        timeout=timeout,
        step=step,
    )
    return {
        "base_loss": float(out.base_loss.value),
        "loss_total": float(out.loss_total),
        "terms": {name: float(r.value) for name, r in out.regularizers.items()},
    }


def _every(step: int, every: int, last: int) -> bool:
    return (every > 0 and step % every == 0) or step == last


def schedule_text(cfg: TrainConfig) -> str:
    """The learning-rate schedule in a few words, e.g. ``"lr 0.003 cosine to 0.0003, warmup 10"``."""
    sch = cfg.scheduler
    lr = cfg.optimizer.learning_rate
    text = f"lr {lr:g}"
    if sch.decay != "constant":
        text += f" {sch.decay} to {lr * sch.min_lr_ratio:g}"
    if sch.warmup_steps:
        text += f", warmup {sch.warmup_steps}"
    return text


async def run_training(
    cfg: TrainConfig,
    run_dir: Path,
    pairs: list[tuple[str, str]],
    specs: list[Any],
    *,
    eval_pairs: list[tuple[str, str]] | None = None,
    resume: bool = False,
    force: bool = False,
    claim: bool = False,
    stop: StopFlag | None = None,
    callbacks: Callbacks | None = None,
    session: Session | None = None,
    loggers: LoggerSet | None = None,
) -> TrainResult:
    """Train ``cfg.training.steps`` steps (in total) into ``run_dir``.

    ``pairs`` and ``specs`` are the data (prompts as written) and the regularizer
    specs, read and built by the caller from ``cfg`` (so their errors come before
    anything else); ``eval_pairs`` the ``[eval] path`` file's pairs. With
    ``claim``, ``run_dir`` is a name to claim (``-2``, ``-3``, ... appended when
    taken; see ``session.run_dir``). ``loggers`` (built by the caller with
    :func:`tinkex._loggers.build_loggers`) get every step's metrics; the caller
    calls ``loggers.finish(run_dir)`` after the report.

    Raises:
        RunDirError: the directory holds a run already (fresh), is locked, has no
            usable checkpoint, or the resume does not match the run (without
            ``force``) -- all before anything is written.
        ConfigError: the examples do not fit the model, or no held-out example does.
        BackendError, RegularizerError, StorageError: the backend, a term or the
            disk failed; ``session.started`` says whether the run had started.
    """
    from ._sampling import can_sample
    from ._training import TrainingClient

    t_session = time.perf_counter()
    stop = stop or StopFlag()
    cb = callbacks or Callbacks()
    session = session if session is not None else Session()
    tcfg = cfg.training
    backend_kwargs = cfg.backend_kwargs()
    rd = RunDir.claim(run_dir) if claim else RunDir(run_dir)
    run_dir = session.run_dir = rd.path

    if not resume and rd.holds_run():
        raise RunDirError(
            f"{run_dir} already holds a run; continue it with `tinkex train --resume "
            f"{run_dir}`, or choose another --out"
        )
    if resume and not rd.config.is_file():
        raise RunDirError(f"{run_dir} is not a tinkex run directory (no config.toml)")
    rd.lock(create=not resume)
    trainer: Trainer | None = None
    try:
        trainer = rd.read_trainer() if resume else None
        if resume and trainer is None:
            raise RunDirError(
                f"{run_dir} has no usable checkpoint (checkpoint/trainer.json); nothing was "
                f"changed -- start a new run with --out"
            )
        start_step = trainer.step if trainer is not None else 0
        if trainer is not None and start_step >= tcfg.steps:
            return TrainResult(
                run_dir=run_dir,
                first_step=start_step + 1,
                last_step=start_step,
                total_steps=tcfg.steps,
                stopped="nothing to do",
                wall_time_s=time.perf_counter() - t_session,
                checkpoint_step=start_step,
            )
        async with await TrainingClient.create(
            backend=cfg.model.backend,
            base_model=cfg.model.base_model,
            device=cfg.model.device,
            lora_rank=cfg.model.lora_rank,
            seed=cfg.model.seed,
            **backend_kwargs,
        ) as tc:
            context = model_context_length(getattr(tc.backend, "model", None))
            prep = prepare_data(cfg, tc.tokenizer, pairs, eval_pairs, context_length=context)
            examples, held = prep.train, prep.held_out
            fingerprint = _fingerprint(cfg, cfg.data_path, examples, held)
            reference: list[Any] | None = None
            held_changed = False
            if trainer is not None:
                mismatches = resume_mismatches(
                    trainer, {**fingerprint, "reference": cfg.uses_reference}
                )
                if mismatches and not force:
                    raise RunDirError(
                        f"cannot resume {run_dir}: "
                        + "; ".join(mismatches)
                        + ". Resume with the run's settings, or add --force to go on anyway"
                    )
                examples_changed = trainer.examples_sha256 != fingerprint["examples_sha256"]
                held_changed = (trainer.eval_sha256 or None) != fingerprint["eval_sha256"]
                if examples_changed and cfg.uses_reference and trainer.reference:
                    raise RunDirError(
                        f"cannot resume {run_dir}, even with --force: its reference "
                        f"log-probabilities (loss.reference) belong to the run's training "
                        f"examples, and the examples changed (the data, data.* or eval.* "
                        f"settings); resume with the run's settings, or start a new run"
                    )
                for line in mismatches:
                    warnings.warn(f"resuming with a changed setting ({line})", stacklevel=2)
                reference = await rd.load_checkpoint(tc, trainer)
                if cfg.model.backend != "tinker" and tc.step != trainer.step:
                    raise RunDirError(
                        f"{run_dir}: checkpoint/trainer.json says step {trainer.step} but the "
                        f"saved model state is at step {tc.step}; the checkpoint is "
                        f"inconsistent -- start a new run"
                    )
            plan = rd.plan_metrics(start_step)
            samples_plan = rd.plan_samples(start_step if trainer is not None else None)
            if stop.requested:
                raise KeyboardInterrupt

            # ---------------------------------------------------------- start
            session.started = True
            session.checkpoint_step = trainer.step if trainer is not None else None
            session.last_step = start_step
            if trainer is None or _config_changed(rd, cfg):
                header = (
                    "The resolved config of this run (written by tinkex train; every key, "
                    f"defaults included).\nResume with: tinkex train --resume {run_dir}"
                )
                rd.write_config(dumps_toml(config_to_dict(cfg), header=header))
            rd.apply_metrics_plan(plan)
            rd.apply_samples_plan(samples_plan)
            kept, removed, torn = plan.kept, plan.removed, plan.torn_line
            if torn is not None:
                warnings.warn(
                    f"repaired {rd.metrics}: its last line ({torn}) was cut short by a crash "
                    f"and was dropped",
                    stacklevel=2,
                )
            if resume:
                telemetry.emit(
                    "info",
                    "train.resume",
                    run_dir=str(run_dir),
                    checkpoint_step=start_step,
                    lines_kept=kept,
                    lines_removed=removed,
                    torn_line=torn,
                )
            held_ref: list[Any] | None = None
            if cfg.uses_reference and reference is None:
                # the initial model's target-token logprobs, computed once
                reference = await _target_logprobs(tc, examples)
                held_ref = await _target_logprobs(tc, held)
            elif reference is not None:
                reference, rest = reference[: len(examples)], reference[len(examples) :]
                if len(rest) == len(held) and (trainer is None or not held_changed):
                    held_ref = rest
                else:  # a forced resume with another held-out set
                    warnings.warn(
                        "the checkpoint holds no reference log-probabilities for this held-out "
                        "set; they are taken from the resumed model",
                        stacklevel=2,
                    )
                    held_ref = await _target_logprobs(tc, held)
            ref_keys = cfg.loss.reference_keys if (cfg.uses_reference and reference) else ()
            data = _datums(examples, reference, ref_keys)
            held_data = _datums(held, held_ref, ref_keys if held_ref is not None else ())
            prompts = prep.sample_prompts(cfg)
            if prompts and not can_sample(tc):
                warnings.warn(
                    f"no samples: generating them needs the model in this process, and the "
                    f"{cfg.model.backend!r} backend has none (set samples.prompts = [] to "
                    f"turn them off)",
                    stacklevel=2,
                )
                prompts = []

            info = {
                "run_dir": str(run_dir),
                "start_step": start_step,
                "total_steps": tcfg.steps,
                "examples": len(examples),
                "dropped": prep.dropped,
                "eval_examples": len(held),
                "eval_dropped": prep.held_out_dropped,
                "eval_source": (
                    None
                    if not held
                    else "held out"
                    if cfg.eval.fraction is not None
                    else str(cfg.eval_path)
                ),
                "samples": len(prompts),
                "schedule": schedule_text(cfg),
                "terms": ["base_loss", *[s.name for s in specs if s.enabled]],
                "backend": cfg.model.backend,
                "base_model": cfg.model.base_model,
                "device": str(getattr(tc.backend, "device", cfg.model.device)),
                "reference": bool(ref_keys),
                "resumed": trainer is not None,
            }
            telemetry.emit("info", "train.start", **info)
            if cb.on_start:
                cb.on_start(info)
            full_reference = None if reference is None else [*reference, *(held_ref or [])]
            loop = _Loop(
                tc=tc,
                rd=rd,
                cfg=cfg,
                specs=specs,
                data=data,
                held_data=held_data,
                prompts=prompts,
                renderer=prep.renderer,
                reference=full_reference,
                fingerprint=fingerprint,
                stop=stop,
                cb=cb,
                session=session,
                loggers=loggers,
            )
            if trainer is None and prompts:
                await loop.samples(0)
            step, stopped = await loop.run(start_step)
    finally:
        forget = session.started and trainer is None and session.last_step == 0
        if forget:  # a fresh run that failed before its first step: nothing worth keeping
            rd.forget_failed_start()
        rd.unlock(remove_if_untouched=forget or not session.started)
    result = TrainResult(
        run_dir=run_dir,
        first_step=start_step + 1,
        last_step=step,
        total_steps=tcfg.steps,
        stopped=stopped,
        wall_time_s=time.perf_counter() - t_session,
        checkpoint_step=session.checkpoint_step,
    )
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in attrs.asdict(result).items()}
    telemetry.emit("info", "train.stop", **fields)
    return result


def _config_changed(rd: RunDir, cfg: TrainConfig) -> bool:
    """Whether the run's ``config.toml`` says something else than ``cfg`` (a longer resume)."""
    from ._config import load_config

    try:
        return load_config(rd.config) != cfg
    except Exception:
        return True


@attrs.define
class _Loop:
    """The steps of one session, with their evaluations, samples and checkpoints."""

    tc: Any
    rd: RunDir
    cfg: TrainConfig
    specs: list[Any]
    data: list[Any]
    held_data: list[Any]
    prompts: list[str]
    renderer: Renderer
    reference: list[Any] | None  # training rows, then held-out rows (as checkpointed)
    fingerprint: dict[str, Any]
    stop: StopFlag
    cb: Callbacks
    session: Session
    loggers: LoggerSet | None = None

    @property
    def sample_every(self) -> int:
        every = self.cfg.samples.every
        return self.cfg.eval.every if every is None else every

    async def checkpoint(self, step: int) -> None:
        fields = {**self.fingerprint, "reference": self.reference is not None}
        await self.rd.save_checkpoint(
            self.tc, step, fields, self.reference, remote=self.cfg.model.backend == "tinker"
        )
        self.session.checkpoint_step = step
        telemetry.emit("info", "train.checkpoint", step=step, path=str(self.rd.path / "checkpoint"))
        if self.cb.on_checkpoint:
            self.cb.on_checkpoint(step)

    async def evaluate(self, step: int) -> dict[str, Any]:
        tcfg = self.cfg.training
        result = await evaluate(
            self.tc,
            self.held_data,
            self.specs,
            batch_size=self.cfg.eval.batch_size,
            parallel=tcfg.parallel,
            timeout=tcfg.timeout,
            step=step,
        )
        telemetry.emit(
            "info", "train.eval", step=step, base_loss=result["base_loss"], terms=result["terms"]
        )
        return result

    async def samples(self, step: int) -> None:
        from ._sampling import greedy_completions

        completions = await greedy_completions(
            self.tc,
            self.prompts,
            self.renderer,
            max_new_tokens=self.cfg.samples.max_new_tokens,
            should_stop=lambda: self.stop.requested,
        )
        if completions is None:  # Ctrl-C during generation: no cut-short samples
            return
        rows = [
            {"step": step, "prompt": p, "completion": c}
            for p, c in zip(self.prompts, completions, strict=True)
        ]
        self.rd.append_samples(rows)
        telemetry.emit("info", "train.samples", step=step, count=len(rows))
        if self.cb.on_samples:
            self.cb.on_samples(step, rows)

    async def run(self, start_step: int) -> tuple[int, str]:
        """The steps themselves; returns the last completed step and how the loop ended."""
        import trio

        tc, cfg, session, cb = self.tc, self.cfg, self.session, self.cb
        tcfg = cfg.training
        base_loss = make_base_loss(cfg.loss.normalize)
        adam = cfg.optimizer  # an AdamParams
        step, stopped = start_step, "completed"
        try:
            with self.rd.metrics_appender() as out:
                for step_no in range(start_step + 1, tcfg.steps + 1):
                    if self.stop.requested:
                        stopped = "interrupted"
                        break
                    indices = batch_indices(step_no, tcfg.batch_size, len(self.data), tcfg.seed)
                    batch = [self.data[i] for i in indices]
                    lr = cfg.learning_rate(step_no)
                    t0 = time.perf_counter()
                    fb = await tc.forward_backward_custom(
                        batch,
                        base_loss,
                        regularizers=self.specs,
                        track_grad_norms=tcfg.track_grad_norms,
                        parallel=tcfg.parallel,
                        timeout=tcfg.timeout,
                        mode=tcfg.mode,
                    )
                    opt = await tc.optim_step(attrs.evolve(adam, learning_rate=lr))
                    dt = time.perf_counter() - t0
                    tokens = sum(len(d) for d in batch)
                    flat = fb.custom.flat_metrics()
                    metrics = {
                        "step_time_s": dt,
                        "tokens": float(tokens),
                        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                        **{k: float(v) for k, v in fb.metrics.items() if k not in flat},
                        **{k: float(v) for k, v in opt.items() if _finite(v)},
                        "learning_rate": lr,
                    }
                    held, failed = None, None
                    if self.held_data and _every(step_no, cfg.eval.every, tcfg.steps):
                        try:
                            held = await self.evaluate(step_no)
                        except Exception as exc:  # the step itself is done: record it first
                            failed = exc
                    record = StepRecord(step=step_no, output=fb.custom, metrics=metrics, eval=held)
                    out.write(record.to_json() + "\n")
                    out.flush()
                    step = session.last_step = step_no
                    if self.loggers is not None:  # a failing logger warns once, never raises
                        self.loggers.log_record(self.rd.path, record)
                    if failed is not None:
                        raise failed
                    if cb.on_step:
                        cb.on_step(record)
                    if step_no % tcfg.log_every == 0 or step_no == tcfg.steps:
                        telemetry.emit(
                            "info",
                            "train.step",
                            step=step_no,
                            loss_total=fb.custom.loss_total,
                            base_loss=fb.custom.base_loss.value,
                            learning_rate=lr,
                            tokens_per_s=metrics["tokens_per_s"],
                        )
                    if self.prompts and _every(step_no, self.sample_every, tcfg.steps):
                        await self.samples(step_no)
                    every = tcfg.checkpoint_every
                    if every and step_no % every == 0 and step_no < tcfg.steps:
                        await self.checkpoint(step)
                    await trio.sleep(0)  # a checkpoint: Ctrl-C lands between steps
        except (trio.Cancelled, KeyboardInterrupt):
            raise  # a hard abort (second Ctrl-C): no checkpoint of the step in progress
        except BaseException:
            if step > (session.checkpoint_step or 0):
                with trio.CancelScope(shield=True):
                    try:
                        await self.checkpoint(step)  # the last good step
                    except Exception as exc:  # the step's own error is the one to report
                        telemetry.emit(
                            "error", "train.checkpoint_failed", step=step, error=repr(exc)
                        )
            raise
        if step > (session.checkpoint_step or 0):
            await self.checkpoint(step)
        return step, stopped


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- dry run


def check_one_step(
    cfg: TrainConfig,
    pairs: list[tuple[str, str]],
    specs: list[Any],
    eval_pairs: list[tuple[str, str]] | None = None,
) -> Prepared:
    """What ``--dry-run`` checks: everything a step needs except the model weights.

    The device, the backend keywords, the tokenized examples against the model's
    context, the held-out split (``[eval]``), the learning rate of the first and
    the last step, and one composed-loss step (base loss and every regularizer,
    reference inputs attached as a real run would) on stand-in log-probabilities,
    for a training batch and for the held-out set's first batch -- so what step 1
    would refuse, this refuses. Returns the prepared data.

    Raises:
        SpecError, ConfigError, RegularizerError: what step 1 would raise.
    """
    import torch
    import trio

    from ._pipeline import compose_loss
    from ._types import Datum

    cfg.backend_kwargs()  # dtype / gguf_file only where the backend takes them
    if cfg.model.backend == "local":
        from ._devices import parse_device

        parse_device(cfg.model.device, allow_auto=True)  # a device this machine has
    tokenizer, context, real = _tokenizer_and_context(cfg)
    prep = prepare_data(cfg, tokenizer, pairs, eval_pairs, context_length=context, warn=real)
    cfg.learning_rate(1)
    cfg.learning_rate(cfg.training.steps)
    g = torch.Generator().manual_seed(0)

    def stand_in(examples: list[Example]) -> tuple[list[Any], list[Any]]:
        batch, logprobs = [], []
        for model_input, targets, weights in examples:
            lp = -torch.rand(len(targets), generator=g) * 3  # stand-ins for the model's logprobs
            inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
            if cfg.uses_reference:
                for key in cfg.loss.reference_keys:
                    inputs[key] = lp.detach().clone()
            batch.append(Datum(model_input=model_input, loss_fn_inputs=inputs))
            logprobs.append(lp)
        return batch, logprobs

    checks = [
        (prep.train[: cfg.training.batch_size], cfg.loss.normalize, cfg.training.track_grad_norms)
    ]
    if prep.held_out:
        checks.append((prep.held_out[: cfg.eval.batch_size], "tokens", False))
    for examples, normalize, norms in checks:
        batch, logprobs = stand_in(examples)
        trio.run(
            lambda b=batch, lp=logprobs, n=normalize, t=norms: compose_loss(
                b,
                lp,
                make_base_loss(n),
                regularizers=specs,
                track_grad_norms=t,
                timeout=cfg.training.timeout,
                step=1,  # a scheduled weight takes its first value
            )
        )
    return prep


def _tokenizer_and_context(cfg: Any) -> tuple[Any, int | None, bool]:
    """The tokenizer and context length a dry run checks against, without the
    weights, and whether the tokenizer is the model's own (not a stand-in)."""
    from ._backends.tiny import ByteTokenizer, tiny_config

    base = cfg.model.base_model
    if cfg.model.backend == "local" and base == "tiny":
        return ByteTokenizer(), int(tiny_config().max_position_embeddings), True
    path = Path(base)
    if cfg.model.backend == "local" and path.is_dir():
        context = None
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            context = config.get("max_position_embeddings")
        except (OSError, ValueError):
            pass
        try:
            from ._backends.tiny import load_tokenizer

            tokenizer = load_tokenizer(path)
            if tokenizer is not None:
                return tokenizer, context, True
        except Exception:
            pass
        return ByteTokenizer(), context, False
    return ByteTokenizer(), None, False  # stand-in shapes only (a remote model is not fetched)
