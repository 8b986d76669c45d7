"""A ``tinkex train`` run directory: one writer, atomic files, a strict past.

What a run directory holds::

    config.toml        the resolved config (every key; paths absolute)
    metrics.jsonl      one line per step, appended and flushed as the step ends
    samples.jsonl      the generation samples ([samples]): one line per prompt and step
    checkpoint/        state/ (TrainingClient.save_state), trainer.json, reference.pt
    summary.json, loss_components.png, grad_share.png    (tinkex._report)
    .tinkex.pid        the pid of the process training into it, while it does

The rules this module keeps:

- **One writer.** :meth:`RunDir.lock` takes an exclusive ``flock`` on the
  directory itself (no lock file to leave behind); a second ``tinkex train`` is
  refused with the holder's pid.
- **Atomic files.** Every file is written with :func:`tinkex._files.atomic_write`;
  a checkpoint directory is replaced by renaming the old one aside first, and a
  reader falls back to the aside copy if a crash came between the two renames.
- **A strict past.** On resume, only a torn *last* line of ``metrics.jsonl`` (a
  crash mid-write) is repaired, and reported; any other bad line stops the
  resume with its line number; ``samples.jsonl`` is cut back to the checkpoint
  the same way. The checkpoint's settings (batch size, data seed, data file and
  its content hash, the held-out set, model) must match the run being resumed.

Problems are :class:`tinkex.RunDirError` s naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from ._errors import RunDirError
from ._files import (
    aside_of,
    atomic_write_bytes,
    atomic_write_text,
    decode_utf8,
    fsync_dir,
    lock_directory,
    storage_errors,
    swap_in_dir,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "METRICS_FILE",
    "SAMPLES_FILE",
    "RunDir",
    "Trainer",
    "read_samples",
    "resume_mismatches",
    "scan_metrics",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CHECKPOINT_DIR = "checkpoint"
PID_FILE = ".tinkex.pid"
_ASIDE = aside_of(Path(CHECKPOINT_DIR)).name  # .checkpoint.old
_TRAINER_FILE = "trainer.json"
_REFERENCE_FILE = "reference.pt"
_STATE_DIR = "state"
_FORMAT_VERSION = 2


def _int_at_least(low: int | None) -> Any:
    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (low is not None and value < low)
        ):
            bound = "" if low is None else f" >= {low}"
            raise ValueError(f"{attribute.name} must be an integer{bound}, got {value!r}")

    return check


def _non_empty_str(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


@attrs.frozen
class Trainer:
    """``checkpoint/trainer.json``: where the run stands and what it was trained on.

    ``examples_sha256`` fingerprints the tokenized training examples (template,
    fields, ``max_length``, limit, tokenizer, the held-out split all change it);
    ``eval_sha256`` and ``eval_examples`` the held-out ones (``None`` and 0
    without ``[eval]``); ``reference`` says whether the run has the initial
    model's reference log-probabilities (``reference.pt`` then holds a row per
    training example, then a row per held-out example).
    """

    step: int = attrs.field(validator=_int_at_least(0))
    state: str = attrs.field(validator=_non_empty_str)
    batch_size: int = attrs.field(validator=_int_at_least(1))
    data_seed: int = attrs.field(validator=_int_at_least(None))
    data_path: str = attrs.field(validator=_non_empty_str)
    data_sha256: str = attrs.field(validator=_non_empty_str)
    examples_sha256: str = attrs.field(validator=_non_empty_str)
    examples: int = attrs.field(validator=_int_at_least(1))
    model: dict[str, Any] = attrs.field(validator=attrs.validators.instance_of(dict))
    reference: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    reference_sha256: str | None = attrs.field(  # of reference.pt, checked before loading it
        default=None, validator=attrs.validators.optional(_non_empty_str)
    )
    eval_sha256: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_non_empty_str)
    )
    eval_examples: int = attrs.field(default=0, validator=_int_at_least(0))
    format_version: int = _FORMAT_VERSION

    @property
    def examples_seen(self) -> int:
        return self.step * self.batch_size


@attrs.frozen
class MetricsScan:
    """What :func:`scan_metrics` found: the complete lines, and a torn last line if any."""

    lines: list[tuple[int, str]]  # (step, line text) in file order
    torn_line: int | None  # line number of a last line cut short by a crash
    unterminated: bool = False  # the last line is complete but lacks its newline


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _check_line(line: str) -> int:
    """The step of a complete, valid metrics line (``ValueError`` & co. otherwise)."""
    from ._types import CustomLossOutput

    row = json.loads(line, parse_constant=_reject_constant)
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    step = row["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    if not isinstance(row.get("output"), dict):
        raise ValueError("no 'output' object")
    CustomLossOutput.from_dict(row["output"])
    if "eval" in row:
        _check_eval(row["eval"])
    metrics = row.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise ValueError("'metrics' must map names to numbers")
    return step


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_eval(value: Any) -> None:
    """A metrics line's ``"eval"``: ``base_loss`` (and ``loss_total``) numbers, ``terms`` numbers."""
    if not isinstance(value, dict) or not _number(value.get("base_loss")):
        raise ValueError("'eval' must be an object with a number 'base_loss'")
    if "loss_total" in value and not _number(value["loss_total"]):
        raise ValueError("'eval.loss_total' must be a number")
    terms = value.get("terms", {})
    if not isinstance(terms, dict) or not all(_number(v) for v in terms.values()):
        raise ValueError("'eval.terms' must map names to numbers")


def _check_sample(line: str) -> int:
    """The step of a complete, valid ``samples.jsonl`` line."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
        raise ValueError("'prompt' and 'completion' must be strings")
    return step


def read_samples(path: Path) -> tuple[list[tuple[int, str]], int | None]:
    """The complete lines of ``samples.jsonl`` as ``(step, line)``, and the number of a
    torn last line (a crash mid-write; left out), if any.

    Raises:
        RunDirError: the file is unreadable, not UTF-8, or a complete line is not a
            sample or goes back in steps (naming the line).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    text = decode_utf8(
        raw, path, RunDirError, "the file is damaged -- remove it or start a new run"
    )
    parts = text.split("\n")
    lines: list[tuple[int, str]] = []
    torn, previous = None, 0
    for number, line in enumerate(parts, 1):
        if not line.strip():
            continue
        try:
            step = _check_sample(line)
        except (ValueError, TypeError) as exc:
            if number == len(parts):
                torn = number
                break
            raise RunDirError(
                f"{path}:{number}: not a valid samples line ({exc}); the file was edited or "
                f"damaged -- restore or remove it"
            ) from None
        if step < previous:
            raise RunDirError(
                f"{path}:{number}: step {step} after step {previous}; the file holds steps out "
                f"of order (two writers?) -- restore or remove it"
            )
        previous = step
        lines.append((step, line))
    return lines, torn


def scan_metrics(path: Path) -> MetricsScan:
    """Read ``metrics.jsonl`` line by line, checking each is a record of a later step.

    A last line without its newline is *torn* (a crash mid-write) and reported,
    not returned.

    Raises:
        RunDirError: the file is missing or not UTF-8, or a complete line is not a
            JSON record with a step after the previous line's (naming the line).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RunDirError(f"no {METRICS_FILE} at {path}; is this a tinkex run directory?") from None
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    text = decode_utf8(raw, path, RunDirError, "the file is damaged -- start a new run")
    parts = text.split("\n")
    torn, unterminated = None, False
    lines: list[tuple[int, str]] = []
    previous = 0
    for number, line in enumerate(parts, 1):
        last = number == len(parts)
        if not line.strip():
            continue
        try:
            step = _check_line(line)
        except (ValueError, KeyError, TypeError) as exc:
            if last:  # no newline after it: a crash cut it short
                torn = number
                break
            raise RunDirError(
                f"{path}:{number}: not a valid metrics line ({exc}); the file was edited or "
                f"damaged -- restore it, or start a new run"
            ) from None
        if step <= previous:
            raise RunDirError(
                f"{path}:{number}: step {step} after step {previous}; the file holds steps "
                f"twice or out of order (two writers?) -- start a new run"
            )
        previous = step
        lines.append((step, line))
        unterminated = last
    return MetricsScan(lines=lines, torn_line=torn, unterminated=unterminated)


@attrs.frozen
class MetricsPlan:
    """How a resume will cut ``metrics.jsonl`` back (see :meth:`RunDir.plan_metrics`)."""

    text: str | None  # the new contents, or None to leave the file as it is
    kept: int
    removed: int
    torn_line: int | None


class RunDir:
    """One run directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = path / CONFIG_FILE
        self.metrics = path / METRICS_FILE
        self.samples = path / SAMPLES_FILE
        self._fd: int | None = None
        self._created = False

    # ---------------------------------------------------------------- lock

    def holds_run(self) -> bool:
        """Whether the directory holds a run: a checkpoint, or steps in ``metrics.jsonl``.

        A ``config.toml`` alone (a start killed before its first step) is not a run:
        a fresh ``tinkex train`` may use the directory again.
        """
        if (self.path / CHECKPOINT_DIR).exists() or (self.path / _ASIDE).exists():
            return True
        try:
            return self.metrics.stat().st_size > 0
        except OSError:
            return False

    @classmethod
    def claim(cls, base: Path) -> RunDir:
        """A new, empty directory named ``base`` (or ``base-2``, ``base-3``, ...),
        created atomically, so two processes starting together never share one."""
        n = 1
        with storage_errors(f"a run directory under {base.parent}"):
            base.parent.mkdir(parents=True, exist_ok=True)
            while True:
                path = base if n == 1 else base.with_name(f"{base.name}-{n}")
                try:
                    path.mkdir()
                except FileExistsError:
                    n += 1
                    continue
                rd = cls(path)
                rd._created = True
                return rd

    def lock(self, *, create: bool) -> None:
        """Become the directory's only writer (creating it first when ``create``).

        Raises:
            RunDirError: another process holds the lock (its pid is named), or the
                directory cannot be created or opened.
        """
        if create and not self._created and not self.path.exists():
            with storage_errors(f"the run directory {self.path}"):
                self.path.mkdir(parents=True)
            self._created = True
        self._fd = lock_directory(
            self.path,
            PID_FILE,
            in_use="{path} is in use by another tinkex train{holder}; wait for it to "
            "finish, or train into another --out",
        )
        self.mark_started()  # the holder's pid, for a second process's refusal

    def mark_started(self) -> None:
        """Write the pid file (removed again by :meth:`unlock`)."""
        atomic_write_text(self.path / PID_FILE, f"{os.getpid()}\n")

    def unlock(self, *, remove_if_untouched: bool = False) -> None:
        """Release the lock; with ``remove_if_untouched``, also remove a directory
        this process created and left empty (a refused or failed start)."""
        with contextlib.suppress(OSError):
            (self.path / PID_FILE).unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove_if_untouched and self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty

    def forget_failed_start(self) -> None:
        """After a fresh run failed before its first step: remove what it wrote, so
        the same ``--out`` can be used again."""
        for path in (self.config, self.metrics, self.samples):
            if path == self.metrics and path.exists() and path.stat().st_size:
                continue
            with contextlib.suppress(OSError):
                path.unlink()

    # ---------------------------------------------------------------- files

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config, text)

    @contextlib.contextmanager
    def metrics_appender(self) -> Iterator[Any]:
        """The metrics file, opened for appending whole lines (each flushed)."""
        with storage_errors(str(self.metrics)), self.metrics.open("a", encoding="utf-8") as fh:
            yield fh

    def plan_metrics(self, checkpoint_step: int) -> MetricsPlan:
        """Check ``metrics.jsonl`` against the checkpoint, changing nothing.

        Raises:
            RunDirError: a bad line other than a torn last one, or fewer lines than
                the checkpoint's steps (lines would be lost).
        """
        if not self.metrics.exists():
            if checkpoint_step:
                raise RunDirError(
                    f"{self.metrics} is missing but the checkpoint is at step "
                    f"{checkpoint_step}; the run's history is gone -- start a new run"
                )
            return MetricsPlan(text=None, kept=0, removed=0, torn_line=None)
        scan = scan_metrics(self.metrics)
        kept = [(step, line) for step, line in scan.lines if step <= checkpoint_step]
        last = kept[-1][0] if kept else 0
        if last != checkpoint_step:
            raise RunDirError(
                f"{self.metrics} ends at step {last} but the checkpoint is at step "
                f"{checkpoint_step}; lines are missing -- start a new run"
            )
        removed = len(scan.lines) - len(kept)
        rewrite = removed or scan.torn_line is not None or scan.unterminated
        text = "".join(line + "\n" for _, line in kept) if rewrite else None
        return MetricsPlan(text=text, kept=len(kept), removed=removed, torn_line=scan.torn_line)

    def apply_metrics_plan(self, plan: MetricsPlan) -> None:
        """Cut ``metrics.jsonl`` back as planned (atomically)."""
        if plan.text is not None:
            atomic_write_text(self.metrics, plan.text)

    def plan_samples(self, checkpoint_step: int | None) -> str | None:
        """Check ``samples.jsonl`` against the checkpoint, changing nothing; return
        its new contents (the lines of the steps up to ``checkpoint_step``), ``""``
        for a fresh run (``checkpoint_step`` None: a start killed earlier may have
        left step-0 lines), or ``None`` to leave it as it is.

        Raises:
            RunDirError: a bad line other than a torn last one.
        """
        if not self.samples.exists():
            return None
        if checkpoint_step is None:
            return ""
        lines, torn = read_samples(self.samples)
        kept = [line for step, line in lines if step <= checkpoint_step]
        if len(kept) == len(lines) and torn is None:
            return None
        return "".join(line + "\n" for line in kept)

    def apply_samples_plan(self, text: str | None) -> None:
        """Cut ``samples.jsonl`` back as planned (atomically; ``""`` removes it)."""
        if text == "":
            with storage_errors(str(self.samples)):
                self.samples.unlink(missing_ok=True)
        elif text is not None:
            atomic_write_text(self.samples, text)

    def append_samples(self, rows: list[dict[str, Any]]) -> None:
        """Append sample lines to ``samples.jsonl`` (flushed)."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with storage_errors(str(self.samples)), self.samples.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_dir(self) -> Path | None:
        """The complete checkpoint directory, or None (the aside copy after a crash
        between the two renames of a checkpoint write)."""
        for name in (CHECKPOINT_DIR, _ASIDE):
            candidate = self.path / name
            if (candidate / _TRAINER_FILE).is_file():
                return candidate
        return None

    def read_trainer(self) -> Trainer | None:
        """The checkpoint's ``trainer.json``; None when there is no checkpoint.

        Raises:
            RunDirError: the file is corrupt (unreadable JSON, missing or wrong keys).
        """
        ckpt = self.checkpoint_dir()
        if ckpt is None:
            return None
        path = ckpt / _TRAINER_FILE
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
            fields = {f.name for f in attrs.fields(Trainer)}
            required = {f.name for f in attrs.fields(Trainer) if f.default is attrs.NOTHING}
            if not isinstance(raw, dict) or not required <= set(raw):
                missing = sorted(required - set(raw if isinstance(raw, dict) else ()))
                raise ValueError(f"missing keys {missing}")
            trainer = Trainer(**{k: v for k, v in raw.items() if k in fields})
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise RunDirError(
                f"{path} is corrupt ({exc}); this checkpoint cannot be resumed -- start a new run"
            ) from None
        return trainer

    async def save_checkpoint(
        self, tc: Any, step: int, fields: Mapping[str, Any], reference: Any, *, remote: bool
    ) -> Trainer:
        """Write a checkpoint atomically: state, ``trainer.json``, ``reference.pt``.

        ``fields`` are the other :class:`Trainer` fields; with ``remote`` (the
        Tinker backend) the state is saved on the service under a name derived
        from the run and the step, and ``trainer.json`` records that name.

        Raises:
            StorageError: writing failed (the previous checkpoint is still there,
                and no temporary directory is left behind).
        """
        import trio

        tmp = self.path / f".checkpoint.tmp-{step}"
        final = self.path / CHECKPOINT_DIR
        with storage_errors(f"the checkpoint in {self.path}"):
            for stale in self.path.glob(".checkpoint.tmp-*"):  # killed saves; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            try:
                if remote:
                    state = str(await tc.save_state(f"tinkex-{self.path.name}-step{step:06d}"))
                else:
                    await tc.save_state(str(tmp / _STATE_DIR))
                    state = _STATE_DIR
                digest = None
                if reference is not None:
                    import io

                    import torch

                    def save_reference() -> str:
                        # serialised in memory, written by atomic_write: torch.save on a full
                        # disk says "unexpected pos", not "No space left"
                        buffer = io.BytesIO()
                        torch.save([t.detach().cpu() for t in reference], buffer)
                        atomic_write_bytes(tmp / _REFERENCE_FILE, buffer.getvalue())
                        return hashlib.sha256(buffer.getvalue()).hexdigest()

                    digest = await trio.to_thread.run_sync(save_reference)
                trainer = Trainer(step=step, state=state, reference_sha256=digest, **fields)
                text = json.dumps(attrs.asdict(trainer), indent=2) + "\n"
                atomic_write_text(tmp / _TRAINER_FILE, text)
                fsync_dir(tmp)
                swap_in_dir(tmp, final, is_complete=lambda d: (d / _TRAINER_FILE).is_file())
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return trainer

    async def load_checkpoint(self, tc: Any, trainer: Trainer) -> list[Any] | None:
        """Restore the training state into ``tc``; return the saved reference logprobs.

        Raises:
            RunDirError: ``reference.pt`` is missing or corrupt.
        """
        import trio

        ckpt = self.checkpoint_dir()
        assert ckpt is not None
        state = trainer.state
        if "://" not in state and not Path(state).is_absolute():
            state = str(ckpt / state)
        await tc.load_state(state)
        if not trainer.reference:
            return None
        path = ckpt / _REFERENCE_FILE

        def load() -> list[Any]:
            import io

            import torch

            raw = path.read_bytes()
            if (
                trainer.reference_sha256 is not None
                and hashlib.sha256(raw).hexdigest() != trainer.reference_sha256
            ):
                raise ValueError("its SHA-256 is not the one trainer.json recorded")
            value = torch.load(io.BytesIO(raw), weights_only=True)
            if not isinstance(value, list) or not all(isinstance(t, torch.Tensor) for t in value):
                raise ValueError("not a list of tensors")
            return value

        try:
            reference = await trio.to_thread.run_sync(load)
        except Exception as exc:
            raise RunDirError(
                f"{path} is missing or corrupt ({type(exc).__name__}: {exc}); this checkpoint "
                f"cannot be resumed -- start a new run"
            ) from None
        rows = trainer.examples + trainer.eval_examples
        if len(reference) != rows:
            raise RunDirError(
                f"{path} holds {len(reference)} reference rows for {rows} examples; "
                f"it is corrupt -- start a new run"
            )
        return reference


_MODEL_DEFAULTS: dict[str, Any] = {"dtype": "auto", "gguf_file": None}


def resume_mismatches(trainer: Trainer, now: Mapping[str, Any]) -> list[str]:
    """Every setting of the run that differs now, as ``"what: the run had X, now Y"``."""
    checks = [
        ("training.batch_size", trainer.batch_size, now["batch_size"]),
        ("training.seed (the data order)", trainer.data_seed, now["data_seed"]),
        ("data.path", trainer.data_path, now["data_path"]),
        ("the data file's contents (SHA-256)", trainer.data_sha256[:12], now["data_sha256"][:12]),
        ("the number of examples", trainer.examples, now["examples"]),
        (
            "the tokenized examples (data.template, data.max_length, data.*_field, "
            "data.limit or the tokenizer changed)",
            trainer.examples_sha256[:12],
            now["examples_sha256"][:12],
        ),
    ]
    checks.append(
        (
            "the held-out eval set (eval.fraction, eval.path or its contents, or the "
            "tokenized examples changed)",
            (trainer.eval_sha256 or "none")[:12],
            (now.get("eval_sha256") or "none")[:12],
        )
    )
    for key in ("backend", "base_model", "lora_rank", "seed", "dtype", "gguf_file"):
        # a checkpoint older than the key had its default
        default = _MODEL_DEFAULTS.get(key)
        checks.append(
            (f"model.{key}", trainer.model.get(key, default), now["model"].get(key, default))
        )
    found = [f"{what}: the run had {a!r}, now {b!r}" for what, a, b in checks if a != b]
    if now["reference"] and not trainer.reference:
        found.append(
            "reference log-probabilities: the run was started without the initial model's, "
            "and a resumed model is not the initial model (a kl/consistency term or "
            "loss.reference = 'initial_model' needs a new run)"
        )
    return found
