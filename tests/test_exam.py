"""Exam-step hypergradient: each estimator against a brute-force finite difference."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification

from ikd_sweep.distill.exam import ESTIMATORS, AdamLookahead, exam_hypergradient
from ikd_sweep.distill.losses import course_loss, task_loss

KW = dict(temperature=2.0, alpha=0.7, lookahead_lr=0.5)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def make_model(num_labels, hidden=16, layers=2, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=num_labels,
        initializer_range=0.2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(cfg).double().eval()


def make_batch(num_labels, seed, b=4, seq=8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[0, 5:] = 0  # some padding
    mask[1, 6:] = 0
    ids = torch.randint(1, 100, (b, seq), generator=g) * mask
    token_type_ids = (torch.arange(seq) >= seq // 2).long().expand(b, seq) * mask
    if num_labels == 1:
        labels = torch.rand(b, generator=g, dtype=torch.float64) * 5
    else:
        labels = torch.randint(0, num_labels, (b,), generator=g)
    # `idx` is not a model input: the exam step must not pass it to the models.
    return dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=token_type_ids,
        labels=labels,
        idx=torch.arange(b),
    )


def setup(num_labels=3, hidden_weight=0.0):
    if hidden_weight > 0:  # hidden-state KD needs equal widths; depths may differ
        teacher, student = make_model(num_labels, 16, 3, seed=1), make_model(num_labels, 16, 2)
    else:
        teacher, student = make_model(num_labels, 32, 2, seed=1), make_model(num_labels, 16, 2)
    return teacher, student, make_batch(num_labels, 0), make_batch(num_labels, 1)


def exam_loss_plain(teacher, student, course, exam, hidden_weight=0.0):
    """L_exam by plain first-order autograd: one SGD step of the student, then the exam loss."""
    hid = hidden_weight > 0
    inputs = {k: course[k] for k in INPUTS}
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=hid)
    theta = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    s = functional_call(student, theta, (), dict(inputs, output_hidden_states=hid))
    lc = course_loss(
        s.logits,
        t.logits,
        course["labels"],
        temperature=KW["temperature"],
        alpha=KW["alpha"],
        student_hidden=s.hidden_states,
        teacher_hidden=t.hidden_states,
        attention_mask=course["attention_mask"],
        hidden_weight=hidden_weight,
    )
    grads = torch.autograd.grad(lc, list(theta.values()))
    theta1 = {
        n: p.detach() - KW["lookahead_lr"] * g
        for (n, p), g in zip(theta.items(), grads, strict=True)
    }
    with torch.no_grad():
        e = functional_call(student, theta1, (), {k: exam[k] for k in INPUTS})
    return task_loss(e.logits, exam["labels"]).item()


def brute_force(teacher, student, course, exam, name, idx, h=1e-5, hidden_weight=0.0):
    """Central difference of L_exam w.r.t. one scalar teacher weight."""
    p = dict(teacher.named_parameters())[name]
    old = p[idx].item()
    losses = []
    for x in (old + h, old - h):
        with torch.no_grad():
            p[idx] = x
        losses.append(exam_loss_plain(teacher, student, course, exam, hidden_weight))
    with torch.no_grad():
        p[idx] = old
    return (losses[0] - losses[1]) / (2 * h)


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def cosine(a, b):
    return F.cosine_similarity(flat(a), flat(b), dim=0).item()


CHECKED = [
    "classifier.weight",
    "bert.pooler.dense.bias",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.1.output.dense.weight",
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
]


@pytest.mark.parametrize("num_labels, hidden_weight", [(3, 0.0), (1, 0.0), (3, 0.5)])
def test_exact_and_fd_match_brute_force(num_labels, hidden_weight):
    teacher, student, course, exam = setup(num_labels, hidden_weight)
    kw = dict(KW, hidden_weight=hidden_weight)
    exact = exam_hypergradient(teacher, student, course, exam, estimator="exact", **kw)
    fd = exam_hypergradient(teacher, student, course, exam, estimator="finite_difference", **kw)
    assert exact.exam_loss.item() == pytest.approx(
        exam_loss_plain(teacher, student, course, exam, hidden_weight), rel=1e-12
    )
    assert fd.exam_loss.item() == pytest.approx(exact.exam_loss.item(), rel=1e-12)
    assert set(exact.grads) == {n for n, _ in teacher.named_parameters()}
    assert cosine(exact.grads, fd.grads) > 0.999
    for name in CHECKED:
        idx = tuple(
            int(i)
            for i in torch.unravel_index(exact.grads[name].abs().argmax(), exact.grads[name].shape)
        )
        want = brute_force(teacher, student, course, exam, name, idx, hidden_weight=hidden_weight)
        assert abs(want) > 1e-6, f"{name}: uninformative weight"
        assert exact.grads[name][idx].item() == pytest.approx(want, rel=1e-4), name
        assert fd.grads[name][idx].item() == pytest.approx(want, rel=1e-3), name


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_models_untouched(estimator):
    teacher, student, course, exam = setup()
    teacher.train()  # mode must survive (dropout is 0, so nothing random happens)
    before = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in (teacher, student)}
    teacher.classifier.weight.grad = torch.ones_like(teacher.classifier.weight)
    student.classifier.bias.grad = torch.full_like(student.classifier.bias, 3.0)
    grads = exam_hypergradient(teacher, student, course, exam, estimator=estimator, **KW).grads
    assert flat(grads).abs().sum() > 0
    for m in (teacher, student):
        after = m.state_dict()
        assert all(torch.equal(before[m][k], after[k]) for k in after)
        assert m.config._attn_implementation == "sdpa"
    assert teacher.training and not student.training
    assert torch.equal(teacher.classifier.weight.grad, torch.ones_like(teacher.classifier.weight))
    assert torch.equal(student.classifier.bias.grad, torch.full_like(student.classifier.bias, 3.0))
    for m, keep in ((teacher, "classifier.weight"), (student, "classifier.bias")):
        assert all(p.grad is None for n, p in m.named_parameters() if n != keep)
    for g, (_, p) in zip(grads.values(), teacher.named_parameters(), strict=True):
        assert g.dtype == p.dtype and g.device == p.device and g.shape == p.shape


def test_exact_restores_attention_on_error():
    teacher, student, course, exam = setup()
    exam = {k: v for k, v in exam.items() if k != "labels"}
    with pytest.raises(KeyError):
        exam_hypergradient(teacher, student, course, exam, estimator="exact", **KW)
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"


def test_exact_needs_switchable_attention():
    teacher, student, course, exam = setup()
    student.set_attn_implementation = lambda *a, **k: None  # a model that silently cannot switch
    with pytest.raises(RuntimeError, match="double backward"):
        exam_hypergradient(teacher, student, course, exam, estimator="exact", **KW)
    assert teacher.config._attn_implementation == "sdpa"  # switched first, then restored


def test_zero_feedback_gives_zeros():
    teacher, student, course, exam = setup()
    for p in student.parameters():  # nothing to look ahead with: v = 0
        p.requires_grad_(False)
    grads = exam_hypergradient(teacher, student, course, exam, **KW).grads
    assert flat(grads).abs().sum() == 0


# --- dropout --------------------------------------------------------------------------------


def dropout_setup(p, eager):
    teacher, student = make_model(3, 32, 2, seed=1, dropout=p), make_model(3, 16, 2, dropout=p)
    if eager:  # eager and SDPA draw attention-dropout masks differently; compare like with like
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")
    return teacher.train(), student.train(), make_batch(3, 0), make_batch(3, 1)


def hyper(seed, *args, **kw):
    torch.manual_seed(seed)
    return exam_hypergradient(*args, **KW, **kw)


def test_fd_under_dropout_is_reproducible_and_random():
    teacher, student, course, exam = dropout_setup(0.1, eager=False)
    a, b, c = (hyper(s, teacher, student, course, exam) for s in (7, 7, 8))
    assert torch.equal(flat(a.grads), flat(b.grads)) and a.exam_loss == b.exam_loss
    assert not torch.equal(flat(a.grads), flat(c.grads))  # dropout really is active


def test_fd_matches_exact_under_dropout():
    # Both estimators see the same masks (same global seed, same attention kernels), so the
    # finite difference must agree with the exact derivative of that same stochastic function.
    # Without matched masks between the lookahead and the +/- passes this would be pure noise.
    teacher, student, course, exam = dropout_setup(0.1, eager=True)
    exact = hyper(3, teacher, student, course, exam, estimator="exact")
    fd = hyper(3, teacher, student, course, exam, estimator="finite_difference")
    assert fd.exam_loss.item() == pytest.approx(exact.exam_loss.item(), rel=1e-12)
    assert cosine(exact.grads, fd.grads) > 0.999
    no_drop = exam_hypergradient(*setup(), **KW)
    assert cosine(fd.grads, no_drop.grads) < 0.999  # the masks did change the answer


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_train_mode_without_dropout_equals_eval(estimator):
    t_train, s_train, course, exam = dropout_setup(0.0, eager=False)
    t_eval, s_eval, _, _ = setup()
    a = hyper(0, t_train, s_train, course, exam, estimator=estimator)
    b = hyper(0, t_eval, s_eval, course, exam, estimator=estimator)
    assert torch.allclose(flat(a.grads), flat(b.grads), rtol=1e-10, atol=1e-14)


# --- first_order ----------------------------------------------------------------------------


def first_order_by_hand(teacher, student, course, exam, temperature, alpha, lookahead_lr):
    """h = lr * g_s . v and h * grad_t CE(t/T, argmax t), spelled out."""
    inputs = {k: course[k] for k in INPUTS}
    t_logits = teacher(**inputs).logits
    theta = {n: p.detach().clone().requires_grad_() for n, p in student.named_parameters()}
    s_logits = functional_call(student, theta, (), inputs).logits
    lc = course_loss(
        s_logits, t_logits.detach(), course["labels"], temperature=temperature, alpha=alpha
    )
    g = torch.autograd.grad(lc, list(theta.values()))
    theta1 = {
        n: (p - lookahead_lr * gi).detach().requires_grad_()
        for (n, p), gi in zip(theta.items(), g, strict=True)
    }
    e_logits = functional_call(student, theta1, (), {k: exam[k] for k in INPUTS}).logits
    v = torch.autograd.grad(task_loss(e_logits, exam["labels"]), list(theta1.values()))
    h = lookahead_lr * sum((a * b).sum() for a, b in zip(g, v, strict=True))
    ce = F.cross_entropy(t_logits / temperature, t_logits.argmax(-1))
    names, params = zip(*teacher.named_parameters(), strict=True)
    gt = torch.autograd.grad(ce, params)
    return h.item(), {n: h * x for n, x in zip(names, gt, strict=True)}


def test_first_order_is_scaled_pseudo_label_gradient():
    teacher, student, course, exam = setup()
    h, want = first_order_by_hand(teacher, student, course, exam, **KW)
    got = exam_hypergradient(teacher, student, course, exam, estimator="first_order", **KW).grads
    assert h != 0
    assert torch.allclose(flat(got), flat(want), rtol=1e-10, atol=1e-15)


def test_first_order_sign_follows_feedback():
    # One example, alpha=0 (course = gold CE), 2 classes: an exam on the same input with the
    # same label agrees with the course step (h > 0); with the flipped label it disagrees (h < 0).
    teacher, student = make_model(2, 32, 2, seed=1), make_model(2, 16, 2)
    course = {k: v[:1] for k, v in make_batch(2, 0).items()}
    flipped = dict(course, labels=1 - course["labels"])
    kw = dict(KW, alpha=0.0, lookahead_lr=0.1)
    t_logits = teacher(**{k: course[k] for k in INPUTS}).logits
    pseudo = t_logits.argmax(-1)

    def confidence_after_step(grads):
        params = {n: p.detach() - 1e-2 * grads[n] for n, p in teacher.named_parameters()}
        logits = functional_call(teacher, params, (), {k: course[k] for k in INPUTS}).logits
        return logits.softmax(-1)[0, pseudo[0]].item()

    conf0 = t_logits.softmax(-1)[0, pseudo[0]].item()
    results = {}
    for name, exam in (("agree", course), ("disagree", flipped)):
        h, _ = first_order_by_hand(teacher, student, course, exam, **kw)
        grads = exam_hypergradient(teacher, student, course, exam, estimator="first_order",
                                   **kw).grads
        results[name] = (h, grads, confidence_after_step(grads))
    (h_pos, g_pos, conf_pos), (h_neg, g_neg, conf_neg) = results["agree"], results["disagree"]
    assert h_pos > 0 > h_neg
    assert cosine(g_pos, g_neg) == pytest.approx(-1.0, abs=1e-9)  # same direction, sign of h
    assert conf_pos > conf0 > conf_neg  # helped -> more confident; hurt -> less


def first_order_vs_exact_cosine(seed=0):
    """Cosine between first_order and exact on the small classification example."""
    teacher, student = make_model(3, 32, 2, seed=1 + seed), make_model(3, 16, 2, seed=seed)
    course, exam = make_batch(3, 2 * seed), make_batch(3, 2 * seed + 1)
    fo = exam_hypergradient(teacher, student, course, exam, estimator="first_order", **KW).grads
    ex = exam_hypergradient(teacher, student, course, exam, estimator="exact", **KW).grads
    return cosine(fo, ex)


def test_report_first_order_vs_exact_cosine():
    values = [first_order_vs_exact_cosine(s) for s in range(3)]
    print(f"\nfirst_order vs exact cosine (3 seeds): {[round(v, 4) for v in values]}")
    assert all(-1.0 <= v <= 1.0 for v in values)  # biased by design: reported, not asserted


# --- errors ---------------------------------------------------------------------------------


def test_unknown_estimator():
    teacher, student, course, exam = setup()
    with pytest.raises(ValueError, match="exact.*finite_difference.*first_order"):
        exam_hypergradient(teacher, student, course, exam, estimator="hessian", **KW)


# --- lookahead: adam (the student's own AdamW step, second moment and clip held fixed) ------


def warm_adamw(student, lr=0.02, wd=0.1, steps=2, seed=5, fused=None):
    """The trainer's AdamW (decay / no-decay groups) after a few steps, at a scheduled lr."""
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3,
        fused=fused,
    )
    g = torch.Generator().manual_seed(seed)
    saved = {n: p.detach().clone() for n, p in student.named_parameters()}
    for _ in range(steps):  # random gradients: only the optimizer state matters here
        for p in student.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01
        opt.step()
    with torch.no_grad():  # back to the original weights, keeping m, v and t
        for n, p in student.named_parameters():
            p.copy_(saved[n])
            p.grad = None
    for grp in opt.param_groups:
        grp["lr"] = lr  # as a scheduler would set it
    return opt


def course_grad(teacher, student, course):
    inputs = {k: course[k] for k in INPUTS}
    with torch.no_grad():
        t = teacher(**inputs).logits
    names, params = zip(*student.named_parameters(), strict=True)
    theta = {n: p.detach().clone().requires_grad_() for n, p in zip(names, params, strict=True)}
    s = functional_call(student, theta, (), inputs).logits
    lc = course_loss(s, t, course["labels"], temperature=KW["temperature"], alpha=KW["alpha"])
    return list(torch.autograd.grad(lc, list(theta.values())))


def adam_exam_loss(teacher, student, course, exam, shift, prec):
    """L_exam after theta' = theta + shift - P * g(theta_t), shift and P fixed (brute force)."""
    g = course_grad(teacher, student, course)
    theta1 = {
        n: p.detach() + sh - pr * gi
        for (n, p), sh, pr, gi in zip(student.named_parameters(), shift, prec, g, strict=True)
    }
    with torch.no_grad():
        e = functional_call(student, theta1, (), {k: exam[k] for k in INPUTS})
    return task_loss(e.logits, exam["labels"]).item()


@pytest.mark.parametrize("fused", [None, True])  # the trainer's AdamW is fused on every device
@pytest.mark.parametrize("num_labels", [3, 1])
def test_adam_lookahead_matches_real_adamw_step_and_brute_force(num_labels, fused):
    teacher, student, course, exam = setup(num_labels)
    opt = warm_adamw(student, fused=fused)
    params = list(student.parameters())
    g = course_grad(teacher, student, course)
    clip = 0.5 * torch.cat([x.flatten() for x in g]).norm().item()  # clipping is active
    shift, prec = AdamLookahead(opt, clip)(params, g)

    # The lookahead is the step AdamW really takes (on a copy of student and optimizer).
    s2, opt2 = copy.deepcopy((student, opt))
    for p, gi in zip(s2.parameters(), g, strict=True):
        p.grad = gi.clone()
    torch.nn.utils.clip_grad_norm_(s2.parameters(), clip)
    opt2.step()
    for p, p2, sh, pr, gi in zip(params, s2.parameters(), shift, prec, g, strict=True):
        assert torch.allclose(p.detach() + sh - pr * gi, p2.detach(), rtol=1e-12, atol=1e-15)

    kw = dict(KW, lookahead="adam", optimizer=opt, max_grad_norm=clip)
    exact = exam_hypergradient(teacher, student, course, exam, estimator="exact", **kw)
    fd = exam_hypergradient(teacher, student, course, exam, estimator="finite_difference", **kw)
    pairs = zip(params, s2.parameters(), strict=True)
    real_step = torch.cat([(p2 - p).detach().flatten() for p, p2 in pairs])
    assert exact.lookahead_norm.item() == pytest.approx(real_step.norm().item(), rel=1e-10)
    assert exact.exam_loss.item() == pytest.approx(
        adam_exam_loss(teacher, student, course, exam, shift, prec), rel=1e-12
    )
    assert cosine(exact.grads, fd.grads) >= 0.999

    # float64 brute force: a random direction through all teacher weights, and single weights
    tp = dict(teacher.named_parameters())
    gen = torch.Generator().manual_seed(11)
    d = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in tp.items()}
    h = 1e-6

    def loss_at(step):
        with torch.no_grad():
            for n, p in tp.items():
                p += step * d[n]
        out = adam_exam_loss(teacher, student, course, exam, shift, prec)
        with torch.no_grad():
            for n, p in tp.items():
                p -= step * d[n]
        return out

    want = (loss_at(h) - loss_at(-h)) / (2 * h)
    got = sum((exact.grads[n] * d[n]).sum() for n in tp).item()
    assert abs(want) > 1e-6
    assert got == pytest.approx(want, rel=1e-6)
    for name in CHECKED:
        idx = tuple(
            int(i)
            for i in torch.unravel_index(exact.grads[name].abs().argmax(), exact.grads[name].shape)
        )
        old = tp[name][idx].item()
        losses = []
        for x in (old + h, old - h):
            with torch.no_grad():
                tp[name][idx] = x
            losses.append(adam_exam_loss(teacher, student, course, exam, shift, prec))
        with torch.no_grad():
            tp[name][idx] = old
        want = (losses[0] - losses[1]) / (2 * h)
        assert abs(want) > 1e-7, f"{name}: uninformative weight"
        assert exact.grads[name][idx].item() == pytest.approx(want, rel=1e-6), name


def test_adam_lookahead_on_a_fresh_optimizer_is_sign_like_and_sgd_unchanged():
    teacher, student, course, exam = setup()
    opt = torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=0.0)  # t = 0, no state
    res = exam_hypergradient(
        teacher, student, course, exam, **dict(KW, lookahead="adam", optimizer=opt)
    )
    g = course_grad(teacher, student, course)
    # First AdamW step: lr * g / (|g| + eps), elementwise.
    step = torch.cat([(0.01 * gi / (gi.abs() + 1e-8)).flatten() for gi in g])
    assert res.lookahead_norm.item() == pytest.approx(step.norm().item(), rel=1e-9)
    # sgd stays MetaDistil's plain step of lookahead_lr
    sgd = exam_hypergradient(teacher, student, course, exam, **KW)
    want = KW["lookahead_lr"] * torch.cat([gi.flatten() for gi in g]).norm().item()
    assert sgd.lookahead_norm.item() == pytest.approx(want, rel=1e-12)
    assert all(torch.equal(sgd.course_grad[n], res.course_grad[n]) for n in sgd.course_grad)


def test_adam_lookahead_needs_the_optimizer():
    teacher, student, course, exam = setup()
    with pytest.raises(ValueError, match="needs the student's optimizer"):
        exam_hypergradient(teacher, student, course, exam, lookahead="adam", **KW)
    with pytest.raises(ValueError, match="sgd.*adam"):
        exam_hypergradient(teacher, student, course, exam, lookahead="lbfgs", **KW)


def test_first_order_with_adam_lookahead_uses_the_preconditioned_feedback():
    teacher, student, course, exam = setup()
    opt = warm_adamw(student)
    kw = dict(KW, lookahead="adam", optimizer=opt)
    fo = exam_hypergradient(teacher, student, course, exam, estimator="first_order", **kw)
    ex = exam_hypergradient(teacher, student, course, exam, estimator="exact", **kw)
    assert flat(fo.grads).abs().sum() > 0 and math.isfinite(cosine(fo.grads, ex.grads))
