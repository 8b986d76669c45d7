"""Atomic writes: the target is either the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import stat

import pytest

import tinkex
from tinkex._files import atomic_write, atomic_write_text, storage_errors


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "config.toml"
    target.write_text("old")

    def half_then_full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(tinkex.StorageError, match="the disk is full") as info:
        atomic_write(target, half_then_full)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_permission_problems_are_named(tmp_path):
    with pytest.raises(tinkex.StorageError, match="permission denied"), storage_errors("x"):
        raise PermissionError(errno.EACCES, "Permission denied")
