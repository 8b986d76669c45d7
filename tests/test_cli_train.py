"""`tinkex train` and `tinkex report` end to end, through the installed `tinkex` executable.

The runs use the tiny embedded model with short sequences and a handful of steps,
so each takes seconds. They need the first-party regularizer distributions
(entropy, kl, norms) installed, as `make test` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

import tinkex
from tinkex._cli import cli
from tinkex._config import load_config
from tinkex._report import grad_shares

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
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
name = "entropy"
weight = 0.05
mode = "maximize"

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
steps = 6
batch_size = 4
checkpoint_every = 2
log_every = 1
"""


def tinkex_run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240):
    full_env = dict(os.environ)
    full_env.pop("TINKEX_LOG_JSON", None)
    full_env["COLUMNS"] = "120"
    full_env.update(env or {})
    return subprocess.run(
        [TINKEX, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_config) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted 6-step run, shared by the tests that read it."""
    run = tmp_path_factory.mktemp("runs") / "full"
    proc = tinkex_run("train", str(small_config), "--out", str(run), cwd=run.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, proc


# --------------------------------------------------------------------------- a whole run


def test_run_writes_every_file(full_run, small_config):
    run, proc = full_run
    recs = lines(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for rec in recs:
        out = tinkex.CustomLossOutput.from_dict(rec["output"])
        assert out.to_dict() == rec["output"]
        assert list(out.regularizers) == ["entropy", "kl_ref", "l2"]
        assert out.loss_total == pytest.approx(out.base_loss.value + out.regularizer_total)
        assert sum(grad_shares(out).values()) == pytest.approx(1.0)
        m = rec["metrics"]
        for key in (
            "step_time_s",
            "tokens",
            "tokens_per_s",
            "grad_norm",
            "learning_rate",
            "loss:sum",
        ):
            assert key in m, key
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["step_time_s"])
        assert m["learning_rate"] == pytest.approx(3e-3)
    # KL to the initial model: at step 1 the policy is the reference, so k3 is 0
    first = tinkex.CustomLossOutput.from_dict(recs[0]["output"])
    assert abs(first.regularizers["kl_ref"].value) < 1e-4
    assert tinkex.CustomLossOutput.from_dict(recs[-1]["output"]).regularizers["kl_ref"].value > 1e-3

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["last_step"] == 6
    assert summary["session"]["stopped"] == "completed"
    assert summary["loss"]["final"] == pytest.approx(recs[-1]["output"]["loss_total"])
    assert set(summary["terms"]) == {"base_loss", "entropy", "kl_ref", "l2"}
    shares = [t["mean_grad_share"] for t in summary["terms"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert summary["config"]["training"]["steps"] == 6
    for name in ("loss_components.png", "grad_share.png"):
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000

    # the resolved config is complete and reads back to the same config
    written = load_config(run / "config.toml")
    assert written == load_config(small_config)
    assert tomllib.loads((run / "config.toml").read_text())["training"]["mode"] == "auto"

    trainer = json.loads((run / "checkpoint" / "trainer.json").read_text())
    assert trainer["step"] == 6 and trainer["reference"] is True
    assert (run / "checkpoint" / "state").is_dir()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp files left

    # the terminal: the start line on stderr, the table and the paths on stdout
    assert "Traceback" not in proc.stderr
    assert "terms: base_loss, entropy, kl_ref, l2" in proc.stderr
    for needle in ("base_loss", "kl_ref", "grad share", "total", f"wrote {run}/"):
        assert needle in proc.stdout, needle


def test_report_redraws_from_metrics(full_run, tmp_path):
    run, _ = full_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("metrics.jsonl", "config.toml"):
        shutil.copy(run / name, copy / name)
    result = CliRunner().invoke(cli, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert "kl_ref" in result.output and "loss " in result.output
    for name in ("loss_components.png", "grad_share.png"):
        assert (copy / name).read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["terms"] == json.loads((run / "summary.json").read_text())["terms"]

    as_json = CliRunner().invoke(cli, ["report", "--json", "--no-plots", str(copy)])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output)["last_step"] == 6

    missing = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "run directory not found" in missing.output


# --------------------------------------------------------------------------- resume


def _kill_after(args: list[str], cwd: Path, metrics: Path, lines_at_least: int) -> None:
    """Start `tinkex train`, and kill -9 it once metrics.jsonl has that many lines."""
    proc = subprocess.Popen(
        [TINKEX, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_bytes().count(b"\n") >= lines_at_least:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait(timeout=60)


def test_resume_after_kill_9_truncates_and_continues(full_run, small_config, tmp_path):
    run = tmp_path / "crashed"
    _kill_after(
        ["train", str(small_config), "--out", str(run), "--steps", "400", "-q"],
        tmp_path,
        run / "metrics.jsonl",
        3,
    )
    before = lines(run)
    ckpt = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert ckpt % 2 == 0 and 2 <= ckpt <= len(before)  # checkpoint_every = 2

    resumed = tinkex_run("train", "--resume", str(run), "--steps", "6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = lines(run)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]  # none lost, none repeated
    assert after[:ckpt] == before[:ckpt]  # earlier lines kept as they were
    assert "resuming" in resumed.stderr and f"steps {ckpt + 1}..6" in resumed.stderr

    # resuming is exact: same losses as the uninterrupted run, step for step
    full = lines(full_run[0])
    for a, b in zip(after, full, strict=True):
        assert a["output"]["loss_total"] == pytest.approx(
            b["output"]["loss_total"], rel=1e-4, abs=1e-6
        )

    # a finished run asked for more steps goes on from where it ended
    more = tinkex_run("train", "--resume", str(run), "--steps", "8", "-q", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert [r["step"] for r in lines(run)] == list(range(1, 9))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["session"]["first_step"] == 7 and summary["last_step"] == 8
    assert tomllib.loads((run / "config.toml").read_text())["training"]["steps"] == 8


def test_ctrl_c_stops_cleanly_with_a_checkpoint_and_json_logs(small_config, tmp_path):
    run = tmp_path / "interrupted"
    env = {**os.environ, "TINKEX_LOG_JSON": "1"}
    proc = subprocess.Popen(
        [
            TINKEX,
            "train",
            str(small_config),
            "--out",
            str(run),
            "--steps",
            "400",
            "--set",
            "training.checkpoint_every=0",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = run / "metrics.jsonl"
            if path.exists() and path.read_text().count("\n") >= 3:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be interrupted: " + proc.stderr.read())
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    steps = [r["step"] for r in lines(run)]
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 400
    assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == steps[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["session"]["stopped"] == "interrupted" and summary["last_step"] == steps[-1]
    assert f"tinkex train --resume {run}" in stdout

    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names[0] == "train.start" and "train.step" in names and names[-1] == "train.stop"
    assert events[-1]["stopped"] == "interrupted"
    assert any(e["event"] == "train.checkpoint" and e["step"] == steps[-1] for e in events)

    resumed = tinkex_run(
        "train", "--resume", str(run), "--steps", str(steps[-1] + 2), "-q", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in lines(run)] == list(range(1, steps[-1] + 3))


# --------------------------------------------------------------------------- the default run


def test_default_run_lowers_the_loss(tmp_path):
    """The shipped config, shortened: no CONFIG argument, default run directory."""
    proc = tinkex_run(
        "train", "--steps", "40", "--set", "training.batch_size=16", "-q", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""  # --quiet
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}", run.name)
    summary = json.loads((run / "summary.json").read_text())
    loss = summary["loss"]
    assert summary["steps"] == 40
    assert loss["final_mean"] < 0.75 * loss["initial_mean"], loss
    assert loss["final_base_mean"] < loss["initial_base_mean"] - 1.0, loss
    assert set(summary["terms"]) == {"base_loss", "entropy", "kl_ref", "l2"}


# --------------------------------------------------------------------------- bad input


BAD_CONFIGS = [
    ("[training]\nstpes = 3\n", "training.stpes", "did you mean 'steps'"),
    (
        "[[regularizers]]\nname = 'entrpy'\nweight = 0.1\n",
        "regularizers[0] (entrpy)",
        "unknown regularizer 'entrpy'",
    ),
    (
        "[[regularizers]]\nname = 'kl'\nweight = 0.1\nestimatr = 'k3'\n",
        "regularizers[0] (kl)",
        "'estimatr'",
    ),
    (
        "[[regularizers]]\nname = 'entropy'\nweight = 0.1\ntemperature = -1.0\n",
        "regularizers[0] (entropy)",
        "temperature",
    ),
    ("[data]\npath = 'missing.jsonl'\n", "data file not found", "missing.jsonl"),
    ("[optimizer]\nlearning_rate = 'fast'\n", "optimizer.learning_rate", "'fast'"),
]


@pytest.mark.parametrize(("text", "culprit", "detail"), BAD_CONFIGS)
def test_bad_config_exits_2_naming_the_culprit(tmp_path, text, culprit, detail):
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert culprit in result.output and detail in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing was started


def test_bad_config_through_the_executable(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[[regularizers]]\nname = 'nosuch'\nweight = 1\n", encoding="utf-8")
    proc = tinkex_run("train", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown regularizer 'nosuch'" in proc.stderr and "regularizers[0]" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.count("\n") <= 3  # short


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope.toml"], "config file not found"),
        (["--resume", "norun"], "not a tinkex run directory"),
        (["--set", "training.steps"], "SECTION.KEY=VALUE"),
        (["--set", "training.stepz=3"], "training.stepz"),
        (["--set", "training.steps=0"], "training.steps"),
        (["--steps", "0"], "--steps"),
        (["cfg.toml", "--resume", "somewhere"], "either CONFIG or --resume"),
    ],
)
def test_bad_command_lines(tmp_path, args, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_fresh_run_refuses_an_existing_run_dir_and_touches_nothing(full_run, small_config):
    run, _ = full_run
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = CliRunner().invoke(cli, ["train", str(small_config), "--out", str(run)])
    assert result.exit_code == 2
    assert "already holds a run" in result.output and f"--resume {run}" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_dry_run_prints_the_resolved_config(small_config):
    result = CliRunner().invoke(
        cli, ["train", str(small_config), "--dry-run", "--set", "training.batch_size=2"]
    )
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads(result.stdout)
    assert resolved["training"]["batch_size"] == 2 and resolved["training"]["steps"] == 6
    assert [r["name"] for r in resolved["regularizers"]] == ["entropy", "kl", "l2"]
    assert "ok: 24 examples" in result.stderr


def test_cli_module_imports_no_torch():
    code = "import sys, tinkex._cli_train; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- docs/cli.md


def _doc_sections() -> dict[str, str]:
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    parts = re.split(r"^## `(tinkex[^`]*)`\s*$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _commands():
    import click

    ctx = click.Context(cli, info_name="tinkex")
    yield "tinkex", cli
    stack = [("tinkex", cli, ctx)]
    while stack:
        path, group, gctx = stack.pop()
        for name in group.list_commands(gctx):
            cmd = group.get_command(gctx, name)
            sub = f"{path} {name}"
            yield sub, cmd
            if isinstance(cmd, click.Group):
                stack.append((sub, cmd, click.Context(cmd, info_name=name, parent=gctx)))


def test_docs_cli_covers_every_command_and_option():
    """docs/cli.md has a `## \\`tinkex ...\\`` section per command listing exactly its options."""
    import click

    sections = _doc_sections()
    seen = set()
    for path, cmd in _commands():
        assert path in sections, f"docs/cli.md has no section for `{path}`"
        seen.add(path)
        body = sections[path]
        documented = set(re.findall(r"`(--[a-z][a-z0-9-]*)", body))
        actual = set()
        for param in cmd.params:
            if isinstance(param, click.Option):
                actual.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
            else:
                assert param.human_readable_name.upper() in body, (
                    f"{path}: argument {param.name} undocumented"
                )
        actual.add("--help")
        assert documented == actual, (
            f"{path}: documented {sorted(documented)} vs actual {sorted(actual)}"
        )
    assert set(sections) == seen, (
        f"docs/cli.md documents commands that do not exist: {set(sections) - seen}"
    )


# --------------------------------------------------------------------------- a failing term


class FailsOnThirdCall:
    """A test regularizer: 0.0 twice, then raises (as a buggy plugin would)."""

    name = "flaky"
    description = "raises on its third call"
    calls = 0

    def __call__(self, data, logprobs):
        type(self).calls += 1
        if type(self).calls >= 3:
            raise RuntimeError("flaky broke")
        return 0.0 * logprobs[0].sum(), {}


def test_a_failing_term_exits_1_naming_it_and_keeps_the_completed_steps(tmp_path):
    import tinkex.testing

    config = tmp_path / "flaky.toml"
    config.write_text(
        "[data]\nlimit = 8\nmax_length = 32\n[training]\nsteps = 5\nbatch_size = 2\ncheckpoint_every = 0\n"
        "[[regularizers]]\nname = 'flaky'\nweight = 1.0\n",
        encoding="utf-8",
    )
    FailsOnThirdCall.calls = 0
    run = tmp_path / "run"
    configured = structlog.is_configured()
    with tinkex.testing.register_regularizers(FailsOnThirdCall):
        result = CliRunner().invoke(cli, ["train", str(config), "--out", str(run), "-q"])
    assert structlog.is_configured() == configured  # the command put logging back as it was
    assert result.exit_code == 1, result.output
    assert "flaky" in result.output and "flaky broke" in result.output
    assert "Traceback" not in result.output
    assert [r["step"] for r in lines(run)] == [1, 2]
    assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_step"] == 2 and summary["session"]["stopped"] == "failed"


# --------------------------------------------------------------------------- weight schedules


def test_a_scheduled_weight_trains_and_evaluates_at_each_step(tmp_path, small_config):
    import tinkex.schedules

    run = tmp_path / "run"
    schedule = '{schedule="linear", start=0.0, end=0.3, steps=3}'
    args = [
        "train",
        str(small_config),
        "--out",
        str(run),
        "-q",
        "--steps",
        "4",
        "--set",
        f"regularizers.kl_ref.weight={schedule}",
        "--set",
        "eval.fraction=0.2",
        "--set",
        "eval.every=2",
        "--set",
        "samples.prompts=[]",
    ]
    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert tomllib.loads(dry.stdout)["regularizers"][1]["weight"] == {
        "schedule": "linear",
        "start": 0.0,
        "end": 0.3,
        "steps": 3,
    }
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    recs = lines(run)
    weights = [r["output"]["regularizers"]["kl_ref"]["weight"] for r in recs]
    assert weights == pytest.approx([0.0, 0.1, 0.2, 0.3])  # the schedule's value at each step
    for rec in recs:
        kl = rec["output"]["regularizers"]["kl_ref"]
        assert kl["contribution"] == pytest.approx(kl["weight"] * kl["value"])
    # the held-out loss composes the terms with the weight of the step it follows
    for rec in (recs[1], recs[3]):
        ev, step = rec["eval"], rec["step"]
        weight = tinkex.schedules.linear(0.0, 0.3, 3)(step)
        assert ev["loss_total"] == pytest.approx(
            ev["base_loss"]
            + 0.05 * ev["terms"]["entropy"]
            + weight * ev["terms"]["kl_ref"]
            + 0.01 * ev["terms"]["l2"]
        )
    # the resolved config keeps the schedule as an inline table, and reads back the same
    text = (run / "config.toml").read_text()
    assert 'weight = { schedule = "linear", start = 0.0, end = 0.3, steps = 3 }' in text
    assert load_config(run / "config.toml").regularizers[1].weight == tinkex.schedules.linear(
        0.0, 0.3, 3
    )


def test_a_bad_schedule_weight_on_the_command_line_exits_2(tmp_path, small_config):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(small_config),
            "--out",
            str(tmp_path / "run"),
            "--set",
            'regularizers.kl_ref.weight={schedule="linaer", start=0.0, end=0.3, steps=3}',
        ],
    )
    assert result.exit_code == 2
    assert result.output == (
        "Error: --set: regularizers.kl_ref.weight.schedule must be one of 'constant', 'linear', "
        "'cosine', 'step', got 'linaer'; did you mean 'linear'?\n"
    )
    assert not (tmp_path / "run").exists()
