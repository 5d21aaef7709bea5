"""The sweep's vocabulary, one home for each name: metric keys, methods, phases, the swept
hyperparameters (and which method uses which) and the control rule.

The trainer, the recorder, the sweep, analysis, simulate and export import these; none of them
spells a metric, method, phase or hyperparameter name of its own. No imports beyond the standard
library, so every layer (the Ray-free trainer included) can read it.
"""

from __future__ import annotations

# Metric keys the trainer reports and the store keeps. `val` is the selection data (carved out
# of train), `dev` GLUE's dev set (reported only); `sel/*` is the run's checkpoint with the best
# VAL (its dev score is the run's result).
VAL, DEV = "val/main", "dev/main"
SEL_VAL, SEL_DEV, SEL_STEP = "sel/val_main", "sel/dev_main", "sel/step"
FINAL_DEV, BEST_DEV = "final/dev_main", "best/dev_main"
TEACHER_VAL, TEACHER_DEV = "teacher/val_main", "teacher/dev_main"
STARTUP = "sys/startup_s"
THREADS = "sys/threads"  # torch threads a trial trained with
# The dev score of always guessing the training rows' majority (`Task.majority_baseline`).
MAJORITY_DEV = "baseline/majority_dev_main"

# Methods a sweep file may name, in the report's order.
METHODS = ("finetune", "kd", "ikd")
# ikd with a teacher that never moves (teacher_lr 0): the report's control method, selected
# and confirmed apart from ikd.
CONTROL = "ikd-control"
METHOD_ORDER = (*METHODS, CONTROL)

# "search" (the settings being compared) or "confirm" (the selected setting re-run on fresh
# seeds from search.confirm_seeds); recorded as the tag ikd.phase.
SEARCH, CONFIRM = "search", "confirm"
PHASES = (SEARCH, CONFIRM)

HPARAMS = ("temperature", "exam_every", "teacher_lr")
# Which search hyperparameters each method uses; the others stay None (NaN in frames).
METHOD_HPARAMS: dict[str, tuple[str, ...]] = {
    "finetune": (),
    "kd": ("temperature",),
    "ikd": ("temperature", "exam_every", "teacher_lr"),
}


# The teacher_lr of the control: a teacher that never moves (not the end of a range).
CONTROL_TEACHER_LR = 0.0


def is_control(method: str, teacher_lr: float | None) -> bool:
    """The control rule: an ikd trial whose teacher_lr is CONTROL_TEACHER_LR."""
    return method == "ikd" and teacher_lr == CONTROL_TEACHER_LR


def method_label(method: str, teacher_lr: float | None) -> str:
    """The method a trial counts for in the report: `CONTROL` for ikd with teacher_lr 0."""
    return CONTROL if is_control(method, teacher_lr) else method


def base_method(label: str) -> str:
    """The method a report label trains with (`CONTROL` is an ikd trial)."""
    return "ikd" if label == CONTROL else label
