"""The ``tinkex train`` loop: data -> composed-loss steps -> metrics lines -> checkpoints.

One run directory holds everything a run writes::

    config.toml        the resolved config (every key, data path made absolute)
    metrics.jsonl      one line per step: {"step", "output", "metrics"}, flushed as the step ends
    checkpoint/        the last checkpoint: state/ (TrainingClient.save_state),
                       trainer.json (step, data order), reference.pt (reference logprobs)
    summary.json, loss_components.png, grad_share.png   (written by tinkex._report)

The data order is a pure function of ``(training.seed, step)`` (a fresh shuffle of
the examples per epoch), so a checkpoint only needs the step number to resume
exactly where the run stopped. Resuming truncates ``metrics.jsonl`` to the lines
up to the checkpoint's step, so no line is lost or repeated.

A checkpoint is replaced atomically: the new one is written into a temporary
sibling directory, the old one renamed aside, the new one renamed into place, the
old one deleted. If a crash lands between the two renames, the aside copy is used.

Stopping: :class:`StopFlag` is checked between steps; ``tinkex train`` sets it on
the first Ctrl-C, and the loop then writes a checkpoint and returns.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import telemetry
from ._config import TrainConfig, build_regularizers, config_to_dict, dumps_toml, load_examples
from ._errors import ConfigError
from ._report import CONFIG_FILE, METRICS_FILE, StepRecord

__all__ = [
    "CHECKPOINT_DIR",
    "Callbacks",
    "StopFlag",
    "TrainResult",
    "batch_indices",
    "make_base_loss",
    "prepare_run_dir",
    "read_checkpoint_step",
    "run_training",
    "tokenize_examples",
    "truncate_metrics",
]

CHECKPOINT_DIR = "checkpoint"
_ASIDE = ".checkpoint.old"
_TRAINER_FILE = "trainer.json"
_REFERENCE_FILE = "reference.pt"
_STATE_DIR = "state"
#: test hook: exit abruptly (as a crash would) right after this step's line is written
CRASH_ENV = "TINKEX_TRAIN_CRASH_AFTER_STEP"


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


@attrs.frozen
class TrainResult:
    """How a run ended.

    Attributes:
        run_dir: the run directory.
        first_step: the first step this session ran (``start_step + 1``).
        last_step: the last completed step (== ``start_step`` when none ran).
        total_steps: the run's target step count.
        stopped: ``"completed"``, ``"interrupted"`` (Ctrl-C) or ``"failed"``.
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


# --------------------------------------------------------------------------- data


def _encode(tokenizer: Any, text: str, *, specials: bool) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=specials)
    except TypeError:  # a tokenizer without the keyword
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def tokenize_examples(
    pairs: Sequence[tuple[str, str]], tokenizer: Any, max_length: int
) -> tuple[list[tuple[list[int], list[int], list[float]]], int]:
    """Tokenise ``(prompt, response)`` pairs into ``(model_input, target_tokens, weights)``.

    The sequence is ``encode(prompt)`` (with the tokenizer's special tokens, e.g.
    BOS) + ``encode(response)`` + EOS; ``model_input = tokens[:-1]``,
    ``target_tokens = tokens[1:]``, and ``weights`` is 1 where the target is a
    response token or EOS, 0 where it is part of the prompt. Sequences longer than
    ``max_length`` inputs are cut from the end; an example left with no response
    token is dropped.

    Returns:
        the examples and the number dropped.

    Raises:
        ConfigError: the tokenizer is missing, or every example was dropped.
    """
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ConfigError(
            "the model has no tokenizer (tc.tokenizer is None); use a model directory that "
            'includes one, or base_model = "tiny"'
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    dropped = 0
    for prompt, response in pairs:
        p = _encode(tokenizer, prompt, specials=True)
        r = _encode(tokenizer, response, specials=False)
        if eos is not None:
            r = [*r, int(eos)]
        tokens = (p + r)[: max_length + 1]
        n_prompt = len(p)
        if len(tokens) <= n_prompt or len(tokens) < 2:
            dropped += 1
            continue
        targets = tokens[1:]
        # target t is tokens[t + 1]: a response token when t + 1 >= n_prompt
        weights = [1.0 if t + 1 >= n_prompt else 0.0 for t in range(len(targets))]
        out.append((tokens[:-1], targets, weights))
    if not out:
        raise ConfigError(
            f"no example fits data.max_length = {max_length} tokens with at least one response "
            f"token; raise data.max_length"
        )
    return out, dropped


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The example indices of ``step`` (1-based): consecutive slices of a stream of
    per-epoch shuffles, so the order depends only on ``(seed, step)``."""
    start = (step - 1) * batch_size
    out = []
    perms: dict[int, list[int]] = {}
    for g in range(start, start + batch_size):
        epoch, i = divmod(g, n)
        perm = perms.get(epoch)
        if perm is None:
            perm = list(range(n))
            random.Random(f"tinkex-data:{seed}:{epoch}").shuffle(perm)
            perms[epoch] = perm
        out.append(perm[i])
    return out


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


# --------------------------------------------------------------------------- metrics file


def truncate_metrics(path: Path, last_step: int) -> tuple[int, int]:
    """Keep only the lines of ``metrics.jsonl`` with ``step <= last_step`` (atomically).

    A line cut short by a crash is dropped too. Returns ``(kept, removed)``.
    """
    if not path.exists():
        return 0, 0
    kept: list[str] = []
    removed = 0
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            removed += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            removed += 1
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept), removed


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, _ASIDE):  # the aside copy: a crash between the renames
        candidate = run_dir / name
        if (candidate / _TRAINER_FILE).is_file():
            return candidate
    return None


def read_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's last checkpoint, or None when it has none."""
    ckpt = _checkpoint_dir(run_dir)
    if ckpt is None:
        return None
    return int(json.loads((ckpt / _TRAINER_FILE).read_text())["step"])


async def _save_checkpoint(
    tc: Any,
    run_dir: Path,
    step: int,
    cfg: TrainConfig,
    reference: list[Any] | None,
    n_examples: int,
) -> None:
    tmp = run_dir / f".checkpoint.tmp-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if cfg.model.backend == "tinker":
        state_ref = await tc.save_state(f"tinkex-{run_dir.name}-step{step:06d}")
    else:
        written = Path(await tc.save_state(str(tmp / _STATE_DIR)))
        state_ref = _state_ref(written, tmp)
    if reference is not None:
        import torch

        torch.save([t.detach().cpu() for t in reference], tmp / _REFERENCE_FILE)
    trainer = {
        "step": step,
        "state": state_ref,
        "data_seed": cfg.training.seed,
        "batch_size": cfg.training.batch_size,
        "examples": n_examples,
        "examples_seen": step * cfg.training.batch_size,
        "reference": reference is not None,
    }
    (tmp / _TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n", encoding="utf-8")
    final, aside = run_dir / CHECKPOINT_DIR, run_dir / _ASIDE
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside.exists():
        shutil.rmtree(aside)


def _state_ref(written: Path, tmp: Path) -> str:
    """How trainer.json names the state: relative when it sits inside the checkpoint."""
    return _STATE_DIR if written.resolve() == (tmp / _STATE_DIR).resolve() else str(written)


async def _load_checkpoint(tc: Any, ckpt: Path) -> tuple[dict[str, Any], list[Any] | None]:
    trainer = json.loads((ckpt / _TRAINER_FILE).read_text())
    state = trainer["state"]
    if "://" not in state and not Path(state).is_absolute():
        state = str(ckpt / state)
    await tc.load_state(state)
    reference = None
    if trainer.get("reference") and (ckpt / _REFERENCE_FILE).is_file():
        import torch

        reference = torch.load(ckpt / _REFERENCE_FILE, weights_only=True)
    return trainer, reference


# --------------------------------------------------------------------------- the loop


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, *, resume: bool) -> None:
    """Create the run directory and write ``config.toml``.

    Raises:
        ConfigError: a fresh run into a directory that already holds a run.
    """
    if not resume and (run_dir / METRICS_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a run (it has {METRICS_FILE}); continue it with "
            f"`tinkex train --resume {run_dir}` or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    header = (
        "The resolved config of this run (written by tinkex train; every key, defaults included).\n"
        f"Resume with: tinkex train --resume {run_dir}"
    )
    text = dumps_toml(config_to_dict(cfg), header=header)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, run_dir / CONFIG_FILE)


async def run_training(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    stop: StopFlag | None = None,
    callbacks: Callbacks | None = None,
) -> TrainResult:
    """Train ``cfg.training.steps`` steps (in total) into ``run_dir``.

    Validates the data and the regularizers before creating the model; on a fresh
    run writes ``config.toml``; on ``resume`` loads the last checkpoint, truncates
    ``metrics.jsonl`` to it and goes on from the next step. Writes a checkpoint
    every ``checkpoint_every`` steps, at the end, and when stopped (``stop`` set,
    or a failed step: the checkpoint then holds the last completed step).

    Raises:
        ConfigError: bad data or regularizer entries, or a run directory mismatch.
        BackendError: the backend cannot be created or fails.
        RegularizerError: a term failed (after the checkpoint of the last good step).
    """
    import trio

    from ._training import AdamParams, TrainingClient
    from ._types import Datum

    t_session = time.perf_counter()
    stop = stop or StopFlag()
    cb = callbacks or Callbacks()
    tcfg = cfg.training
    pairs = load_examples(cfg)
    specs = build_regularizers(cfg)
    base_loss = make_base_loss(cfg.loss.normalize)
    prepare_run_dir(run_dir, cfg, resume=resume)
    metrics_path = run_dir / METRICS_FILE

    ckpt = _checkpoint_dir(run_dir) if resume else None
    async with await TrainingClient.create(
        backend=cfg.model.backend,
        base_model=cfg.model.base_model,
        device=cfg.model.device,
        lora_rank=cfg.model.lora_rank,
        seed=cfg.model.seed,
    ) as tc:
        examples, dropped = tokenize_examples(pairs, tc.tokenizer, cfg.data.max_length)
        start_step = 0
        reference: list[Any] | None = None
        if ckpt is not None:
            trainer, reference = await _load_checkpoint(tc, ckpt)
            start_step = int(trainer["step"])
            if trainer.get("examples") not in (None, len(examples)):
                raise ConfigError(
                    f"the checkpoint in {run_dir} was trained on {trainer['examples']} examples but the "
                    f"data now has {len(examples)}; the data file changed since the run started"
                )
        kept, removed = truncate_metrics(metrics_path, start_step)
        if resume:
            telemetry.emit(
                "info",
                "train.resume",
                run_dir=str(run_dir),
                checkpoint_step=start_step if ckpt is not None else None,
                lines_kept=kept,
                lines_removed=removed,
            )

        if cfg.uses_reference and reference is None:
            # reference logprobs from the model as it is now: the initial model on a fresh
            # run (a resumed run without a saved reference would use its checkpoint instead)
            reference = []
            for i in range(0, len(examples), 64):
                chunk = [
                    Datum(model_input=m, loss_fn_inputs={"target_tokens": t})
                    for m, t, _ in examples[i : i + 64]
                ]
                reference.extend(lp.detach().to("cpu") for lp in await tc.forward(chunk))
        ref_keys = cfg.loss.reference_keys if (cfg.uses_reference and reference is not None) else ()
        data = []
        for i, (model_input, targets, weights) in enumerate(examples):
            inputs: dict[str, Any] = {"target_tokens": targets, "weights": weights}
            for key in ref_keys:
                inputs[key] = reference[i]
            data.append(Datum(model_input=model_input, loss_fn_inputs=inputs))

        adam = AdamParams(**attrs.asdict(cfg.optimizer))
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
            "resumed": ckpt is not None,
        }
        telemetry.emit("info", "train.start", **info)
        if cb.on_start:
            cb.on_start(info)

        last_ckpt = start_step if ckpt is not None else None
        step = start_step
        stopped = "completed"
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        try:
            with metrics_path.open("a", encoding="utf-8") as out:
                for step_no in range(start_step + 1, tcfg.steps + 1):
                    if stop.requested:
                        stopped = "interrupted"
                        break
                    batch = [
                        data[i]
                        for i in batch_indices(step_no, tcfg.batch_size, len(data), tcfg.seed)
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
                    step = step_no
                    if crash_after and step_no == crash_after:
                        os._exit(3)  # test hook: die like a crash (no checkpoint, no cleanup)
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
                    if (
                        tcfg.checkpoint_every
                        and step_no % tcfg.checkpoint_every == 0
                        and step_no < tcfg.steps
                    ):
                        await _checkpoint(tc, run_dir, step_no, cfg, reference, len(data), cb)
                        last_ckpt = step_no
                    await trio.sleep(0)  # a checkpoint: Ctrl-C lands between steps
        except (trio.Cancelled, KeyboardInterrupt):
            stopped = "aborted"  # a hard abort (second Ctrl-C): no checkpoint
            raise
        except BaseException:
            stopped = "failed"
            raise
        finally:
            # the end, a stop request and a failed step all leave a checkpoint of the
            # last completed step (a failed step back-propagated nothing)
            if stopped != "aborted" and step > (last_ckpt or 0):
                with trio.CancelScope(shield=True):
                    try:
                        await _checkpoint(tc, run_dir, step, cfg, reference, len(data), cb)
                        last_ckpt = step
                    except Exception as exc:
                        if stopped != "failed":
                            raise
                        # the step's own error is the one to report
                        telemetry.emit(
                            "error", "train.checkpoint_failed", step=step, error=repr(exc)
                        )
    result = TrainResult(
        run_dir=run_dir,
        first_step=start_step + 1,
        last_step=step,
        total_steps=tcfg.steps,
        stopped=stopped,
        wall_time_s=time.perf_counter() - t_session,
        checkpoint_step=last_ckpt,
    )
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in attrs.asdict(result).items()}
    telemetry.emit("info", "train.stop", **fields)
    return result


async def _checkpoint(
    tc: Any, run_dir: Path, step: int, cfg: TrainConfig, reference: Any, n: int, cb: Callbacks
) -> None:
    await _save_checkpoint(tc, run_dir, step, cfg, reference, n)
    telemetry.emit("info", "train.checkpoint", step=step, path=str(run_dir / CHECKPOINT_DIR))
    if cb.on_checkpoint:
        cb.on_checkpoint(step)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
