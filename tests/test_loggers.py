"""Metrics loggers (tinkex._loggers) through `tinkex train` on the tiny model.

Each built-in logger's output is read back with its own library and compared with
metrics.jsonl, the source of truth: metrics.csv with the csv module, the event
files with TensorBoard's EventAccumulator, the MLflow run with MlflowClient on its
sqlite store, the offline W&B run from its .wandb file. Then: a logger that fails
is reported once and turned off while the run completes, a logger whose package is
missing or whose name is unknown is refused (exit 2), a resume after a crash
leaves one row per step, and a plugin registers a logger in-process.

The trackers' packages come from the extras `make test` installs
(`tinkex[tensorboard,mlflow,wandb]`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

import tinkex
import tinkex.loggers
import tinkex.testing
from tinkex._cli import cli
from tinkex._loggers import CsvLogger, LoggerSet, MlflowLogger, WandbLogger, step_metrics
from tinkex._report import StepRecord

TINKEX = str(Path(sys.executable).with_name("tinkex"))
if not Path(TINKEX).exists():  # pragma: no cover - a layout without a venv bin dir
    TINKEX = shutil.which("tinkex") or TINKEX

SMALL = """
[model]
device = "cpu"

[data]
limit = 24
max_length = 40

[loss]
reference = "initial_model"

[[regularizers]]
name = "kl"
as = "kl_ref"
weight = 0.2

[[regularizers]]
name = "l2"
weight = 0.01
reduction = "mean"

[optimizer]
learning_rate = 3e-3

[training]
steps = 4
batch_size = 4
checkpoint_every = 2
log_every = 1

[eval]
fraction = 0.2
every = 2

[samples]
prompts = []
"""

ALL = ["csv", "tensorboard", "mlflow", "wandb"]


def tinkex_run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TINKEX_LOG_JSON", None)
    env["COLUMNS"] = "120"
    return subprocess.run(
        [TINKEX, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def jsonl(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def expected(run: Path) -> dict[int, dict[str, float]]:
    """step -> the flat metrics a logger gets, from metrics.jsonl."""
    out = {}
    for line in jsonl(run):
        record = StepRecord(
            step=line["step"],
            output=tinkex.CustomLossOutput.from_dict(line["output"]),
            metrics=line["metrics"],
            eval=line.get("eval"),
        )
        out[line["step"]] = step_metrics(record)
    return out


def read_csv(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, small_config) -> tuple[Path, subprocess.CompletedProcess]:
    """One 4-step run (held-out evaluation at steps 2 and 4) logged to every built-in logger."""
    run = tmp_path_factory.mktemp("runs") / "all"
    proc = tinkex_run(
        "train", str(small_config), "--out", str(run), "--log-to", ",".join(ALL), cwd=run.parent
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, proc


# --------------------------------------------------------------------------- step_metrics


def test_step_metrics_flattens_a_metrics_line(logged_run):
    run, _ = logged_run
    lines = jsonl(run)
    flat = expected(run)
    assert sorted(flat) == [1, 2, 3, 4]
    first = flat[1]
    out = tinkex.CustomLossOutput.from_dict(lines[0]["output"])
    assert {k: first[k] for k in out.flat_metrics()} == out.flat_metrics()
    assert first["learning_rate"] == lines[0]["metrics"]["learning_rate"] == 3e-3
    assert first["loss:sum"] == lines[0]["metrics"]["loss:sum"]
    assert "step" not in first  # the step is the step argument, not a metric
    assert not any(k.startswith("eval/") for k in first)
    second = flat[2]
    assert second["eval/base_loss"] == lines[1]["eval"]["base_loss"]
    assert second["eval/loss_total"] == lines[1]["eval"]["loss_total"]
    assert second["eval/terms/kl_ref"] == lines[1]["eval"]["terms"]["kl_ref"]
    assert second["eval/terms/l2"] == lines[1]["eval"]["terms"]["l2"]
    assert all(isinstance(v, float) for v in second.values())


# --------------------------------------------------------------------------- the four loggers


def test_the_run_names_its_loggers_and_stays_quiet(logged_run):
    run, proc = logged_run
    assert "logged to: csv, tensorboard, mlflow, wandb" in proc.stdout
    assert "Traceback" not in proc.stderr and "warning" not in proc.stderr.lower()
    # the trackers print nothing of their own (no MLflow INFO lines, no wandb banner)
    assert "mlflow" not in proc.stderr.lower() and "wandb:" not in proc.stderr
    for name in ("metrics.csv", "tensorboard", "mlflow", "wandb", "metrics.jsonl"):
        assert (run / name).exists(), name


def test_csv_holds_the_values_of_metrics_jsonl(logged_run):
    run, _ = logged_run
    columns, rows = read_csv(run)
    flat = expected(run)
    assert columns[0] == "step"
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # the eval columns first appear at step 2: they were added at the end
    assert columns[-4:] == [
        "eval/base_loss",
        "eval/loss_total",
        "eval/terms/kl_ref",
        "eval/terms/l2",
    ]
    assert set(columns[1:]) == set(flat[2])
    for row in rows:
        step = int(row["step"])
        for key in columns[1:]:
            if key in flat[step]:
                assert float(row[key]) == flat[step][key], (step, key)  # exact: repr round-trips
            else:
                assert row[key] == "", (step, key)  # no evaluation at steps 1 and 3
    assert rows[0]["eval/base_loss"] == "" and float(rows[3]["eval/base_loss"]) > 0


def test_tensorboard_event_files_hold_the_same_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = logged_run
    flat = expected(run)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(flat[2])
    for tag in tags:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert steps == sorted(s for s in flat if tag in flat[s]), tag
        for event in events:  # TensorBoard keeps float32
            assert event.value == pytest.approx(flat[event.step][tag], rel=1e-6, abs=1e-30), tag
    assert [e.step for e in acc.Scalars("eval/base_loss")] == [2, 4]


def test_mlflow_run_holds_params_metrics_and_artifacts(logged_run):
    from mlflow.tracking import MlflowClient

    run, _ = logged_run
    flat = expected(run)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tinkex")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    assert found.data.tags["tinkex.run_dir"] == str(run.resolve())
    params = found.data.params
    assert params["training.steps"] == "4" and params["training.batch_size"] == "4"
    assert params["regularizers.kl_ref.weight"] == "0.2"
    assert params["regularizers.l2.reduction"] == "mean"
    assert params["logging.to"] == json.dumps(ALL)
    assert params["model.base_model"] == "tiny"
    for key in (
        "loss_total",
        "reg/kl_ref/grad_share",
        "learning_rate",
        "loss:sum",
        "eval/terms/l2",
    ):
        history = client.get_metric_history(found.info.run_id, key)
        assert {m.step: m.value for m in history} == {
            s: pytest.approx(v[key], rel=1e-12) for s, v in flat.items() if key in v
        }, key
    assert set(found.data.metrics) == set(flat[2])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "loss_components.png", "grad_share.png", "config.toml"} <= artifacts
    assert str(run.resolve()) in found.info.artifact_uri  # kept inside the run directory


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + data)
            records.append(record)
            pending = b""
        else:  # FIRST, MIDDLE
            pending += data
    return records


def test_wandb_offline_run_holds_the_same_history(logged_run):
    run, _ = logged_run
    flat = expected(run)
    (offline,) = (run / "wandb").glob("offline-run-*")
    run_id = (run / "wandb" / "tinkex-run-id").read_text().strip()
    assert offline.name.endswith(f"-{run_id}")
    (wandb_file,) = offline.glob("run-*.wandb")
    records = _wandb_records(wandb_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run_record.run_id, run_record.display_name, run_record.project) == (
        run_id,
        run.name,
        "tinkex",
    )
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["training"]["steps"] == 4 and config["logging"]["to"] == ALL
    assert config["regularizers"][0] == {
        "name": "kl",
        "weight": 0.2,
        "as": "kl_ref",
        "enabled": True,
    }
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert sorted(history) == [1, 2, 3, 4]
    for step, values in history.items():
        assert values == {k: pytest.approx(v, rel=1e-12) for k, v in flat[step].items()}, step
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0
    assert (offline / "files" / "summary.json").read_bytes() == (run / "summary.json").read_bytes()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_a_logger_whose_package_is_missing_is_refused_naming_the_extra(
    tmp_path, small_config, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, name, None)  # `import <name>` now fails
    run = tmp_path / "run"
    result = CliRunner().invoke(
        cli, ["train", str(small_config), "--out", str(run), "--log-to", f"csv,{name}"]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(f"Error: --log-to: logger {name!r} needs the {name!r} package")
    assert lines[0].endswith(f"pip install 'tinkex[{name}]'")
    assert not run.exists()  # refused before anything was written


def test_a_missing_package_named_in_the_config_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    config = tmp_path / "run.toml"
    config.write_text(SMALL + '\n[logging]\nto = ["mlflow"]\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert (
        f"Error: {config}: logging.to: logger 'mlflow' needs the 'mlflow' package" in result.output
    )
    assert "pip install 'tinkex[mlflow]'" in result.output


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (
            ["--log-to", "csv,tensorbord"],
            "",
            "Error: --log-to: unknown logger 'tensorbord' (did you mean 'tensorboard'?); "
            "available: csv, mlflow, tensorboard, wandb",
        ),
        (
            [],
            '\n[logging]\nto = ["cvs"]\n',
            ": logging.to: unknown logger 'cvs' (did you mean 'csv'?); available: csv, ",
        ),
        (
            ["--log-to", "csv,csv"],
            "",
            "Error: --log-to: logging.to must be a list of distinct non-empty strings, "
            "got ('csv', 'csv')",
        ),
    ],
    ids=["option", "config", "twice"],
)
def test_an_unknown_logger_is_refused_with_a_suggestion(tmp_path, args, extra, message):
    config = tmp_path / "run.toml"
    config.write_text(SMALL + extra, encoding="utf-8")
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(config), "--out", str(run), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not run.exists()


def test_dry_run_checks_the_loggers_and_starts_none(tmp_path, small_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["train", str(small_config), "--dry-run", "--log-to", "csv,tensorboard"]
    )
    assert result.exit_code == 0, result.output
    assert "loggers: csv, tensorboard; one composed-loss step checked" in result.stderr
    assert tomllib.loads(result.stdout)["logging"]["to"] == ["csv", "tensorboard"]
    assert not (tmp_path / "runs").exists()
    empty = CliRunner().invoke(cli, ["train", str(small_config), "--dry-run", "--log-to", ""])
    assert empty.exit_code == 0 and "loggers:" not in empty.stderr


# --------------------------------------------------------------------------- failures


class Recorder:
    """A plugin logger keeping what it is given."""

    instances: ClassVar[list[Recorder]] = []

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        Recorder.instances.append(self)

    def start(self, run_dir, config):
        self.calls.append(("start", Path(run_dir), config["training"]["steps"]))

    def log(self, step, metrics):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self, run_dir):
        self.calls.append(("finish", Path(run_dir)))


class FailsInLog:
    def __init__(self) -> None:
        self.logged: list[int] = []

    def start(self, run_dir, config):
        pass

    def log(self, step, metrics):
        if step >= 2:
            raise RuntimeError(f"disk on fire\nat step {step}")
        self.logged.append(step)

    def finish(self, run_dir):
        raise AssertionError("never called: the logger was turned off")


class FailsInFinish:
    def start(self, run_dir, config):
        pass

    def log(self, step, metrics):
        pass

    def finish(self, run_dir):
        raise OSError("cannot upload")


class TestLoggers:
    @tinkex.hookimpl
    def tinkex_register_loggers(self, register):
        register("recorder", Recorder)
        register("fails_in_log", FailsInLog)
        register("fails_in_finish", FailsInFinish)


def test_a_failing_logger_warns_once_and_the_run_completes(tmp_path, small_config):
    Recorder.instances.clear()
    run = tmp_path / "run"
    with (
        tinkex.testing.register_plugin(TestLoggers(), name="tinkex-test-loggers"),
        pytest.warns(tinkex.loggers.LoggerWarning) as caught,
    ):
        result = CliRunner().invoke(
            cli,
            [
                "train",
                str(small_config),
                "--out",
                str(run),
                "-q",
                "--log-to",
                "fails_in_log,recorder,csv,fails_in_finish",
            ],
        )
    assert result.exit_code == 0, result.output
    messages = [str(w.message) for w in caught if w.category is tinkex.loggers.LoggerWarning]
    assert messages == [
        "logger 'fails_in_log' failed at step 2 and is off for the rest of this session "
        "(metrics.jsonl is not affected): RuntimeError: disk on fire at step 2",
        "logger 'fails_in_finish' failed while finishing and is off for the rest of this "
        "session (metrics.jsonl is not affected): OSError: cannot upload",
    ]
    # the run, metrics.jsonl and the other loggers are untouched by the failures
    assert [r["step"] for r in jsonl(run)] == [1, 2, 3, 4]
    flat = expected(run)
    _, rows = read_csv(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    (recorder,) = Recorder.instances
    assert recorder.calls[0] == ("start", run, 4)
    logs = [c for c in recorder.calls if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2, 3, 4]
    assert all(c[2] == flat[c[1]] for c in logs)  # the plugin logger got metrics.jsonl's values
    assert recorder.calls[-1] == ("finish", run)  # finished after the report was written
    assert (run / "summary.json").is_file()


def test_a_logger_failing_in_the_executable_is_one_warning_line(tmp_path, small_config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a folder")  # SummaryWriter cannot write there
    proc = tinkex_run(
        "train",
        str(small_config),
        "--out",
        str(run),
        "-q",
        "--log-to",
        "tensorboard,csv",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    warning_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1, proc.stderr
    assert warning_lines[0].startswith(
        "warning: logger 'tensorboard' failed at step 1 and is off for the rest of this session"
    )
    assert "Traceback" not in proc.stderr
    assert [int(r["step"]) for r in read_csv(run)[1]] == [1, 2, 3, 4]


def test_logger_set_starts_lazily_and_finishes_once(tmp_path):
    recorder = Recorder()
    loggers = LoggerSet(loggers=[("recorder", recorder)], config={"training": {"steps": 9}})
    loggers.finish(tmp_path)  # nothing started: nothing to finish
    assert recorder.calls == []
    loggers.log(tmp_path, 5, {"a": 1.0})
    loggers.log(tmp_path, 6, {"a": 2.0})
    loggers.finish(tmp_path)
    loggers.finish(tmp_path)
    assert recorder.calls == [
        ("start", tmp_path, 9),
        ("log", 5, {"a": 1.0}),
        ("log", 6, {"a": 2.0}),
        ("finish", tmp_path),
    ]


# --------------------------------------------------------------------------- resume


def _kill_after(args: list[str], cwd: Path, metrics: Path, lines_at_least: int) -> None:
    """Start `tinkex train`, and kill -9 it once metrics.jsonl has that many lines."""
    proc = subprocess.Popen(
        [TINKEX, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_bytes().count(b"\n") >= lines_at_least:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait(timeout=60)


def test_resume_after_a_crash_leaves_one_csv_row_and_one_scalar_per_step(tmp_path, small_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "crashed"
    _kill_after(
        [
            "train",
            str(small_config),
            "--out",
            str(run),
            "--steps",
            "400",
            "-q",
            "--set",
            "eval.every=0",
            "--log-to",
            "csv,tensorboard",
        ],
        tmp_path,
        run / "metrics.jsonl",
        4,
    )
    checkpoint = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    _, before = read_csv(run)
    assert len(before) >= 3 and checkpoint < len(before)  # rows past the checkpoint

    resumed = tinkex_run("train", "--resume", str(run), "--steps", "7", "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in jsonl(run)] == list(range(1, 8))
    flat = expected(run)
    columns, rows = read_csv(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 8))  # none repeated, none lost
    # the rows up to the checkpoint are kept as they were; the evaluation after the last
    # step added its columns, empty on those rows
    assert columns[-1] == "eval/terms/l2" and "eval/base_loss" not in before[0]
    kept = [{k: r[k] for k in before[0]} for r in rows[:checkpoint]]
    assert kept == before[:checkpoint]
    assert all(r["eval/base_loss"] == "" for r in rows[:-1]) and rows[-1]["eval/base_loss"]
    for row in rows:
        step = int(row["step"])
        assert {k: float(row[k]) for k in columns[1:] if row[k]} == flat[step], step

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("loss_total")
    assert [e.step for e in events] == list(range(1, 8))  # the re-run steps purged once
    for event in events:
        assert event.value == pytest.approx(flat[event.step]["loss_total"], rel=1e-6)


def test_csv_logger_trims_rows_from_the_first_step_of_a_session_and_a_torn_row(tmp_path):
    first = CsvLogger()
    first.start(tmp_path, {})
    for step in (1, 2, 3):
        first.log(step, {"a": float(step), "b": step / 10})
    first.log(4, {"a": 4.0, "b": 0.4, "eval/x": 9.5})  # a new column: the header is rewritten
    first.finish(tmp_path)
    text = (tmp_path / "metrics.csv").read_text()
    assert text == "step,a,b,eval/x\n1,1.0,0.1,\n2,2.0,0.2,\n3,3.0,0.3,\n4,4.0,0.4,9.5\n"
    with (tmp_path / "metrics.csv").open("a") as fh:
        fh.write("5,5.0,0.")  # a crash while writing step 5
    again = CsvLogger()
    again.start(tmp_path, {})
    again.log(3, {"a": 30.0, "c": 1.5})  # a resume from the checkpoint at step 2
    again.finish(tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == (
        "step,a,b,eval/x,c\n1,1.0,0.1,,\n2,2.0,0.2,,\n3,30.0,,,1.5\n"
    )


def test_mlflow_and_wandb_loggers_continue_their_run_on_resume(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    # wandb's service announces itself in WANDB_SERVICE: keep it from later subprocesses
    monkeypatch.setenv("WANDB_SERVICE", "")
    monkeypatch.delenv("WANDB_SERVICE")

    hooks = (sys.exit, sys.excepthook)
    # a first session of steps 1-2, then a resume from the checkpoint at step 1 that
    # goes on to step 3 with a longer run (training.steps 5) and is interrupted
    for session, steps in enumerate(((1, 2), (2, 3))):
        config = {"training": {"steps": 3 + 2 * session}, "logging": {"mlflow_experiment": "exp"}}
        loggers = LoggerSet(
            loggers=[("mlflow", MlflowLogger()), ("wandb", WandbLogger())], config=config
        )
        for step in steps:
            loggers.log(tmp_path, step, {"loss_total": step + 10.0 * session})
        summary = {"session": {"stopped": ["completed", "interrupted"][session]}}
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        loggers.finish(tmp_path)
        assert loggers.failed == {}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss_total")
    )
    assert history == [(1, 1.0), (2, 2.0), (2, 12.0), (3, 13.0)]  # one run; step 2 logged twice
    assert found.data.params["training.steps"] == "3"  # params cannot change: the first kept
    assert found.info.status == "KILLED"  # the last session was interrupted
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["summary.json"]
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    run_id = (tmp_path / "wandb" / "tinkex-run-id").read_text().strip()
    # the same W&B run id; a second session in the same second gets "...-<id>-1"
    assert len(runs) == 2 and all(f"-{run_id}" in Path(r).name for r in runs)
    exits = []
    for folder in runs:
        (path,) = Path(folder).glob("run-*.wandb")
        records = _wandb_records(path)
        exits += [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0, 1]
    assert (sys.exit, sys.excepthook) == hooks  # wandb's process-wide hooks taken back


# --------------------------------------------------------------------------- docs/loggers.md

_DOCS = Path(__file__).resolve().parents[1] / "docs" / "loggers.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _DOCS.read_text(encoding="utf-8"), flags=re.S)


def test_docs_csv_example_reads_a_real_run(logged_run):
    run, _ = logged_run
    (block,) = [b for b in _BLOCKS if "csv.DictReader" in b]
    namespace: dict = {}
    exec(compile(block.replace("runs/<dir>", str(run)), str(_DOCS), "exec"), namespace)
    assert namespace["loss"] == [r["output"]["loss_total"] for r in jsonl(run)]
    assert namespace["held_out"] == {
        r["step"]: r["eval"]["base_loss"] for r in jsonl(run) if "eval" in r
    }


def test_docs_plugin_logger_example_runs(tmp_path):
    (block,) = [b for b in _BLOCKS if "tinkex_register_loggers" in b]
    namespace: dict = {"__name__": "docs_loggers"}
    exec(compile(block, str(_DOCS), "exec"), namespace)
    logger = namespace["JsonLinesLogger"]()
    loggers = LoggerSet(loggers=[("jsonl", logger)])
    loggers.log(tmp_path, 1, {"loss_total": 2.5})
    loggers.finish(tmp_path)
    assert loggers.failed == {}
    assert json.loads((tmp_path / "metrics.flat.jsonl").read_text()) == {
        "step": 1,
        "loss_total": 2.5,
    }


def test_docs_name_every_builtin_logger_and_its_extra():
    text = _DOCS.read_text(encoding="utf-8")
    for name in tinkex.loggers.logger_names():
        assert f"| `{name}` |" in text, name
    for extra in ("tensorboard", "mlflow", "wandb"):
        assert f"pip install 'tinkex[{extra}]'" in text
    config = (_DOCS.parent / "config.md").read_text(encoding="utf-8")
    assert "## `[logging]`" in config and "[loggers.md](loggers.md)" in config
