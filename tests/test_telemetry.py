"""Telemetry: the six structlog events, their fields and levels; silence by default."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import structlog
import torch
import trio
from structlog.testing import capture_logs

import tinkex
from tinkex import RegularizerError, RegularizerSpec, RegularizerTimeoutError

LP = torch.tensor([1.0, 2.0, 3.0])


@pytest.fixture(autouse=True)
def _reset_structlog():
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def base(data, lp):
    return lp.sum(), {}


def sq(data, lp):
    return (lp**2).sum(), {}


async def test_start_and_stop_events_with_their_fields():
    with capture_logs() as logs:
        await tinkex.compute_loss(
            None, LP, base, regularizers=[RegularizerSpec(sq, 0.5, "sq")], track_grad_norms=True
        )
    events = [e["event"] for e in logs]
    assert events[0] == "custom_loss.start" and events[-1] == "custom_loss.stop"
    assert events.count("regularizer.compute.start") == 1  # the base loss emits none
    assert events.count("regularizer.compute.stop") == 1
    by_event = {e["event"]: e for e in logs}
    start = by_event["custom_loss.start"]
    assert start["log_level"] == "debug"
    assert start["regularizer_count"] == 1 and start["track_grad_norms"] is True
    stop = by_event["custom_loss.stop"]
    assert stop["loss_total"] == pytest.approx(13.0) and stop["regularizer_total"] == pytest.approx(
        7.0
    )
    assert stop["regularizer_count"] == 1 and stop["duration_s"] >= 0
    rstart = by_event["regularizer.compute.start"]
    assert {k: rstart[k] for k in ("regularizer_name", "weight", "is_async", "log_level")} == {
        "regularizer_name": "sq",
        "weight": 0.5,
        "is_async": False,
        "log_level": "debug",
    }
    rstop = by_event["regularizer.compute.stop"]
    assert rstop["value"] == pytest.approx(14.0) and rstop["contribution"] == pytest.approx(7.0)
    assert rstop["grad_norm"] == pytest.approx(56**0.5) and rstop["duration_s"] >= 0
    assert set(rstop) >= {
        "regularizer_name",
        "weight",
        "is_async",
        "duration_s",
        "value",
        "contribution",
        "grad_norm",
    }


async def test_regularizer_count_counts_enabled_terms_only():
    with capture_logs() as logs:
        await tinkex.compute_loss(
            None,
            LP,
            base,
            regularizers=[RegularizerSpec(sq, 1, "a"), RegularizerSpec(sq, 1, "b", enabled=False)],
        )
    assert logs[0]["regularizer_count"] == 1


async def test_exception_events():
    def boom(data, lp):
        raise ValueError("bad reference")

    with capture_logs() as logs, pytest.raises(RegularizerError):
        await tinkex.compute_loss(None, LP, base, regularizers=[RegularizerSpec(boom, 2.0, "kl")])
    exc = [e for e in logs if e["event"] == "regularizer.compute.exception"]
    assert len(exc) == 1
    assert (
        exc[0]["log_level"] == "error"
        and exc[0]["regularizer_name"] == "kl"
        and exc[0]["weight"] == 2.0
    )
    assert "ValueError: bad reference" in exc[0]["error"] and exc[0]["duration_s"] >= 0
    total = [e for e in logs if e["event"] == "custom_loss.exception"]
    assert len(total) == 1 and total[0]["log_level"] == "error" and "kl" in total[0]["error"]
    assert not [e for e in logs if e["event"] == "custom_loss.stop"]


async def test_timeouts_emit_an_exception_event(autojump_clock):
    async def abase(data, lp):
        return lp.sum(), {}

    async def hang(data, lp):
        await trio.sleep_forever()

    with capture_logs() as logs, pytest.raises(RegularizerTimeoutError):
        await tinkex.compute_loss(
            None, LP, abase, regularizers=[RegularizerSpec(hang, 1, "slow")], timeout=2
        )
    exc = [e for e in logs if e["event"] == "regularizer.compute.exception"]
    assert exc[0]["regularizer_name"] == "slow" and exc[0]["is_async"] is True
    assert exc[0]["duration_s"] == pytest.approx(2.0) and "timed out" in exc[0]["error"]


async def test_base_loss_failure_emits_no_regularizer_events():
    def bad(data, lp):
        raise RuntimeError("x")

    with capture_logs() as logs, pytest.raises(RegularizerError):
        await tinkex.compute_loss(None, LP, bad)
    assert not [e for e in logs if e["event"].startswith("regularizer.")]


def test_the_library_prints_nothing_unless_configured():
    # A fresh interpreter: nothing configured, so nothing may reach stdout or stderr.
    code = (
        "import torch, trio, tinkex\n"
        "def f(d, lp): return lp.sum(), {}\n"
        "async def main():\n"
        "    await tinkex.compute_loss(None, torch.ones(3), f,"
        " regularizers=[tinkex.RegularizerSpec(f, 1, 'a')], track_grad_norms=True)\n"
        "trio.run(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


async def test_configure_json_writes_one_object_per_line_to_the_stream():
    stream = io.StringIO()
    tinkex.telemetry.configure(json=True, level="debug", stream=stream)
    await tinkex.compute_loss(None, LP, base, regularizers=[RegularizerSpec(sq, 1, "a")])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "custom_loss.start"
    assert all("timestamp" in line and "level" in line for line in lines)


async def test_configure_level_filters_debug_events():
    stream = io.StringIO()
    tinkex.telemetry.configure(json=False, level="info", stream=stream)
    await tinkex.compute_loss(None, LP, base, regularizers=[RegularizerSpec(sq, 1, "a")])
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="unknown log level"):
        tinkex.telemetry.configure(level="chatty")
