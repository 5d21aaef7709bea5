"""benchmarks/gpu_gap_experiments.py in CPU smoke mode: launch time, threads and report costs in
a plain process, a Ray task and a Ray Tune trial, as one JSON object (no figure is asserted:
they are measurements; the sweep-based experiments run in tests/test_gpu_sweep_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_run_prints_every_figure(tmp_path):
    out = tmp_path / "gap.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_gap_experiments.py"),
                          "--device", "cpu", "--ops", "500", "--reports", "3", "--ckpt-mib", "2",
                          "--trial-cpu", "1", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == figures
    assert "ray_error" not in figures, figures.get("ray_error")
    for where in ("plain", "ray_task", "tune_trial"):
        assert figures["launch_us"][where] > 0
        threads = figures["threads"][where]
        assert threads["torch_threads"] >= 1 and threads["affinity"] >= 1
    assert figures["threads"]["tune_trial"]["omp_num_threads"] == "1"
    assert figures["report_ms"]["plain"] > 0
    assert figures["report_ms"]["checkpoint_2mib"] > 0 and figures["copy_ms"]["checkpoint_2mib"] > 0
    assert set(figures["seconds"]) == {"launch", "ray"}
