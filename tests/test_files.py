"""Atomic writes: a reader sees the old version or the new one, never half, never leftovers."""

from __future__ import annotations

import os

import pytest

from ikd_sweep.files import SweepBusy, atomic_path, sweep_lock


def test_a_failed_write_leaves_the_old_folder_and_no_temporary_files(tmp_path):
    target = tmp_path / "teacher"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]
    with atomic_path(target) as tmp:  # a folder is replaced whole
        tmp.mkdir()
        (tmp / "other").write_text("v2")
    assert [p.name for p in target.iterdir()] == ["other"]


def test_with_first_wins_two_writers_of_one_cache_keep_the_first_copy(tmp_path):
    target = tmp_path / "cache"
    with atomic_path(target, first_wins=True) as slow:
        slow.mkdir()
        (slow / "data").write_text("slow")
        with atomic_path(target, first_wins=True) as fast:  # finishes first
            fast.mkdir()
            (fast / "data").write_text("fast")
    assert (target / "data").read_text() == "fast"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_file_is_replaced_in_one_step(tmp_path):
    target = tmp_path / "train_logits.pt"
    for text in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.write_text(text)
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_sweep_lock_is_held_once_and_names_its_holder(tmp_path):
    with sweep_lock(tmp_path, "demo"):
        with pytest.raises(SweepBusy, match=rf"sweep demo is already running in {tmp_path} "
                                            rf"\(pid {os.getpid()} on .+, since .+\); wait"):
            with sweep_lock(tmp_path, "demo"):
                pass
        with sweep_lock(tmp_path, "other"):  # another sweep of the same folder may run
            pass
    with sweep_lock(tmp_path, "demo"):  # released: the next run gets it
        pass
