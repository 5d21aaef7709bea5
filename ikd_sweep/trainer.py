"""The training loop of one trial: `finetune`, `kd` or `ikd` on one task, in plain PyTorch.

`fit` runs the loop on data and models it is given (`trial.run_trial` assembles them). Each
course step trains the student on the course loss; for `ikd`, every `exam_every`
course steps an exam step also trains the teacher on the student's feedback: the hypergradient
of the student's quiz loss after a one-step lookahead of that same course batch, taken from the
student's parameters before its real update (DESIGN.md, "Order within an exam round").

Features: AdamW with linear warmup/decay (fused on CUDA), bf16 autocast on CUDA, per-batch
padding with length-grouped batches, losses accumulated on the device (host syncs only at
logging, evaluation and checkpoint steps), val and dev evaluation every `eval_every` steps and at
each epoch end, checkpoint + exact resume (models, optimizers, schedulers, step, RNG, the
selection so far), and a non-finite loss check at every logging step.

Selection (DESIGN.md, comparison protocol): the trial's result is its evaluation with the best
`val/main` (`sel/val_main`, `sel/dev_main`, `sel/step`; ties keep the earlier one). GLUE dev is
only reported: `best/dev_main` (max over dev) is a diagnostic that never chooses anything.

Metrics leave through a callback, so this module imports neither Ray nor MLflow:
`callback.log(metrics, step)` for training curves, `callback.report(metrics, step, checkpoint)`
at each evaluation. Raises `NonFiniteLoss` when a loss goes NaN/inf, `ValueError` when a
method lacks its teacher. Settings that cannot run together are rejected by the config.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from ikd_sweep.config import SweepConfig
from ikd_sweep.data import Split, TaskData, batch_order, collate, iterate
from ikd_sweep.distill.exam import exam_hypergradient
from ikd_sweep.distill.losses import course_loss, task_loss
from ikd_sweep.files import atomic_path
from ikd_sweep.models import autocast, model_inputs
from ikd_sweep.tasks import Task
from ikd_sweep.trials import Trial, trial_seed


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


@dataclass
class FitSettings:
    """What one training loop needs, resolved from the sweep and the trial."""

    method: str
    seed: int
    epochs: float
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float | None
    eval_every: int | None
    log_every: int
    max_steps: int | None
    alpha: float = 0.5
    hidden_weight: float = 0.0
    temperature: float = 1.0
    exam_every: int = 1
    teacher_lr: float = 0.0
    estimator: str = "finite_difference"
    lookahead_lr: float = 5e-5
    teacher_ce_weight: float = 0.0
    fd_epsilon: float = 0.01

    @classmethod
    def for_trial(cls, cfg: SweepConfig, trial: Trial) -> FitSettings:
        t, k = cfg.train, cfg.ikd
        return cls(method=trial.method, seed=trial_seed(cfg, trial), epochs=t.epochs,
                   batch_size=t.batch_size, eval_batch_size=t.eval_batch_size, lr=t.lr,
                   weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
                   max_grad_norm=t.max_grad_norm, eval_every=t.eval_every,
                   log_every=t.log_every, max_steps=t.max_steps, alpha=t.alpha,
                   hidden_weight=t.hidden_weight, temperature=trial.temperature or 1.0,
                   exam_every=trial.exam_every or 1, teacher_lr=trial.teacher_lr or 0.0,
                   estimator=k.estimator, lookahead_lr=k.lookahead_lr,
                   teacher_ce_weight=k.teacher_ce_weight, fd_epsilon=k.fd_epsilon)

    @classmethod
    def for_teacher(cls, cfg: SweepConfig, seed: int) -> FitSettings:
        t = cfg.teacher
        return cls(method="finetune", seed=trial_seed(cfg, seed), epochs=t.epochs,
                   batch_size=t.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                   lr=t.lr, weight_decay=cfg.train.weight_decay,
                   warmup_ratio=cfg.train.warmup_ratio, max_grad_norm=cfg.train.max_grad_norm,
                   eval_every=None, log_every=cfg.train.log_every, max_steps=None)


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _scores(model: torch.nn.Module, data: TaskData, task: Task, device: torch.device,
            batch_size: int, pad_id: int) -> dict[str, float]:
    """`val/<m>` and `dev/<m>` for every task metric m."""
    return {f"{name}/{k}": v
            for name, split in (("val", data.val), ("dev", data.dev))
            for k, v in evaluate(model, split, task, device, batch_size, pad_id).items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, task: Task, device: torch.device,
             batch_size: int = 128, pad_id: int = 0) -> dict[str, float]:
    """The task's dev metrics for `model` on `split`."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in iterate(split, batch_size, pad_id=pad_id, regression=task.is_regression):
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


def fit(s: FitSettings, task: Task, data: TaskData, student: torch.nn.Module, *,
        teacher: torch.nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
        device: torch.device, callback: Callback | None = None, pad_id: int = 0,
        checkpoint_dir: Path | None = None, resume_from: Path | None = None) -> dict[str, float]:
    """Train `student` by `s.method` on `data.train`; return the trial's result.

    Result: `sel/val_main`, `sel/dev_main`, `sel/step` (the evaluation with the best val/main),
    `final/val_*` and `final/dev_*` (the last evaluation), `best/dev_main` (diagnostic), `steps`.
    """
    cb = callback or NullCallback()
    reg = task.is_regression
    if s.method == "kd" and teacher is None and teacher_logits is None:
        raise ValueError("method kd needs a teacher or its cached logits")
    if s.method == "ikd" and teacher is None:
        raise ValueError("method ikd needs the teacher model (it trains it)")
    cuda = device.type == "cuda"
    seed_everything(s.seed)
    student.to(device).train()
    hidden = s.hidden_weight > 0

    steps_per_epoch = math.ceil(len(data.train) / s.batch_size)
    total = max(1, int(s.epochs * steps_per_epoch))
    if s.max_steps:
        total = min(total, s.max_steps)
    eval_at = set(range(steps_per_epoch, total + 1, steps_per_epoch)) | {total}
    if s.eval_every:
        eval_at |= set(range(s.eval_every, total + 1, s.eval_every))

    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, fused=cuda)
    sched = get_linear_schedule_with_warmup(opt, int(s.warmup_ratio * total), total)
    t_opt = None
    if teacher is not None:
        teacher.to(device).eval()  # soft targets without dropout noise
        for p in teacher.parameters():
            p.requires_grad_(s.method == "ikd")
        if s.method == "ikd":
            t_opt = torch.optim.AdamW(teacher.parameters(), lr=s.teacher_lr, weight_decay=0.0,
                                      fused=cuda)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(device)

    step, quiz_used, best, best_step = 0, 0, -math.inf, 0
    sel: dict[str, float] = {"sel/val_main": -math.inf, "sel/dev_main": math.nan, "sel/step": 0}
    last_eval: dict[str, float] | None = None
    if resume_from is not None:
        st = torch.load(Path(resume_from) / "state.pt", map_location="cpu", weights_only=False)
        student.load_state_dict(st["student"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        if t_opt is not None:
            teacher.load_state_dict(st["teacher"])
            t_opt.load_state_dict(st["t_opt"])
        step, quiz_used, best, best_step = st["step"], st["quiz_used"], st["best"], st["best_step"]
        sel = st["sel"]  # a resumed trial selects among all its evaluations, not just the new
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"])
        if cuda and st["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
    quiz = (_cycle(data.quiz, s.batch_size, s.seed, pad_id, reg, quiz_used)
            if s.method == "ikd" else None)

    zero = lambda: torch.zeros((), device=device)  # noqa: E731
    sums = {"loss": zero(), "kd": zero(), "exam": zero()}
    n_logged, n_exams, t0, seen = 0, 0, time.perf_counter(), 0
    last: dict[str, float] = {}
    while step < total:
        epoch = step // steps_per_epoch
        order = batch_order(data.train, s.batch_size, s.seed * 1000 + epoch)
        for rows in order[step - epoch * steps_per_epoch:]:
            if step >= total:
                break
            batch = {k: v.to(device, non_blocking=True)
                     for k, v in collate(data.train, rows, pad_id, regression=reg).items()}
            labels = batch["labels"]

            # ---- exam step (ikd): judge this course step before the student takes it
            grads = None
            if quiz is not None and (step + 1) % s.exam_every == 0:
                quiz_used, qb = next(quiz)
                qb = {k: v.to(device, non_blocking=True) for k, v in qb.items()}
                with autocast(device):
                    res = exam_hypergradient(
                        teacher, student, batch, qb, temperature=s.temperature, alpha=s.alpha,
                        lookahead_lr=s.lookahead_lr, estimator=s.estimator,
                        hidden_weight=s.hidden_weight, fd_epsilon=s.fd_epsilon)
                grads = res.grads
                sums["exam"] += res.exam_loss.float()
                n_exams += 1

            # ---- course step: student on soft targets (+ gold labels)
            with autocast(device):
                out = student(**model_inputs(batch), output_hidden_states=hidden)
                t_hidden = None
                if s.method == "finetune":
                    loss = task_loss(out.logits.float(), labels)
                    kd = torch.zeros((), device=device)
                else:
                    if teacher_logits is not None:
                        t_logits = teacher_logits[batch["idx"]]
                    else:
                        with torch.no_grad():
                            t_out = teacher(**model_inputs(batch), output_hidden_states=hidden)
                        t_logits = t_out.logits.float()
                        t_hidden = t_out.hidden_states if hidden else None
                    loss = course_loss(out.logits.float(), t_logits, labels,
                                       temperature=s.temperature, alpha=s.alpha,
                                       student_hidden=out.hidden_states if hidden else None,
                                       teacher_hidden=t_hidden,
                                       attention_mask=batch["attention_mask"],
                                       hidden_weight=s.hidden_weight)
                    with torch.no_grad():
                        kd = course_loss(out.logits.float(), t_logits, labels,
                                         temperature=s.temperature, alpha=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(student.parameters(), s.max_grad_norm)
            opt.step()
            sched.step()

            # ---- teacher update with the student's feedback (+ optional gold CE)
            if grads is not None:
                t_opt.zero_grad(set_to_none=True)
                if s.teacher_ce_weight > 0:
                    with autocast(device):
                        gold = task_loss(teacher(**model_inputs(batch)).logits.float(), labels)
                    (s.teacher_ce_weight * gold).backward()
                for name, p in teacher.named_parameters():
                    g = grads.get(name)
                    if g is not None:
                        p.grad = g.to(p.dtype) if p.grad is None else p.grad + g
                if s.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(teacher.parameters(), s.max_grad_norm)
                t_opt.step()

            step += 1
            sums["loss"] += loss.detach().float()
            sums["kd"] += kd.detach().float()
            n_logged += 1
            seen += len(rows)

            # ---- logging: the only regular host sync
            if step % s.log_every == 0 or step in eval_at:
                vals = {k: v.item() for k, v in sums.items()}
                if not math.isfinite(vals["loss"]) or not math.isfinite(vals["exam"]):
                    raise NonFiniteLoss(f"non-finite loss by step {step} of {total} "
                                        f"(train/loss={vals['loss']}, exam/loss={vals['exam']})"
                                        "; lower the learning rates or check the data")
                dt = time.perf_counter() - t0
                last = {"train/loss": vals["loss"] / n_logged,
                        "train/lr": sched.get_last_lr()[0],
                        "samples_per_s": seen / dt if dt > 0 else 0.0,
                        "epoch": step / steps_per_epoch}
                if s.method != "finetune":
                    last["train/kd_loss"] = vals["kd"] / n_logged
                if n_exams:
                    last["exam/loss"] = vals["exam"] / n_exams
                cb.log(last, step)
                sums = {k: zero() for k in sums}
                n_logged, n_exams, t0, seen = 0, 0, time.perf_counter(), 0

            # ---- evaluation, checkpoint, report
            if step in eval_at:
                metrics = _scores(student, data, task, device, s.eval_batch_size, pad_id)
                if metrics["val/main"] > sel["sel/val_main"]:  # strict: ties keep the earlier
                    sel = {"sel/val_main": metrics["val/main"],
                           "sel/dev_main": metrics["dev/main"], "sel/step": step}
                if metrics["dev/main"] > best:
                    best, best_step = metrics["dev/main"], step
                metrics.update(sel)
                metrics.update({"best/dev_main": best, "epoch": step / steps_per_epoch})
                if s.method == "ikd":
                    tsc = _scores(teacher, data, task, device, s.eval_batch_size, pad_id)
                    metrics["teacher/val_main"] = tsc["val/main"]
                    metrics["teacher/dev_main"] = tsc["dev/main"]
                ckpt = None
                if checkpoint_dir is not None:
                    state = {"student": student.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "step": step, "quiz_used": quiz_used,
                             "best": best, "best_step": best_step, "sel": sel,
                             "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                     "torch": torch.get_rng_state(),
                                     "cuda": torch.cuda.get_rng_state_all() if cuda else None}}
                    if t_opt is not None:
                        state.update(teacher=teacher.state_dict(), t_opt=t_opt.state_dict())
                    ckpt = _save_checkpoint(Path(checkpoint_dir), state)
                cb.report(metrics, step, ckpt)
                last_eval = metrics

    if last_eval is None:  # resumed from the final checkpoint: nothing left to train
        last_eval = _scores(student, data, task, device, s.eval_batch_size, pad_id)
        if s.method == "ikd":
            tsc = _scores(teacher, data, task, device, s.eval_batch_size, pad_id)
            last_eval.update({"teacher/val_main": tsc["val/main"],
                              "teacher/dev_main": tsc["dev/main"]})
    final = {f"final/{k.replace('/', '_')}": v for k, v in last_eval.items()
             if k.startswith(("val/", "dev/"))}
    final.update(sel)
    final.update({"best/dev_main": best, "best/step": best_step, "steps": step})
    if s.method == "ikd":
        final["final/teacher_val_main"] = last_eval["teacher/val_main"]
        final["final/teacher_dev_main"] = last_eval["teacher/dev_main"]
    for name, split in data.extra_dev.items():
        for k, v in evaluate(student, split, task, device, s.eval_batch_size, pad_id).items():
            final[f"final/{name}_{k}"] = v
    return final
