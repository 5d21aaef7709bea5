"""Packing trials onto a GPU: the preflight's memory check, and the CPU smoke run of
benchmarks/gpu_sweep_check.sh (Ray Tune + MLflow end to end, its JSON figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ikd_sweep import preflight
from ikd_sweep.config import SweepConfig
from ikd_sweep.errors import PreflightError

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
             "intermediate_size": 3072}


def base_sweep(gpu: float, batch_size: int = 32) -> SweepConfig:
    """BERT-base teacher, its 6-layer student (random init: nothing is loaded)."""
    return SweepConfig.model_validate({
        "name": "pack", "tasks": ["sst2"], "methods": ["kd", "ikd"],
        "data": {"max_length": 128},
        "teacher": {"model": "minilm", "init": "random", "config": BERT_BASE},
        "student": {"model": "minilm", "init": "random",
                    "config": {**BERT_BASE, "num_hidden_layers": 6}},
        "train": {"batch_size": batch_size}, "resources": {"cpu": 1, "gpu": gpu}})


def sizes(cfg: SweepConfig) -> dict[str, preflight.ModelSize]:
    return {n: preflight.model_size(getattr(cfg, n), n) for n in ("teacher", "student")}


@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend the driver sees one CUDA device of `gib` GiB."""
    def install(gib: float) -> None:
        monkeypatch.setattr(preflight, "gpu_memory", lambda: ("Test GPU", int(gib * 2**30)))
    return install


def test_an_ikd_trial_needs_more_memory_than_kd_and_grows_with_the_batch():
    cfg = base_sweep(1)
    kd, ikd = (preflight.trial_memory(cfg, {m}, sizes(cfg)) for m in ("kd", "ikd"))
    assert 0 < kd < ikd
    big = base_sweep(1, batch_size=128)
    assert preflight.trial_memory(big, {"ikd"}, sizes(big)) > ikd


def test_preflight_refuses_a_packing_that_does_not_fit_and_says_what_would(gpu_of):
    cfg = base_sweep(0.25)
    each = preflight.trial_memory(cfg, {"kd", "ikd"}, sizes(cfg))
    gpu_of(2.5 * each / 2**30)  # room for two trials, not four
    with pytest.raises(PreflightError) as exc:
        preflight.check_packing(cfg, {"kd", "ikd"}, sizes(cfg))
    msg = str(exc.value)
    assert "resources.gpu: 0.25 packs 4 trials per GPU" in msg
    assert "Test GPU" in msg and "an estimate" in msg
    assert "set resources.gpu to 0.5 (2 per GPU)" in msg
    preflight.check_packing(base_sweep(0.5), {"kd", "ikd"}, sizes(cfg))  # two fit


def test_preflight_says_when_not_even_one_trial_fits(gpu_of):
    cfg = base_sweep(1)
    gpu_of(0.5)
    with pytest.raises(PreflightError, match="not even one trial fits; lower train.batch_size"):
        preflight.check_packing(cfg, {"ikd"}, sizes(cfg))


def test_no_gpu_or_cpu_trials_are_not_checked(gpu_of):
    cfg = base_sweep(0.125)
    preflight.check_packing(cfg, {"ikd"}, sizes(cfg))  # this machine: no CUDA device
    gpu_of(0.5)
    preflight.check_packing(base_sweep(0), {"ikd"}, sizes(cfg))  # CPU trials


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason="no SST-2")
def test_cpu_smoke_run_of_the_gpu_sweep_check(tmp_path):
    env = {**os.environ, "SMALL": "1", "DEVICE": "cpu", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "SKIP_WHL": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_sweep_check.sh"), str(GLUE)],
                         env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu_sweep_check.json").read_text())
    assert figures["all_finished"]
    for pack in ("pack_1", "pack_2"):
        assert figures["finished"][pack] == figures["trials"][pack] == 2  # one kd, one ikd
        assert figures["sweep_samples_per_s"][pack] > 0
        assert figures["trial_samples_per_s"][pack] > 0
        assert figures["wall_s"][pack] > 0
        assert pack in figures["peak_gib"]  # None on CPU: no GPU memory
        shares = figures["time_share"][pack]["ikd"]
        assert shares["exam"] > 0 and sum(shares.values()) == pytest.approx(1, abs=1e-3)
    assert figures["ratio"]["pack_2_over_pack_1"] > 0
    # A kd trial's steady state in each sweep and alone in a fresh process (teacher cached),
    # its start-up and its torch threads (the whole resources.cpu: 2 cores / k, or what the
    # exported OMP_NUM_THREADS says); ikd's under by_method.
    for pack, cpus in (("pack_1", 2), ("pack_2", 1)):
        assert figures["trial_samples_per_s"][f"sweep_{pack}"] > 0
        assert figures["startup_s"][f"sweep_{pack}"] > 0
        assert 1 <= figures["threads"][f"sweep_{pack}"] <= cpus
        assert figures["by_method"]["ikd"]["trial_samples_per_s"][f"sweep_{pack}"] > 0
        assert figures["ratio"][f"sweep_{pack}_over_standalone_cold"] > 0
    assert figures["trial_samples_per_s"]["standalone_cold"] > 0
    assert figures["startup_s"]["standalone_cold"] > 0
    gap = figures["experiments"]
    assert gap["launch_us"]["tune_trial"] > 0 and gap["report_ms"]["plain"] > 0
    for cold in ("cold_1", "cold_2"):
        assert gap["standalone"][cold]["window_samples_per_s"] > 0, gap["standalone"]
    for n in ("5", "100"):
        assert gap["log_every"][n]["samples_per_s"] > 0, gap["log_every"]
    assert figures["estimate_gib"] > 0
    out = (tmp_path / "gpu_sweep_check.txt").read_text()
    assert "sweep_samples_per_s.pack_2 = " in out  # the dotted lines, for a reader
    assert json.loads(run.stdout.strip().splitlines()[-1]) == figures
