"""The teacher cache: fine-tune once per (task, seed, settings) on train - val, also across
processes, with its val and dev scores, and the kd logit cache, which must cover every kd course
row and train the same student as live teacher forward passes.

Tiny random-init BERTs on subsampled real RTE, CPU, seconds per test (the two-process test
pays for starting two Python interpreters).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import merge, needs_glue, tiny_spec
from helpers import sweep_raw as tiny_sweep

from ikd_sweep import teacher as teacher_cache
from ikd_sweep.config import SweepConfig
from ikd_sweep.data import batch_order, collate, prepare_data, tokenize_splits
from ikd_sweep.models import build_model, load_tokenizer
from ikd_sweep.tasks import get_task
from ikd_sweep.trainer import FitSettings, evaluate, fit, seed_everything
from ikd_sweep.trial import run_trial
from ikd_sweep.trials import Trial

pytestmark = needs_glue
CPU = "cpu"
# This module's sizes, laid on the tiny sweep of helpers.py.
TEACHER = {"tasks": ["rte"], "data": {"max_length": 64, "max_train_samples": 200,
                                      "max_eval_samples": 100},
           "train": {"log_every": 4}}


def sweep_raw(**over) -> dict:
    """The tiny sweep with 2-layer hidden-64 random-init models on MiniLM's vocabulary and 200
    rows of RTE."""
    tiny = tiny_spec().model_dump(mode="json")
    raw = tiny_sweep("tiny", **TEACHER)
    del raw["train"]["eval_every"]  # the sweep file's default
    return merge(raw, {"teacher": tiny, "student": tiny, **over})


def sweep(**over) -> SweepConfig:
    return SweepConfig.model_validate(sweep_raw(**over))


KD = Trial("rte", "kd", 1, temperature=2.0)
IKD = Trial("rte", "ikd", 1, temperature=2.0, exam_every=2, teacher_lr=1e-4)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """Tokenized RTE shared by the module's homes (tokenizing is the same in every home)."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def home(tmp_path, data_cache) -> Path:
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "data").symlink_to(data_cache, target_is_directory=True)
    return home


def teacher_folders(home: Path) -> list[Path]:
    return sorted(p for p in (home / "cache" / "teachers").iterdir() if p.is_dir())


class Fits(list):
    """The methods of the teacher cache's fine-tuning runs, and in `.data` what each trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.data: list = []


@pytest.fixture
def teacher_fits(monkeypatch) -> Fits:
    """Counts the fine-tuning runs of the teacher cache (its own reference to `fit`)."""
    calls = Fits()
    real = teacher_cache.fit

    def counting(settings, task, data, *args, **kwargs):
        calls.append(settings.method)
        calls.data.append(data)
        return real(settings, task, data, *args, **kwargs)

    monkeypatch.setattr(teacher_cache, "fit", counting)
    return calls


# ----------------------------------------------------------------------------- fine-tune once


def test_two_trials_share_one_fine_tuned_teacher(home, teacher_fits):
    cfg = sweep()
    run_trial(cfg, KD, home=home, device=CPU)
    run_trial(cfg, IKD, home=home, device=CPU)
    assert teacher_fits == ["finetune"]
    (folder,) = teacher_folders(home)
    assert (folder / teacher_cache.DONE).is_file() and (folder / "train_logits.pt").is_file()
    assert folder.name == teacher_cache.teacher_key(cfg, "rte", 1)
    # It learned from train - val (quiz rows included), never from the trial's val rows, and
    # recorded its scores on that val and on dev.
    (taught,) = teacher_fits.data
    trial = prepare_data("rte", cfg.data, load_tokenizer("minilm"), home / "cache" / "data", 1,
                         method="ikd")
    assert len(taught.train) == 180 and not set(taught.train.idx) & set(trial.val.idx)
    assert set(trial.quiz.idx) <= set(taught.train.idx)
    assert np.array_equal(taught.val.idx, trial.val.idx)
    recorded = teacher_cache.teacher_metrics(folder)
    teacher = teacher_cache.load_teacher(folder)
    for name, split in (("val", trial.val), ("dev", trial.dev)):
        assert recorded[f"{name}/main"] == evaluate(teacher, split, trial.task,
                                                    torch.device(CPU))["main"]

    # Another seed is another teacher; a student-side change (temperature, method) is not.
    run_trial(cfg, Trial("rte", "kd", 2, temperature=4.0), home=home, device=CPU)
    assert teacher_fits == ["finetune", "finetune"]
    assert len(teacher_folders(home)) == 2


def test_teacher_key_names_what_changes_the_teacher():
    cfg = sweep()
    key = teacher_cache.teacher_key(cfg, "rte", 1)
    assert key == teacher_cache.teacher_key(sweep(), "rte", 1)  # stable across processes
    # quiz_fraction and quiz_parity only move rows between students' courses: the teacher
    # learns from train - val either way.
    same = [sweep(student={"config": {"hidden_size": 32}}), sweep(train={"lr": 1.0},
            search={"temperature": [8]}, methods=["kd"]), sweep(data={"quiz_fraction": 0.2}),
            sweep(data={"quiz_parity": False})]
    for other in same:
        assert teacher_cache.teacher_key(other, "rte", 1) == key
    different = [sweep(teacher={"lr": 2e-3}), sweep(teacher={"epochs": 2}),
                 sweep(data={"max_train_samples": 300}), sweep(data={"max_length": 32}),
                 sweep(data={"val_fraction": 0.2}), sweep(train={"seed_base": 10}),
                 sweep(data={"max_eval_samples": 50})]  # its recorded dev score changes
    for other in different:
        assert teacher_cache.teacher_key(other, "rte", 1) != key
    assert teacher_cache.teacher_key(cfg, "rte", 2) != key


def _ensure_in_child(raw: dict, home: str, marker: str, barrier, result: str) -> None:
    """One of two processes asking for the same teacher at the same moment."""
    import ikd_sweep.teacher as tc

    real = tc.fit

    def marking_fit(*args, **kwargs):
        with open(marker, "a") as f:  # one line per fine-tuning run, from whichever process
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # hold the lock a while: the other process must find it taken
        return real(*args, **kwargs)

    tc.fit = marking_fit
    cfg = SweepConfig.model_validate(raw)
    barrier.wait(timeout=300)
    cached_before = (tc.teacher_dir(cfg, "rte", 1, Path(home)) / tc.DONE).exists()
    out = tc.ensure_teacher(cfg, "rte", 1, Path(home), device="cpu")
    Path(result).write_text(f"{out}\n{cached_before}")


def test_two_processes_at_once_train_the_teacher_once(home, tmp_path):
    raw = sweep_raw()
    cfg = SweepConfig.model_validate(raw)
    tokenize_splits(get_task("rte"), cfg.data, load_tokenizer("minilm"), home / "cache" / "data")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    marker = tmp_path / "fits.txt"
    results = [tmp_path / f"result-{i}.txt" for i in range(2)]
    procs = [ctx.Process(target=_ensure_in_child,
                         args=(raw, str(home), str(marker), barrier, str(r))) for r in results]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    outs = [r.read_text().splitlines() for r in results]
    # Both asked before the teacher existed (a real race), both got the same folder ...
    assert [o[1] for o in outs] == ["False", "False"]
    assert outs[0][0] == outs[1][0] == str(teacher_cache.teacher_dir(cfg, "rte", 1, home))
    # ... and it was fine-tuned once: one fit, one folder, no half-written leftovers.
    assert len(marker.read_text().split()) == 1
    assert [p.name for p in teacher_folders(home)] == [Path(outs[0][0]).name]
    leftovers = [p.name for p in (home / "cache" / "teachers").iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []


# ----------------------------------------------------------------------------- kd logit cache


def test_train_logits_are_the_teachers_and_computed_once(home, monkeypatch):
    cfg = sweep()
    tdir = teacher_cache.ensure_teacher(cfg, "rte", 1, home, device=CPU)
    data = prepare_data("rte", cfg.data, load_tokenizer("minilm"), home / "cache" / "data", 1,
                        method="kd")
    logits = teacher_cache.train_logits(tdir, data, torch.device(CPU))
    teacher = teacher_cache.load_teacher(tdir).eval()
    with torch.no_grad():  # a live forward pass on training-sized batches
        for rows in batch_order(data.train, 16, 0):
            b = collate(data.train, rows)
            live = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"]).logits
            torch.testing.assert_close(logits[b["idx"]], live, atol=1e-5, rtol=0)

    def no_teacher(path):
        raise AssertionError("the cached logits should have been reused")

    monkeypatch.setattr(teacher_cache, "load_teacher", no_teacher)
    assert torch.equal(teacher_cache.train_logits(tdir, data, torch.device(CPU)), logits)
    # Without quiz parity kd trains on fewer rows: the same cached logits cover them.
    off = sweep(data={"quiz_parity": False})
    assert teacher_cache.teacher_dir(off, "rte", 1, home) == tdir
    fewer = prepare_data("rte", off.data, load_tokenizer("minilm"), home / "cache" / "data", 1,
                         method="kd")
    assert len(fewer.train) == 160 and set(fewer.train.idx) < set(data.train.idx)
    assert torch.equal(teacher_cache.train_logits(tdir, fewer, torch.device(CPU)), logits)


def test_logit_cache_trains_the_same_student_as_a_live_teacher(home):
    """kd from cached logits vs kd with the teacher's forward pass at every step.

    Tolerance: atol 1e-5 on weights (rtol 0). The cached logits come from length-sorted
    evaluation batches of 128 rows, the live ones from the training batches of 16, so the
    padded widths and thus float32 summation order differ; pads are masked, so the only
    difference is rounding: measured 1e-8 on the logits and 2e-8 on the weights after a full
    epoch (AdamW steps are bounded by lr, so such rounding does not blow up). Any real
    mismatch (wrong rows, train-mode dropout, another temperature) moves weights by ~1e-3.
    """
    cfg = sweep()
    device = torch.device(CPU)
    tdir = teacher_cache.ensure_teacher(cfg, "rte", 1, home, device=CPU)
    data = prepare_data("rte", cfg.data, load_tokenizer("minilm"), home / "cache" / "data", 1,
                        method="kd")
    settings = FitSettings.for_trial(cfg, KD)
    students, results = [], []
    for source in ({"teacher_logits": teacher_cache.train_logits(tdir, data, device)},
                   {"teacher": teacher_cache.load_teacher(tdir)}):
        seed_everything(1)
        student = build_model(cfg.student, 2)
        results.append(fit(settings, data.task, data, student, device=device, **source))
        students.append(student)
    cached, live = students
    timeless = [{k: v for k, v in r.items() if not k.startswith("sys/")} for r in results]
    assert timeless[0] == timeless[1]  # wall-clock measurements (sys/*) aside
    assert results[0]["steps"] == 12
    for (name, a), (_, b) in zip(cached.named_parameters(), live.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    # It trained at all (the comparison is not between two untouched initialisations).
    seed_everything(1)
    init = build_model(cfg.student, 2)
    moved = max((a - b).abs().max().item()
                for a, b in zip(cached.parameters(), init.parameters(), strict=True))
    assert moved > 1e-3
    dev_a = evaluate(cached, data.dev, data.task, device)
    dev_b = evaluate(live, data.dev, data.task, device)
    assert dev_a == dev_b
