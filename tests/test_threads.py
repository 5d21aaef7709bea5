"""A Ray trial's torch threads: at least its whole `resources.cpu` (the sweep end to end, with
Ray's own setting, is checked by tests/test_gpu_sweep_check.py's CPU smoke run)."""

from __future__ import annotations

import pytest
import torch

from ikd_sweep.sweep.worker import pin_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_trial_gets_at_least_its_whole_cpus_and_never_fewer_threads(threads):
    torch.set_num_threads(1)
    assert pin_threads(2) == torch.get_num_threads() == 2
    assert pin_threads(0.5) == 2  # never lowered (a fraction of a CPU is one thread)
    torch.set_num_threads(1)
    assert pin_threads(0.25) == 1 and pin_threads(1.9) == 1
