"""The figures: one colour per term everywhere, smoothing that keeps spikes, log-scale
grad shares as lines, units, and resume boundaries."""

from __future__ import annotations

import itertools
import json

import pytest
from matplotlib.colors import to_hex

import tinkex
from tinkex._plots import (
    BASE_COLOUR,
    SHARE_FLOOR,
    TOTAL_COLOUR,
    VariantCurves,
    compare_grad_share_figure,
    grad_share_figure,
    loss_components_figure,
    smooth,
    term_colours,
    write_report,
)
from tinkex._report import StepRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(step: int, regs: dict[str, tuple[float, float, float]], base=2.0, base_gn=1.0):
    """regs: name -> (value, weight, grad_norm)."""
    outs = {
        name: tinkex.RegularizerOutput(
            name=name,
            value=v,
            weight=w,
            contribution=w * v,
            grad_norm=g,
            grad_norm_weighted=w * g,
        )
        for name, (v, w, g) in regs.items()
    }
    total = sum(r.contribution for r in outs.values())
    out = tinkex.CustomLossOutput(
        loss_total=base + total,
        base_loss=tinkex.BaseLossOutput(value=base, grad_norm=base_gn),
        regularizers=outs,
        regularizer_total=total,
        total_grad_norm=base_gn,
    )
    return StepRecord(step=step, output=out, metrics={"step_time_s": 0.1, "tokens": 10.0})


def records(n: int, names=("kl_ref", "entropy", "my_term")) -> list[StepRecord]:
    # weighted norms: base 1, kl_ref 1, entropy 0.02, my_term 0.18 -> entropy 0.9% of the sum
    table = {"kl_ref": (0.5, 1.0, 1.0), "entropy": (-1.0, 0.02, 1.0), "my_term": (3.0, 0.18, 1.0)}
    return [record(s, {n_: table[n_] for n_ in names}, base=5.0 / s) for s in range(1, n + 1)]


def colours_by_label(ax) -> dict[str, str]:
    return {
        line.get_label(): to_hex(line.get_color())
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


# --------------------------------------------------------------------------- the palette


def test_a_term_keeps_its_colour_whatever_the_other_terms_and_their_order():
    a = term_colours(["base_loss", "kl_ref", "entropy", "my_term"])
    b = term_colours(["my_term", "entropy", "kl_ref"])
    assert a == b
    assert a["base_loss"] == BASE_COLOUR and a["loss_total"] == TOTAL_COLOUR
    # first-party names have fixed colours; unknown names get distinct free ones
    assert term_colours(["kl_ref"])["kl_ref"] == a["kl_ref"] == "#d62728"
    assert term_colours(["entropy", "zzz"])["entropy"] == a["entropy"] == "#2ca02c"
    many = term_colours([f"term{i}" for i in range(10)] + ["kl_ref", "entropy"])
    regs = [c for n, c in many.items() if n not in ("base_loss", "loss_total")]
    assert len(set(regs)) == len(regs) == 12 and BASE_COLOUR not in regs
    # a clash between two names is settled by name, not by order
    assert term_colours(["x1", "x2", "kl"]) == term_colours(["kl", "x2", "x1"])


def test_every_figure_of_a_run_and_of_a_comparison_draws_a_term_in_one_colour():
    recs = records(20)
    expected = term_colours(["base_loss", "kl_ref", "entropy", "my_term"])
    loss_fig = loss_components_figure(recs, unit="nats per response token")
    top, bottom = loss_fig.axes[:2]
    assert colours_by_label(top)["base_loss"] == BASE_COLOUR
    assert colours_by_label(top)["loss_total (composed)"] == TOTAL_COLOUR
    for name in ("kl_ref", "entropy", "my_term"):
        assert colours_by_label(bottom)[name] == expected[name], name
    share_fig = grad_share_figure(recs)
    by_term = {
        label.split(" (mean")[0]: c for label, c in colours_by_label(share_fig.axes[0]).items()
    }
    assert by_term == {k: expected[k] for k in ("base_loss", "kl_ref", "entropy", "my_term")}
    # a comparison whose variants have different terms: the union decides, colours agree
    variants = [
        VariantCurves(
            label=label,
            colour="#000000",
            linestyle="-",
            runs=1,
            steps=[1, 2],
            loss_total=[2.0, 1.0],
            base_loss=[2.0, 1.0],
            share_steps=[1, 2],
            shares={n: [0.2, 0.2] for n in terms},
        )
        for label, terms in (
            ("a", ["base_loss", "kl_ref"]),
            ("b", ["base_loss", "entropy", "my_term"]),
        )
    ]
    fig = compare_grad_share_figure(variants)
    for ax in fig.axes[:2]:
        for label, colour in colours_by_label(ax).items():
            assert colour == expected[label], label


# --------------------------------------------------------------------------- smoothing


def test_smoothing_keeps_a_spike_a_peak_at_its_step_not_a_plateau():
    values = [1.0] * 101
    values[50] = 11.0
    out = smooth(values, 4)
    assert max(range(101), key=out.__getitem__) == 50  # the peak stays where it was
    assert 1.0 < out[50] < 11.0
    assert out[49] == pytest.approx(out[51])  # centred: no lag
    right = out[50:70]
    assert all(a > b for a, b in itertools.pairwise(right) if a > 1.0 + 1e-9)
    assert len({round(v, 9) for v in out[46:55]}) == 5  # falls off on both sides, no flat top
    assert smooth([3.0] * 40, 5) == pytest.approx([3.0] * 40)  # no droop at the ends
    assert smooth([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]  # k <= 1: as is
    assert smooth([1.0, float("nan"), 3.0, 3.0], 2)[1] == pytest.approx(
        smooth([1.0, 3.0], 2)[0], abs=1.5
    )


# --------------------------------------------------------------------------- the figures


def test_the_grad_share_is_lines_on_a_log_axis_and_a_one_percent_term_shows():
    fig = grad_share_figure(records(60))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(SHARE_FLOOR)
    assert not ax.collections  # lines, not stacked areas
    entropy = [line for line in ax.get_lines() if line.get_label() == "entropy (mean 0.9%)"]
    assert entropy, [line.get_label() for line in ax.get_lines()]
    ys = entropy[0].get_ydata()
    assert min(ys) > 0.005  # a 1% share sits a decade and more above the floor
    assert "%" in ax.yaxis.get_major_formatter()(0.01, 0)
    linear = grad_share_figure(records(5), log=False).axes[0]
    assert linear.get_yscale() == "linear" and linear.get_ylim() == (0.0, 1.0)


def test_a_term_with_zero_share_is_named_not_drawn_at_the_floor():
    recs = [record(s, {"kl_ref": (0.5, 0.0, 1.0), "l2": (1.0, 0.1, 1.0)}) for s in (1, 2, 3)]
    ax = grad_share_figure(recs).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert not any(label.startswith("kl_ref") for label in labels)
    assert any("zero share (not drawn): kl_ref" in t.get_text() for t in ax.texts)


def test_axes_say_their_units_and_resumes_are_marked():
    fig = loss_components_figure(records(30), unit="nats per response token", resumes=[11, 21])
    top, bottom = fig.axes[:2]
    assert top.get_ylabel() == "loss (nats per response token)"
    assert "nats per response token" in bottom.get_ylabel()
    marks = [
        line.get_xdata()[0]
        for line in top.get_lines()
        if line.get_linestyle() == ":" and len(set(line.get_xdata())) == 1
    ]
    assert marks == [10.5, 20.5]
    assert [t.get_text().strip() for t in top.texts] == ["resumed at 11", "resumed at 21"]
    share = grad_share_figure(records(30), resumes=[11]).axes[0]
    assert any(
        line.get_linestyle() == ":" and list(line.get_xdata()) == [10.5, 10.5]
        for line in share.get_lines()
    )


def test_write_report_records_the_sessions_and_marks_the_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = records(12)
    (run / "metrics.jsonl").write_text("".join(r.to_json() + "\n" for r in recs[:8]))
    (run / "config.toml").write_text('[loss]\nnormalize = "tokens"\n')
    first = {"stopped": "interrupted", "first_step": 1, "last_step": 8}
    write_report(run, extra={"session": first})
    (run / "metrics.jsonl").write_text("".join(r.to_json() + "\n" for r in recs))
    second = {"stopped": "completed", "first_step": 9, "last_step": 12}
    summary = write_report(run, extra={"session": second})
    assert summary["sessions"] == [first, second]
    assert json.loads((run / "summary.json").read_text())["sessions"] == [first, second]
    # `tinkex report` hands the last session back: nothing is added twice
    assert write_report(run, extra={"session": second})["sessions"] == [first, second]
    for name in ("loss_components.png", "grad_share.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("unit", "axes_on_top"), [("nats, summed over the batch", 2), ("nats per response token", 1)]
)
def test_a_held_out_loss_per_token_gets_its_own_axis_next_to_a_summed_training_loss(
    unit, axes_on_top
):
    import attrs

    rows = [
        attrs.evolve(r, eval={"base_loss": 1.5, "terms": {}}) if r.step % 5 == 0 else r
        for r in records(20)
    ]
    fig = loss_components_figure(rows, unit=unit)
    top = fig.axes[0]
    sharing = [ax for ax in fig.axes if ax is not top and ax.bbox.bounds == top.bbox.bounds]
    assert 1 + len(sharing) == axes_on_top
