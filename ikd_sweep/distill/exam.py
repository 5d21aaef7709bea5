"""IKD exam step: the teacher's hypergradient through a one-step student lookahead.

    theta_s' = theta_s - lr * grad_{theta_s} L_course(theta_s; theta_t)      (course batch)
    L_exam(theta_t) = task_loss(student(theta_s'), y_exam)                   (exam/quiz batch)
    d L_exam / d theta_t = -lr * d2 L_course / (d theta_t d theta_s) . v,  v = grad L_exam(theta_s')

Estimators (see DESIGN.md): `exact` (double backward), `finite_difference` (first-order only,
central difference along v), `first_order` (Meta-Pseudo-Labels scalar feedback, biased;
classification only: the sweep config rejects it for regression tasks).

Dropout: every estimator draws three seeds from the global torch RNG and runs the teacher pass,
the student course passes and the student exam pass each under its own fixed seed (in a forked
RNG). So the lookahead and the finite-difference +/- passes see the same dropout masks, a call
is reproducible under `torch.manual_seed`, and with the same global RNG state (and the same
attention implementation) all estimators see the same masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ikd_sweep.distill.losses import course_loss, task_loss
from ikd_sweep.models import model_inputs

ESTIMATORS = ("exact", "finite_difference", "first_order")


@dataclass
class ExamResult:
    grads: dict[str, Tensor]  # teacher param name -> d L_exam / d theta_t (param dtype/device)
    exam_loss: Tensor  # detached scalar: L_exam at the lookahead student theta_s'


def _forward(model: nn.Module, batch: Mapping[str, Tensor], hidden: bool, params=None):
    """Logits (and HF hidden_states if asked); `params` evaluates the model at other weights."""
    kw = {**model_inputs(batch), "output_hidden_states": hidden}
    out = model(**kw) if params is None else functional_call(model, params, (), kw)
    return out.logits, (out.hidden_states if hidden else None)


@contextlib.contextmanager
def _seeded(seed: int, cuda_devices: list[int]) -> Iterator[None]:
    """Run under a fixed seed (same seed -> same dropout masks); the caller's RNG is restored."""
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        for d in cuda_devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _eager_attention(*models: nn.Module) -> Iterator[None]:
    """`exact` needs a double backward, which SDPA/flash attention kernels lack; eager has it."""
    saved = []
    try:
        for m in models:
            prev = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if prev == "eager":
                continue
            why = ("the exact estimator needs eager attention (SDPA/flash attention have no double "
                   f"backward), but {type(m).__name__} (attention {prev!r}) cannot switch to it")
            if prev is None or not hasattr(m, "set_attn_implementation"):
                raise RuntimeError(f"{why}: it is not a transformers model. "
                                   "Use estimator='finite_difference'.")
            saved.append((m, prev))
            try:
                m.set_attn_implementation("eager")
            except Exception as e:
                raise RuntimeError(f"{why}: {e}. Use estimator='finite_difference'.") from e
            if m.config._attn_implementation != "eager":
                raise RuntimeError(f"{why}: its attention is not switchable at run time. "
                                   "Load it with attn_implementation='eager' or use "
                                   "estimator='finite_difference'.")
        yield
    finally:
        for m, prev in reversed(saved):
            m.set_attn_implementation(prev)


def _grad(loss: Tensor, inputs, create_graph: bool = False) -> list[Tensor]:
    """autograd.grad that leaves .grad alone and gives zeros where an input has no effect."""
    inputs = list(inputs)
    grads = [None] * len(inputs)
    if inputs and loss.requires_grad:
        grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs, strict=True)]


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """sum_i <a_i, b_i>, accumulated in float64 (one tensor pair at a time, to spare memory)."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b, strict=True):
        total = total + (x.double() * y.double()).sum()
    return total


def exam_hypergradient(
    teacher: nn.Module,
    student: nn.Module,
    course_batch: Mapping[str, Tensor],
    exam_batch: Mapping[str, Tensor],
    *,
    temperature: float,
    alpha: float,
    lookahead_lr: float,
    estimator: str = "finite_difference",
    hidden_weight: float = 0.0,
    fd_epsilon: float = 0.01,
) -> ExamResult:
    """d L_exam / d theta_t for every teacher parameter that requires grad.

    Leaves parameters, `.grad` and train/eval mode of both models as they were (gradients are
    taken with `torch.autograd.grad`, the student is evaluated with `functional_call`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    t_named = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
    t_params = [p for _, p in t_named]
    # Leaf copies sharing storage: we differentiate w.r.t. them, so the student's .grad is spared.
    theta = {n: p.detach().requires_grad_() for n, p in student.named_parameters()
             if p.requires_grad}
    hidden = hidden_weight > 0
    exact = estimator == "exact"
    devices = sorted({p.device.index or 0 for m in (teacher, student) for p in m.parameters()
                      if p.device.type == "cuda"})
    seed_t, seed_c, seed_e = torch.randint(0, 2**62, (3,)).tolist()

    def l_course(s_out, t_out):
        return course_loss(s_out[0], t_out[0], course_batch["labels"], temperature=temperature,
                           alpha=alpha, student_hidden=s_out[1], teacher_hidden=t_out[1],
                           attention_mask=course_batch.get("attention_mask"),
                           hidden_weight=hidden_weight)

    def student_course(params):
        with _seeded(seed_c, devices):  # same seed for every course pass -> same dropout masks
            return _forward(student, course_batch, hidden, params)

    attention = _eager_attention(teacher, student) if exact else contextlib.nullcontext()
    with attention, torch.enable_grad():
        # The teacher runs once, with grad: its course outputs are how theta_t enters.
        with _seeded(seed_t, devices):
            t_out = _forward(teacher, course_batch, hidden)

        # Lookahead. Only `exact` differentiates through it; the others hold the teacher fixed.
        t_fixed = t_out if exact else (t_out[0].detach(),
                                       None if t_out[1] is None else [h.detach() for h in t_out[1]])
        g = _grad(l_course(student_course(theta), t_fixed), theta.values(), create_graph=exact)
        theta1 = {n: p - lookahead_lr * gi for (n, p), gi in zip(theta.items(), g, strict=True)}
        if not exact:
            theta1 = {n: p.detach().requires_grad_() for n, p in theta1.items()}
        with _seeded(seed_e, devices):
            e_logits, _ = _forward(student, exam_batch, False, theta1)
        exam_loss = task_loss(e_logits, exam_batch["labels"])

        v = None if exact else _grad(exam_loss, theta1.values())  # v = grad L_exam(theta_s')
        if exact:
            grads = _grad(exam_loss, t_params)
        elif estimator == "first_order":
            grads = _first_order(t_out[0], g, v, temperature, lookahead_lr, t_params)
        elif (vnorm := _dot(v, v).sqrt().item()) == 0:
            grads = [torch.zeros_like(p) for p in t_params]
        else:
            eps = fd_epsilon / vnorm
            with torch.no_grad():  # student outputs at theta_s +/- eps v: constants w.r.t. theta_t
                s_pm = [student_course({n: p + sign * eps * vi for (n, p), vi
                                        in zip(theta.items(), v, strict=True)})
                        for sign in (1.0, -1.0)]
            # One backward into the teacher; the gold-label term has no theta_t in it.
            diff = l_course(s_pm[0], t_out) - l_course(s_pm[1], t_out)
            grads = [gr * (-lookahead_lr / (2 * eps)) for gr in _grad(diff, t_params)]
    return ExamResult({n: gr.detach() for (n, _), gr in zip(t_named, grads, strict=True)},
                      exam_loss.detach())


def _first_order(t_logits, g, v, temperature, lookahead_lr, t_params):
    """Meta-Pseudo-Labels feedback: h * grad CE(t/T, argmax t), h = lr * g.v.

    h is the first-order predicted decrease of L_exam from the course step: with h > 0 a
    descent step makes the teacher more confident in its own pseudo-labels, with h < 0 less.
    """
    h = lookahead_lr * _dot(g, v)
    loss = F.cross_entropy(t_logits / temperature, t_logits.argmax(-1))
    return [gr * h.to(gr) for gr in _grad(loss, t_params)]
