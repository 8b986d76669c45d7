"""Run directories: one writer, a strict past, settings a resume must match."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tinkex
from tinkex._rundir import RunDir, Trainer, resume_mismatches, scan_metrics

OUTPUT = {
    "loss_total": 1.0,
    "regularizer_total": 0.0,
    "base_loss": {"value": 1.0, "grad_norm": None, "custom": {}},
    "regularizers": {},
}


def _line(step: int) -> str:
    return json.dumps({"step": step, "output": OUTPUT, "metrics": {}})


def test_only_a_torn_last_line_is_repaired_and_it_is_reported(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_text("\n".join(_line(s) for s in (1, 2, 3)) + '\n{"step": 4, "outp')
    assert scan_metrics(rd.metrics).torn_line == 4
    before = rd.metrics.read_bytes()
    plan = rd.plan_metrics(2)
    assert (plan.kept, plan.removed, plan.torn_line) == (2, 1, 4)
    assert rd.metrics.read_bytes() == before  # planning changes nothing
    rd.apply_metrics_plan(plan)
    assert rd.metrics.read_text() == _line(1) + "\n" + _line(2) + "\n"


def test_a_bad_line_in_the_middle_stops_the_resume_with_its_number(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_text(_line(1) + "\nnot json\n" + _line(3) + "\n")
    before = rd.metrics.read_bytes()
    with pytest.raises(tinkex.RunDirError, match=r"metrics.jsonl:2: not a valid metrics line"):
        rd.plan_metrics(3)
    assert rd.metrics.read_bytes() == before  # nothing deleted


def test_repeated_steps_two_writers_are_refused(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_text("".join(_line(s) + "\n" for s in (1, 2, 1, 2)))
    with pytest.raises(tinkex.RunDirError, match=r":3: step 1 after step 2"):
        scan_metrics(rd.metrics)


def test_non_utf8_metrics_are_a_run_dir_error(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_bytes(_line(1).encode() + b"\n\xff\n")
    with pytest.raises(tinkex.RunDirError, match=r"metrics.jsonl:2: not UTF-8"):
        scan_metrics(rd.metrics)


def test_lines_missing_before_the_checkpoint_are_refused(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_text(_line(1) + "\n")
    with pytest.raises(tinkex.RunDirError, match="ends at step 1 but the checkpoint is at step 3"):
        rd.plan_metrics(3)


def test_corrupt_trainer_json_is_one_line(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer.json").write_text('{"step": 3')
    with pytest.raises(tinkex.RunDirError, match=r"trainer.json is corrupt"):
        rd.read_trainer()
    (tmp_path / "checkpoint" / "trainer.json").write_text('{"step": 3}')
    with pytest.raises(tinkex.RunDirError, match=r"missing keys \['batch_size'"):
        rd.read_trainer()


def test_resume_mismatches_name_every_setting():
    trainer = Trainer(
        step=5,
        state="state",
        batch_size=2,
        data_seed=0,
        data_path="/d.jsonl",
        data_sha256="a" * 64,
        examples_sha256="c" * 64,
        examples=10,
        model={"backend": "local", "base_model": "tiny", "lora_rank": None, "seed": 0},
        reference=False,
    )
    now = {
        "batch_size": 16,
        "data_seed": 0,
        "data_path": "/d.jsonl",
        "data_sha256": "b" * 64,
        "examples_sha256": "c" * 64,
        "examples": 10,
        "reference": True,
        "model": {"backend": "local", "base_model": "tiny", "lora_rank": None, "seed": 0},
    }
    found = resume_mismatches(trainer, now)
    assert len(found) == 3
    assert found[0] == "training.batch_size: the run had 2, now 16"
    assert "contents" in found[1]
    assert found[2].startswith("reference log-probabilities: the run was started without")
    now["examples_sha256"] = "d" * 64
    assert "the tokenized examples" in resume_mismatches(trainer, now)[2]


def test_the_lock_refuses_a_second_writer_naming_its_pid(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from pathlib import Path
                from tinkex._rundir import RunDir
                rd = RunDir(Path({str(run)!r}))
                rd.lock(create=True)
                rd.mark_started()
                print("locked", flush=True)
                sys.stdin.readline()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            tinkex.RunDirError, match=rf"in use by another tinkex train \(pid {holder.pid}\)"
        ):
            RunDir(run).lock(create=False)
    finally:
        holder.communicate("\n", timeout=30)
    rd = RunDir(run)
    rd.lock(create=False)  # free again once the holder is gone
    rd.unlock()
    assert not (run / ".tinkex.pid").exists()


def test_a_refused_fresh_start_leaves_no_directory(tmp_path):
    rd = RunDir(tmp_path / "new")
    rd.lock(create=True)
    assert (tmp_path / "new").is_dir()
    rd.unlock(remove_if_untouched=True)
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path) == []


def test_a_complete_last_line_without_its_newline_is_kept_and_mended(tmp_path):
    rd = RunDir(tmp_path)
    rd.metrics.write_text(_line(1) + "\n" + _line(2))
    plan = rd.plan_metrics(2)
    assert (plan.kept, plan.torn_line) == (2, None)
    rd.apply_metrics_plan(plan)
    assert rd.metrics.read_text() == _line(1) + "\n" + _line(2) + "\n"


def test_a_line_whose_output_is_damaged_or_nan_is_caught_by_the_scan(tmp_path):
    rd = RunDir(tmp_path)
    bad = json.loads(_line(2))
    bad["output"]["regularizers"] = 5
    rd.metrics.write_text(_line(1) + "\n" + json.dumps(bad) + "\n" + _line(3) + "\n")
    with pytest.raises(tinkex.RunDirError, match=r"metrics.jsonl:2: not a valid metrics line"):
        rd.plan_metrics(3)
    rd.metrics.write_text(_line(1) + "\n" + _line(2).replace("1.0", "NaN", 1) + "\n")
    with pytest.raises(tinkex.RunDirError, match=r":2: .*NaN is not a number JSON allows"):
        scan_metrics(rd.metrics)


def test_trainer_json_with_wrong_types_is_corrupt(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    good = {
        "step": 3,
        "state": "state",
        "batch_size": 2,
        "data_seed": 0,
        "data_path": "/d",
        "data_sha256": "a",
        "examples_sha256": "b",
        "examples": 4,
        "model": {"backend": "local"},
        "reference": False,
    }
    for key, value in (("step", True), ("model", "x"), ("state", None), ("data_sha256", 5)):
        (tmp_path / "checkpoint" / "trainer.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(tinkex.RunDirError, match=rf"trainer.json is corrupt .*{key}"):
            rd.read_trainer()
    (tmp_path / "checkpoint" / "trainer.json").write_text(json.dumps(good))
    assert rd.read_trainer().step == 3


def test_a_directory_holding_only_a_config_is_not_a_run(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "config.toml").write_text("[training]\nsteps = 3\n")
    (tmp_path / "metrics.jsonl").write_text("")
    assert not rd.holds_run()  # a start killed before its first step: usable again
    rd.metrics.write_text(_line(1) + "\n")
    assert rd.holds_run()


async def test_a_crash_between_the_two_renames_is_undone_before_the_next_save(tmp_path):
    class FakeClient:
        async def save_state(self, path):
            Path(path).mkdir()  # noqa: ASYNC240 - a fake, in a test
            (Path(path) / "w").write_text("weights")
            return path

    rd = RunDir(tmp_path)
    fields = {
        "batch_size": 2,
        "data_seed": 0,
        "data_path": "/d",
        "data_sha256": "a",
        "examples_sha256": "b",
        "examples": 4,
        "model": {},
        "reference": False,
    }
    await rd.save_checkpoint(FakeClient(), 1, fields, None, remote=False)
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old")  # the crash
    (tmp_path / ".checkpoint.tmp-9").mkdir()  # and a save killed half-way
    assert rd.read_trainer().step == 1  # the aside copy is read
    original = shutil.rmtree
    seen = []

    def rmtree_then_check(path, *args, **kwargs):
        original(path, *args, **kwargs)
        seen.append(rd.read_trainer())  # a crash right here must leave a checkpoint

    shutil.rmtree = rmtree_then_check
    try:
        await rd.save_checkpoint(FakeClient(), 2, fields, None, remote=False)
    finally:
        shutil.rmtree = original
    assert all(t is not None for t in seen)
    assert rd.read_trainer().step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
