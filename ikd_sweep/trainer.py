"""The training loop of one trial: `finetune`, `kd` or `ikd` on one task, in plain PyTorch.

`fit` runs the loop on data and models it is given (`trial.run_trial` assembles them). Each
course step trains the student on the course loss; for `ikd`, every `exam_every`
course steps an exam step also trains the teacher on the student's feedback: the hypergradient
of the student's quiz loss after a one-step lookahead (`ikd.lookahead`: sgd, or the student's
own AdamW step) of that same course batch from the student's weights before its real update;
`ikd.order` says whether the teacher steps after the student (student_first) or before it
(teacher_first). `step.TrainStep` is one such step (DESIGN.md, "Order within an exam round").

Features: AdamW with linear warmup/decay (fused on every device: on CPU the per-tensor
loop was 37 % of a kd trial), bf16 autocast on CUDA, per-batch
padding with length-grouped batches, losses accumulated on the device (host syncs only at
logging, evaluation and checkpoint steps), val evaluation every `eval_every` steps and at each
epoch end, checkpoint + exact resume (models, optimizers, schedulers, step, RNG, the selection so
far), and a non-finite loss check at every logging step. The result also says where the time
went (`timing.StepTimes`: `sys/time_share/*`, `sys/samples_per_s`) and, on CUDA, the trial's
peak GPU memory (`sys/peak_gpu_gib`).

Selection (DESIGN.md, comparison protocol): the trial's result is its evaluation with the best
`val/main` (`sel/val_main`, `sel/dev_main`, `sel/step`; ties keep the earlier one). GLUE dev is
only reported, so it is evaluated only where a reported number needs it: at an evaluation that
improves `val/main` (the new selected checkpoint's `sel/dev_main`) and at the last one
(`final/dev_*`); an evaluation report carries `dev/*` only then (for ikd the teacher's
`teacher/dev_main` likewise; `teacher/val_main` at every evaluation). `best/dev_main` is the
best dev score over those evaluated checkpoints, a diagnostic that never chooses anything.

The selected student (`KeepStudent`): each time selection improves, the student is written as a
Hugging Face model folder (`save_pretrained` safetensors, the tokenizer, a README.md model card)
into a temporary folder swapped in whole, so the folder always holds one complete selected
student. The resumable state (`checkpoint_dir`) is separate; callers delete it when the trial
ends.

Metrics leave through a callback, so this module imports neither Ray nor MLflow:
`callback.log(metrics, step)` for training curves, `callback.report(metrics, step, checkpoint)`
at each evaluation. Raises `NonFiniteLoss` when a loss goes NaN/inf, `ValueError` when a
method lacks its teacher. Settings that cannot run together are rejected by the config.
"""

from __future__ import annotations

import math
import pickle
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from ikd_sweep.data import Split, TaskData, batch_order, collate, iterate, pad_multiple_for
from ikd_sweep.files import atomic_path
from ikd_sweep.keep import KeepStudent, save_student
from ikd_sweep.models import autocast, model_inputs
from ikd_sweep.names import (
    BEST_DEV,
    DEV,
    SEL_DEV,
    SEL_STEP,
    SEL_VAL,
    STARTUP,
    TEACHER_DEV,
    TEACHER_VAL,
    VAL,
)
from ikd_sweep.settings import FitSettings
from ikd_sweep.step import TrainStep
from ikd_sweep.tasks import Task
from ikd_sweep.timing import StepTimes, peak_memory, reset_peak_memory


class Callback(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None: ...


class NullCallback:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        pass


class NonFiniteLoss(RuntimeError):
    """The trial's loss went NaN or infinite; the trial stops instead of training on garbage."""


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def describe_device(device: torch.device) -> dict[str, str]:
    """Where a trial trains, for its record: ``{"device": "cuda", "gpu": "NVIDIA H200"}``."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"device": device.type, "gpu": gpu}


def total_steps(s: FitSettings, n_rows: int) -> int:
    """Optimizer steps of a run on `n_rows` training rows: `epochs` passes, capped at
    `max_steps` (the progress bar's total and the learning-rate schedule's length)."""
    total = max(1, int(s.train.epochs * math.ceil(n_rows / s.train.batch_size)))
    return min(total, s.train.max_steps) if s.train.max_steps else total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _scores(model: torch.nn.Module, data: TaskData, task: Task, device: torch.device,
            batch_size: int, pad_id: int, splits: tuple[str, ...] = ("val", "dev"),
            ) -> dict[str, float]:
    """`<split>/<m>` for every task metric m and each of `splits` (val, dev)."""
    return {f"{name}/{k}": v
            for name in splits
            for k, v in evaluate(model, getattr(data, name), task, device, batch_size,
                                 pad_id).items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, task: Task, device: torch.device,
             batch_size: int = 128, pad_id: int = 0) -> dict[str, float]:
    """The task's dev metrics for `model` on `split`.

    Batches by device (the metrics do not depend on the rows' order or grouping; the logits
    only up to float rounding): on CPU every padded token is computed, so batches are cut
    where padding would exceed 10 % of a row (demo student on SST-2 val + dev: 1.23x faster
    than 128-row batches, whose val batches were 67 % padding; benchmarks/README.md); on CUDA,
    launch-bound at small batches, full batches padded to a multiple of 8."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in iterate(split, batch_size, pad_id=pad_id, regression=task.is_regression,
                         max_pad=0.1 if device.type == "cpu" else None,
                         pad_multiple=pad_multiple_for(device)):
        with autocast(device):
            out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()})
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return task.compute_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def _cycle(split: Split, batch_size: int, seed: int, pad_id: int, regression: bool,
           start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless quiz batches, reshuffled each pass; `start` skips already-used batches."""
    n = start
    while True:
        order = batch_order(split, batch_size, seed + 7919 * (n // max(1, math.ceil(
            len(split) / batch_size))))
        for rows in order[n % len(order):]:
            n += 1
            yield n, collate(split, rows, pad_id, regression=regression)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
    return path


def _read_checkpoint(folder: Path) -> dict[str, Any]:
    """A checkpoint `_save_checkpoint` wrote; `CacheError` where it cannot be read."""
    state_file = Path(folder) / "state.pt"
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        from ikd_sweep.errors import CacheError

        why = str(e).strip().split(". ")[0][:160]  # torch's message runs on for lines
        raise CacheError(f"checkpoint {state_file} cannot be read ({type(e).__name__}: "
                         f"{why}); delete it or run without --resume") from None


def _no_selection() -> dict[str, float]:
    return {SEL_VAL: -math.inf, SEL_DEV: math.nan, SEL_STEP: 0}


@dataclass
class TrainState:
    """Everything a checkpoint holds: the models and their optimizers, the step, the quiz
    batches used, the selection so far and the random generators. Save and resume share
    `state_dict` / `load_state_dict`, so the two cannot drift apart."""

    student: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    teacher: torch.nn.Module | None = None
    t_opt: torch.optim.Optimizer | None = None  # ikd only: the teacher trains
    cuda: bool = False
    step: int = 0
    quiz_used: int = 0
    best: float = -math.inf  # the best dev score so far (diagnostic) and its step
    best_step: int = 0
    # The evaluation with the best val/main; a resumed trial selects among all its evaluations.
    sel: dict[str, float] = field(default_factory=_no_selection)

    COUNTERS: ClassVar[tuple[str, ...]] = ("step", "quiz_used", "best", "best_step", "sel")

    def state_dict(self) -> dict[str, Any]:
        state = {"student": self.student.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(),
                 **{k: getattr(self, k) for k in self.COUNTERS},
                 "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                         "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if self.cuda else None}}
        if self.t_opt is not None:
            state.update(teacher=self.teacher.state_dict(), t_opt=self.t_opt.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.t_opt is not None:
            self.teacher.load_state_dict(state["teacher"])
            self.t_opt.load_state_dict(state["t_opt"])
        for k in self.COUNTERS:
            setattr(self, k, state[k])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if self.cuda and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])


def _train_state(s: FitSettings, student: torch.nn.Module, teacher: torch.nn.Module | None,
                 device: torch.device, total: int) -> TrainState:
    """Fresh optimizers (fused AdamW; the student's with a linear warmup/decay schedule, no
    weight decay on biases and norms); the teacher in eval mode, trainable for ikd only."""
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.train.lr, fused=True)
    sched = get_linear_schedule_with_warmup(opt, int(s.train.warmup_ratio * total), total)
    t_opt = None
    if teacher is not None:
        teacher.to(device).eval()  # soft targets without dropout noise
        for p in teacher.parameters():
            p.requires_grad_(s.method == "ikd")
        if s.method == "ikd":
            t_opt = torch.optim.AdamW(teacher.parameters(), lr=s.teacher_lr, weight_decay=0.0,
                                      fused=True)
    return TrainState(student, opt, sched, teacher, t_opt, cuda=device.type == "cuda")


class _Window:
    """The training steps since the last log: their losses summed on the device, counts, and a
    clock that restarts after logging, evaluation and checkpoints (so `samples_per_s` is the
    training alone, the steady state that compares across runs)."""

    def __init__(self, device: torch.device, started: float | None) -> None:
        self.zero = lambda: torch.zeros((), device=device)
        self.sums = {"loss": self.zero(), "kd": self.zero(), "exam": self.zero()}
        self.n = self.n_exams = self.seen = self.trained = 0
        self.t0 = self.t_start = time.perf_counter()
        # Startup: the trial's start to the first step; logged once (the first log).
        self.startup = {STARTUP: self.t0 - (started if started is not None else self.t0)}
        self.pending = dict(self.startup)

    def add(self, out: dict[str, torch.Tensor], rows: int, exam: bool) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.n_exams += exam
        self.n += 1
        self.seen += rows
        self.trained += rows

    def restart_clock(self) -> None:
        if self.n == 0:  # a window starts after its log (and evaluation) is done
            self.t0 = time.perf_counter()


def _log_window(w: _Window, s: FitSettings, st: TrainState, total: int,
                steps_per_epoch: int) -> dict[str, float]:
    """The training-curve point of window `w` (the only regular host sync), which it then
    empties. Raises `NonFiniteLoss` for a NaN/inf loss."""
    vals = {k: v.item() for k, v in w.sums.items()}
    if not math.isfinite(vals["loss"]) or not math.isfinite(vals["exam"]):
        raise NonFiniteLoss(f"non-finite loss by step {st.step} of {total} "
                            f"(train/loss={vals['loss']}, exam/loss={vals['exam']})"
                            "; lower the learning rates or check the data")
    dt = time.perf_counter() - w.t0
    out = {"train/loss": vals["loss"] / w.n, "train/lr": st.sched.get_last_lr()[0],
           "samples_per_s": w.seen / dt if dt > 0 else 0.0, "epoch": st.step / steps_per_epoch}
    if s.method != "finetune":
        out["train/kd_loss"] = vals["kd"] / w.n
    if w.n_exams:
        out["exam/loss"] = vals["exam"] / w.n_exams
        out["exam/hypergrad_norm"] = vals["hypergrad_norm"] / w.n_exams
    out.update(w.pending)  # the first log of this process: how long until training began
    w.pending = {}
    if vals.get("n_diagnosed"):
        out["exam/teacher_update_norm"] = vals["teacher_update_norm"] / vals["n_diagnosed"]
        if vals["n_ratio"]:
            out["exam/lookahead_over_real_step"] = vals["lookahead_over_real_step"] / vals[
                "n_ratio"]
    w.sums = {k: w.zero() for k in w.sums}
    w.n = w.n_exams = w.seen = 0
    return out


@dataclass
class _Run:
    """What `fit`'s evaluations and result need besides the training state."""

    s: FitSettings
    task: Task
    data: TaskData
    device: torch.device
    pad_id: int
    times: StepTimes
    total: int
    steps_per_epoch: int
    keep: KeepStudent | None
    checkpoint_dir: Path | None

    def scores(self, model: torch.nn.Module, splits: tuple[str, ...] = ("val", "dev")):
        return _scores(model, self.data, self.task, self.device, self.s.train.eval_batch_size,
                       self.pad_id, splits)


def _evaluation(r: _Run, st: TrainState) -> tuple[dict[str, float], Path | None]:
    """An evaluation step: val always, dev only where a reported number needs it (a new
    selection, the last step); the selection and its kept student; the checkpoint. Returns the
    evaluation report's metrics and the checkpoint folder."""
    step, times = st.step, r.times
    with times("evaluation"):
        metrics = r.scores(st.student, ("val",))
    improved = metrics[VAL] > st.sel[SEL_VAL]  # ties keep the earlier
    if improved or step == r.total or r.s.dev_every_eval:
        with times("evaluation"):
            metrics.update(r.scores(st.student, ("dev",)))
        if metrics[DEV] > st.best:
            st.best, st.best_step = metrics[DEV], step
    if improved:
        st.sel = {SEL_VAL: metrics[VAL], SEL_DEV: metrics[DEV], SEL_STEP: step}
        if r.keep is not None:  # before the checkpoint that records this selection
            with times("checkpoint"):
                save_student(r.keep, st.student, st.sel)
    metrics.update(st.sel)
    metrics.update({BEST_DEV: st.best, "epoch": step / r.steps_per_epoch})
    if r.s.method == "ikd":
        with times("evaluation"):
            tsc = r.scores(st.teacher, ("val", "dev") if DEV in metrics else ("val",))
        metrics[TEACHER_VAL] = tsc[VAL]
        if DEV in tsc:
            metrics[TEACHER_DEV] = tsc[DEV]
    ckpt = None
    if r.checkpoint_dir is not None:
        state = st.state_dict()
        with times("checkpoint"):
            ckpt = _save_checkpoint(Path(r.checkpoint_dir), state)
    return metrics, ckpt


def _result(r: _Run, st: TrainState, w: _Window, last_eval: dict[str, float] | None,
            ) -> dict[str, float]:
    """The trial's result (see `fit`), on the extra dev sets too (MNLI mismatched)."""
    wall = time.perf_counter() - w.t_start
    if last_eval is None:  # resumed from the final checkpoint: nothing left to train
        last_eval = r.scores(st.student)
        if r.s.method == "ikd":
            tsc = r.scores(st.teacher)
            last_eval.update({TEACHER_VAL: tsc[VAL], TEACHER_DEV: tsc[DEV]})
    final = {f"final/{k.replace('/', '_')}": v for k, v in last_eval.items()
             if k.startswith(("val/", "dev/"))}
    final.update(st.sel)
    final.update({BEST_DEV: st.best, "best/step": st.best_step, "steps": st.step})
    final.update({**r.times.metrics(wall, w.trained), **peak_memory(r.device), **w.startup})
    if r.s.method == "ikd":
        final["final/teacher_val_main"] = last_eval[TEACHER_VAL]
        final["final/teacher_dev_main"] = last_eval[TEACHER_DEV]
    for name, split in r.data.extra_dev.items():
        for k, v in evaluate(st.student, split, r.task, r.device, r.s.train.eval_batch_size,
                             r.pad_id).items():
            final[f"final/{name}_{k}"] = v
    return final


def fit(s: FitSettings, task: Task, data: TaskData, student: torch.nn.Module, *,
        teacher: torch.nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
        device: torch.device, callback: Callback | None = None, pad_id: int = 0,
        checkpoint_dir: Path | None = None, resume_from: Path | None = None,
        keep: KeepStudent | None = None, started: float | None = None) -> dict[str, float]:
    """Train `student` by `s.method` on `data.train`; return the trial's result.

    `started`: the trial's start (`time.perf_counter()`), for `sys/startup_s`, the time from it
    to the first training step (data, models, teacher loading; defaults to fit's own start).

    Result: `sel/val_main`, `sel/dev_main`, `sel/step` (the evaluation with the best val/main),
    `final/val_*` and `final/dev_*` (the last evaluation), `best/dev_main` (the best dev score
    over the evaluations that computed dev: the selected ones and the last; diagnostic),
    `steps`. With `keep`, the selected student is kept there (see `KeepStudent`).
    """
    cb = callback or NullCallback()
    if s.method == "kd" and teacher is None and teacher_logits is None:
        raise ValueError("method kd needs a teacher or its cached logits")
    if s.method == "ikd" and teacher is None:
        raise ValueError("method ikd needs the teacher model (it trains it)")
    times = StepTimes(device)
    reset_peak_memory(device)
    seed_everything(s.seed)
    student.to(device).train()
    steps_per_epoch = math.ceil(len(data.train) / s.train.batch_size)
    total = total_steps(s, len(data.train))
    eval_at = set(range(steps_per_epoch, total + 1, steps_per_epoch)) | {total}
    if s.train.eval_every:
        eval_at |= set(range(s.train.eval_every, total + 1, s.train.eval_every))
    st = _train_state(s, student, teacher, device, total)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(device)
    if resume_from is not None:
        st.load_state_dict(_read_checkpoint(resume_from))
    r = _Run(s, task, data, device, pad_id, times, total, steps_per_epoch, keep, checkpoint_dir)
    reg = task.is_regression
    quiz = (_cycle(data.quiz, s.train.batch_size, s.seed, pad_id, reg, st.quiz_used)
            if s.method == "ikd" else None)
    train_step = TrainStep(s, student, st.opt, st.sched, device, teacher=teacher,
                           teacher_logits=teacher_logits, t_opt=st.t_opt, times=times)
    w, last_eval = _Window(device, started), None
    while st.step < total:
        epoch = st.step // steps_per_epoch
        order = batch_order(data.train, s.train.batch_size, s.seed * 1000 + epoch)
        for rows in order[st.step - epoch * steps_per_epoch:]:
            if st.step >= total:
                break
            batch = {k: v.to(device, non_blocking=True)
                     for k, v in collate(data.train, rows, pad_id, regression=reg).items()}
            qb = None
            if quiz is not None and train_step.is_exam(st.step):
                st.quiz_used, qb = next(quiz)
                qb = {k: v.to(device, non_blocking=True) for k, v in qb.items()}
            # Step norms only for the last exam before the next log (they cost a weight copy).
            next_log = min([(st.step // s.train.log_every + 1) * s.train.log_every]
                           + [e for e in eval_at if e > st.step])
            w.add(train_step(batch, qb, diagnose=next_log - st.step <= s.exam_every),
                  len(rows), qb is not None)
            st.step += 1
            if st.step % s.train.log_every == 0 or st.step in eval_at:
                cb.log(_log_window(w, s, st, total, steps_per_epoch), st.step)
                times.collect()  # after the sync above: reading the events waits for nothing
            if st.step in eval_at:
                last_eval, ckpt = _evaluation(r, st)
                cb.report(last_eval, st.step, ckpt)
            w.restart_clock()
    return _result(r, st, w, last_eval)
