"""A Ray trial's torch threads: its whole `resources.cpu` unless OMP_NUM_THREADS says otherwise
(the sweep end to end, with Ray's own setting, is checked by tests/test_gpu_sweep_check.py's
CPU smoke run: `threads.sweep_pack_k`)."""

from __future__ import annotations

import pytest
import torch

from ikd_sweep.sweep.worker import pin_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_trial_runs_on_its_whole_cpus_where_nothing_set_the_threads(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert pin_threads(2) == torch.get_num_threads() == 2
    assert pin_threads(0.5) == 1  # a fraction of a CPU is one thread
    assert pin_threads(1.9) == 1


def test_an_exported_omp_num_threads_is_kept(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's value, or the user's
    torch.set_num_threads(1)
    assert pin_threads(2) == 1
