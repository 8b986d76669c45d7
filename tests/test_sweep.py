"""`tinkex sweep` end to end, through the installed `tinkex` executable, on the tiny model.

A 2x2 grid with 2 seeds (8 runs of 4 steps, two at a time), compared from each
run's metrics.jsonl; an interrupted sweep finished by running it again; a failing
run that does not stop the others; and the refusals (exit 2, one line, nothing
written). The runs need the first-party regularizer distributions installed.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_compare import RUN_KEYS, expected_row
from tinkex._cli import cli
from tinkex._sweep import (
    make_variants,
    manifest_differences,
    parse_grid,
    split_values,
    threads_per_run,
    variant_name,
)

SMALL = """
[model]
device = "cpu"

[data]
limit = 24
max_length = 40

[loss]
reference = "initial_model"

[[regularizers]]
name = "entropy"
weight = 0.05
mode = "maximize"

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

[eval]
fraction = 0.25
every = 2

[samples]
prompts = []
"""
GRID = [
    "--grid",
    "regularizers.kl_ref.weight=0,0.2",
    "--grid",
    "regularizers.entropy.enabled=true,false",
]
NAMES = [
    f"kl_ref.weight={w},entropy.enabled={e}-seed{s}"
    for w in ("0", "0.2")
    for e in ("true", "false")
    for s in (0, 1)
]


def tinkex(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TINKEX_LOG_JSON"}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "tinkex", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, config) -> tuple[Path, subprocess.CompletedProcess]:
    """The 2x2 grid x 2 seeds sweep, two runs at a time."""
    sweep = tmp_path_factory.mktemp("sweeps") / "grid"
    args = [str(config), *GRID, "--seeds", "2", "--jobs", "2", "--out", str(sweep)]
    proc = tinkex("sweep", *args, cwd=sweep.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sweep, proc


# --------------------------------------------------------------------------- a whole sweep


def test_every_combination_and_seed_is_its_own_run(swept):
    sweep, proc = swept
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "logs")
    assert runs == sorted(NAMES)
    for name in NAMES:
        run = sweep / name
        config = (run / "config.toml").read_text()
        seed = int(name[-1])
        assert f"seed = {seed}" in config
        recs = lines(run)
        assert [r["step"] for r in recs] == [1, 2, 3, 4]
        assert recs[-1]["eval"]["base_loss"] > 0  # [eval] fraction
        regs = recs[-1]["output"]["regularizers"]
        assert regs["kl_ref"]["weight"] == (0.0 if "weight=0," in name else 0.2)
        assert ("entropy" in regs) == ("enabled=true" in name)
        assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == 4
        assert json.loads((run / "summary.json").read_text())["session"]["stopped"] == "completed"
        assert (sweep / "logs" / f"{name}.log").is_file()

    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["status"] == "completed" and manifest["seeds"] == [0, 1]
    assert manifest["grid"] == [
        {"key": "regularizers.kl_ref.weight", "values": [0, 0.2], "raw": ["0", "0.2"]},
        {"key": "regularizers.entropy.enabled", "values": [True, False], "raw": ["true", "false"]},
    ]
    assert [v["params"] for v in manifest["variants"]] == [
        {"regularizers.kl_ref.weight": w, "regularizers.entropy.enabled": e}
        for w in (0, 0.2)
        for e in (True, False)
    ]
    assert [r["run_dir"] for v in manifest["variants"] for r in v["runs"]] == NAMES
    assert {r["status"] for v in manifest["variants"] for r in v["runs"]} == {"completed"}
    assert manifest["jobs"] == 2 and manifest["threads_per_run"] == threads_per_run(2)
    assert manifest["command"].startswith("tinkex sweep ") and "--seeds 2" in manifest["command"]
    assert manifest["counts"]["completed"] == 8

    assert "4 variants x 2 seeds = 8 runs" in proc.stderr
    assert proc.stderr.count("done    kl_ref.weight=") == 8
    assert "Traceback" not in proc.stderr
    for png in ("compare_loss.png", "compare_grad_share.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_comparison_equals_what_each_runs_metrics_say(swept):
    sweep, proc = swept
    result = tinkex("compare", str(sweep), "--json", "--no-plots", cwd=sweep.parent)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [Path(r["run"]).name for r in rows] == NAMES
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        assert set(row) == RUN_KEYS
        assert row["seed"] == int(row["run"][-1]) and row["sweep"] == str(sweep)
        for key, value in expected_row(Path(row["run"])).items():
            if key == "terms":
                assert set(row["terms"]) == set(value)
                for name, t in value.items():
                    assert row["terms"][name] == pytest.approx(t)
            else:
                assert row[key] == pytest.approx(value), key
        by_variant.setdefault(row["variant"], []).append(row)
    # the sweep's own table: mean ± sample std over the two seeds, as recomputed
    table = " ".join(proc.stdout.split())
    for key in ("final_loss", "final_eval_loss"):
        for runs in by_variant.values():
            values = [r[key] for r in runs]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert f"{mean:.4g} ± {std:.2g}" in table, (key, mean, std)
    share = [r["terms"]["kl_ref"]["mean_grad_share"] for r in by_variant[NAMES[4][:-6]]]
    std = 100 * statistics.stdev(share)
    spread = "<0.1" if std < 0.05 else f"{std:.1f}"
    assert f"{100 * statistics.fmean(share):.1f}% ± {spread}" in table


def test_running_a_finished_sweep_again_trains_nothing(swept, config):
    sweep, _ = swept
    before = {n: (sweep / n / "metrics.jsonl").stat().st_mtime_ns for n in NAMES}
    args = [str(config), *GRID, "--seeds", "2", "--out", str(sweep), "-q"]
    again = tinkex("sweep", *args, cwd=sweep.parent)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "" and again.stderr == ""
    assert {n: (sweep / n / "metrics.jsonl").stat().st_mtime_ns for n in NAMES} == before
    assert json.loads((sweep / "sweep.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["--grid", "regularizers.kl_ref.weight=0,0.5"], "the grid (--grid"),
        (["--seeds", "3"], "the seeds (--seeds 2 then, 3 now)"),
        (["--set", "training.batch_size=2"], "the --set items (none then"),
    ],
)
def test_other_settings_for_an_existing_sweep_are_refused(swept, config, change, needle):
    sweep, _ = swept
    args = [str(config), *GRID, "--seeds", "2", "--out", str(sweep)]
    if change[0] == "--grid":
        args = [str(config), *change, GRID[2], GRID[3], "--seeds", "2", "--out", str(sweep)]
    elif change[0] == "--seeds":
        args = [str(config), *GRID, *change, "--out", str(sweep)]
    else:
        args += change
    manifest = (sweep / "sweep.json").read_bytes()
    result = CliRunner().invoke(cli, ["sweep", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "holds a sweep started with other settings" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert (sweep / "sweep.json").read_bytes() == manifest


# --------------------------------------------------------------------------- resuming


def test_an_interrupted_sweep_run_again_finishes_only_what_is_missing(config, tmp_path):
    """4 variants, one at a time: A and B finish, C is interrupted mid-way, D never
    starts. Then B's checkpoint is deleted (as if it never got one) and the same
    command runs again: A is left alone, B starts over, C resumes, D starts."""
    sweep = tmp_path / "sw"
    args = [
        str(config),
        "--grid",
        "regularizers.kl_ref.weight=0,0.1,0.2,0.3",
        "--steps",
        "60",
        "--set",
        "training.checkpoint_every=0",
        "--out",
        str(sweep),
    ]
    a, b, c, d = (sweep / f"kl_ref.weight={w}-seed0" for w in ("0", "0.1", "0.2", "0.3"))
    env = {k: v for k, v in os.environ.items() if k != "TINKEX_LOG_JSON"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinkex", "sweep", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            metrics = c / "metrics.jsonl"
            if metrics.exists() and metrics.read_bytes().count(b"\n") >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the sweep ended before it could be interrupted: " + proc.stderr.read())
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "finish the sweep with: tinkex sweep" in err
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [v["runs"][0]["status"] for v in manifest["variants"]] == [
        "completed",
        "completed",
        "interrupted",
        "pending",
    ]
    stopped_at = json.loads((c / "checkpoint" / "trainer.json").read_text())["step"]
    assert 2 <= stopped_at < 60 and [r["step"] for r in lines(c)] == list(range(1, stopped_at + 1))
    assert not d.exists()

    a_before = (a / "metrics.jsonl").read_bytes(), (a / "metrics.jsonl").stat().st_mtime_ns
    c_before = lines(c)
    for path in (b / "checkpoint").rglob("*"):
        if path.is_file():
            path.unlink()
    again = tinkex("sweep", *args, "--jobs", "2", cwd=tmp_path)  # --jobs may change
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done, 1 to resume, 2 to start · jobs 2" in again.stderr
    a_after = (a / "metrics.jsonl").read_bytes(), (a / "metrics.jsonl").stat().st_mtime_ns
    assert a_after == a_before  # A was done: not touched
    for run in (b, c, d):
        assert [r["step"] for r in lines(run)] == list(range(1, 61)), run.name
    assert lines(c)[:stopped_at] == c_before  # the steps before the interruption are kept
    sessions = json.loads((c / "summary.json").read_text())["sessions"]
    assert [(s["first_step"], s["last_step"]) for s in sessions] == [
        (1, stopped_at),
        (stopped_at + 1, 60),
    ]
    b_sessions = json.loads((b / "summary.json").read_text())["sessions"]
    assert [s["first_step"] for s in b_sessions] == [1]  # started over, not resumed
    log = (sweep / "logs" / f"{c.name}.log").read_text()
    assert f"train --resume {c}" in log
    assert json.loads((sweep / "sweep.json").read_text())["status"] == "completed"


def test_a_failing_run_is_reported_and_the_others_go_on(config, tmp_path):
    sweep = tmp_path / "sw"
    proc = tinkex(
        "sweep",
        str(config),
        "--grid",
        "data.max_length=40,2000",  # the tiny model has 1024 positions: the second run fails
        "--steps",
        "3",
        "--jobs",
        "2",
        "--out",
        str(sweep),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED  data.max_length=2000-seed0 (exit 2): " in proc.stderr
    assert "data.max_length" in proc.stderr.split("FAILED", 1)[1].splitlines()[0]
    assert "done    data.max_length=40-seed0: step 3" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: 1 of 2 runs failed (data.max_length=2000-seed0;")
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["status"] == "failed"
    ok, bad = (v["runs"][0] for v in manifest["variants"])
    assert ok["status"] == "completed" and ok["last_step"] == 3
    assert bad["status"] == "failed" and bad["exit_code"] == 2 and "max_length" in bad["error"]
    assert [r["step"] for r in lines(sweep / "data.max_length=40-seed0")] == [1, 2, 3]
    assert "loss per variant" in proc.stdout  # the runs that did train are compared


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--grid", "regularizers.kl_reff.weight=0,0.1"],
            "did you mean 'regularizers.kl_ref.weight'?",
        ),
        (["--grid", "regularizers.kl_ref.weight=0,[0.1"], "cannot read the values: '[' is never"),
        (["--grid", 'regularizers.kl_ref.weight=0,"a'], 'unterminated " quote'),
        (["--grid", "regularizers.kl_ref.weight=0,,1"], "an empty value"),
        (["--grid", "regularizers.kl_ref.weight=0,high"], "regularizers.kl_ref.weight"),
        (["--grid", "regularizers.kl_ref.weight=0,0"], "the value 0 is given twice"),
        (["--grid", "regularizers.kl_ref.weight"], "--grid expects SECTION.KEY=V1,V2"),
        (["--grid", "training.seed=0,1"], "--seeds N"),
        (
            ["--grid", "training.steps=2,3", "--grid", "training.steps=4"],
            "training.steps is given twice",
        ),
        (
            ["--grid", "training.batch_size=2,4", "--set", "training.batch_size=8"],
            "both give it a value",
        ),
        (["--grid", "training.batch_size=2,0"], "training.batch_size"),
        (["--set", "training.stepz=3"], "training.stepz"),
    ],
)
def test_bad_grids_exit_2_in_one_line_and_write_nothing(config, tmp_path, args, needle):
    out = tmp_path / "sw"
    result = CliRunner().invoke(cli, ["sweep", str(config), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_directory_that_is_not_a_sweep_is_refused(config, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["sweep", str(config), *GRID, "--out", str(out)])
    assert result.exit_code == 2
    assert "is not empty and holds no sweep.json" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_dry_run_lists_the_runs_and_writes_nothing(config, tmp_path):
    out = tmp_path / "sw"
    result = CliRunner().invoke(
        cli, ["sweep", str(config), *GRID, "--seeds", "2", "--out", str(out), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == NAMES
    assert {r[1] for r in rows} == {"4 steps"} and {r[2] for r in rows} == {"start"}
    assert "ok: 8 runs checked; nothing was written" in result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- units


def test_values_split_at_the_top_level_commas_only():
    assert split_values("0, 0.1 ,0.3") == ["0", "0.1", "0.3"]
    assert split_values('[1, 2],["a,b"]') == ["[1, 2]", '["a,b"]']
    assert split_values('{ schedule = "linear", start = 0, end = 0.3, steps = 100 },0.1') == [
        '{ schedule = "linear", start = 0, end = 0.3, steps = 100 }',
        "0.1",
    ]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    for bad in ("[1,2", "1]", '"a', "{a = [1}"):
        with pytest.raises(ValueError):
            split_values(bad)


def test_variant_names_are_readable_and_file_system_safe():
    (axis,) = parse_grid(['regularizers.kl_ref.weight=0,1e-3,{ a = "x/y", b = [1, 2] }'])
    assert axis.values == (0, 0.001, {"a": "x/y", "b": [1, 2]})
    names = [v.name for v in make_variants([axis])]
    assert names == ["kl_ref.weight=0", "kl_ref.weight=0.001", "kl_ref.weight=x_y-1-2"]
    assert variant_name({}) == "default"
    assert variant_name({"loss.reference": "none", "training.mode": "fused"}) == (
        "loss.reference=none,training.mode=fused"
    )
    long = variant_name({f"data.k{i}": "v" * 20 for i in range(10)})
    assert len(long) <= 96 and "/" not in long
    # two values that read alike once made safe still get two directories
    (alike,) = parse_grid(['data.template="a/b","a_b"'])
    first, second = (v.name for v in make_variants([alike]))
    assert first == "data.template=a_b" and second.startswith("data.template=a_b~")


def test_manifest_differences_name_each_setting():
    old = {
        "grid": [{"key": "a.b", "values": [1, 2], "raw": ["1", "2"]}],
        "seeds": [0],
        "sets": [],
        "config": "/c.toml",
        "config_sha256": "x",
    }
    same = {**old, "grid": [{"key": "a.b", "values": [1, 2], "raw": ["1", "2"]}]}
    assert manifest_differences(old, same) == []
    new = {**old, "seeds": [0, 1], "config_sha256": "y", "sets": ["t.s=1"]}
    found = manifest_differences(old, new)
    assert [f.split(" (")[0] for f in found] == ["the seeds", "the --set items", "the config"]


def test_the_commands_are_listed_and_import_no_torch():
    code = (
        "import sys, tinkex._cli_experiments, tinkex._cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = CliRunner().invoke(cli, ["--help"])
    assert "sweep" in result.output and "compare" in result.output
