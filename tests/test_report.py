"""Run reports: reading metrics.jsonl, the grad-share definition, summary values, plots, table."""

from __future__ import annotations

import json

import pytest

import tinkex
from tinkex._plots import plot_grad_share, plot_loss_components, write_report
from tinkex._report import (
    GRAD_SHARE_DEFINITION,
    StepRecord,
    eval_line,
    grad_alignment,
    grad_shares,
    last_samples,
    read_metrics,
    summarize,
    terms_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def output(
    base: float, regs: dict[str, tuple[float, float, float | None]], base_gn=None, total_gn=None
):
    """regs: name -> (value, weight, grad_norm)."""
    regularizers = {
        name: tinkex.RegularizerOutput(
            name=name,
            value=v,
            weight=w,
            contribution=w * v,
            grad_norm=g,
            grad_norm_weighted=None if g is None else w * g,
        )
        for name, (v, w, g) in regs.items()
    }
    reg_total = sum(r.contribution for r in regularizers.values())
    return tinkex.CustomLossOutput(
        loss_total=base + reg_total,
        base_loss=tinkex.BaseLossOutput(value=base, grad_norm=base_gn),
        regularizers=regularizers,
        regularizer_total=reg_total,
        total_grad_norm=total_gn,
    )


def records(n: int = 10) -> list[StepRecord]:
    out = []
    for step in range(1, n + 1):
        base = 5.0 - 0.3 * step
        o = output(
            base,
            {"kl": (0.1 * step, 0.5, 2.0), "l2": (10.0, 0.01, 100.0)},
            base_gn=3.0,
            total_gn=4.0,
        )
        out.append(StepRecord(step=step, output=o, metrics={"step_time_s": 0.5, "tokens": 100.0}))
    return out


def write_metrics(run, recs, tail: str = ""):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text(
        "".join(r.to_json() + "\n" for r in recs) + tail, encoding="utf-8"
    )


# --------------------------------------------------------------------------- shares


def test_grad_shares_worked_example():
    # weighted norms: base 3.0, kl 0.5*2 = 1.0, l2 0.01*100 = 1.0 -> sum 5.0
    o = output(1.0, {"kl": (1.0, 0.5, 2.0), "l2": (10.0, 0.01, 100.0)}, base_gn=3.0, total_gn=4.0)
    shares = grad_shares(o)
    assert shares == pytest.approx({"base_loss": 0.6, "kl": 0.2, "l2": 0.2})
    assert sum(shares.values()) == pytest.approx(1.0)
    assert grad_alignment(o) == pytest.approx(4.0 / 5.0)


def test_grad_shares_absent_or_all_zero():
    assert grad_shares(output(1.0, {"kl": (1.0, 0.5, None)})) is None
    assert grad_alignment(output(1.0, {"kl": (1.0, 0.5, None)})) is None
    zero = output(1.0, {"kl": (1.0, 0.5, 0.0)}, base_gn=0.0, total_gn=0.0)
    assert grad_shares(zero) == {"base_loss": 0.0, "kl": 0.0}
    assert grad_alignment(zero) is None
    assert "base loss" in GRAD_SHARE_DEFINITION


# --------------------------------------------------------------------------- reading


def test_read_metrics_round_trips(tmp_path):
    recs = records(3)
    write_metrics(tmp_path, recs)
    again = read_metrics(tmp_path)
    assert again == recs
    assert read_metrics(tmp_path / "metrics.jsonl") == recs


def test_read_metrics_skips_a_cut_last_line_and_says_which(tmp_path):
    recs = records(3)
    write_metrics(tmp_path, recs, tail='{"step": 4, "output": {"loss_to')
    torn: list[int] = []
    assert [r.step for r in read_metrics(tmp_path, torn=torn)] == [1, 2, 3]
    assert torn == [4]


def test_read_metrics_rejects_a_bad_complete_line(tmp_path):
    write_metrics(tmp_path, records(2), tail='{"step": 3}\n')
    with pytest.raises(tinkex.RunDirError, match=r"metrics.jsonl:3: not a valid metrics line"):
        read_metrics(tmp_path)


def test_read_metrics_missing(tmp_path):
    with pytest.raises(tinkex.RunDirError, match=r"no metrics\.jsonl"):
        read_metrics(tmp_path)


# --------------------------------------------------------------------------- summary


def test_summary_values():
    recs = records(10)
    s = summarize(recs, config={"training": {"steps": 10}})
    # loss_total(step) = 5 - 0.3 s + 0.5 * 0.1 s + 0.01 * 10 = 5.1 - 0.25 s
    assert s["steps"] == 10 and s["first_step"] == 1 and s["last_step"] == 10
    assert s["loss"]["initial"] == pytest.approx(4.85)
    assert s["loss"]["final"] == pytest.approx(2.6)
    assert s["loss"]["best"] == pytest.approx(2.6) and s["loss"]["best_step"] == 10
    assert s["loss"]["initial_mean"] == pytest.approx(4.85)  # window = 10 // 10 = 1
    assert s["loss"]["final_base"] == pytest.approx(2.0)
    kl = s["terms"]["kl"]
    assert kl["weight"] == 0.5
    assert kl["final_value"] == pytest.approx(1.0) and kl["final_contribution"] == pytest.approx(
        0.5
    )
    assert kl["mean_value"] == pytest.approx(0.55) and kl["mean_contribution"] == pytest.approx(
        0.275
    )
    assert kl["mean_grad_norm"] == pytest.approx(2.0)
    assert kl["mean_grad_share"] == pytest.approx(0.2) and kl["final_grad_share"] == pytest.approx(
        0.2
    )
    assert s["terms"]["base_loss"]["mean_grad_share"] == pytest.approx(0.6)
    assert list(s["terms"]) == ["base_loss", "kl", "l2"]
    assert s["mean_grad_alignment"] == pytest.approx(0.8)
    assert s["wall_time_s"] == pytest.approx(5.0) and s["tokens"] == 1000
    assert s["tokens_per_s"] == pytest.approx(200.0)
    assert s["config"] == {"training": {"steps": 10}}
    json.dumps(s, allow_nan=False)


def with_evals(recs: list[StepRecord]) -> list[StepRecord]:
    """Held-out metrics on steps 2, 4, ...: base_loss 3.0, 2.5, 2.7, ..."""
    base = {2: 3.0, 4: 2.5, 6: 2.7, 8: 2.9, 10: 2.6}
    out = []
    for r in recs:
        if r.step in base:
            held = {
                "base_loss": base[r.step],
                "loss_total": base[r.step] + 0.1,
                "terms": {"kl": 0.2},
            }
            r = StepRecord(step=r.step, output=r.output, metrics=r.metrics, eval=held)
        out.append(r)
    return out


def test_summary_has_the_last_and_the_best_evaluation():
    s = summarize(with_evals(records(10)))
    assert s["eval"] == {
        "evaluations": 5,
        "last": {"step": 10, "base_loss": 2.6, "loss_total": 2.7, "terms": {"kl": 0.2}},
        "best": {"step": 4, "base_loss": 2.5, "loss_total": 2.6, "terms": {"kl": 0.2}},
    }
    assert eval_line(s) == (
        "eval base_loss 2.6000 at step 10 (best 2.5000 at step 4; 5 evaluations); terms: kl 0.2"
    )
    plain = summarize(records(3))
    assert "eval" not in plain and eval_line(plain) is None


def test_an_eval_line_round_trips_and_a_bad_one_is_refused(tmp_path):
    recs = with_evals(records(4))
    write_metrics(tmp_path, recs)
    assert read_metrics(tmp_path) == recs
    assert '"eval": {"base_loss": 3.0' in (tmp_path / "metrics.jsonl").read_text()
    assert '"eval"' not in recs[0].to_json()  # only on the evaluated steps
    bad = json.loads(recs[1].to_json())
    bad["eval"] = {"base_loss": "low"}
    write_metrics(tmp_path, recs[:1], tail=json.dumps(bad) + "\n")
    with pytest.raises(tinkex.RunDirError, match=r"metrics.jsonl:2: .*'eval' must be an object"):
        read_metrics(tmp_path)


def test_last_samples_reads_the_last_step_and_skips_a_torn_line(tmp_path):
    assert last_samples(tmp_path) is None
    rows = [
        {"step": 0, "prompt": "a", "completion": "x"},
        {"step": 0, "prompt": "b", "completion": "y"},
        {"step": 5, "prompt": "a", "completion": "z"},
        {"step": 5, "prompt": "b", "completion": "w"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "samples.jsonl").write_text(text + '{"step": 6, "pro', encoding="utf-8")
    assert last_samples(tmp_path) == {
        "step": 5,
        "samples": [{"prompt": "a", "completion": "z"}, {"prompt": "b", "completion": "w"}],
    }
    (tmp_path / "samples.jsonl").write_text(text + "[1]\n" + text, encoding="utf-8")
    with pytest.raises(tinkex.RunDirError, match=r"samples.jsonl:5: not a valid samples line"):
        last_samples(tmp_path)
    (tmp_path / "samples.jsonl").write_text(text + text, encoding="utf-8")
    with pytest.raises(tinkex.RunDirError, match=r"samples.jsonl:5: step 0 after step 5"):
        last_samples(tmp_path)


def test_summary_of_untracked_norms_has_no_shares():
    recs = [StepRecord(step=1, output=output(2.0, {"kl": (1.0, 0.5, None)}))]
    s = summarize(recs)
    assert (
        s["terms"]["kl"]["mean_grad_share"] is None and s["terms"]["kl"]["mean_grad_norm"] is None
    )
    assert s["tokens_per_s"] is None and "config" not in s


def test_summary_needs_a_step():
    with pytest.raises(tinkex.RunDirError, match="no steps"):
        summarize([])


# --------------------------------------------------------------------------- output


def test_plots_are_png_files(tmp_path):
    recs = records(12)
    for fn, name in ((plot_loss_components, "a.png"), (plot_grad_share, "b.png")):
        path = fn(recs, tmp_path / name)
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    # one step, and untracked norms, still give a picture
    one = [StepRecord(step=1, output=output(2.0, {"kl": (1.0, 0.5, None)}))]
    assert plot_grad_share(one, tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_loss_components(one, tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))


def test_terms_table_shows_every_term_and_the_shares():
    from rich.console import Console

    console = Console(width=120, record=True, force_terminal=False)
    console.print(terms_table(summarize(records(10))))
    text = console.export_text()
    for needle in ("base_loss", "kl", "l2", "total", "60.0%", "20.0%", "grad share", "2.6"):
        assert needle in text, (needle, text)


def test_the_loss_plot_draws_the_held_out_points(tmp_path):
    plain = plot_loss_components(records(10), tmp_path / "plain.png").read_bytes()
    held = plot_loss_components(with_evals(records(10)), tmp_path / "held.png").read_bytes()
    assert held[:8] == PNG_MAGIC and held != plain


def test_write_report_adds_the_last_samples(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, with_evals(records(4)))
    (run / "samples.jsonl").write_text(
        json.dumps({"step": 4, "prompt": "p", "completion": "c"}) + "\n", encoding="utf-8"
    )
    summary = write_report(run, plots=False)
    assert summary["samples"] == {"step": 4, "samples": [{"prompt": "p", "completion": "c"}]}
    assert summary["eval"]["last"]["step"] == 4


def test_write_report(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, records(5))
    (run / "config.toml").write_text("[training]\nsteps = 5\n", encoding="utf-8")
    summary = write_report(run, extra={"stopped": "completed"})
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert summary["config"] == {"training": {"steps": 5}} and summary["stopped"] == "completed"
    for name in ("loss_components.png", "grad_share.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(tinkex.RunDirError, match="run directory not found"):
        write_report(tmp_path / "missing")


def test_terms_table_headers_say_last_step_or_run_mean_and_fit_80_columns():
    from rich.console import Console

    console = Console(width=150, record=True, force_terminal=False)
    console.print(terms_table(summarize(records(10))))
    text = console.export_text()
    header = text.split("base_loss")[0]
    assert header.count("(run mean)") == 2
    words = " ".join(text.split())  # the caption wraps at the table's width
    assert "weight, value, contrib.: at the last step" in words
    assert "mean over the 10 steps" in words
    narrow = Console(width=80, record=True, force_terminal=False)
    narrow.print(terms_table(summarize(records(10))))
    assert "…" not in narrow.export_text()  # nothing cut short in a plain terminal


def test_sessions_are_kept_and_a_resume_cuts_the_later_ones_away():
    from tinkex._report import loss_unit, merge_sessions, resume_steps

    a = {"stopped": "interrupted", "first_step": 1, "last_step": 7}
    b = {"stopped": "interrupted", "first_step": 8, "last_step": 12}
    c = {"stopped": "completed", "first_step": 11, "last_step": 20}  # resumed from step 10
    d = {"stopped": "completed", "first_step": 8, "last_step": 20}  # b killed before step 10
    assert merge_sessions(None, a, 7) == [a]
    assert merge_sessions({"sessions": [a]}, b, 12) == [a, b]
    assert merge_sessions({"sessions": [a, b]}, c, 20) == [a, b, c]  # b wrote steps 8..10
    assert merge_sessions({"sessions": [a, b]}, d, 20) == [a, d]  # d rewrote all of b's
    assert merge_sessions({"session": a}, b, 12) == [a, b]  # a summary from before `sessions`
    assert merge_sessions({"sessions": [a, b]}, {"stopped": "failed"}, 12) == [a, b]
    assert merge_sessions({"sessions": [a, b]}, None, 9) == [a, b]
    assert merge_sessions({"sessions": [a, b]}, None, 7) == [a]
    assert resume_steps({"first_step": 1, "sessions": [a, b, c]}) == [8, 11]
    assert resume_steps({"first_step": 1, "sessions": "junk"}) == [] == resume_steps(None)
    assert loss_unit({"loss": {"normalize": "tokens"}}) == "nats per response token"
    assert loss_unit({"loss": {"normalize": "sum"}}) == "nats, summed over the batch"
    assert loss_unit({}) == "nats per response token" and loss_unit(None) is None
