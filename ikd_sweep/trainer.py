"""The training loop of one trial: `finetune`, `kd` or `ikd` on one task, in plain PyTorch.

`fit` runs the loop on data and models it is given (`trial.run_trial` assembles them). Each
course step trains the student on the course loss; for `ikd`, every `exam_every`
course steps an exam step also trains the teacher on the student's feedback: the hypergradient
of the student's quiz loss after a one-step lookahead (`ikd.lookahead`: sgd, or the student's
own AdamW step) of that same course batch from the student's weights before its real update;
`ikd.order` says whether the teacher steps after the student (student_first) or before it
(teacher_first). `TrainStep` is one such step (DESIGN.md, "Order within an exam round").

Features: AdamW with linear warmup/decay (fused on CUDA), bf16 autocast on CUDA, per-batch
padding with length-grouped batches, losses accumulated on the device (host syncs only at
logging, evaluation and checkpoint steps), val evaluation every `eval_every` steps and at each
epoch end, checkpoint + exact resume (models, optimizers, schedulers, step, RNG, the selection so
far), and a non-finite loss check at every logging step.

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

import contextlib
import logging
import math
import pickle
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
from ikd_sweep.distill.exam import ExamResult, exam_hypergradient, global_norm, seeded
from ikd_sweep.distill.losses import course_loss, task_loss
from ikd_sweep.files import atomic_path
from ikd_sweep.models import autocast, model_inputs
from ikd_sweep.tasks import Task
from ikd_sweep.trials import Trial, trial_seed

log = logging.getLogger(__name__)


class Callback(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None: ...


class NullCallback:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        pass


@dataclass
class KeepStudent:
    """Where and how `fit` keeps the selected student: `path` (a folder, replaced whole each
    time selection improves), the tokenizer saved with it, and the model card's facts (task,
    method, setting, seed, sweep, commit; written by `trial.run_trial`, which knows them)."""

    path: Path
    tokenizer: Any = None
    card: dict[str, Any] | None = None


def student_card(card: dict[str, Any], sel: dict[str, float]) -> str:
    """The README.md model card of a kept student: its facts and its selection scores."""
    facts = {**(card or {}), "sel/val_main": sel["sel/val_main"],
             "sel/dev_main": sel["sel/dev_main"], "sel/step": int(sel["sel/step"])}
    title = " ".join(str(facts[k]) for k in ("task", "method") if facts.get(k) is not None)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification", "---",
             "", f"# ikd-sweep student{': ' + title if title else ''}", "",
             "The student at the checkpoint its trial selected on `val/main` (ties keep the "
             "earlier); `sel/dev_main` is its GLUE dev score, which chose nothing.", "",
             "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else '-'} |" for k, v in facts.items()]
    return "\n".join(lines) + "\n"


def save_student(keep: KeepStudent, model: torch.nn.Module, sel: dict[str, float]) -> Path:
    """Write the selected student atomically: a crash leaves the previous folder, never half."""
    with atomic_path(keep.path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if keep.tokenizer is not None:
            keep.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(student_card(keep.card or {}, sel), encoding="utf-8")
    return keep.path


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
    lookahead: str = "sgd"
    order: str = "student_first"
    teacher_schedule: str = "constant"
    compile: bool = False
    # Reuse the exam's course gradient and teacher outputs for the real step when they are the
    # same computation (student_first); False recomputes them (same result; for tests/benchmarks).
    fuse_exam: bool = True
    # Evaluate dev at every evaluation, not only where selection or the final score needs it
    # (the old behaviour: same training and selection, more evaluation; for benchmarks).
    dev_every_eval: bool = False

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
                   teacher_ce_weight=k.teacher_ce_weight, fd_epsilon=k.fd_epsilon,
                   lookahead=k.lookahead, order=k.order, teacher_schedule=k.teacher_schedule,
                   compile=t.compile)

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


def describe_device(device: torch.device) -> dict[str, str]:
    """Where a trial trains, for its record: ``{"device": "cuda", "gpu": "NVIDIA H200"}``."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"device": device.type, "gpu": gpu}


def total_steps(s: FitSettings, n_rows: int) -> int:
    """Optimizer steps of a run on `n_rows` training rows: `epochs` passes, capped at
    `max_steps` (the progress bar's total and the learning-rate schedule's length)."""
    total = max(1, int(s.epochs * math.ceil(n_rows / s.batch_size)))
    return min(total, s.max_steps) if s.max_steps else total


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


def _snapshot(params: list[torch.Tensor], buf: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """A copy of `params` in `buf` (allocated on first use and reused: no per-step allocation)."""
    if buf is None:
        return [p.detach().clone() for p in params]
    torch._foreach_copy_(buf, [p.detach() for p in params])
    return buf


def _moved(params: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    """||params - before||, computed in `before`'s storage (a scratch copy, overwritten)."""
    torch._foreach_sub_(before, [p.detach() for p in params])
    return global_norm(before)


class TrainStep:
    """One step of `fit`: a course step and, for ikd on exam steps, the exam and teacher update.

    Exam rounds (DESIGN.md, `ikd.order`):
    - `student_first`: exam at the student's weights before its step -> real student step on
      the old teacher's targets -> teacher step. The exam's course gradient (same batch, weights,
      teacher and dropout masks) is the real step's gradient, so with `fuse_exam` it is reused,
      and so are the teacher's course outputs: no second student pass, no second teacher pass.
    - `teacher_first` (MetaDistil): exam -> teacher step -> real student step on the updated
      teacher's targets (a fresh teacher forward; the student pass reuses the exam's masks).
    The teacher's update direction is the hypergradient scaled to unit L2 norm, plus
    `teacher_ce_weight` times the unit-norm gold-label gradient (see README, "IKD settings").
    `fit` calls it once per batch; the benchmark times it as the trainer runs it.
    """

    def __init__(self, s: FitSettings, student: torch.nn.Module, opt: torch.optim.Optimizer,
                 sched, device: torch.device, *, teacher: torch.nn.Module | None = None,
                 teacher_logits: torch.Tensor | None = None,
                 t_opt: torch.optim.Optimizer | None = None) -> None:
        self.s, self.student, self.opt, self.sched, self.device = s, student, opt, sched, device
        self.teacher, self.teacher_logits, self.t_opt = teacher, teacher_logits, t_opt
        self.hidden = s.hidden_weight > 0
        self.s_params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.t_params = ([] if teacher is None or t_opt is None else
                         [(n, p) for n, p in teacher.named_parameters() if p.requires_grad])
        self.devices = sorted({p.device.index or 0 for p in student.parameters()
                               if p.device.type == "cuda"})
        self._s_buf = self._t_buf = None  # scratch copies for the step-norm diagnostics
        # Plain course steps may run compiled forwards; exam rounds stay eager, so the real
        # step sees the lookahead's dropout masks (compiled kernels draw their own).
        self.s_fwd, self.t_fwd = student, teacher
        if s.compile and device.type == "cuda":
            self.s_fwd = torch.compile(student)
            self.t_fwd = None if teacher is None else torch.compile(teacher)
        elif s.compile:
            log.warning("train.compile is ignored on %s: torch.compile is used on CUDA only",
                        device.type)

    def is_exam(self, step: int) -> bool:
        """Whether 0-based course step `step` has an exam (every `exam_every`-th step)."""
        return self.t_opt is not None and (step + 1) % self.s.exam_every == 0

    def __call__(self, batch: dict[str, torch.Tensor],
                 quiz: dict[str, torch.Tensor] | None = None, *,
                 diagnose: bool = True) -> dict[str, torch.Tensor]:
        """Train on `batch` (exam on `quiz` if given); device scalars for the logs.

        `diagnose` measures the teacher's and the student's step norms (a copy and a pass over
        both models' weights, so `fit` asks for it only on the exam it will log).
        """
        if quiz is None:
            return self._course(batch)
        s = self.s
        with autocast(self.device):
            res = exam_hypergradient(
                self.teacher, self.student, batch, quiz, temperature=s.temperature,
                alpha=s.alpha, lookahead_lr=s.lookahead_lr, estimator=s.estimator,
                hidden_weight=s.hidden_weight, fd_epsilon=s.fd_epsilon, lookahead=s.lookahead,
                optimizer=self.opt, max_grad_norm=s.max_grad_norm,
                keep_teacher_graph=s.teacher_ce_weight > 0)
        lr_factor = self.sched.get_last_lr()[0] / s.lr  # this step's warmup/decay factor
        t_grads, h_norm = self._teacher_grads(res, batch["labels"])
        if diagnose:
            before = self._s_buf = _snapshot([p for _, p in self.s_params], self._s_buf)
        if s.order == "teacher_first":
            t_norm = self._teacher_step(t_grads, lr_factor, diagnose)
            out = self._course(batch, seed=res.course_seed)
        else:
            fused = res if s.fuse_exam else None
            out = self._course(batch, seed=res.course_seed, fused=fused)
            t_norm = self._teacher_step(t_grads, lr_factor, diagnose)
        out.update({"exam": res.exam_loss.float(), "hypergrad_norm": h_norm})
        if diagnose:
            real = _moved([p for _, p in self.s_params], before)
            moved = real > 0  # lr_t = 0 (warmup start): no real step to compare with
            out.update({"teacher_update_norm": t_norm, "n_diagnosed": torch.ones_like(real),
                        "n_ratio": moved.float(), "lookahead_over_real_step": torch.where(
                            moved, res.lookahead_norm.to(real) / real.clamp_min(1e-30), 0.0)})
        return out

    def _course(self, batch: dict[str, torch.Tensor], seed: int | None = None,
                fused: ExamResult | None = None) -> dict[str, torch.Tensor]:
        """The student's real step on soft targets (+ gold labels); `fused`: the exam's g."""
        s, labels, hidden = self.s, batch["labels"], self.hidden
        if fused is not None:
            for n, p in self.s_params:
                p.grad = fused.course_grad[n].to(p.dtype)
            loss = fused.course_loss
            with torch.no_grad():
                kd = course_loss(fused.student_logits.float(),
                                 fused.teacher_logits.detach().float(), labels,
                                 temperature=s.temperature, alpha=1.0)
        else:
            eager = seed is not None
            s_fwd = self.student if eager else self.s_fwd
            t_fwd = self.teacher if eager else self.t_fwd
            masks = seeded(seed, self.devices) if eager else contextlib.nullcontext()
            with autocast(self.device):
                with masks:
                    out = s_fwd(**model_inputs(batch), output_hidden_states=hidden)
                t_hidden = None
                if s.method == "finetune":
                    loss = task_loss(out.logits.float(), labels)
                    kd = torch.zeros((), device=self.device)
                else:
                    if self.teacher_logits is not None:
                        t_logits = self.teacher_logits[batch["idx"]]
                    else:
                        with torch.no_grad():
                            t_out = t_fwd(**model_inputs(batch), output_hidden_states=hidden)
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
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), s.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach().float(), "kd": kd.detach().float()}

    def _teacher_grads(self, res: ExamResult, labels: torch.Tensor
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Unit-norm hypergradient (+ weight x unit-norm gold CE gradient); the raw norm."""
        grads = [res.grads[n] for n, _ in self.t_params]  # ours to scale in place
        h_norm = global_norm(grads)
        # A zero hypergradient (v = 0, or lr_t = 0 in adam's warmup) stays zero.
        torch._foreach_mul_(grads, torch.where(h_norm > 0, 1 / h_norm.clamp_min(1e-30), 0.0))
        if self.s.teacher_ce_weight > 0:
            gold = task_loss(res.teacher_logits.float(), labels)
            c = torch.autograd.grad(gold, [p for _, p in self.t_params], allow_unused=True)
            c = [torch.zeros_like(p) if ci is None else ci
                 for ci, (_, p) in zip(c, self.t_params, strict=True)]
            w = self.s.teacher_ce_weight / global_norm(c).clamp_min(1e-30)
            torch._foreach_add_(grads, torch._foreach_mul(c, w))
        return grads, h_norm

    def _teacher_step(self, grads: list[torch.Tensor], lr_factor: float,
                      diagnose: bool) -> torch.Tensor | None:
        """AdamW step of the teacher on `grads`; the norm of the change of its weights."""
        if self.s.teacher_schedule == "linear":  # the student's warmup/decay, teacher_lr peak
            for grp in self.t_opt.param_groups:
                grp["lr"] = self.s.teacher_lr * lr_factor
        if diagnose:
            before = self._t_buf = _snapshot([p for _, p in self.t_params], self._t_buf)
        for (_, p), g in zip(self.t_params, grads, strict=True):
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
        self.t_opt.step()
        self.t_opt.zero_grad(set_to_none=True)
        return _moved([p for _, p in self.t_params], before) if diagnose else None


def fit(s: FitSettings, task: Task, data: TaskData, student: torch.nn.Module, *,
        teacher: torch.nn.Module | None = None, teacher_logits: torch.Tensor | None = None,
        device: torch.device, callback: Callback | None = None, pad_id: int = 0,
        checkpoint_dir: Path | None = None, resume_from: Path | None = None,
        keep: KeepStudent | None = None) -> dict[str, float]:
    """Train `student` by `s.method` on `data.train`; return the trial's result.

    Result: `sel/val_main`, `sel/dev_main`, `sel/step` (the evaluation with the best val/main),
    `final/val_*` and `final/dev_*` (the last evaluation), `best/dev_main` (the best dev score
    over the evaluations that computed dev: the selected ones and the last; diagnostic),
    `steps`. With `keep`, the selected student is kept there (see `KeepStudent`).
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

    steps_per_epoch = math.ceil(len(data.train) / s.batch_size)
    total = total_steps(s, len(data.train))
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
        state_file = Path(resume_from) / "state.pt"
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            from ikd_sweep.errors import CacheError

            why = str(e).strip().split(". ")[0][:160]  # torch's message runs on for lines
            raise CacheError(f"checkpoint {state_file} cannot be read ({type(e).__name__}: "
                             f"{why}); delete it or run without --resume") from None
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
    train_step = TrainStep(s, student, opt, sched, device, teacher=teacher,
                           teacher_logits=teacher_logits, t_opt=t_opt)

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
            qb = None
            if quiz is not None and train_step.is_exam(step):
                quiz_used, qb = next(quiz)
                qb = {k: v.to(device, non_blocking=True) for k, v in qb.items()}
            # Step norms only for the last exam before the next log (they cost a weight copy).
            next_log = min([(step // s.log_every + 1) * s.log_every]
                           + [e for e in eval_at if e > step])
            out = train_step(batch, qb, diagnose=next_log - step <= s.exam_every)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v
            n_exams += qb is not None

            step += 1
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
                    last["exam/hypergrad_norm"] = vals["hypergrad_norm"] / n_exams
                if vals.get("n_diagnosed"):
                    last["exam/teacher_update_norm"] = (vals["teacher_update_norm"]
                                                        / vals["n_diagnosed"])
                    if vals["n_ratio"]:
                        last["exam/lookahead_over_real_step"] = (
                            vals["lookahead_over_real_step"] / vals["n_ratio"])
                cb.log(last, step)
                sums = {k: zero() for k in sums}
                n_logged, n_exams, t0, seen = 0, 0, time.perf_counter(), 0

            # ---- evaluation, checkpoint, report
            if step in eval_at:
                # val at every evaluation; dev only where a reported number needs it.
                metrics = _scores(student, data, task, device, s.eval_batch_size, pad_id,
                                  ("val",))
                improved = metrics["val/main"] > sel["sel/val_main"]  # ties keep the earlier
                if improved or step == total or s.dev_every_eval:
                    metrics.update(_scores(student, data, task, device, s.eval_batch_size,
                                           pad_id, ("dev",)))
                    if metrics["dev/main"] > best:
                        best, best_step = metrics["dev/main"], step
                if improved:
                    sel = {"sel/val_main": metrics["val/main"],
                           "sel/dev_main": metrics["dev/main"], "sel/step": step}
                    if keep is not None:  # before the checkpoint that records this selection
                        save_student(keep, student, sel)
                metrics.update(sel)
                metrics.update({"best/dev_main": best, "epoch": step / steps_per_epoch})
                if s.method == "ikd":
                    tsc = _scores(teacher, data, task, device, s.eval_batch_size, pad_id,
                                  ("val", "dev") if "dev/main" in metrics else ("val",))
                    metrics["teacher/val_main"] = tsc["val/main"]
                    if "dev/main" in tsc:
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
