"""The trainable: one Ray Tune trial on a worker. Its teacher if not cached yet, then the
trainer; everything is reported to Tune (`events`), nothing to MLflow (the driver records)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ray import tune

from ikd_sweep.config import SweepConfig
from ikd_sweep.home import Home
from ikd_sweep.names import VAL
from ikd_sweep.sweep.events import (
    DEVICE,
    DONE_KEY,
    ERROR,
    EVAL,
    EVALS,
    FINAL,
    LOG,
    OBJECTIVE,
    RECORDED,
    REPORT,
    TEACHER,
    describe_error,
)
from ikd_sweep.trials import Trial


def _report(info: dict[str, Any], top: dict[str, Any] | None = None,
            checkpoint: tune.Checkpoint | None = None) -> None:
    # Stamped here: the metrics keep the time they were measured, whenever MLflow gets them.
    tune.report({**(top or {}), REPORT: {**info, "time_ms": int(time.time() * 1000)}},
                checkpoint=checkpoint)


class _Reporter:
    """Trainer callback inside a Ray trial: everything goes to Tune, nothing to MLflow."""

    def __init__(self, evals: int) -> None:
        self.evals = evals  # carried in the checkpoint's metadata across a resume

    def log(self, metrics: dict[str, float], step: int) -> None:
        _report({"kind": LOG, "step": int(step), "metrics": dict(metrics)})

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        self.evals += 1
        ckpt = None
        if checkpoint is not None:
            ckpt = tune.Checkpoint.from_directory(str(checkpoint))
            ckpt.set_metadata({EVALS: self.evals})
        top = {EVALS: self.evals, **({VAL: metrics[VAL]} if VAL in metrics else {})}
        _report({"kind": EVAL, "step": int(step), "metrics": dict(metrics)}, top, ckpt)


def pin_threads(cpu: float) -> int:
    """Run the trial on `int(resources.cpu)` torch threads (at least 1) unless OMP_NUM_THREADS
    already says how many; return the count.

    Ray sets OMP_NUM_THREADS in a trial to its whole CPUs when the driver's environment does
    not set it (measured, Ray 2.60 on 2 cores: resources.cpu 0.5 -> 1, 1 -> 1, 2 -> 2 threads),
    so this only acts where it is unset: torch would then take every core, and k packed trials
    would each spin on all of them. A value the user exported is kept: on an oversubscribed
    machine one thread per process is the fast setting (benchmarks/README.md)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, int(cpu)))
    return torch.get_num_threads()


def _teacher_first(sweep: SweepConfig, trial: Trial, home: str, attempt: str) -> None:
    """Fine-tune (or wait for) this trial's teacher, reporting each epoch to Tune."""
    from ikd_sweep import teacher as tc

    def progress(info: dict[str, Any]) -> None:
        _report({"kind": TEACHER, "step": 0, "metrics": info})

    tc.ensure_teacher(sweep, trial.task, trial.seed, Path(home), progress=progress,
                      attempt=attempt)


def trainable(config: dict, *, sweep: SweepConfig, home: str, trials: dict[str, dict],
              done: frozenset[str], splits: dict | None, attempt: str) -> None:
    """One Ray Tune trial: its teacher if not cached yet, the trainer; all reported to Tune
    (the driver records it). `attempt` identifies the driver's run (teacher failures)."""
    from ikd_sweep.trial import run_trial

    if config["trial_id"] in done:  # FINISHED in MLflow already: never train it twice
        _report({"kind": RECORDED, "step": 0, "metrics": {}}, {DONE_KEY: 1})
        return
    from ikd_sweep.trainer import describe_device, pick_device

    # The driver cannot see the worker's hardware: the trial says where it trains.
    _report({"kind": DEVICE, "step": 0, "device": describe_device(pick_device())})
    # An optuna trial is not in `trials` (chosen during the run): its config is its Trial.
    trial = Trial.from_dict(trials.get(config["trial_id"]) or config)
    ckpt = tune.get_checkpoint()
    if ckpt is not None and Path(ckpt.path).is_dir() and not any(
            not p.name.startswith(".") for p in Path(ckpt.path).iterdir()):
        ckpt = None  # emptied by drop_checkpoints, yet not FINISHED in MLflow: start over
    reporter = _Reporter((ckpt.get_metadata() or {}).get(EVALS, 0) if ckpt else 0)
    pin_threads(sweep.resources.cpu)  # before the teacher: its fine-tuning runs here too
    work = Path(tempfile.mkdtemp(prefix=f"ikd-{trial.trial_id}-"))
    try:
        if trial.method != "finetune":
            _teacher_first(sweep, trial, home, attempt)
        with (ckpt.as_directory() if ckpt else nullcontext()) as resume_dir:
            final = run_trial(sweep, trial, home=Path(home), callback=reporter,
                              checkpoint_dir=work / "checkpoint",
                              resume_from=Path(resume_dir) if resume_dir else None,
                              splits=splits,
                              student_dir=Home(home).student(sweep.name, trial.trial_id))
    except Exception as e:
        _report({"kind": ERROR, "step": 0, "error": describe_error(e)})
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    objective = final.get(OBJECTIVE)
    _report({"kind": FINAL, "step": int(final.get("steps", 0)), "metrics": final},
            {DONE_KEY: 1, **({OBJECTIVE: objective} if objective is not None
                             and math.isfinite(objective) else {})})
