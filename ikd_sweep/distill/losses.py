"""Distillation losses: task loss, Hinton KD, intermediate-layer (hidden-state) KD, course loss.

Regression tasks (STS-B) have one output (`num_labels == 1`): MSE replaces CE and KL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def is_regression(logits: Tensor) -> bool:
    """A model with one output is a regressor (HF convention for `num_labels == 1`)."""
    return logits.shape[-1] == 1


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Gold-label loss: CE (mean over the batch), or MSE for regression."""
    if is_regression(logits):
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.long())


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over batch.

    The T^2 keeps the gradient scale independent of T. Regression: MSE(s, t), T unused.
    """
    if is_regression(student_logits):
        return F.mse_loss(student_logits, teacher_logits)
    t = temperature
    log_ps = F.log_softmax(student_logits / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits / t, dim=-1)
    return t * t * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def hidden_state_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    attention_mask: Tensor | None,
) -> Tensor:
    """Intermediate-layer KD (PKD-style uniform mapping), MSE over non-pad tokens.

    Takes HF `hidden_states` tuples: embedding output first, then one tensor per layer (the
    embedding entry is not matched). Student layer i (1-based) is matched to teacher layer
    round(i * Lt / Ls) (half up), so the last layers always meet; the loss is averaged over
    the student's layers.
    """
    ls, lt = len(student_hidden) - 1, len(teacher_hidden) - 1
    if ls < 1 or lt < 1:
        raise ValueError(
            "hidden_state_loss takes HF hidden_states tuples (embeddings + one per layer); "
            f"got {ls + 1} student and {lt + 1} teacher entries"
        )
    ds, dt = student_hidden[-1].shape[-1], teacher_hidden[-1].shape[-1]
    if ds != dt:
        raise ValueError(
            f"hidden_state_loss needs equal hidden sizes; got {ds} vs {dt} (student vs "
            "teacher). Use hidden_weight=0 or a student with the teacher's hidden size."
        )
    h = student_hidden[-1]
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:-1], device=h.device)
    mask = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, L, 1): pads contribute nothing
    denom = mask.sum() * ds
    losses = []
    for i in range(1, ls + 1):
        j = (2 * i * lt + ls) // (2 * ls)  # round(i * lt / ls), half up, in integers
        diff = student_hidden[i] - teacher_hidden[j]
        losses.append((diff.pow(2) * mask).sum() / denom)
    return torch.stack(losses).mean()


def course_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    student_hidden: Sequence[Tensor] | None = None,
    teacher_hidden: Sequence[Tensor] | None = None,
    attention_mask: Tensor | None = None,
    hidden_weight: float = 0.0,
) -> Tensor:
    """L_course = alpha*KD + (1-alpha)*task (+ hidden_weight * hidden-state KD).

    Terms with zero weight are skipped, so e.g. alpha=1 needs no meaningful labels.
    """
    loss = student_logits.new_zeros(())
    if alpha != 0:
        loss = loss + alpha * kd_loss(student_logits, teacher_logits, temperature)
    if alpha != 1:
        loss = loss + (1 - alpha) * task_loss(student_logits, labels)
    if hidden_weight > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError(
                "hidden_weight > 0 needs student_hidden and teacher_hidden "
                "(call the models with output_hidden_states=True)"
            )
        hs = hidden_state_loss(student_hidden, teacher_hidden, attention_mask)
        loss = loss + hidden_weight * hs
    return loss
