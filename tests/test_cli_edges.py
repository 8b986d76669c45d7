"""`tinkex train` at its edges: refusals write nothing, resumes match their run, every
input can be corrupt, one writer per run directory, exit codes by one rule.

Each test runs the real executable on the tiny model (a few seconds per run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINKEX = str(Path(sys.executable).with_name("tinkex"))

SMALL = """
[model]
device = "cpu"

[data]
limit = 16
max_length = 40

[[regularizers]]
name = "entropy"
weight = 0.05

[[regularizers]]
name = "kl"
as = "kl_ref"
weight = 0.2

[optimizer]
learning_rate = 3e-3

[training]
steps = 4
batch_size = 4
checkpoint_every = 2
"""


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TINKEX_LOG_JSON"}
    full_env["COLUMNS"] = "200"
    full_env.update(env or {})
    return subprocess.run(
        [TINKEX, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("edges")
    (d / "small.toml").write_text(SMALL, encoding="utf-8")
    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "instructions.jsonl"
    (d / "data.jsonl").write_bytes(data.read_bytes())
    return d


@pytest.fixture(scope="module")
def done(workdir) -> Path:
    """A finished 4-step run, shared (copied) by the tests that resume or refuse it."""
    out = workdir / "done"
    proc = run("train", "small.toml", "--out", str(out), "-q", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- refusals


def test_a_no_op_resume_writes_nothing(done, tmp_path):
    r = copy_run(done, tmp_path / "r")
    before = snapshot(r)
    proc = run("train", "--resume", str(r), "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to train, nothing written" in proc.stderr
    assert snapshot(r) == before


def test_resume_with_another_batch_size_is_refused_unless_forced(done, tmp_path):
    r = copy_run(done, tmp_path / "r")
    before = snapshot(r)
    proc = run(
        "train", "--resume", str(r), "--steps", "6", "--set", "training.batch_size=8", cwd=tmp_path
    )
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "training.batch_size: the run had 4, now 8" in line and "--force" in line
    assert snapshot(r) == before
    forced = run(
        "train",
        "--resume",
        str(r),
        "--steps",
        "6",
        "--set",
        "training.batch_size=8",
        "--force",
        "-q",
        cwd=tmp_path,
    )
    assert forced.returncode == 0, forced.stderr
    assert "warning: resuming with a changed setting (training.batch_size" in forced.stderr
    steps = [json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_notices_data_whose_contents_changed(workdir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes((workdir / "data.jsonl").read_bytes())
    r = tmp_path / "r"
    first = run(
        "train",
        str(workdir / "small.toml"),
        "--out",
        str(r),
        "--steps",
        "2",
        "-q",
        "--set",
        f"data.path={data}",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    rows = data.read_text().splitlines()
    rows[0] = rows[0].replace('"response": "', '"response": "Edited. ', 1)
    data.write_text("\n".join(rows) + "\n")  # same number of examples, other contents
    before = snapshot(r)
    proc = run("train", "--resume", str(r), "--steps", "4", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "the data file's contents (SHA-256)" in line and "data.path" not in line
    assert snapshot(r) == before


def test_resume_without_a_checkpoint_refuses_and_keeps_the_metrics(done, tmp_path):
    import shutil

    r = copy_run(done, tmp_path / "r")
    shutil.rmtree(r / "checkpoint")
    before = snapshot(r)
    proc = run("train", "--resume", str(r), "--steps", "6", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no usable checkpoint" in one_line_error(proc)
    assert snapshot(r) == before


def test_a_corrupt_middle_line_stops_the_resume_with_its_number(done, tmp_path):
    r = copy_run(done, tmp_path / "r")
    rows = (r / "metrics.jsonl").read_text().splitlines()
    rows[1] = rows[1][:40]
    (r / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    before = snapshot(r)
    proc = run("train", "--resume", str(r), "--steps", "6", cwd=tmp_path)
    assert proc.returncode == 2
    assert "metrics.jsonl:2: not a valid metrics line" in one_line_error(proc)
    assert snapshot(r) == before


def test_a_torn_last_line_is_reported_by_report_and_repaired_by_resume(done, tmp_path):
    r = copy_run(done, tmp_path / "r")
    text = (r / "metrics.jsonl").read_text()
    (r / "metrics.jsonl").write_text(text + '{"step": 5, "output": {"loss_to')
    report = run("report", str(r), "--no-plots", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "line 5 was cut short" in report.stderr
    resumed = run("train", "--resume", str(r), "--steps", "5", "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "its last line (5) was cut short by a crash and was dropped" in resumed.stderr
    steps = [json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def _flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    path.write_bytes(bytes(raw))  # same size, other bytes


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (
            lambda r: (r / "checkpoint" / "trainer.json").write_text('{"step": 4'),
            "trainer.json is corrupt",
        ),
        (
            lambda r: (r / "checkpoint" / "reference.pt").write_bytes(b"\x80not a pickle"),
            "reference.pt is missing or corrupt",
        ),
        (lambda r: (r / "metrics.jsonl").write_bytes(b"\xff\xfe\n"), "metrics.jsonl:1: not UTF-8"),
        (
            lambda r: _flip_middle(r / "checkpoint" / "reference.pt"),
            "reference.pt is missing or corrupt",
        ),
        (lambda r: (r / "config.toml").write_bytes(b"[training]\nsteps = \xff\n"), "config.toml"),
    ],
)
def test_corrupt_run_state_is_one_line_and_exit_2(done, tmp_path, damage, needle):
    r = copy_run(done, tmp_path / "r")
    damage(r)
    proc = run("train", "--resume", str(r), "--steps", "6", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in one_line_error(proc)


# --------------------------------------------------------------------------- fresh runs


def test_relative_data_path_from_set_survives_a_resume(workdir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "d.jsonl").write_bytes((workdir / "data.jsonl").read_bytes())
    first = run(
        "train",
        str(workdir / "small.toml"),
        "--out",
        "runs/a",
        "--steps",
        "2",
        "-q",
        "--set",
        "data.path=mine/d.jsonl",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    again = run("train", "--resume", "runs/a", "--steps", "3", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_a_run_failing_at_its_first_step_leaves_nothing_that_blocks_a_retry(workdir, tmp_path):
    out = tmp_path / "retry"
    failed = run(
        "train",
        str(workdir / "small.toml"),
        "--out",
        str(out),
        "--set",
        "loss.reference=none",
        cwd=tmp_path,
    )
    assert failed.returncode == 1
    assert "reference_logprobs" in one_line_error(failed)
    assert not out.exists() or list(out.iterdir()) == []
    ok = run(
        "train", str(workdir / "small.toml"), "--out", str(out), "--steps", "1", "-q", cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr


def test_dry_run_catches_what_step_one_would(workdir, tmp_path):
    no_ref = run(
        "train",
        str(workdir / "small.toml"),
        "--dry-run",
        "--set",
        "loss.reference=none",
        cwd=tmp_path,
    )
    assert no_ref.returncode == 2
    assert "reference_logprobs" in one_line_error(no_ref)
    typo = run(
        "train", str(workdir / "small.toml"), "--dry-run", "--backend", "tinkr", cwd=tmp_path
    )
    assert typo.returncode == 2
    assert "did you mean 'tinker'" in one_line_error(typo)
    too_long = run(
        "train",
        str(workdir / "small.toml"),
        "--dry-run",
        "--set",
        "data.max_length=3000",
        cwd=tmp_path,
    )
    assert too_long.returncode == 2
    assert "context of 1024 positions" in one_line_error(too_long)
    ok = run("train", str(workdir / "small.toml"), "--dry-run", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "one composed-loss step checked" in ok.stderr


def test_corrupt_inputs_are_one_line(workdir, tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_bytes(b'{"prompt": "\xff", "response": "x"}\n')
    proc = run(
        "train",
        str(workdir / "small.toml"),
        "--set",
        f"data.path={bad_data}",
        "--dry-run",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "bad.jsonl:1: not UTF-8" in one_line_error(proc)
    bad_config = tmp_path / "bad.toml"
    bad_config.write_bytes(b"[training]\nsteps = 3 # \xff\n")
    proc = run("train", str(bad_config), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "bad.toml" in one_line_error(proc)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run("train", str(workdir / "small.toml"), "--out", str(blocker / "run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "a-file" in one_line_error(proc)


def test_two_trainings_into_one_directory_the_second_is_refused(workdir, tmp_path):
    out = tmp_path / "dual"
    first = subprocess.Popen(
        [TINKEX, "train", str(workdir / "small.toml"), "--out", str(out), "--steps", "300", "-q"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run("train", "--resume", str(out), "--steps", "400", cwd=tmp_path)
        assert second.returncode == 2
        line = one_line_error(second)
        assert f"in use by another tinkex train (pid {first.pid})" in line
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


def test_ctrl_c_during_start_up_exits_130_and_leaves_nothing(workdir, tmp_path):
    out = tmp_path / "early"
    proc = subprocess.Popen(
        [TINKEX, "train", str(workdir / "small.toml"), "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # importing torch, building the model
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    assert not out.exists() or not (out / "metrics.jsonl").exists()


def test_json_logs_make_stderr_pure_json(workdir, tmp_path):
    proc = run(
        "train",
        str(workdir / "small.toml"),
        "--out",
        str(tmp_path / "j"),
        "--steps",
        "2",
        cwd=tmp_path,
        env={"TINKEX_LOG_JSON": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert events and events[0]["event"] == "train.start"
    failed = run(
        "train",
        str(workdir / "small.toml"),
        "--out",
        str(tmp_path / "j"),
        cwd=tmp_path,
        env={"TINKEX_LOG_JSON": "1"},
    )
    assert failed.returncode == 2
    (error,) = [json.loads(line) for line in failed.stderr.splitlines() if line.strip()]
    assert error["event"] == "tinkex.error" and "already holds a run" in error["error"]


def test_logs_to_a_file_carry_no_colour_codes(workdir, tmp_path):
    proc = run(
        "train",
        str(workdir / "small.toml"),
        "--out",
        str(tmp_path / "c"),
        "--steps",
        "1",
        "--log-level",
        "info",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr


# --------------------------------------------------------------------------- found by trying
# to break it


def test_resume_refuses_a_new_tokenization_or_a_reference_it_never_had(done, tmp_path):
    r = copy_run(done, tmp_path / "r")
    before = snapshot(r)
    template = run(
        "train",
        "--resume",
        str(r),
        "--steps",
        "6",
        "--set",
        'data.template="Q: {prompt}\\nA:"',
        cwd=tmp_path,
    )
    assert template.returncode == 2
    assert "the tokenized examples" in one_line_error(template)
    assert snapshot(r) == before
    again = run("train", "--resume", str(r), "--steps", "5", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # the run is still fine

    no_ref = tmp_path / "no_ref"
    first = run(
        "train",
        "small.toml",
        "--out",
        str(no_ref),
        "--steps",
        "2",
        "-q",
        "--set",
        "regularizers.kl_ref.enabled=false",
        cwd=done.parent,
    )
    assert first.returncode == 0, first.stderr
    enabled = run(
        "train",
        "--resume",
        str(no_ref),
        "--steps",
        "3",
        "--set",
        "regularizers.kl_ref.enabled=true",
        cwd=tmp_path,
    )
    assert enabled.returncode == 2
    assert "started without the initial model's" in one_line_error(enabled)


def test_bad_command_lines_are_one_line_and_json_with_json_logs(tmp_path):
    plain = run("train", "--steps", "0", cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        "Error: Invalid value for '--steps': 0 is not in the range x>=1. "
        "(see `tinkex train --help`)"
    ]
    as_json = run("train", "--steps", "0", cwd=tmp_path, env={"TINKEX_LOG_JSON": "1"})
    (line,) = as_json.stderr.strip().splitlines()
    assert json.loads(line)["exit_code"] == 2
    empty = run("train", "--out", "", cwd=tmp_path)
    assert empty.returncode == 2 and "--out needs the name of a run directory" in empty.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("device", "needle"), [("meta", "not one tinkex trains on"), ("cuda", "CUDA")]
)
def test_dry_run_checks_the_device(workdir, tmp_path, device, needle):
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = run("train", str(workdir / "small.toml"), "--dry-run", "--device", device, cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)


def test_two_runs_started_together_without_out_get_their_own_directories(workdir, tmp_path):
    args = [TINKEX, "train", str(workdir / "small.toml"), "--steps", "1", "-q"]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all((r / "metrics.jsonl").read_text().count("\n") == 1 for r in runs)
