"""IKD exam step: the teacher's hypergradient through a one-step student lookahead.

    g = grad_{theta_s} L_course(theta_s; theta_t)                            (course batch)
    theta_s' = theta_s + c - P * g       (sgd: c = 0, P = lookahead_lr; adam: see below)
    L_exam(theta_t) = task_loss(student(theta_s'), y_exam)                   (exam/quiz batch)
    d L_exam / d theta_t = -(d g / d theta_t)^T (P * v),  v = grad L_exam(theta_s')

Lookaheads (DESIGN.md): `sgd` is MetaDistil's pilot step of size `lookahead_lr`. `adam` is one
step of the student's own AdamW from its current state (m, v, step t, the scheduler's lr_t,
weight decay per param group, and the trainer's gradient clipping), with the second moment
v' = b2*v + (1-b2)*g^2 and the clip coefficient held constant: a diagonal preconditioner
P = lr_t*(1-b1)/((1-b1^(t+1))*(sqrt(v'/(1-b2^(t+1))) + eps)) and a constant shift
c = -lr_t*wd*theta_s - lr_t*b1*m/((1-b1^(t+1))*(sqrt(v'/(1-b2^(t+1))) + eps)).

Estimators (see DESIGN.md): `exact` (double backward), `finite_difference` (first-order only,
central difference along P*v), `first_order` (Meta-Pseudo-Labels scalar feedback, biased;
classification only: the sweep config rejects it for regression tasks).

Dropout: every estimator draws three seeds from the global torch RNG and runs the teacher pass,
the student course passes and the student exam pass each under its own fixed seed (in a forked
RNG). So the lookahead and the finite-difference +/- passes see the same dropout masks, a call
is reproducible under `torch.manual_seed`, and with the same global RNG state (and the same
attention implementation) all estimators see the same masks. The course seed is returned, so
the trainer's real course step can use the very masks the lookahead used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ikd_sweep.config import IkdConfig
from ikd_sweep.distill.losses import course_loss, task_loss
from ikd_sweep.models import model_inputs

# The choices of the ikd section (config.py is their one home).
ESTIMATORS = get_args(IkdConfig.model_fields["estimator"].annotation)


@dataclass
class ExamResult:
    grads: dict[str, Tensor]  # teacher param name -> d L_exam / d theta_t (param dtype/device)
    exam_loss: Tensor  # detached scalar: L_exam at the lookahead student theta_s'
    # What the trainer's real course step can reuse (same batch, weights and dropout masks):
    course_grad: dict[str, Tensor]  # student param name -> g = grad L_course(theta_s) (detached)
    course_loss: Tensor  # detached scalar L_course(theta_s; theta_t)
    student_logits: Tensor  # detached student course logits at theta_s
    # Teacher course logits: attached to the teacher's graph if keep_teacher_graph, else detached.
    teacher_logits: Tensor
    lookahead_norm: Tensor  # float64 scalar: ||theta_s' - theta_s||
    course_seed: int  # the dropout seed of the student course passes


LOOKAHEADS = get_args(IkdConfig.model_fields["lookahead"].annotation)


class AdamLookahead:
    """The student's next AdamW step as theta' = theta + shift - P * g (v' and clip held fixed).

    Reads the optimizer's current state (exp_avg, exp_avg_sq, step) and each param group's lr,
    betas, eps and weight_decay; `max_grad_norm` is the trainer's clipping of g (its
    coefficient, like v', is a constant of the lookahead).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None):
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self.group = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
        if any(grp.get("amsgrad") or grp.get("maximize") for grp in optimizer.param_groups):
            raise ValueError("lookahead 'adam' models plain AdamW (no amsgrad, no maximize)")

    def __call__(self, params: list[Tensor], g: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(shift, P) for the student tensors `params` whose course gradient is `g`."""
        coef = 1.0
        if self.max_grad_norm:  # as torch.nn.utils.clip_grad_norm_
            norm = global_norm([gi.detach() for gi in g]).item()
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        shifts, precs = [], []
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                grp = self.group.get(id(p))
                if grp is None:
                    raise ValueError("lookahead 'adam': a student parameter is not in the "
                                     "optimizer it should mirror")
                st = self.optimizer.state.get(p, {})
                b1, b2 = grp["betas"]
                lr, eps, wd = float(grp["lr"]), grp["eps"], grp["weight_decay"]
                t = int(st["step"]) if "step" in st else 0
                m = st.get("exp_avg")
                v = st.get("exp_avg_sq")
                gc = gi.detach().to(p.dtype) * coef
                v1 = (1 - b2) * gc * gc if v is None else b2 * v + (1 - b2) * gc * gc
                bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                denom = v1.sqrt() / math.sqrt(bc2) + eps
                precs.append((lr * (1 - b1) * coef / bc1) / denom)
                shift = -lr * wd * p.detach()
                if m is not None:
                    shift = shift - (lr * b1 / bc1) * m / denom
                shifts.append(shift)
        return shifts, precs


def _forward(model: nn.Module, batch: Mapping[str, Tensor], hidden: bool, params=None):
    """Logits (and HF hidden_states if asked); `params` evaluates the model at other weights."""
    kw = {**model_inputs(batch), "output_hidden_states": hidden}
    out = model(**kw) if params is None else functional_call(model, params, (), kw)
    return out.logits, (out.hidden_states if hidden else None)


@contextlib.contextmanager
def seeded(seed: int, cuda_devices: list[int]) -> Iterator[None]:
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


def _grad(loss: Tensor, inputs, create_graph: bool = False,
          retain_graph: bool | None = None) -> list[Tensor]:
    """autograd.grad that leaves .grad alone and gives zeros where an input has no effect."""
    inputs = list(inputs)
    grads = [None] * len(inputs)
    if inputs and loss.requires_grad:
        grads = torch.autograd.grad(loss, inputs, create_graph=create_graph,
                                    retain_graph=retain_graph or None, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs, strict=True)]


def _full(x: Tensor) -> Tensor:
    """Logits in at least float32 (bf16 under autocast), as the trainer's losses take them."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _each(op, first: list[Tensor], *rest, **kw) -> list[Tensor]:
    """A torch._foreach_* op that also accepts empty lists (a student with nothing to train)."""
    return list(op(first, *rest, **kw)) if first else []


def global_norm(xs: list[Tensor]) -> Tensor:
    """Global L2 norm (float64 scalar, on the inputs' device) from per-tensor norms: no host
    sync and no float64 copies of the inputs."""
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([n.double() for n in torch._foreach_norm([x.detach() for x in xs])]).norm()


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """sum_i <a_i, b_i>, accumulated in float64 (one tensor pair at a time, to spare memory)."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b, strict=True):
        total = total + (x.double() * y.double()).sum()
    return total


def _ikd_knobs(ikd: IkdConfig | None, knobs: dict[str, Any]) -> IkdConfig:
    """The ikd section (its defaults when None) with `knobs` (its field names) put over it."""
    unknown = sorted(set(knobs) - set(IkdConfig.model_fields))
    if unknown:
        raise TypeError(f"exam_hypergradient: unknown ikd knobs {unknown}")
    k = (ikd or IkdConfig()).model_copy(update=knobs)
    if k.estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {k.estimator!r}; choose one of {ESTIMATORS}")
    if k.lookahead not in LOOKAHEADS:
        raise ValueError(f"unknown lookahead {k.lookahead!r}; choose one of {LOOKAHEADS}")
    return k


def exam_hypergradient(
    teacher: nn.Module,
    student: nn.Module,
    course_batch: Mapping[str, Tensor],
    exam_batch: Mapping[str, Tensor],
    *,
    temperature: float,
    alpha: float,
    ikd: IkdConfig | None = None,
    hidden_weight: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    max_grad_norm: float | None = None,
    keep_teacher_graph: bool = False,
    **knobs: Any,
) -> ExamResult:
    """d L_exam / d theta_t for every teacher parameter that requires grad.

    `ikd`: the sweep's ikd section (its defaults when None); `knobs` override its fields.
    `lookahead='adam'` needs the student's `optimizer` (AdamW, stepped by the caller) and the
    caller's `max_grad_norm`; `lookahead_lr` is then unused. `keep_teacher_graph` keeps the
    returned teacher logits attached to the teacher's graph (e.g. for a gold-label term).
    Leaves parameters, `.grad` and train/eval mode of both models as they were (autograd.grad,
    functional_call)."""
    k = _ikd_knobs(ikd, knobs)
    if k.lookahead == "adam" and optimizer is None:
        raise ValueError("lookahead 'adam' needs the student's optimizer (optimizer=...)")
    t_named = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
    t_params = [p for _, p in t_named]
    s_named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    # Leaf copies sharing storage: we differentiate w.r.t. them, so the student's .grad is spared.
    theta = {n: p.detach().requires_grad_() for n, p in s_named}
    hidden = hidden_weight > 0
    exact, seeds = k.estimator == "exact", torch.randint(0, 2**62, (3,)).tolist()
    devices = sorted({p.device.index or 0 for m in (teacher, student) for p in m.parameters()
                      if p.device.type == "cuda"})
    seed_t, seed_c, seed_e = seeds

    def l_course(s_out, t_out):
        # float logits, as the trainer's course step (bf16 autocast on CUDA)
        return course_loss(_full(s_out[0]), _full(t_out[0]), course_batch["labels"],
                           temperature=temperature, alpha=alpha, student_hidden=s_out[1],
                           teacher_hidden=t_out[1],
                           attention_mask=course_batch.get("attention_mask"),
                           hidden_weight=hidden_weight)

    def student_course(params):
        with seeded(seed_c, devices):  # same seed for every course pass -> same dropout masks
            return _forward(student, course_batch, hidden, params)

    attention = _eager_attention(teacher, student) if exact else contextlib.nullcontext()
    with attention, torch.enable_grad():
        # The teacher runs once, with grad: its course outputs are how theta_t enters.
        with seeded(seed_t, devices):
            t_out = _forward(teacher, course_batch, hidden)

        # Lookahead. Only `exact` differentiates through it; the others hold the teacher fixed.
        t_fixed = t_out if exact else (t_out[0].detach(),
                                       None if t_out[1] is None else [h.detach() for h in t_out[1]])
        s_out = student_course(theta)
        loss_c = l_course(s_out, t_fixed)
        g = _grad(loss_c, theta.values(), create_graph=exact)
        prec, step, theta1 = _lookahead(k, exact, theta, g, [p for _, p in s_named], optimizer,
                                        max_grad_norm)
        with seeded(seed_e, devices):
            e_logits, _ = _forward(student, exam_batch, False, theta1)
        exam_loss = task_loss(_full(e_logits), exam_batch["labels"])
        grads = _teacher_grads(k, exam_loss, theta, theta1, g, prec, t_out, t_params,
                               temperature, keep_teacher_graph, l_course, student_course)
        with torch.no_grad():
            step_norm = global_norm(step)
    return ExamResult(
        grads={n: gr.detach() for (n, _), gr in zip(t_named, grads, strict=True)},
        exam_loss=exam_loss.detach(),
        course_grad={n: gi.detach() for (n, _), gi in zip(s_named, g, strict=True)},
        course_loss=loss_c.detach(),
        student_logits=s_out[0].detach(),
        teacher_logits=t_out[0] if keep_teacher_graph else t_out[0].detach(),
        lookahead_norm=step_norm.detach(),
        course_seed=seed_c,
    )


def _lookahead(k: IkdConfig, exact: bool, theta: dict[str, Tensor], g: list[Tensor],
               params: list[Tensor], optimizer: torch.optim.Optimizer | None,
               max_grad_norm: float | None):
    """The lookahead student theta_s' = theta_s + shift - P * g: (P or None for sgd, the step,
    theta_s'); differentiable in theta_t through g only for `exact`."""
    sgd, lr = k.lookahead == "sgd", k.lookahead_lr
    if sgd:  # P = lookahead_lr everywhere, no shift
        shift, prec = None, None
    else:
        shift, prec = AdamLookahead(optimizer, max_grad_norm)(params, g)
    base = list(theta.values())
    if exact:  # differentiable in theta_t through g
        step = ([-lr * gi for gi in g] if sgd else
                [sh - pr * gi for sh, pr, gi in zip(shift, prec, g, strict=True)])
        theta1 = dict(zip(theta, [p + st for p, st in zip(base, step, strict=True)],
                          strict=True))
    else:  # constants: fused foreach ops, no graph
        with torch.no_grad():
            step = (_each(torch._foreach_mul, g, -lr) if sgd else
                    _each(torch._foreach_sub, shift, _each(torch._foreach_mul, prec, g)))
            theta1 = {n: p.requires_grad_() for n, p
                      in zip(theta, _each(torch._foreach_add, base, step), strict=True)}
    return prec, step, theta1


def _teacher_grads(k: IkdConfig, exam_loss: Tensor, theta: dict[str, Tensor],
                   theta1: dict[str, Tensor], g: list[Tensor], prec: list[Tensor] | None,
                   t_out, t_params: list[Tensor], temperature: float, keep: bool,
                   l_course, student_course) -> list[Tensor]:
    """d L_exam / d theta_t by the estimator `k.estimator` (see the module doc)."""
    if k.estimator == "exact":
        return _grad(exam_loss, t_params, retain_graph=keep)
    v = _grad(exam_loss, theta1.values())  # v = grad L_exam(theta_s')
    # u = P * v; for sgd kept as v with the scalar lookahead_lr folded in below
    sgd = k.lookahead == "sgd"
    u, scale = (v, k.lookahead_lr) if sgd else (_each(torch._foreach_mul, prec, v), 1.0)
    if k.estimator == "first_order":
        return _first_order(t_out[0], g, u, scale, temperature, t_params, keep)
    if (unorm := scale * global_norm(u).item()) == 0:
        return [torch.zeros_like(p) for p in t_params]
    eps = k.fd_epsilon / unorm  # theta_s +/- eps * P * v moves fd_epsilon
    base = list(theta.values())
    with torch.no_grad():  # student outputs at those points: constants
        s_pm = [student_course(dict(zip(theta, _each(
            torch._foreach_add, base, u, alpha=sign * eps * scale), strict=True)))
                for sign in (1.0, -1.0)]
    # One backward into the teacher; the gold-label term has no theta_t in it.
    diff = l_course(s_pm[0], t_out) - l_course(s_pm[1], t_out)
    return _grad(diff * (-1 / (2 * eps)), t_params, retain_graph=keep)


def _first_order(t_logits, g, u, scale, temperature, t_params, retain_graph):
    """Meta-Pseudo-Labels feedback: h * grad CE(t/T, argmax t), h = g . (P * v).

    h is the first-order predicted decrease of L_exam from the teacher-dependent part of the
    lookahead step (lr * g.v for sgd): with h > 0 a descent step makes the teacher more
    confident in its own pseudo-labels, with h < 0 less.
    """
    h = _dot(g, u) * scale
    loss = F.cross_entropy(_full(t_logits) / temperature, t_logits.argmax(-1))
    return [gr * h.to(gr) for gr in _grad(loss, t_params, retain_graph=retain_graph)]

