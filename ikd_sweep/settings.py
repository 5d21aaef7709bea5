"""`FitSettings`: what one training loop (`trainer.fit`, `step.TrainStep`) needs, resolved
from the sweep file and the trial (or, for a teacher's fine-tuning, the teacher's section)."""

from __future__ import annotations

from dataclasses import dataclass

from ikd_sweep.config import SweepConfig
from ikd_sweep.trials import Trial, trial_seed


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
