"""Metrics loggers: each training step's numbers, also sent to CSV, TensorBoard, MLflow or W&B.

``metrics.jsonl`` is the run's record and the source of truth; a logger is a copy
for the tools people read runs with. A logger is any object with the three
methods of :class:`Logger`; plugins register factories for them through the
``tinkex_register_loggers(register)`` hook, and this module is the built-in
plugin that registers ``csv``, ``tensorboard``, ``mlflow`` and ``wandb`` (see
``docs/loggers.md``).

:class:`LoggerSet` is how ``tinkex train`` drives them: the loggers are built
before training starts (an unknown name, or a logger whose package is missing,
is refused then), started just before the first step of the session is logged
(so a run that fails before its first step leaves none of their files), handed
every step's metrics right after its ``metrics.jsonl`` line is written, and
finished after the report. A logger that raises is reported once, as a
:class:`LoggerWarning`, and not called again; the run goes on.

Importing this module imports none of the trackers' packages (each is imported
when its logger is built) and not torch.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib
import io
import json
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from ._errors import ConfigError, PluginError, TinkexError
from ._files import atomic_write_text
from .hookspecs import hookimpl

__all__ = [
    "CSV_FILE",
    "CsvLogger",
    "Logger",
    "LoggerSet",
    "LoggerWarning",
    "MlflowLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "step_metrics",
    "tinkex_register_loggers",
]

#: the CSV logger's file in the run directory
CSV_FILE = "metrics.csv"
#: the TensorBoard logger's folder of event files in the run directory
TENSORBOARD_DIR = "tensorboard"
#: the MLflow logger's folder (the default sqlite store and the artifacts) in the run directory
MLFLOW_DIR = "mlflow"
#: the W&B logger's folder in the run directory (``wandb.init(dir=run_dir)`` makes it)
WANDB_DIR = "wandb"
#: the report files the MLflow and W&B loggers attach to their run when it finishes
REPORT_FILES = ("summary.json", "loss_components.png", "grad_share.png", "config.toml")
#: logger name -> (module to import, the tinkex extra that installs it)
EXTRAS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


@runtime_checkable
class Logger(Protocol):
    """What a metrics logger implements; ``tinkex train`` calls, in this order:

    - ``start(run_dir, config)`` once, just before the first step of the session
      is logged: ``run_dir`` is the run directory (a :class:`pathlib.Path`),
      ``config`` the resolved config as a TOML-shaped dict (what ``config.toml``
      holds; a logger's own options are under ``config["logging"]``). On a
      resume the run directory already holds what earlier sessions wrote, and
      ``metrics.jsonl`` has been cut back to the checkpoint.
    - ``log(step, metrics)`` once per step, right after the step's line is
      written to ``metrics.jsonl``: ``metrics`` is a flat ``dict[str, float]``
      (:func:`step_metrics`). Steps increase by one within a session; the first
      step of a resumed session may be one an earlier session logged already
      (it ran past its last checkpoint): what was logged from that step on is
      to be replaced.
    - ``finish(run_dir)`` once, after ``summary.json`` and the plots are written
      (also after a failed or interrupted session).

    Any exception a method raises is reported once (a :class:`LoggerWarning`)
    and the logger is not called again in that session; the run goes on.
    """

    def start(self, run_dir: Path, config: dict[str, Any]) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, run_dir: Path) -> None: ...


class LoggerWarning(UserWarning):
    """A metrics logger failed and was turned off for the rest of the session."""


def step_metrics(record: Any) -> dict[str, float]:
    """The flat metrics of one ``metrics.jsonl`` line (a :class:`tinkex._report.StepRecord`).

    ``CustomLossOutput.flat_metrics()`` (``loss_total``, ``base_loss/value``,
    ``reg/<name>/grad_share``, ...), then the step's own metrics (``learning_rate``,
    ``grad_norm``, ``step_time_s``, ``loss:sum``, ...; not the optimizer's ``step``,
    which is the step itself), then, on an evaluated step, ``eval/base_loss``,
    ``eval/loss_total`` and ``eval/terms/<name>``.
    """
    out = {k: float(v) for k, v in record.output.flat_metrics().items()}
    for key, value in record.metrics.items():
        if key != "step":
            out.setdefault(key, float(value))
    for key, value in (record.eval or {}).items():
        if isinstance(value, Mapping):
            for name, item in value.items():
                out[f"eval/{key}/{name}"] = float(item)
        else:
            out[f"eval/{key}"] = float(value)
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _options(config: Mapping[str, Any]) -> Mapping[str, Any]:
    options = config.get("logging")
    return options if isinstance(options, Mapping) else {}


# --------------------------------------------------------------------------- the set


@attrs.define
class LoggerSet:
    """The loggers of one ``tinkex train`` session.

    Attributes:
        loggers: ``(name, logger)`` pairs, in the order ``logging.to`` names them.
        config: the resolved config, as ``config.toml`` holds it (given to ``start``).
        failed: name -> the one-line error of each logger turned off.
    """

    loggers: list[tuple[str, Any]] = attrs.field(factory=list)
    config: dict[str, Any] = attrs.field(factory=dict)
    failed: dict[str, str] = attrs.field(factory=dict)
    _state: str = "new"  # "new" -> "started" -> "finished"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.loggers]

    def _active(self) -> list[tuple[str, Any]]:
        return [(name, lg) for name, lg in self.loggers if name not in self.failed]

    def _call(self, name: str, when: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a logger never stops the run
            self.failed[name] = _one_line(exc)
            warnings.warn(
                f"logger {name!r} failed {when} and is off for the rest of this session "
                f"(metrics.jsonl is not affected): {self.failed[name]}",
                LoggerWarning,
                stacklevel=3,
            )

    def log(self, run_dir: Path, step: int, metrics: Mapping[str, float]) -> None:
        """Log one step to every logger still on (starting them first, on the first call)."""
        if self._state == "new":
            self._state = "started"
            for name, lg in self._active():
                config = copy.deepcopy(self.config)  # each logger its own: one may change it
                self._call(name, f"to start (step {step})", lg.start, Path(run_dir), config)
        for name, lg in self._active():
            self._call(name, f"at step {step}", lg.log, step, dict(metrics))

    def log_record(self, run_dir: Path, record: Any) -> None:
        """:meth:`log` of a ``metrics.jsonl`` line (:func:`step_metrics`)."""
        if self.loggers:
            self.log(run_dir, record.step, step_metrics(record))

    def finish(self, run_dir: Path) -> None:
        """Finish every started logger still on (once; nothing when none was started)."""
        if self._state != "started":
            return
        self._state = "finished"
        for name, lg in self._active():
            self._call(name, "while finishing", lg.finish, Path(run_dir))


def build_loggers(
    names: Sequence[str], config: dict[str, Any], *, where: str = "logging.to"
) -> LoggerSet:
    """Build the loggers ``names`` through the plugin registry, starting none.

    Args:
        names: logger names (``logging.to``).
        config: the resolved config (TOML-shaped), kept for ``start``.
        where: what named them, for messages (``"run.toml: logging.to"``, ``"--log-to"``).

    Raises:
        ConfigError: one line: an unknown name (listing the registered loggers, with
            a close one suggested), a logger whose package is missing (naming the
            extra to install, e.g. ``pip install 'tinkex[tensorboard]'``), or a
            factory that failed or returned something that is not a :class:`Logger`.
    """
    from ._plugins import get_logger_factory

    built: list[tuple[str, Any]] = []
    for name in names:
        try:
            factory = get_logger_factory(name)
        except PluginError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        try:
            logger = factory()
        except TinkexError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        except ImportError as exc:
            raise ConfigError(
                f"{where}: logger {name!r} needs a package that is not installed "
                f"({_one_line(exc)}); install what its plugin needs"
            ) from exc
        except Exception as exc:
            raise ConfigError(
                f"{where}: logger {name!r} could not be built: {_one_line(exc)}"
            ) from exc
        missing = [m for m in ("start", "log", "finish") if not callable(getattr(logger, m, None))]
        if missing:
            raise ConfigError(
                f"{where}: logger {name!r} is not a tinkex logger: its factory returned "
                f"{type(logger).__qualname__}, which has no {', '.join(missing)} method"
            )
        built.append((name, logger))
    return LoggerSet(loggers=built, config=dict(config))


def _require(name: str) -> None:
    """Import the package logger ``name`` needs, or refuse naming the extra that installs it.

    Raises:
        ConfigError: the package is missing or fails to import.
    """
    module, extra = EXTRAS[name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"logger {name!r} needs the {module!r} package, which is not installed "
            f"({_one_line(exc)}): pip install 'tinkex[{extra}]'"
        ) from exc
    except Exception as exc:  # a broken install
        raise ConfigError(
            f"logger {name!r} needs the {module!r} package, which failed to import "
            f"({_one_line(exc)}); reinstall it: pip install --force-reinstall 'tinkex[{extra}]'"
        ) from exc


# --------------------------------------------------------------------------- csv


class CsvLogger:
    """``metrics.csv`` in the run directory: a header row, then one row per step.

    The columns are ``step`` and the metric names in the order they first
    appear. A name that first appears on a later step (the ``eval/...`` columns
    of the first evaluated step, a term's metric it reports only sometimes)
    rewrites the file once, atomically, with the new column added at the end:
    the earlier rows get an empty cell there, as do steps without that value.
    Numbers are written as Python writes floats (``repr``: they read back exactly).

    On a resume, the rows from the first step of the session on (steps an
    interrupted session logged after its last checkpoint) are dropped before that
    step is written, so no step has two rows; so is a last row cut short by a crash.
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._columns: list[str] = []
        self._known: set[str] = set()
        self._fh: Any = None
        self._writer: Any = None

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        self._path = Path(run_dir) / CSV_FILE

    def log(self, step: int, metrics: dict[str, float]) -> None:
        assert self._path is not None, "start() first"
        new = [k for k in metrics if k not in self._known and k != "step"]
        if self._fh is None:  # the session's first step: keep only the earlier rows
            header, rows = self._read(before=step)
            self._rewrite([*header, *(k for k in new if k not in header)], rows)
        elif new:
            self._close()
            header, rows = self._read(before=None)
            self._rewrite([*header, *new], rows)
        self._writer.writerow([step, *(_cell(metrics.get(c)) for c in self._columns[1:])])
        self._fh.flush()

    def finish(self, run_dir: Path) -> None:
        self._close()

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = self._writer = None

    def _read(self, *, before: int | None) -> tuple[list[str], list[list[str]]]:
        """The header and the rows of the file (those of steps ``< before``, when given)."""
        assert self._path is not None
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ["step"], []
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            return ["step"], []
        header, body = rows[0], rows[1:]
        if not header or header[0] != "step":
            raise ValueError(
                f"{self._path} is not a tinkex metrics.csv (its first column is not 'step')"
            )
        if body and (not text.endswith("\n") or len(body[-1]) != len(header)):
            body.pop()  # a last row cut short by a crash
        kept = []
        for row in body:
            try:
                row_step = int(row[0])
            except (ValueError, IndexError):
                continue
            if before is None or row_step < before:
                kept.append(row + [""] * (len(header) - len(row)))
        return header, kept

    def _rewrite(self, columns: list[str], rows: list[list[str]]) -> None:
        assert self._path is not None
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(row + [""] * (len(columns) - len(row)))
        atomic_write_text(self._path, buffer.getvalue())
        self._columns, self._known = columns, set(columns)
        self._fh = self._path.open("a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._fh, lineterminator="\n")


def _cell(value: Any) -> str:
    return "" if value is None else repr(float(value))


# --------------------------------------------------------------------------- tensorboard


class TensorBoardLogger:
    """Event files under ``tensorboard/`` in the run directory, one scalar per metric
    (the tag is the metric's name), written with ``torch.utils.tensorboard.SummaryWriter``
    and flushed every step.

    A resumed session's writer is opened with ``purge_step`` = its first step, so
    TensorBoard drops what an earlier session logged from that step on.
    """

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._writer: Any = None

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        self._dir = Path(run_dir) / TENSORBOARD_DIR

    def log(self, step: int, metrics: dict[str, float]) -> None:
        assert self._dir is not None, "start() first"
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            resumed = self._dir.is_dir() and any(self._dir.iterdir())
            self._writer = SummaryWriter(
                log_dir=str(self._dir), purge_step=step if resumed else None
            )
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def finish(self, run_dir: Path) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --------------------------------------------------------------------------- mlflow

_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")


def _mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts (alphanumerics, ``_ - . / : `` and space)."""
    key = _MLFLOW_BAD.sub("_", name)[:250] or "_"
    parts = [p if p not in ("", ".", "..") else "_" for p in key.split("/")]
    return "/".join(parts)


def _flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config as MLflow params: ``section.key`` (``regularizers.<term>.<key>``)."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, tuple, Mapping)):
            return json.dumps(value, default=str, ensure_ascii=False)
        return str(value)

    out: dict[str, str] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        else:
            out[_mlflow_key(prefix)] = text(value)[:6000]

    for section, table in config.items():
        if section == "regularizers" and isinstance(table, (list, tuple)):
            for entry in table:
                term = entry.get("as", entry.get("name", "?"))
                for key, value in entry.items():
                    add(f"regularizers.{term}.{key}", value)
        else:
            add(str(section), table)
    return out


_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


def _session_status(run_dir: Path) -> str | None:
    """How the session ended, from ``summary.json`` (``completed``, ``interrupted``, ``failed``)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return summary.get("session", {}).get("stopped")
    return None


class MlflowLogger:
    """An MLflow run per run directory, through ``mlflow.tracking.MlflowClient``.

    The tracking URI is ``logging.mlflow_uri``, by default a sqlite store in the
    run directory (``sqlite:///<run_dir>/mlflow/mlflow.db``, artifacts in
    ``mlflow/artifacts/``); the experiment is ``logging.mlflow_experiment``. The
    run is named after the run directory and tagged ``tinkex.run_dir`` with its
    path; a resumed session finds it by that tag and goes on in it. Params: the
    resolved config, flattened (``training.steps``, ``regularizers.kl_ref.weight``,
    ...; a resumed session adds only keys the run lacks, as MLflow params cannot
    change). Metrics: every step's, at that step. At the end: ``summary.json``,
    the plots and ``config.toml`` as artifacts, and the run's status (``FINISHED``,
    ``KILLED`` after Ctrl-C, ``FAILED``).
    """

    def __init__(self) -> None:
        self._client: Any = None
        self._run_id: str | None = None

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        options = _options(config)
        uri = options.get("mlflow_uri")
        artifacts = None
        if not uri:
            store = run_dir / MLFLOW_DIR
            store.mkdir(exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            artifacts = (store / "artifacts").as_uri()
        name = str(options.get("mlflow_experiment") or "tinkex")
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self._find_run(client, experiment_id, str(run_dir))
        params = _flat_params(config)
        if run is None:
            run = client.create_run(
                experiment_id, run_name=run_dir.name, tags={"tinkex.run_dir": str(run_dir)}
            )
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in run.data.params}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        self._client, self._run_id = client, run.info.run_id

    @staticmethod
    def _find_run(client: Any, experiment_id: str, run_dir: str) -> Any:
        if "'" not in run_dir and "\\" not in run_dir:
            found = client.search_runs(
                [experiment_id], filter_string=f"tags.`tinkex.run_dir` = '{run_dir}'"
            )
        else:  # a path MLflow's filter syntax cannot quote: compare here
            found = [
                r
                for r in client.search_runs([experiment_id], max_results=5000)
                if r.data.tags.get("tinkex.run_dir") == run_dir
            ]
        return found[0] if found else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        assert self._client is not None, "start() first"
        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self._run_id, metrics=items[i : i + 1000])

    def finish(self, run_dir: Path) -> None:
        if self._client is None:
            return
        client, run_id = self._client, self._run_id
        self._client = None
        for name in REPORT_FILES:
            path = Path(run_dir) / name
            if path.is_file():
                client.log_artifact(run_id, str(path))
        status = _STATUS.get(_session_status(Path(run_dir)) or "completed", "FINISHED")
        client.set_terminated(run_id, status)


# --------------------------------------------------------------------------- wandb


class WandbLogger:
    """A Weights & Biases run, ``wandb.init(dir=run_dir, mode=logging.wandb_mode)``.

    ``wandb_mode = "offline"`` (the default) needs no account and no network: the
    run is written under ``wandb/offline-run-*/`` in the run directory (``wandb
    sync`` uploads it later). Project ``logging.wandb_project``, the run named
    after the run directory, the resolved config as the run's config, every
    step's metrics with ``step=``. Its id is kept in ``wandb/tinkex-run-id``, so
    a resumed session continues the same W&B run (``resume="allow"``; W&B keeps
    the first value of a step logged twice). At the end ``summary.json`` and the
    plots are saved with the run, which is finished with exit code 0 (1 after a
    failed or interrupted session).

    ``wandb`` replaces ``sys.exit`` and ``sys.excepthook`` with its own when its
    service starts, for good; :meth:`finish` puts back those it replaced during
    :meth:`start`, so the process is left as it was found.
    """

    def __init__(self) -> None:
        self._run: Any = None
        self._hooks: tuple[Any, Any] | None = None

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        run_dir = Path(run_dir).resolve()
        options = _options(config)
        folder = run_dir / WANDB_DIR
        folder.mkdir(exist_ok=True)
        id_file = folder / "tinkex-run-id"
        try:
            run_id = id_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            run_id = ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + "\n")
        settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True)
        self._hooks = (sys.exit, sys.excepthook)
        try:
            self._run = wandb.init(
                project=str(options.get("wandb_project") or "tinkex"),
                dir=str(run_dir),
                mode=str(options.get("wandb_mode") or "offline"),
                config=json.loads(json.dumps(config, default=str)),
                name=run_dir.name,
                id=run_id,
                resume="allow",
                settings=settings,
            )
        except BaseException:
            self._restore_hooks()
            raise

    def log(self, step: int, metrics: dict[str, float]) -> None:
        assert self._run is not None, "start() first"
        self._run.log(metrics, step=step)

    def finish(self, run_dir: Path) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        files = Path(run.dir)
        for name in REPORT_FILES:
            path = Path(run_dir) / name
            if path.is_file():
                shutil.copy2(path, files / name)  # the run's files/ folder is saved with it
        status = _session_status(Path(run_dir)) or "completed"
        try:
            run.finish(exit_code=0 if status == "completed" else 1)
        finally:
            self._restore_hooks()

    def _restore_hooks(self) -> None:
        if self._hooks is None:
            return
        exit_, excepthook = self._hooks
        self._hooks = None
        if sys.exit is not exit_ and getattr(sys.exit, "__module__", "").startswith("wandb"):
            sys.exit = exit_
        hook_module = getattr(sys.excepthook, "__module__", "") or ""
        if sys.excepthook is not excepthook and hook_module.startswith("wandb"):
            sys.excepthook = excepthook


# --------------------------------------------------------------------------- the plugin


def _tensorboard() -> TensorBoardLogger:
    _require("tensorboard")
    return TensorBoardLogger()


def _mlflow() -> MlflowLogger:
    _require("mlflow")
    return MlflowLogger()


def _wandb() -> WandbLogger:
    _require("wandb")
    return WandbLogger()


@hookimpl
def tinkex_register_loggers(register: Callable[[str, Callable[[], Any]], None]) -> None:
    """Register the built-in ``csv``, ``tensorboard``, ``mlflow`` and ``wandb`` loggers."""
    register("csv", CsvLogger)
    register("tensorboard", _tensorboard)
    register("mlflow", _mlflow)
    register("wandb", _wandb)
