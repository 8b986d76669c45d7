"""``tinkex sweep``: a grid of config values times seeds, each combination a ``tinkex train`` run.

A sweep directory holds::

    sweep.json                 the manifest: config, --set items, grid, seeds, steps,
                               every variant with its params and its runs (status)
    <variant>-seed<k>/         one run directory per variant and seed (``tinkex train``'s)
    logs/<variant>-seed<k>.log what each run's process wrote (JSON lines)
    compare_loss.png, compare_grad_share.png    (``tinkex compare``, at the end)
    .tinkex-sweep.pid          the pid of the sweep running in it, while it does

How it runs: every run is a ``tinkex train`` process (``python -c`` bootstrapping
:func:`tinkex._cli.main`, so it is exactly that command), started in its own
process group with ``-q`` and ``TINKEX_LOG_JSON=1``; ``--jobs N`` keeps N of them
going, each with ``OMP_NUM_THREADS = cores // N`` torch threads. A run that fails
is reported and the others go on. Ctrl-C is forwarded to every running process
once per press (the first: stop after the step, checkpoint; the second: abort); on
Linux a run also gets a Ctrl-C when the sweep process dies, so it checkpoints and
stops rather than training on unattended.

Resuming: run the same command again (same ``--out``). Each run is looked at on
disk: a checkpoint at the target step is done (skipped); an earlier checkpoint is
resumed (``tinkex train --resume``); no usable checkpoint means the run never
got anywhere, and the sweep -- which owns its run directories -- starts it over.
The config file's contents, the ``--set`` items, the grid and the seeds must be
those the sweep started with (else it is refused, naming what differs);
``--steps`` and ``--jobs`` may change (a larger ``--steps`` trains every run on).

Nothing here imports torch; the config checks load the regularizer plugins.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from ._errors import ConfigError, RunDirError
from ._files import (
    atomic_write_text,
    decode_utf8,
    lock_directory,
    storage_errors,
)

__all__ = [
    "SWEEP_FILE",
    "GridAxis",
    "PlannedRun",
    "SweepPlan",
    "SweepRunner",
    "Variant",
    "manifest_differences",
    "parse_grid",
    "plan_sweep",
    "read_manifest",
    "run_state",
    "split_values",
    "variant_name",
]

SWEEP_FILE = "sweep.json"
LOG_DIR = "logs"
PID_FILE = ".tinkex-sweep.pid"
FORMAT_VERSION = 1
#: keys a grid may not vary: ``--seeds`` sets both for every run
_SEED_KEYS = ("model.seed", "training.seed")
_MAX_NAME = 96


# --------------------------------------------------------------------------- the grid


@attrs.frozen
class GridAxis:
    """One ``--grid KEY=V1,V2,...``: the key and its values, as typed and as read (TOML)."""

    key: str
    raw: tuple[str, ...]
    values: tuple[Any, ...]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "values": list(self.values), "raw": list(self.raw)}

    @property
    def text(self) -> str:
        return f"{self.key}={','.join(self.raw)}"


def split_values(text: str) -> list[str]:
    """Split ``V1,V2,...`` at the commas outside quotes, ``[...]`` and ``{...}``, so a
    value may itself be a TOML array or inline table (``{ schedule = "linear", ... }``).

    Raises:
        ValueError: an unterminated quote or an unbalanced bracket.
    """
    parts: list[str] = []
    buf: list[str] = []
    stack: list[str] = []
    quote: str | None = None
    pairs = {"]": "[", "}": "{"}
    i = 0
    while i < len(text):
        c = text[i]
        if quote is not None:
            buf.append(c)
            if c == "\\" and quote == '"' and i + 1 < len(text):
                buf.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
            buf.append(c)
        elif c in "[{":
            stack.append(c)
            buf.append(c)
        elif c in "]}":
            if not stack or stack[-1] != pairs[c]:
                raise ValueError(f"unbalanced {c!r} at character {i + 1}")
            stack.pop()
            buf.append(c)
        elif c == "," and not stack:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    if quote is not None:
        raise ValueError(f"unterminated {quote} quote")
    if stack:
        raise ValueError(f"{stack[-1]!r} is never closed")
    parts.append("".join(buf))
    return [p.strip() for p in parts]


def _parse(raw: str) -> Any:
    """A grid value, read exactly as a ``--set`` value is."""
    from ._config import _parse_value

    return _parse_value(raw)


def parse_grid(items: Sequence[str]) -> list[GridAxis]:
    """The ``--grid`` items, each ``KEY=V1,V2,...`` with TOML values.

    Raises:
        ConfigError: an item without ``=`` or without values, a value that cannot
            be split (unbalanced quote or bracket) or is empty or repeated, a key
            given twice, or a seed key (``--seeds`` sets those).
    """
    axes: list[GridAxis] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or not rest.strip():
            raise ConfigError(f"--grid expects SECTION.KEY=V1,V2,..., got {item!r}")
        if key in _SEED_KEYS:
            raise ConfigError(
                f"--grid {key}: the seeds are set by --seeds N (seeds 0..N-1 for the model "
                f"initialisation and the data order of every variant), not by the grid"
            )
        if any(a.key == key for a in axes):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        try:
            raw = split_values(rest)
        except ValueError as exc:
            raise ConfigError(f"--grid {item}: cannot read the values: {exc}") from None
        if any(not r for r in raw):
            raise ConfigError(
                f"--grid {item}: an empty value (two commas in a row, or one at an end)"
            )
        values = [_parse(r) for r in raw]
        for i, v in enumerate(values):
            if any(_same(v, w) for w in values[:i]):
                raise ConfigError(f"--grid {item}: the value {raw[i]} is given twice")
        axes.append(GridAxis(key=key, raw=tuple(raw), values=tuple(values)))
    return axes


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- variants


@attrs.frozen
class Variant:
    """One combination of grid values.

    Attributes:
        name: a readable, file-system-safe name (e.g. ``kl_ref.weight=0.1,entropy.enabled=false``).
        params: grid key -> value, in grid order.
        items: the same as ``--set`` items (``KEY=VALUE``, the values as typed).
    """

    name: str
    params: dict[str, Any]
    items: tuple[str, ...]


def short_key(key: str) -> str:
    """``regularizers.kl_ref.weight`` -> ``kl_ref.weight``; other keys as they are."""
    return key.removeprefix("regularizers.")


def format_value(value: Any) -> str:
    """A grid value as a name shows it: ``0.1``, ``true``, ``k3``, ``linear-0-0.3-100``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return "-".join(format_value(v) for v in value.values())
    if isinstance(value, list | tuple):
        return "-".join(format_value(v) for v in value)
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def variant_name(params: Mapping[str, Any]) -> str:
    """A readable, file-system-safe name for grid values: ``key=value`` pairs (the key
    without ``regularizers.``) joined by commas, characters other than letters,
    digits and ``._=,+-`` replaced by ``_``; ``default`` for no grid."""
    if not params:
        return "default"
    text = ",".join(f"{short_key(k)}={format_value(v)}" for k, v in params.items())
    text = _UNSAFE.sub("_", text).strip(".") or "variant"
    if len(text) > _MAX_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        text = f"{text[: _MAX_NAME - 9]}~{digest}"
    return text


def make_variants(axes: Sequence[GridAxis]) -> list[Variant]:
    """Every combination of the axes' values, the first axis varying slowest."""
    out: list[Variant] = []
    names: set[str] = set()
    choices = [list(zip(a.raw, a.values, strict=True)) for a in axes]
    for combo in itertools.product(*choices):
        params = {a.key: v for a, (_, v) in zip(axes, combo, strict=True)}
        items = tuple(f"{a.key}={raw}" for a, (raw, _) in zip(axes, combo, strict=True))
        name = variant_name(params)
        if name in names:  # two values that read alike once made file-system-safe
            name = f"{name}~{hashlib.sha256(repr(items).encode()).hexdigest()[:6]}"
        names.add(name)
        out.append(Variant(name=name, params=params, items=items))
    return out


# --------------------------------------------------------------------------- the plan


@attrs.frozen
class PlannedRun:
    """One run of a sweep: a variant at a seed, trained to ``steps`` in ``dir_name``."""

    variant: Variant
    seed: int
    steps: int

    @property
    def dir_name(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"


@attrs.frozen
class SweepPlan:
    """What a sweep command asks for, checked: the runs, and the manifest's identity."""

    config: Path | None  # None: the shipped default config
    config_sha256: str
    sets: tuple[str, ...]
    axes: tuple[GridAxis, ...]
    seeds: tuple[int, ...]
    steps: int | None  # --steps, as given
    variants: tuple[Variant, ...]
    runs: tuple[PlannedRun, ...]

    def identity(self) -> dict[str, Any]:
        """What a re-run of the sweep must repeat (``--steps`` and ``--jobs`` may change)."""
        identity = {
            "config": None if self.config is None else str(self.config),
            "config_sha256": self.config_sha256,
            "sets": list(self.sets),
            "grid": [a.to_json() for a in self.axes],
            "seeds": list(self.seeds),
        }
        return json.loads(json.dumps(identity, default=str))  # as sweep.json will hold it

    def command(self, out: Path, jobs: int) -> str:
        """The command line that runs (or resumes) this sweep."""
        import shlex

        parts = ["tinkex", "sweep"]
        if self.config is not None:
            parts.append(str(self.config))
        for a in self.axes:
            parts += ["--grid", a.text]
        if len(self.seeds) > 1:
            parts += ["--seeds", str(len(self.seeds))]
        if self.steps is not None:
            parts += ["--steps", str(self.steps)]
        for s in self.sets:
            parts += ["--set", s]
        if jobs > 1:
            parts += ["--jobs", str(jobs)]
        parts += ["--out", str(out)]
        return shlex.join(parts)


def _relabel(exc: ConfigError, item: str) -> ConfigError:
    """A ``--set`` error about a grid item, said as a ``--grid`` one."""
    text = str(exc)
    if text.startswith("--set: "):
        text = text[len("--set: ") :]
    return ConfigError(f"--grid {item}: {text}")


def plan_sweep(
    config: Path | None,
    sets: Sequence[str],
    axes: Sequence[GridAxis],
    seeds: int,
    steps: int | None,
    *,
    base_dir: Path,
) -> SweepPlan:
    """Check every variant's config as ``tinkex train`` would read it (the file, the
    ``--set`` items, the variant's grid values, ``--steps``), building its regularizers,
    and list the runs. Writes nothing.

    Raises:
        ConfigError: a bad config, ``--set`` or grid item (an unknown key with a
            close match suggested, a value the config rejects), or a key both set
            and varied.
    """
    from ._config import (
        apply_overrides,
        build_regularizers,
        default_config_path,
        load_config,
    )

    path = None if config is None else config.resolve()
    source = path if path is not None else default_config_path()
    base = load_config(path)
    try:
        sha = hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError as exc:  # pragma: no cover - load_config read it just now
        raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
    base = apply_overrides(base, sets, base_dir=base_dir)
    set_keys = {s.partition("=")[0].strip() for s in sets}
    for a in axes:
        if a.key in set_keys:
            raise ConfigError(
                f"--grid {a.key} and --set {a.key} both give it a value; keep one of them"
            )
    for a in axes:  # the keys first, each error naming its whole --grid item
        try:
            apply_overrides(base, [f"{a.key}={a.raw[0]}"], base_dir=base_dir)
        except ConfigError as exc:
            raise _relabel(exc, a.text) from None
    variants = make_variants(axes)
    runs: list[PlannedRun] = []
    for variant in variants:
        cfg = base
        for item in variant.items:
            try:
                cfg = apply_overrides(cfg, [item], base_dir=base_dir)
            except ConfigError as exc:
                raise _relabel(exc, item) from None
        try:
            cfg = cfg.with_overrides(training__steps=steps)
            build_regularizers(cfg)
        except ConfigError as exc:
            raise ConfigError(f"variant {variant.name}: {exc}") from None
        for seed in range(seeds):
            runs.append(PlannedRun(variant=variant, seed=seed, steps=cfg.training.steps))
    return SweepPlan(
        config=path,
        config_sha256=sha,
        sets=tuple(sets),
        axes=tuple(axes),
        seeds=tuple(range(seeds)),
        steps=steps,
        variants=tuple(variants),
        runs=tuple(runs),
    )


# --------------------------------------------------------------------------- the manifest


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    """``sweep.json`` of a sweep directory; None when there is none.

    Raises:
        RunDirError: it is unreadable, not JSON, or not a sweep manifest.
    """
    path = sweep_dir / SWEEP_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    text = decode_utf8(raw, path, RunDirError, "restore it, or start the sweep in another --out")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RunDirError(
            f"{path} is not valid JSON ({exc}); restore it, or start the sweep in another --out"
        ) from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("variants"), list)
        or not isinstance(data.get("grid"), list)
    ):
        raise RunDirError(f"{path} is not a tinkex sweep manifest (no 'variants' and 'grid')")
    return data


def _grid_text(grid: Any) -> str:
    try:
        return " ".join(f"{a['key']}={','.join(a['raw'])}" for a in grid) or "no grid"
    except (TypeError, KeyError):
        return repr(grid)


def manifest_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between a sweep's recorded identity and this command's."""
    found = []
    old_grid = [(a.get("key"), a.get("values")) for a in old.get("grid", []) if isinstance(a, dict)]
    new_grid = [(a["key"], a["values"]) for a in new["grid"]]
    if old_grid != new_grid:
        found.append(
            f"the grid (--grid {_grid_text(old.get('grid'))} then, "
            f"--grid {_grid_text(new['grid'])} now)"
        )
    if old.get("seeds") != new["seeds"]:
        found.append(
            f"the seeds (--seeds {len(old.get('seeds') or [])} then, {len(new['seeds'])} now)"
        )
    if list(old.get("sets") or []) != new["sets"]:
        then = " ".join(old.get("sets") or []) or "none"
        now = " ".join(new["sets"]) or "none"
        found.append(f"the --set items ({then} then, {now} now)")
    if old.get("config_sha256") != new["config_sha256"]:
        then = old.get("config") or "the shipped default"
        now = new["config"] or "the shipped default"
        found.append(f"the config ({then} then, {now} now, contents differ)")
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the directory


class SweepDir:
    """A sweep directory with its lock (one sweep at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = path / SWEEP_FILE
        self._fd: int | None = None
        self.created = False

    @classmethod
    def claim(cls, base: Path) -> SweepDir:
        """A new directory ``base`` (or ``base-2``, ...), created atomically."""
        n = 1
        with storage_errors(f"a sweep directory under {base.parent}"):
            base.parent.mkdir(parents=True, exist_ok=True)
            while True:
                path = base if n == 1 else base.with_name(f"{base.name}-{n}")
                try:
                    path.mkdir()
                except FileExistsError:
                    n += 1
                    continue
                sd = cls(path)
                sd.created = True
                return sd

    def check_usable(self) -> dict[str, Any] | None:
        """The manifest of a sweep already here; None for a new (missing or empty) directory.

        Raises:
            RunDirError: a non-empty directory that is not a sweep, or a bad manifest.
        """
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is not a directory; choose another --out")
        manifest = read_manifest(self.path)
        if manifest is None and any(self.path.iterdir()):
            raise RunDirError(
                f"{self.path} is not empty and holds no {SWEEP_FILE}: it is not a tinkex sweep "
                f"directory; choose another --out"
            )
        return manifest

    def lock(self) -> None:
        """Become the directory's only sweep (creating it when missing).

        Raises:
            RunDirError: another sweep runs in it (naming its pid).
        """
        if not self.path.exists():
            with storage_errors(f"the sweep directory {self.path}"):
                self.path.mkdir(parents=True)
            self.created = True
        self._fd = lock_directory(
            self.path,
            PID_FILE,
            in_use="{path} is in use by another tinkex sweep{holder}; wait for it to "
            "finish, or choose another --out",
        )
        atomic_write_text(self.path / PID_FILE, f"{os.getpid()}\n")

    def unlock(self) -> None:
        with contextlib.suppress(OSError):
            (self.path / PID_FILE).unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write_manifest(self, data: Mapping[str, Any]) -> None:
        text = json.dumps(data, indent=2, allow_nan=False, default=str)
        atomic_write_text(self.manifest, text + "\n")


# --------------------------------------------------------------------------- a run on disk


def run_state(path: Path, steps: int) -> tuple[str, int, str | None]:
    """Where one run of a sweep stands on disk: ``(state, checkpoint step, why)``.

    ``state`` is ``"new"`` (no directory), ``"restart"`` (a directory without a
    usable checkpoint: ``why`` says what is wrong), ``"resume"`` (a checkpoint
    before ``steps``) or ``"done"`` (a checkpoint at ``steps`` or later).
    """
    from ._rundir import RunDir

    if not path.exists():
        return "new", 0, None
    try:
        trainer = RunDir(path).read_trainer()
    except RunDirError as exc:
        return "restart", 0, str(exc)
    if trainer is None:
        return "restart", 0, "no checkpoint"
    if trainer.step >= steps:
        return "done", trainer.step, None
    return "resume", trainer.step, None


#: what the child process runs: `tinkex` itself, after asking Linux to send it a
#: Ctrl-C (SIGINT: checkpoint and stop) should the sweep process die
_BOOT = """\
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG
except Exception:
    pass
if str(os.getppid()) != os.environ.get("TINKEX_SWEEP_PID", str(os.getppid())):
    sys.exit(130)  # the sweep died before the line above
from tinkex._cli import main
sys.argv[0] = "tinkex"
sys.exit(main(sys.argv[1:]))
"""


def train_argv(plan: SweepPlan, run: PlannedRun, path: Path, *, resume: bool) -> list[str]:
    """The ``tinkex train`` arguments of one run (fresh, or ``--resume``)."""
    if resume:
        return ["train", "--resume", str(path), "--steps", str(run.steps), "-q"]
    args = ["train"]
    if plan.config is not None:
        args.append(str(plan.config))
    args += ["--out", str(path), "--seed", str(run.seed), "--steps", str(run.steps), "-q"]
    for item in (*plan.sets, *run.variant.items):
        args += ["--set", item]
    return args


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_run(jobs: int) -> int:
    """torch threads for each of ``jobs`` concurrent runs: ``cores // jobs``, at least 1."""
    return max(1, cores() // max(1, jobs))


def error_of(log: Path, code: int) -> str:
    """One line saying why a run's process failed: its ``tinkex.error`` line, else
    the last line it wrote, else its exit status."""
    text = ""
    with contextlib.suppress(OSError):
        text = log.read_text(encoding="utf-8", errors="replace")
    last = ""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and event.get("event") == "tinkex.error":
            return " ".join(str(event.get("error", "")).split())
        if not last:
            last = line
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    if last and not last.startswith("{"):
        return " ".join(last.split())[:300]
    return f"exit status {code}"


# --------------------------------------------------------------------------- running


@attrs.define
class RunStatus:
    """One run while the sweep goes: its plan, state on disk, process and outcome."""

    run: PlannedRun
    path: Path
    state: str  # new / restart / resume / done, as found at the start
    checkpoint_step: int
    status: str = "pending"  # pending, running, completed, failed, interrupted
    exit_code: int | None = None
    error: str | None = None
    last_step: int = 0
    loss: float | None = None
    started_at: float | None = None
    process_s: float | None = None
    proc: Any = None
    log_fh: Any = None
    tail: _Tail | None = None

    @property
    def label(self) -> str:
        return self.run.dir_name

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.run.seed,
            "run_dir": self.run.dir_name,
            "steps": self.run.steps,
            "status": self.status,
            "last_step": self.last_step,
            "exit_code": self.exit_code,
            "error": self.error,
            "process_s": None if self.process_s is None else round(self.process_s, 3),
            "log": f"{LOG_DIR}/{self.run.dir_name}.log",
        }


class _Tail:
    """Follows a run's ``metrics.jsonl`` as it grows: its last step and loss."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inode: int | None = None
        self.offset = 0
        self.buf = b""
        self.step = 0
        self.loss: float | None = None

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            return
        if st.st_ino != self.inode or st.st_size < self.offset:  # replaced (a resume cut it back)
            self.inode, self.offset, self.buf = st.st_ino, 0, b""
        if st.st_size == self.offset:
            return
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return
        self.offset += len(chunk)
        lines = (self.buf + chunk).split(b"\n")
        self.buf = lines.pop()
        for line in reversed(lines):
            try:
                row = json.loads(line)
                self.step = int(row["step"])
                self.loss = float(row["output"]["loss_total"])
                break
            except (ValueError, KeyError, TypeError):
                continue


@attrs.define
class SweepRunner:
    """Runs a sweep's runs as ``tinkex train`` processes, ``jobs`` at a time.

    ``display`` gets ``run_started(status)``, ``run_progress(status)``,
    ``run_finished(status)`` and ``note(text)``; ``emit(event, **fields)`` a log
    event (JSON logs). The manifest is rewritten on every change of a run's status.
    """

    plan: SweepPlan
    sweep: SweepDir
    jobs: int
    display: Any
    emit: Callable[..., None]
    runs: list[RunStatus] = attrs.Factory(list)
    presses: int = 0
    started: str = attrs.Factory(_now)

    def __attrs_post_init__(self) -> None:
        for run in self.plan.runs:
            path = self.sweep.path / run.dir_name
            state, step, _ = run_state(path, run.steps)
            status = RunStatus(run=run, path=path, state=state, checkpoint_step=step)
            if state == "done":
                status.status, status.last_step = "completed", step
            self.runs.append(status)

    # ---------------------------------------------------------------- manifest

    def manifest(self, status: str) -> dict[str, Any]:
        variants = []
        for variant in self.plan.variants:
            runs = [r.to_json() for r in self.runs if r.run.variant is variant]
            variants.append({"name": variant.name, "params": variant.params, "runs": runs})
        counts = {s: sum(r.status == s for r in self.runs) for s in _STATUSES}
        return {
            "format_version": FORMAT_VERSION,
            "command": self.plan.command(self.sweep.path, self.jobs),
            **self.plan.identity(),
            "steps": self.plan.steps,
            "jobs": self.jobs,
            "threads_per_run": threads_per_run(self.jobs),
            "status": status,
            "counts": counts,
            "started": self.started,
            "updated": _now(),
            "variants": variants,
        }

    def save(self, status: str = "running") -> None:
        self.sweep.write_manifest(self.manifest(status))

    # ---------------------------------------------------------------- signals

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.presses += 1
        running = [r for r in self.runs if r.proc is not None and r.proc.poll() is None]
        for r in running:
            with contextlib.suppress(OSError):
                os.kill(r.proc.pid, signal.SIGKILL if self.presses >= 3 else signal.SIGINT)
        if self.presses == 1:
            self.display.note(
                "Ctrl-C: no new runs; the running ones stop after their step and checkpoint "
                "(Ctrl-C again aborts them)"
            )
        elif self.presses == 2:
            self.display.note(
                "Ctrl-C again: the running runs abort now (their last checkpoint stays)"
            )

    @property
    def stopping(self) -> bool:
        return self.presses > 0

    # ---------------------------------------------------------------- the loop

    def _prepare(self, r: RunStatus) -> bool:
        """Make ``r``'s directory ready to start over (state ``restart``): remove it,
        unless a process holds it. Returns whether it may start."""
        from ._rundir import RunDir

        if r.state != "restart":
            return True
        rd = RunDir(r.path)
        try:
            rd.lock(create=False)
        except RunDirError as exc:
            self._finish(r, "failed", None, str(exc))
            return False
        rd.unlock()
        with storage_errors(str(r.path)):
            shutil.rmtree(r.path)
        return True

    def _start(self, r: RunStatus) -> None:
        if not self._prepare(r):
            return
        resume = r.state == "resume"
        logs = self.sweep.path / LOG_DIR
        with storage_errors(str(logs)):
            logs.mkdir(exist_ok=True)
            r.log_fh = (logs / f"{r.label}.log").open("ab")
        threads = str(threads_per_run(self.jobs))
        env = dict(os.environ)
        env.update(
            {
                "TINKEX_LOG_JSON": "1",
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "TINKEX_SWEEP_PID": str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        argv = [sys.executable, "-c", _BOOT, *train_argv(self.plan, r.run, r.path, resume=resume)]
        r.log_fh.write(f"# {_now()} tinkex {' '.join(argv[3:])}\n".encode())
        r.log_fh.flush()
        r.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=r.log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,  # a terminal's Ctrl-C reaches the sweep only; it forwards one
        )
        r.status, r.started_at = "running", time.monotonic()
        r.last_step = r.checkpoint_step
        r.tail = _Tail(r.path / "metrics.jsonl")
        self.display.run_started(r)
        self.emit(
            "sweep.run_start",
            run=r.label,
            resume=resume,
            from_step=r.checkpoint_step,
            steps=r.run.steps,
        )
        self.save()

    def _finish(self, r: RunStatus, status: str, code: int | None, error: str | None) -> None:
        r.status, r.exit_code, r.error = status, code, error
        if r.started_at is not None:
            r.process_s = time.monotonic() - r.started_at
        if r.log_fh is not None:
            r.log_fh.close()
            r.log_fh = None
        r.proc = None
        self.display.run_finished(r)
        self.emit(
            "sweep.run",
            run=r.label,
            status=status,
            exit_code=code,
            last_step=r.last_step,
            error=error,
        )
        self.save()

    def _reap(self, r: RunStatus) -> None:
        code = r.proc.poll()
        if code is None:
            return
        r.tail.poll()
        r.last_step = max(r.last_step, r.tail.step)
        from ._rundir import RunDir

        with contextlib.suppress(RunDirError):
            trainer = RunDir(r.path).read_trainer()
            if trainer is not None:
                r.last_step = trainer.step
        if code == 0 or (
            code in (130, -signal.SIGINT) and run_state(r.path, r.run.steps)[0] == "done"
        ):  # a Ctrl-C that came after the last step's checkpoint stopped nothing
            self._finish(r, "completed", code, None)
        elif code in (130, -signal.SIGINT) and self.stopping:
            self._finish(r, "interrupted", code, "interrupted (Ctrl-C)")
        else:
            self._finish(
                r, "failed", code, error_of(self.sweep.path / LOG_DIR / f"{r.label}.log", code)
            )

    def run(self, poll_s: float = 0.25) -> str:
        """Run what is left; returns how the sweep ended: ``completed``, ``failed``
        (a run failed) or ``interrupted`` (Ctrl-C)."""
        for r in self.runs:
            if r.state == "done":
                self._report_if_missing(r)
        pending = [r for r in self.runs if r.status == "pending"]
        self.save()
        previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self.on_sigint)
        except ValueError:  # pragma: no cover - not the main thread
            previous = None
        try:
            while True:
                running = [r for r in self.runs if r.status == "running"]
                while not self.stopping and pending and len(running) < self.jobs:
                    r = pending.pop(0)
                    self._start(r)
                    if r.status == "running":
                        running.append(r)
                if not running and (self.stopping or not pending):
                    break
                time.sleep(poll_s)
                for r in running:
                    r.tail.poll()
                    if r.tail.step > r.last_step or r.tail.loss != r.loss:
                        r.last_step, r.loss = max(r.last_step, r.tail.step), r.tail.loss
                        self.display.run_progress(r)
                    self._reap(r)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            for r in self.runs:  # only after an error in this loop: leave no process behind
                if r.proc is not None and r.proc.poll() is None:
                    with contextlib.suppress(OSError):
                        os.kill(r.proc.pid, signal.SIGINT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        r.proc.wait(timeout=60)
        if self.stopping:
            status = "interrupted"
        elif any(r.status != "completed" for r in self.runs):
            status = "failed"
        else:
            status = "completed"
        self.save(status)
        return status

    def _report_if_missing(self, r: RunStatus) -> None:
        """A run that reached its last checkpoint but not its report (killed in
        between): write its summary and plots now (best effort)."""
        from ._report import SUMMARY_FILE

        try:
            summary = json.loads((r.path / SUMMARY_FILE).read_text(encoding="utf-8"))
            if summary.get("last_step") == r.checkpoint_step:
                return
        except (OSError, ValueError, AttributeError):
            pass
        from ._plots import write_report

        with contextlib.suppress(Exception):
            write_report(r.path)


_STATUSES = ("completed", "failed", "interrupted", "running", "pending")
