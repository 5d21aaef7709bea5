"""`FitSettings`: what one training loop (`trainer.fit`, `step.TrainStep`) needs. The knobs are
the sweep file's `train` and `ikd` sections themselves (their defaults live in config.py and
nowhere else); this adds the trial's method, seed and point of the search, and is built in one
place for a trial (`for_trial`) or a teacher's fine-tuning (`for_teacher`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ikd_sweep.config import IkdConfig, SweepConfig, TrainConfig
from ikd_sweep.names import HPARAMS
from ikd_sweep.trials import Trial, trial_seed

# What the trainer uses for a search hyperparameter its method does not use (names.HPARAMS).
UNUSED = {"temperature": 1.0, "exam_every": 1, "teacher_lr": 0.0}


@dataclass
class FitSettings:
    """What one training loop needs, resolved from the sweep and the trial."""

    method: str
    seed: int
    train: TrainConfig
    ikd: IkdConfig = field(default_factory=IkdConfig)
    temperature: float = UNUSED["temperature"]
    exam_every: int = UNUSED["exam_every"]
    teacher_lr: float = UNUSED["teacher_lr"]
    # Reuse the exam's course gradient and teacher outputs for the real step when they are the
    # same computation (student_first); False recomputes them (same result; for tests/benchmarks).
    fuse_exam: bool = True
    # Evaluate dev at every evaluation, not only where selection or the final score needs it
    # (the old behaviour: same training and selection, more evaluation; for benchmarks).
    dev_every_eval: bool = False

    @classmethod
    def for_trial(cls, cfg: SweepConfig, trial: Trial) -> FitSettings:
        point = {h: UNUSED[h] if getattr(trial, h) is None else getattr(trial, h)
                 for h in HPARAMS}
        return cls(method=trial.method, seed=trial_seed(cfg, trial), train=cfg.train.model_copy(),
                   ikd=cfg.ikd.model_copy(), **point)

    @classmethod
    def for_teacher(cls, cfg: SweepConfig, seed: int) -> FitSettings:
        """The teacher's section's epochs, lr and batch size; the train section's optimizer,
        schedule, clipping and evaluation batch; no eval_every, max_steps or hidden loss."""
        t, tr = cfg.teacher, cfg.train
        train = TrainConfig(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                            eval_batch_size=tr.eval_batch_size, weight_decay=tr.weight_decay,
                            warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm,
                            log_every=tr.log_every)
        return cls(method="finetune", seed=trial_seed(cfg, seed), train=train)
