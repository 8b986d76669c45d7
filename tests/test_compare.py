"""`tinkex compare` on hand-made run and sweep directories: every number checked
against the metrics lines, the mean ± std (ddof=1) per variant, the --json schema,
where the plots go, and the refusals."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

import tinkex
from tinkex._cli import cli
from tinkex._compare import collect, group
from tinkex._report import StepRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {
    "run",
    "sweep",
    "variant",
    "params",
    "seed",
    "steps",
    "final_loss",
    "final_base_loss",
    "best_loss",
    "final_eval_loss",
    "wall_time_s",
    "terms",
}


def step(s: int, base: float, kl: float, kl_w: float, ent: float | None, held=None):
    regs = {"kl_ref": (kl, kl_w, 2.0)}
    if ent is not None:
        regs["entropy"] = (ent, 0.05, 4.0)
    outs = {
        n: tinkex.RegularizerOutput(
            name=n, value=v, weight=w, contribution=w * v, grad_norm=g, grad_norm_weighted=w * g
        )
        for n, (v, w, g) in regs.items()
    }
    total = sum(o.contribution for o in outs.values())
    out = tinkex.CustomLossOutput(
        loss_total=base + total,
        base_loss=tinkex.BaseLossOutput(value=base, grad_norm=1.0),
        regularizers=outs,
        regularizer_total=total,
        total_grad_norm=1.0,
    )
    return StepRecord(
        step=s, output=out, metrics={"step_time_s": 0.25 + 0.01 * s, "tokens": 100.0}, eval=held
    )


def make_run(path: Path, seed: int, kl_w: float, entropy: bool, *, n: int = 6, evals=True):
    """A run whose losses depend on the seed and the variant (a spike at step 3)."""
    path.mkdir(parents=True)
    recs = []
    for s in range(1, n + 1):
        base = 4.0 / s + 0.1 * seed + (1.5 if s == 3 else 0.0)
        held = None
        if evals and s % 3 == 0:
            held = {"base_loss": base + 0.2, "loss_total": base + 0.3, "terms": {"kl_ref": 0.1}}
        recs.append(step(s, base, 0.1 * s, kl_w, -2.0 + 0.1 * seed if entropy else None, held))
    (path / "metrics.jsonl").write_text("".join(r.to_json() + "\n" for r in recs))
    (path / "config.toml").write_text(
        f'[loss]\nnormalize = "tokens"\n[training]\nseed = {seed}\n[model]\nseed = {seed}\n'
    )
    return recs


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """A hand-made sweep: kl_ref.weight 0 / 0.5 x entropy on, seeds 0 and 1, one run unstarted."""
    sweep = tmp_path / "sw"
    sweep.mkdir()
    variants = []
    for w in (0.0, 0.5):
        name = f"kl_ref.weight={w},entropy.enabled=true"
        runs = []
        for seed in (0, 1, 2):
            run_dir = f"{name}-seed{seed}"
            if seed < 2:
                make_run(sweep / run_dir, seed, w, True, evals=w > 0)
            runs.append({"seed": seed, "run_dir": run_dir, "status": "completed"})
        params = {"regularizers.kl_ref.weight": w, "regularizers.entropy.enabled": True}
        variants.append({"name": name, "params": params, "runs": runs})
    grid = [
        {"key": "regularizers.kl_ref.weight", "values": [0.0, 0.5], "raw": ["0.0", "0.5"]},
        {"key": "regularizers.entropy.enabled", "values": [True], "raw": ["true"]},
    ]
    (sweep / "sweep.json").write_text(json.dumps({"grid": grid, "variants": variants}))
    return sweep


def lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def expected_row(run: Path) -> dict:
    """The --json numbers of a run, recomputed from its metrics lines."""
    recs = lines(run)
    outs = [tinkex.CustomLossOutput.from_dict(r["output"]) for r in recs]
    evals = [r["eval"] for r in recs if "eval" in r]
    terms = {}
    for name in ["base_loss", *outs[0].regularizers]:
        contribs = [
            o.base_loss.value if name == "base_loss" else o.regularizers[name].contribution
            for o in outs
        ]
        shares = [o.grad_shares()[name] for o in outs]
        terms[name] = {
            "mean_contribution": statistics.fmean(contribs),
            "mean_grad_share": statistics.fmean(shares),
        }
    return {
        "steps": recs[-1]["step"],
        "final_loss": outs[-1].loss_total,
        "final_base_loss": outs[-1].base_loss.value,
        "best_loss": min(o.loss_total for o in outs),
        "final_eval_loss": evals[-1]["base_loss"] if evals else None,
        "wall_time_s": sum(r["metrics"]["step_time_s"] for r in recs),
        "terms": terms,
    }


def test_json_has_one_object_per_run_with_the_numbers_of_its_metrics(sweep_dir):
    result = CliRunner().invoke(cli, ["compare", str(sweep_dir), "--json", "--no-plots"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["params"]["regularizers.kl_ref.weight"], r["seed"]) for r in rows] == [
        (0.0, 0),
        (0.0, 1),
        (0.5, 0),
        (0.5, 1),
    ]
    for row in rows:
        assert set(row) == RUN_KEYS
        assert row["sweep"] == str(sweep_dir) and Path(row["run"]).parent == sweep_dir
        assert row["variant"] == Path(row["run"]).name.rsplit("-seed", 1)[0]
        want = expected_row(Path(row["run"]))
        for key, value in want.items():
            if key == "terms":
                assert set(row["terms"]) == set(value)
                for name, t in value.items():
                    assert row["terms"][name] == pytest.approx(t), (row["run"], name)
            else:
                assert row[key] == pytest.approx(value), (row["run"], key)
    assert rows[0]["final_eval_loss"] is None and rows[2]["final_eval_loss"] == pytest.approx(
        4.0 / 6 + 0.2
    )
    assert "2 runs with no step yet, left out" in result.stderr  # the seed-2 runs
    assert not list(sweep_dir.glob("*.png"))  # --no-plots


def test_a_variant_row_is_the_mean_and_the_sample_std_over_its_seeds(sweep_dir):
    runs, keys, notes = collect([sweep_dir])
    assert keys == ["regularizers.kl_ref.weight", "regularizers.entropy.enabled"]
    assert len(notes) == 1 and "seed2" in notes[0]
    rows = group(runs)
    assert [(r.label, len(r.runs)) for r in rows] == [
        ("kl_ref.weight=0.0,entropy.enabled=true", 2),
        ("kl_ref.weight=0.5,entropy.enabled=true", 2),
    ]
    finals = [lines(r.run)[-1]["output"]["loss_total"] for r in rows[1].runs]
    mean, std, n = rows[1].stat(lambda r: r.summary["loss"]["final"])
    assert n == 2
    assert mean == pytest.approx(statistics.fmean(finals))
    assert std == pytest.approx(statistics.stdev(finals))  # ddof = 1
    assert std == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)

    result = CliRunner().invoke(cli, ["compare", str(sweep_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"{mean:.4g} ± {std:.2g}" in text
    for header in ("kl_ref.weight", "entropy.enabled", "(last step)", "(min over steps)"):
        assert header in text, header
    assert "final eval loss" in text and "mean ± std over 2 seeds" in text
    # the plots go into the sweep directory
    for name in ("compare_loss.png", "compare_grad_share.png"):
        assert (sweep_dir / name).read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {sweep_dir}/compare_loss.png" in " ".join(text.split())


def test_runs_given_directly_have_no_params_and_their_config_seed(tmp_path):
    make_run(tmp_path / "a", 3, 0.2, False)
    make_run(tmp_path / "b", 4, 0.2, True, evals=False)
    result = CliRunner().invoke(
        cli, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["params"], r["seed"], r["sweep"], r["variant"]) for r in rows] == [
        ({}, 3, None, "a"),
        ({}, 4, None, "b"),
    ]
    assert set(rows[0]["terms"]) == {"base_loss", "kl_ref"}
    assert set(rows[1]["terms"]) == {"base_loss", "kl_ref", "entropy"}
    assert not list(tmp_path.rglob("compare_*.png"))  # no sweep, no --out: no plots
    table = CliRunner().invoke(cli, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert table.exit_code == 0 and "give --out DIR" in table.stdout
    assert "one run per variant" in table.stdout
    out = tmp_path / "cmp"
    drawn = CliRunner().invoke(
        cli, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]
    )
    assert drawn.exit_code == 0, drawn.output
    assert sorted(p.name for p in out.iterdir()) == ["compare_grad_share.png", "compare_loss.png"]


def test_a_sweep_and_a_run_together_label_their_variants(sweep_dir, tmp_path):
    make_run(tmp_path / "solo", 0, 0.1, True)
    runs, _, _ = collect([sweep_dir, tmp_path / "solo"])
    labels = [row.label for row in group(runs)]
    assert labels == [
        "sw/kl_ref.weight=0.0,entropy.enabled=true",
        "sw/kl_ref.weight=0.5,entropy.enabled=true",
        "solo",
    ]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d.mkdir(), "neither a tinkex run directory"),
        (lambda d: None, "no such directory"),
        (
            lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")),
            "no run with a recorded step",
        ),
        (
            lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')),
            "metrics.jsonl:1: not a valid metrics line",
        ),
        (lambda d: (d.mkdir(), (d / "sweep.json").write_text("{")), "sweep.json is not valid JSON"),
    ],
)
def test_what_cannot_be_compared_exits_2_in_one_line(tmp_path, make, needle):
    target = tmp_path / "x"
    make(target)
    result = CliRunner().invoke(cli, ["compare", str(target)])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.output


def test_a_run_with_no_step_yet_is_left_out_beside_others(tmp_path):
    make_run(tmp_path / "good", 0, 0.1, True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "good"), str(empty), "--json"])
    assert result.exit_code == 0, result.output
    assert [r["run"] for r in json.loads(result.stdout)] == [str(tmp_path / "good")]
    assert "no step recorded" in result.stderr and "left out" in result.stderr
