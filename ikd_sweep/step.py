"""One training step of `fit`: a course step and, for ikd on exam steps, the exam and the
teacher's update (`TrainStep`); `fit` calls it once per batch, and benchmarks/bench_trainer.py
times it as the trainer runs it. Where its time goes is added up in a `timing.StepTimes`."""

from __future__ import annotations

import contextlib
import logging

import torch

from ikd_sweep.distill.exam import ExamResult, exam_hypergradient, global_norm, seeded
from ikd_sweep.distill.losses import course_loss, task_loss
from ikd_sweep.models import autocast, model_inputs
from ikd_sweep.settings import FitSettings
from ikd_sweep.timing import StepTimes

log = logging.getLogger(__name__)


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
                 t_opt: torch.optim.Optimizer | None = None,
                 times: StepTimes | None = None) -> None:
        self.s, self.student, self.opt, self.sched, self.device = s, student, opt, sched, device
        self.times = times or StepTimes(device)
        self.teacher, self.teacher_logits, self.t_opt = teacher, teacher_logits, t_opt
        self.hidden = s.train.hidden_weight > 0
        self.s_params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.t_params = ([] if teacher is None or t_opt is None else
                         [(n, p) for n, p in teacher.named_parameters() if p.requires_grad])
        self.devices = sorted({p.device.index or 0 for p in student.parameters()
                               if p.device.type == "cuda"})
        self._s_buf = self._t_buf = None  # scratch copies for the step-norm diagnostics
        # Plain course steps may run compiled forwards; exam rounds stay eager, so the real
        # step sees the lookahead's dropout masks (compiled kernels draw their own).
        self.s_fwd, self.t_fwd = student, teacher
        if s.train.compile and device.type == "cuda":
            self.s_fwd = torch.compile(student)
            self.t_fwd = None if teacher is None else torch.compile(teacher)
        elif s.train.compile:
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
        with self.times("exam"), autocast(self.device):
            res = exam_hypergradient(
                self.teacher, self.student, batch, quiz, temperature=s.temperature,
                alpha=s.train.alpha, ikd=s.ikd, hidden_weight=s.train.hidden_weight,
                optimizer=self.opt, max_grad_norm=s.train.max_grad_norm,
                keep_teacher_graph=s.ikd.teacher_ce_weight > 0)
        lr_factor = self.sched.get_last_lr()[0] / s.train.lr  # this step's warmup/decay factor
        with self.times("exam"):
            t_grads, h_norm = self._teacher_grads(res, batch["labels"])
        if diagnose:
            before = self._s_buf = _snapshot([p for _, p in self.s_params], self._s_buf)
        if s.ikd.order == "teacher_first":
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
            with self.times("course"), torch.no_grad():
                for n, p in self.s_params:
                    p.grad = fused.course_grad[n].to(p.dtype)
                loss = fused.course_loss
                kd = course_loss(fused.student_logits.float(),
                                 fused.teacher_logits.detach().float(), labels,
                                 temperature=s.temperature, alpha=1.0)
        else:
            eager = seed is not None
            s_fwd = self.student if eager else self.s_fwd
            t_fwd = self.teacher if eager else self.t_fwd
            masks = seeded(seed, self.devices) if eager else contextlib.nullcontext()
            with autocast(self.device):
                with self.times("course"), masks:
                    out = s_fwd(**model_inputs(batch), output_hidden_states=hidden)
                t_logits = t_hidden = None
                if s.method != "finetune" and self.teacher_logits is not None:
                    t_logits = self.teacher_logits[batch["idx"]]
                elif s.method != "finetune":
                    with self.times("teacher_forward"), torch.no_grad():
                        t_out = t_fwd(**model_inputs(batch), output_hidden_states=hidden)
                    t_logits = t_out.logits.float()
                    t_hidden = t_out.hidden_states if hidden else None
                with self.times("course"):
                    if s.method == "finetune":
                        loss = task_loss(out.logits.float(), labels)
                        kd = torch.zeros((), device=self.device)
                    else:
                        loss = course_loss(
                            out.logits.float(), t_logits, labels, temperature=s.temperature,
                            alpha=s.train.alpha,
                            student_hidden=out.hidden_states if hidden else None,
                            teacher_hidden=t_hidden, attention_mask=batch["attention_mask"],
                            hidden_weight=s.train.hidden_weight)
                        with torch.no_grad():
                            kd = course_loss(out.logits.float(), t_logits, labels,
                                             temperature=s.temperature, alpha=1.0)
            with self.times("course"):
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
        with self.times("optimizer"):
            if s.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), s.train.max_grad_norm)
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
        if self.s.ikd.teacher_ce_weight > 0:
            gold = task_loss(res.teacher_logits.float(), labels)
            c = torch.autograd.grad(gold, [p for _, p in self.t_params], allow_unused=True)
            c = [torch.zeros_like(p) if ci is None else ci
                 for ci, (_, p) in zip(c, self.t_params, strict=True)]
            w = self.s.ikd.teacher_ce_weight / global_norm(c).clamp_min(1e-30)
            torch._foreach_add_(grads, torch._foreach_mul(c, w))
        return grads, h_norm

    def _teacher_step(self, grads: list[torch.Tensor], lr_factor: float,
                      diagnose: bool) -> torch.Tensor | None:
        """AdamW step of the teacher on `grads`; the norm of the change of its weights."""
        if self.s.ikd.teacher_schedule == "linear":  # the student's warmup/decay, teacher_lr peak
            for grp in self.t_opt.param_groups:
                grp["lr"] = self.s.teacher_lr * lr_factor
        if diagnose:
            before = self._t_buf = _snapshot([p for _, p in self.t_params], self._t_buf)
        with self.times("optimizer"):
            for (_, p), g in zip(self.t_params, grads, strict=True):
                p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
            self.t_opt.step()
            self.t_opt.zero_grad(set_to_none=True)
        return _moved([p for _, p in self.t_params], before) if diagnose else None
