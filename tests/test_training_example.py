"""examples/async_trainer.py runs, reports each term, and lowers the loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "async_trainer.py"


def load_example():
    pytest.importorskip("tinkex_reg_entropy", reason="needs the tinkex-reg-entropy plugin")
    pytest.importorskip("tinkex_reg_kl", reason="needs the tinkex-reg-kl plugin")
    spec = importlib.util.spec_from_file_location("async_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_async_trainer_lowers_the_loss(capsys):
    example = load_example()
    start, end = await example.main(steps=6, batch_size=8, log_every=3, limit=48)
    assert end < start
    out = capsys.readouterr().out
    for step in (1, 3, 6):
        assert f"step {step:4d}" in out
    assert "base_loss" in out and "entropy" in out and "kl_ref" in out and "% grad" in out
    assert f"evaluation loss after 6 steps: {end:.4f}" in out
