"""One trial assembled: its data, its cached teacher (and kd logits), a fresh student, the loop.

The assembly lives here, not in the training loop, so the dependencies run one way:
trial -> teacher cache -> trainer (the cache fine-tunes teachers with the trainer's `fit`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ikd_sweep import names
from ikd_sweep import teacher as teacher_cache
from ikd_sweep.config import SweepConfig
from ikd_sweep.data import Split, prepare_data
from ikd_sweep.home import Home
from ikd_sweep.keep import KeepStudent
from ikd_sweep.models import build_model, load_tokenizer
from ikd_sweep.names import HPARAMS
from ikd_sweep.store import git_commit
from ikd_sweep.trainer import (
    Callback,
    FitSettings,
    fit,
    pick_device,
    seed_everything,
)
from ikd_sweep.trials import Trial, trial_seed


def run_trial(cfg: SweepConfig, trial: Trial, *, home: Path, callback: Callback | None = None,
              checkpoint_dir: Path | None = None, resume_from: Path | None = None,
              device: str | None = None, splits: dict[str, Split] | None = None,
              student_dir: Path | None = None) -> dict[str, float]:
    """Run one trial end to end: data, cached teacher (and logits for kd), training loop.

    `student_dir`: keep the selected student there (a Hugging Face folder with the tokenizer
    and a model card; see `keep.KeepStudent`)."""
    started = time.perf_counter()  # for sys/startup_s: data, models, teacher until step 1
    dev = pick_device(device)
    seed = trial_seed(cfg, trial)
    tokenizer = load_tokenizer(cfg.teacher.model)
    data = prepare_data(trial.task, cfg.data, tokenizer, Home(home).data_cache, seed, splits,
                        method=trial.method)
    teacher = logits = None
    teacher_scores: dict[str, float] = {}
    if trial.method in ("kd", "ikd"):
        tdir = teacher_cache.ensure_teacher(cfg, trial.task, trial.seed, home, device=device)
        recorded = teacher_cache.teacher_metrics(tdir)
        teacher_scores = {f"teacher/{k}_main": recorded[f"{k}/main"] for k in ("val", "dev")}
        if trial.method == "kd":
            logits = teacher_cache.train_logits(tdir, data, dev)
        else:
            teacher = teacher_cache.load_teacher(tdir)
    seed_everything(seed)  # the student's fresh head is drawn from the trial's seed
    student = build_model(cfg.student, data.task.num_labels)
    if student.config.vocab_size < len(tokenizer):
        raise ValueError(f"student vocabulary ({student.config.vocab_size}) is smaller than the "
                         f"teacher tokenizer's ({len(tokenizer)}): they must share a vocabulary")
    if teacher_scores and callback is not None:
        callback.log(teacher_scores, 0)
    result = fit(FitSettings.for_trial(cfg, trial), data.task, data, student, teacher=teacher,
                 teacher_logits=logits, device=dev, callback=callback,
                 pad_id=tokenizer.pad_token_id or 0, checkpoint_dir=checkpoint_dir,
                 resume_from=resume_from, started=started,
                 keep=None if student_dir is None else KeepStudent(
                     Path(student_dir), tokenizer, card_facts(cfg, trial, seed)))
    result.update({k.replace("teacher/", "teacher/initial_"): v
                   for k, v in teacher_scores.items()})
    result[names.MAJORITY_DEV] = data.task.majority_baseline(data.labelled.labels,
                                                       data.dev.labels)["main"]
    # The torch threads it trained with: a trial in a sweep (Ray: resources.cpu) and the same
    # trial alone (all cores) compare only with this beside their samples/s.
    result[names.THREADS] = float(torch.get_num_threads())
    return result


def card_facts(cfg: SweepConfig, trial: Trial, seed: int) -> dict[str, Any]:
    """What a kept student's model card says about where it comes from."""
    setting = {h: getattr(trial, h) for h in HPARAMS if getattr(trial, h) is not None}
    return {"task": trial.task, "method": trial.method,
            "setting": ", ".join(f"{k}={v:g}" for k, v in setting.items()) or "-",
            "seed": trial.seed, "training seed": seed, "trial_id": trial.trial_id,
            "phase": trial.phase, "sweep": cfg.name, "student model": cfg.student.model,
            "teacher model": cfg.teacher.model, "git commit": git_commit()}
