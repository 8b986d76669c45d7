"""The ``tinkex train`` loop: checks -> start -> composed-loss steps -> checkpoints.

:func:`run_training` does, in this order:

1. **Checks, writing nothing**: the data and the regularizers (already read by
   the caller), the run directory's lock, the model (created), the examples
   against the model's context, and on resume the checkpoint and its settings
   against the run's. Any refusal here raises before a byte is written, and a
   directory created for a fresh run is removed again.
2. **Start** (:attr:`Session.started`): ``config.toml`` is written (fresh run,
   or a resume that changes the step count), ``metrics.jsonl`` is cut back to the
   checkpoint (resume), reference log-probabilities are computed (fresh run).
3. **Steps**: each writes its line to ``metrics.jsonl`` (flushed) as it ends; a
   checkpoint every ``checkpoint_every`` steps, at the end, when stopped (Ctrl-C)
   and after a failed step (of the last good one).

The data order is a pure function of ``(training.seed, step)``, so a checkpoint
needs only its step to continue exactly where the run stopped.
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
from ._dataset import batch_indices, file_sha256, tokenize_pairs
from ._errors import RunDirError
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


def model_context_length(model: Any) -> int | None:
    """Positions the model was built for (``max_position_embeddings``), when it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _fingerprint(cfg: TrainConfig, data_path: Path, examples: list[Any]) -> dict[str, Any]:
    """The settings a resume must match (see :func:`tinkex._rundir.resume_mismatches`)."""
    tokens = hashlib.sha256(json.dumps(examples, separators=(",", ":")).encode()).hexdigest()
    return {
        "batch_size": cfg.training.batch_size,
        "data_seed": cfg.training.seed,
        "data_path": str(data_path.resolve()),
        "data_sha256": file_sha256(data_path),
        "examples_sha256": tokens,
        "examples": len(examples),
        "model": {
            "backend": cfg.model.backend,
            "base_model": cfg.model.base_model,
            "lora_rank": cfg.model.lora_rank,
            "seed": cfg.model.seed,
        },
    }


async def run_training(
    cfg: TrainConfig,
    run_dir: Path,
    pairs: list[tuple[str, str]],
    specs: list[Any],
    *,
    resume: bool = False,
    force: bool = False,
    claim: bool = False,
    stop: StopFlag | None = None,
    callbacks: Callbacks | None = None,
    session: Session | None = None,
) -> TrainResult:
    """Train ``cfg.training.steps`` steps (in total) into ``run_dir``.

    ``pairs`` and ``specs`` are the data and the regularizer specs, read and built
    by the caller from ``cfg`` (so their errors come before anything else). With
    ``claim``, ``run_dir`` is a name to claim (``-2``, ``-3``, ... appended when
    taken; see ``session.run_dir``).

    Raises:
        RunDirError: the directory holds a run already (fresh), is locked, has no
            usable checkpoint, or the resume does not match the run (without
            ``force``) -- all before anything is written.
        ConfigError: the examples do not fit the model.
        BackendError, RegularizerError, StorageError: the backend, a term or the
            disk failed; ``session.started`` says whether the run had started.
    """
    from ._training import TrainingClient
    from ._types import Datum

    t_session = time.perf_counter()
    stop = stop or StopFlag()
    cb = callbacks or Callbacks()
    session = session if session is not None else Session()
    tcfg = cfg.training
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
        ) as tc:
            context = model_context_length(getattr(tc.backend, "model", None))
            examples, dropped = tokenize_pairs(
                pairs, tc.tokenizer, cfg.data.max_length, context_length=context
            )
            fingerprint = _fingerprint(cfg, cfg.data_path, examples)
            reference: list[Any] | None = None
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
            if cfg.uses_reference and reference is None:
                # the initial model's target-token logprobs, computed once
                reference = []
                for i in range(0, len(examples), 64):
                    chunk = [
                        Datum(model_input=m, loss_fn_inputs={"target_tokens": t})
                        for m, t, _ in examples[i : i + 64]
                    ]
                    reference.extend(lp.detach().to("cpu") for lp in await tc.forward(chunk))
            ref_keys = cfg.loss.reference_keys if (cfg.uses_reference and reference) else ()
            data = []
            for i, (model_input, targets, weights) in enumerate(examples):
                inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
                for key in ref_keys:
                    inputs[key] = reference[i]  # type: ignore[index]
                data.append(Datum(model_input=model_input, loss_fn_inputs=inputs))

            info = {
                "run_dir": str(run_dir),
                "start_step": start_step,
                "total_steps": tcfg.steps,
                "examples": len(examples),
                "dropped": dropped,
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
            step, stopped = await _steps(
                tc, rd, cfg, data, specs, start_step, reference, fingerprint, stop, cb, session
            )
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


async def _steps(
    tc: Any,
    rd: RunDir,
    cfg: TrainConfig,
    data: list[Any],
    specs: list[Any],
    start_step: int,
    reference: list[Any] | None,
    fingerprint: dict[str, Any],
    stop: StopFlag,
    cb: Callbacks,
    session: Session,
) -> tuple[int, str]:
    """The steps themselves; returns the last completed step and how the loop ended."""
    import trio

    tcfg = cfg.training
    base_loss = make_base_loss(cfg.loss.normalize)
    adam = cfg.optimizer  # an AdamParams
    step, stopped = start_step, "completed"

    async def checkpoint() -> None:
        fields = {**fingerprint, "reference": reference is not None}
        await rd.save_checkpoint(tc, step, fields, reference, remote=cfg.model.backend == "tinker")
        session.checkpoint_step = step
        telemetry.emit("info", "train.checkpoint", step=step, path=str(rd.path / "checkpoint"))
        if cb.on_checkpoint:
            cb.on_checkpoint(step)

    try:
        with rd.metrics_appender() as out:
            for step_no in range(start_step + 1, tcfg.steps + 1):
                if stop.requested:
                    stopped = "interrupted"
                    break
                batch = [
                    data[i] for i in batch_indices(step_no, tcfg.batch_size, len(data), tcfg.seed)
                ]
                t0 = time.perf_counter()
                fb = await tc.forward_backward_custom(
                    batch,
                    base_loss,
                    regularizers=specs,
                    track_grad_norms=tcfg.track_grad_norms,
                    parallel=tcfg.parallel,
                    timeout=tcfg.timeout,
                    mode=tcfg.mode,
                )
                opt = await tc.optim_step(adam)
                dt = time.perf_counter() - t0
                tokens = sum(len(d) for d in batch)
                flat = fb.custom.flat_metrics()
                metrics = {
                    "step_time_s": dt,
                    "tokens": float(tokens),
                    "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                    **{k: float(v) for k, v in fb.metrics.items() if k not in flat},
                    **{k: float(v) for k, v in opt.items() if _finite(v)},
                }
                record = StepRecord(step=step_no, output=fb.custom, metrics=metrics)
                out.write(record.to_json() + "\n")
                out.flush()
                step = session.last_step = step_no
                if cb.on_step:
                    cb.on_step(record)
                if step_no % tcfg.log_every == 0 or step_no == tcfg.steps:
                    telemetry.emit(
                        "info",
                        "train.step",
                        step=step_no,
                        loss_total=fb.custom.loss_total,
                        base_loss=fb.custom.base_loss.value,
                        tokens_per_s=metrics["tokens_per_s"],
                    )
                every = tcfg.checkpoint_every
                if every and step_no % every == 0 and step_no < tcfg.steps:
                    await checkpoint()
                await trio.sleep(0)  # a checkpoint: Ctrl-C lands between steps
    except (trio.Cancelled, KeyboardInterrupt):
        raise  # a hard abort (second Ctrl-C): no checkpoint of the step in progress
    except BaseException:
        if step > (session.checkpoint_step or 0):
            with trio.CancelScope(shield=True):
                try:
                    await checkpoint()  # the last good step (a failed step changed nothing)
                except Exception as exc:  # the step's own error is the one to report
                    telemetry.emit("error", "train.checkpoint_failed", step=step, error=repr(exc))
        raise
    if step > (session.checkpoint_step or 0):
        await checkpoint()
    return step, stopped


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- dry run


def check_one_step(
    cfg: TrainConfig, pairs: list[tuple[str, str]], specs: list[Any]
) -> tuple[int, int]:
    """What ``--dry-run`` checks: everything a step needs except the model weights.

    The device, the tokenized examples against the model's context, and one
    composed-loss step (base loss and every regularizer, reference inputs
    attached as a real run would) on stand-in log-probabilities -- so what step 1
    would refuse, this refuses. Returns ``(examples, dropped)``.

    Raises:
        SpecError, ConfigError, RegularizerError: what step 1 would raise.
    """
    import torch
    import trio

    from ._pipeline import compose_loss
    from ._types import Datum

    if cfg.model.backend == "local":
        from ._devices import parse_device

        parse_device(cfg.model.device, allow_auto=True)  # a device this machine has
    tokenizer, context = _tokenizer_and_context(cfg)
    examples, dropped = tokenize_pairs(
        pairs, tokenizer, cfg.data.max_length, context_length=context
    )
    g = torch.Generator().manual_seed(0)
    batch, logprobs = [], []
    for model_input, targets, weights in examples[: cfg.training.batch_size]:
        lp = -torch.rand(len(targets), generator=g) * 3  # stand-ins for the model's logprobs
        inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
        if cfg.uses_reference:
            for key in cfg.loss.reference_keys:
                inputs[key] = lp.detach().clone()
        batch.append(Datum(model_input=model_input, loss_fn_inputs=inputs))
        logprobs.append(lp)
    trio.run(
        lambda: compose_loss(
            batch,
            logprobs,
            make_base_loss(cfg.loss.normalize),
            regularizers=specs,
            track_grad_norms=cfg.training.track_grad_norms,
            timeout=cfg.training.timeout,
        )
    )
    return len(examples), dropped


def _tokenizer_and_context(cfg: Any) -> tuple[Any, int | None]:
    """The tokenizer and context length a dry run checks against, without the weights."""
    from ._backends.tiny import ByteTokenizer, tiny_config

    base = cfg.model.base_model
    if cfg.model.backend == "local" and base == "tiny":
        return ByteTokenizer(), int(tiny_config().max_position_embeddings)
    path = Path(base)
    if cfg.model.backend == "local" and path.is_dir():
        context = None
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            context = config.get("max_position_embeddings")
        except (OSError, ValueError):
            pass
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path), context
        except Exception:
            return ByteTokenizer(), context
    return ByteTokenizer(), None  # stand-in shapes only (a remote model is not fetched)
