"""The README's example runs as shown and its numbers add up."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_and_adds_up():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    regs = out["regularizers"]
    assert list(regs) == ["entropy", "l2", "mean_prob"]
    # cross-entropy over the two counted tokens: (1.2 + 2.5) / 2
    assert out["base_loss"]["value"] == pytest.approx(1.85)
    # l2 mean over counted tokens: (1.2^2 + 2.5^2) / 2
    assert regs["l2"]["value"] == pytest.approx(3.845)
    assert regs["entropy"]["value"] == pytest.approx(-regs["entropy"]["custom"]["entropy"])
    assert regs["mean_prob"]["value"] == pytest.approx(
        (math.exp(-0.3) + math.exp(-1.2) + math.exp(-2.5)) / 3
    )
    for r in regs.values():
        assert r["contribution"] == pytest.approx(r["weight"] * r["value"])
        assert r["grad_norm_weighted"] == pytest.approx(r["weight"] * r["grad_norm"])
    assert out["regularizer_total"] == pytest.approx(sum(r["contribution"] for r in regs.values()))
    assert out["loss_total"] == pytest.approx(out["base_loss"]["value"] + out["regularizer_total"])
    # base-loss gradient: -w / sum(w) = [0, -1/2, -1/2] -> norm sqrt(1/2)
    assert out["base_loss"]["grad_norm"] == pytest.approx(math.sqrt(0.5))
