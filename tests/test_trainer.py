"""The trainer on tiny random-init BERTs and subsampled real RTE (CPU, seconds per test).

Covers: reproducibility per seed, exact resume (kd and ikd, and the selection made before an
interruption), non-finite losses (library and CLI), the metric names the callback promises,
the checkpoint chosen on val and never on dev, that ikd trains the teacher (and kd and the
teacher_lr 0 control never do), the exam-step count, and every exam estimator.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import merge, needs_glue, tiny_spec
from helpers import sweep_raw as tiny_sweep
from typer.testing import CliRunner

from ikd_sweep import names, trainer
from ikd_sweep import step as step_module
from ikd_sweep import teacher as teacher_cache
from ikd_sweep import trial as trial_module
from ikd_sweep.cli import app
from ikd_sweep.config import SweepConfig
from ikd_sweep.data import prepare_data
from ikd_sweep.models import build_model, load_tokenizer, model_inputs
from ikd_sweep.trainer import FitSettings, NonFiniteLoss, fit, seed_everything
from ikd_sweep.trial import run_trial
from ikd_sweep.trials import Trial

pytestmark = needs_glue
CPU = "cpu"
# The trainer tests' sizes, laid on the tiny sweep of helpers.py.
TRAINER = {"tasks": ["rte"], "data": {"max_length": 64, "max_train_samples": 200,
                                      "max_eval_samples": 100},
           "train": {"eval_every": 4, "log_every": 2}}
# 200 RTE rows -> 20 val + 20 quiz + 160 rest. With quiz parity finetune and kd train on
# 180 rows (batch 16 -> 12 steps, last batch of 4), ikd on 160 (10 steps).
STEPS = {"finetune": 12, "kd": 12, "ikd": 10}


# ----------------------------------------------------------------------------- helpers


def sweep_raw(**over) -> dict:
    """The tiny sweep with 2-layer hidden-64 random-init models on MiniLM's vocabulary and 200
    rows of RTE (the step counts above)."""
    tiny = tiny_spec().model_dump(mode="json")
    return merge(tiny_sweep("tiny", **TRAINER), {"teacher": tiny, "student": tiny, **over})


def sweep(**over) -> SweepConfig:
    return SweepConfig.model_validate(sweep_raw(**over))


def trial(method: str, seed: int = 1, task: str = "rte", exam_every: int = 2) -> Trial:
    if method == "finetune":
        return Trial(task, method, seed)
    if method == "kd":
        return Trial(task, method, seed, temperature=2.0)
    return Trial(task, method, seed, temperature=2.0, exam_every=exam_every, teacher_lr=1e-4)


def timeless(result: dict) -> dict:
    """A result without its wall-clock measurements (`sys/*`), which never repeat exactly."""
    return {k: v for k, v in result.items() if not k.startswith("sys/")}


class Recorder:
    """A trainer callback that keeps everything it is given."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.reports: list[tuple[int, dict, Path | None]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logs.append((step, dict(metrics)))

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        self.reports.append((step, dict(metrics), checkpoint))

    def curve(self, after: int = -1) -> list[tuple[int, dict]]:
        """Logged values without wall-clock measurements, which never repeat exactly."""
        return [
            (s, {k: v for k, v in m.items() if k != "samples_per_s" and not k.startswith("sys/")})
            for s, m in self.logs
            if s > after
        ]


class Interrupted(Exception):
    pass


class InterruptAt(Recorder):
    """Raises at the n-th evaluation report, i.e. after that evaluation's checkpoint is saved."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def report(self, metrics, step, checkpoint) -> None:
        super().report(metrics, step, checkpoint)
        if len(self.reports) == self.n:
            raise Interrupted(f"interrupted at step {step}")


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def files_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """Tokenized RTE shared by the module's homes (tokenizing is the same in every home)."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def new_home(tmp_path, data_cache):
    """Fresh working folders (own teacher cache) that share the tokenized-data cache."""

    def make(name: str = "home") -> Path:
        home = tmp_path / name
        (home / "cache").mkdir(parents=True)
        (home / "cache" / "data").symlink_to(data_cache, target_is_directory=True)
        return home

    return make


@pytest.fixture
def home(new_home) -> Path:
    return new_home()


# ----------------------------------------------------------------------------- reproducibility


def test_kd_trial_reproduces_exactly_for_a_seed_and_differs_for_another(new_home):
    cfg = sweep()
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        home = new_home(name)  # fresh homes: the teacher is fine-tuned again in each
        rec = Recorder()
        result = run_trial(
            cfg,
            trial("kd", seed),
            home=home,
            callback=rec,
            checkpoint_dir=home / "ckpt",
            device=CPU,
        )
        runs[name] = (result, rec, load_state(home / "ckpt")["student"])
    (ra, reca, sa), (rb, recb, sb), (_, recc, sc) = runs["a"], runs["b"], runs["c"]
    assert timeless(ra) == timeless(rb)
    assert reca.curve() == recb.curve()
    assert [(s, m) for s, m, _ in reca.reports] == [(s, m) for s, m, _ in recb.reports]
    assert_same_tensors(sa, sb)
    # Another seed: another teacher, course subsample, quiz split, batch order and dropout.
    assert reca.curve() != recc.curve()
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", ["kd", "ikd"])
def test_resume_after_interruption_matches_uninterrupted_run(home, method):
    cfg = sweep()  # eval_every 4: evaluations (and checkpoints) at steps 4, 8, 12
    full = Recorder()
    expected = run_trial(
        cfg, trial(method), home=home, callback=full, checkpoint_dir=home / "full", device=CPU
    )
    assert expected["steps"] == STEPS[method]

    ckpt = home / "interrupted"
    with pytest.raises(Interrupted):
        run_trial(
            cfg, trial(method), home=home, callback=InterruptAt(2), checkpoint_dir=ckpt, device=CPU
        )
    saved = load_state(ckpt)
    assert saved["step"] == 8
    if method == "ikd":  # exams at steps 2, 4, 6, 8: the quiz iterator is mid-way
        assert saved["quiz_used"] == 4 and "teacher" in saved and "t_opt" in saved

    resumed = Recorder()
    got = run_trial(
        cfg,
        trial(method),
        home=home,
        callback=resumed,
        checkpoint_dir=ckpt,
        resume_from=ckpt,
        device=CPU,
    )
    assert timeless(got) == timeless(expected)  # exactly, on CPU, sel/* included
    # It really resumed (no evaluation before step 8 again) and replayed the same steps.
    assert [s for s, _, _ in resumed.reports] == [STEPS[method]]
    assert resumed.reports[0][1] == full.reports[-1][1]
    assert resumed.curve(after=8) == full.curve(after=8)
    end, want = load_state(ckpt), load_state(home / "full")
    assert_same_tensors(end["student"], want["student"])
    if method == "ikd":  # the teacher kept learning from where it was
        assert_same_tensors(end["teacher"], want["teacher"])
        assert end["quiz_used"] == want["quiz_used"] == STEPS["ikd"] // 2


# ----------------------------------------------------------------------------- non-finite loss


def test_nan_loss_raises_naming_the_step(home, monkeypatch):
    calls = 0
    real = step_module.course_loss

    def nan_on_third_call(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = real(*args, **kwargs)
        return loss + math.nan if calls == 3 else loss

    # kd calls course_loss twice per step (loss, then the logged KD term): call 3 is step 2.
    monkeypatch.setattr(step_module, "course_loss", nan_on_third_call)
    with pytest.raises(NonFiniteLoss, match=rf"step 2 of {STEPS['kd']}\b.*train/loss=nan"):
        run_trial(sweep(), trial("kd"), home=home, device=CPU)


@pytest.mark.parametrize("method, absurd", [
    ("kd", ["--set", "train.lr=1e30"]),
    # the teacher's steps blow up, not the student's (what the sweep test's stsb trial showed)
    ("ikd", ["--teacher-lr", "1e30"]),
])
def test_cli_train_exits_nonzero_with_failed_status_on_absurd_lr(tmp_path, new_home, method,
                                                                 absurd):
    home = new_home()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep_raw()))
    result = CliRunner().invoke(app, ["train", str(path), "--task", "rte", "--method", method,
                                      *absurd, "--home", str(home), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert '"status": "FAILED"' in result.output
    assert "non-finite loss by step" in result.output
    final = json.loads(next(home.glob("single/tiny/*/final_metrics.json")).read_text())
    assert final["status"] == "FAILED" and "non-finite loss" in final["error"]


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("method", ["finetune", "kd", "ikd"])
def test_callback_receives_the_promised_metric_names(home, method):
    rec = Recorder()
    result = run_trial(sweep(), trial(method), home=home, callback=rec, device=CPU)
    logged = {k for _, m in rec.logs for k in m}
    reported = {k for _, m, _ in rec.reports for k in m}
    assert {"train/loss", "samples_per_s"} <= logged
    assert {names.VAL, "val/accuracy", names.DEV, "dev/accuracy", names.BEST_DEV} <= reported
    assert {names.SEL_VAL, names.SEL_DEV, names.SEL_STEP} <= reported
    distill = {"train/kd_loss"}
    teacher = {names.TEACHER_VAL, names.TEACHER_DEV}
    ikd_only = {"exam/loss", "exam/hypergrad_norm", "exam/teacher_update_norm",
                "exam/lookahead_over_real_step"}
    if method == "finetune":
        assert not (distill | ikd_only | teacher) & (logged | reported)
    else:
        assert distill <= logged
        assert teacher <= logged  # the cached teacher's val and dev scores, at step 0
        assert {"teacher/initial_val_main", "teacher/initial_dev_main"} <= result.keys()
    if method == "ikd":
        assert ikd_only <= logged
        assert teacher <= reported  # the teacher changes: evaluated with the student
        assert {"final/teacher_val_main", "final/teacher_dev_main"} <= result.keys()
    else:
        assert not ikd_only & logged
    for _, m in rec.logs:
        assert all(math.isfinite(v) for v in m.values())
    assert [s for s, _, _ in rec.reports] == [4, 8, STEPS[method]]
    assert {names.FINAL_DEV, "final/dev_accuracy", "final/val_main", names.BEST_DEV} <= (
        result.keys())
    # dev is evaluated where val/main improves (the new selection's dev score) and at the end.
    running = -math.inf
    for i, (_, m, _) in enumerate(rec.reports):
        improved, running = m[names.VAL] > running, max(running, m[names.VAL])
        assert (names.DEV in m) == (improved or i == len(rec.reports) - 1)
        if method == "ikd":
            assert (names.TEACHER_DEV in m) == (names.DEV in m)
    assert result[names.BEST_DEV] == max(m[names.DEV] for _, m, _ in rec.reports
                                          if names.DEV in m)
    assert result[names.FINAL_DEV] == rec.reports[-1][1][names.DEV]
    # where the time went: shares of the loop's wall time that add up to 1, and throughput
    shares = {k.split("/")[-1]: v for k, v in result.items() if k.startswith("sys/time_share/")}
    assert set(shares) == {"course", "teacher_forward", "exam", "optimizer", "evaluation",
                           "checkpoint", "other"}
    assert all(v >= 0 for v in shares.values()) and sum(shares.values()) == pytest.approx(1)
    assert shares["course"] > 0 and shares["optimizer"] > 0 and shares["evaluation"] > 0
    assert (shares["exam"] > 0) == (method == "ikd")
    # kd trains on the cached teacher logits; ikd's plain course steps run the live teacher
    assert (shares["teacher_forward"] > 0) == (method == "ikd")
    assert result["sys/train_samples"] == (180 if method != "ikd" else 160)
    assert result["sys/samples_per_s"] > 0
    assert "sys/peak_gpu_gib" not in result  # CPU: no GPU memory to report
    # the floor beside it: the dev score of guessing the training rows' majority class
    assert 0 < result[names.MAJORITY_DEV] < 1
    # the result is the evaluation with the best val/main, reported with its dev score
    chosen = max(rec.reports, key=lambda r: r[1][names.VAL])  # max keeps the first of ties
    assert (result[names.SEL_STEP], result[names.SEL_VAL], result[names.SEL_DEV]) == (
        chosen[0], chosen[1][names.VAL], chosen[1][names.DEV])


def test_throughput_is_the_training_windows_alone_and_startup_is_measured(home, monkeypatch):
    # A clock on which every evaluation takes 1000 s: a window that counted it would show
    # under one sample per second.
    clock = {"skew": 0.0}
    real_clock, real_scores = trainer.time.perf_counter, trainer._scores

    def slow_scores(*a, **kw):
        clock["skew"] += 1000.0
        return real_scores(*a, **kw)

    monkeypatch.setattr(trainer.time, "perf_counter", lambda: real_clock() + clock["skew"])
    monkeypatch.setattr(trainer, "_scores", slow_scores)
    rec = Recorder()
    result = run_trial(sweep(), trial("kd"), home=home, callback=rec, device=CPU)
    rates = [m["samples_per_s"] for _, m in rec.logs if "samples_per_s" in m]
    assert len(rates) == STEPS["kd"] // 2 and min(rates) > 1.0
    # the time from the trial's start to its first step (data, models, cached logits)
    first = next(m for _, m in rec.logs if "samples_per_s" in m)
    assert first[names.STARTUP] == result[names.STARTUP] > 0
    assert sum(names.STARTUP in m for _, m in rec.logs) == 1
    assert result[names.THREADS] == torch.get_num_threads()  # what it trained with


# ----------------------------------------------------------------------------- selection


class StepRecorder(Recorder):
    """Knows the current step: fit logs at every evaluation step just before it evaluates."""

    step = 0

    def log(self, metrics, step) -> None:
        super().log(metrics, step)
        self.step = step


@pytest.fixture
def scripted_scores(monkeypatch):
    """Replaces the trainer's evaluation with given val and dev scores per step, so that val and
    dev can disagree on purpose. Returns a function that installs the script for a callback."""
    prepared: list = []
    real_prepare = trial_module.prepare_data

    def keeping(*args, **kwargs):
        prepared.append(real_prepare(*args, **kwargs))
        return prepared[-1]

    monkeypatch.setattr(trial_module, "prepare_data", keeping)

    def install(rec: StepRecorder, val: dict[int, float], dev: dict[int, float]) -> None:
        def evaluate(model, split, task, device, batch_size=128, pad_id=0):
            data = prepared[-1]
            assert split is data.val or split is data.dev
            score = (val if split is data.val else dev)[rec.step]
            return {"main": score, "accuracy": score}

        monkeypatch.setattr(trainer, "evaluate", evaluate)

    return install


def test_the_checkpoint_is_chosen_on_val_not_on_dev(home, scripted_scores):
    # dev is best at step 4, val at step 8 (and ties at 12: the earlier checkpoint stays).
    val = {4: 0.60, 8: 0.70, 12: 0.70}
    dev = {4: 0.90, 8: 0.55, 12: 0.80}
    rec = StepRecorder()
    scripted_scores(rec, val, dev)
    result = run_trial(sweep(), trial("finetune"), home=home, callback=rec, device=CPU)
    assert (result[names.SEL_STEP], result[names.SEL_VAL], result[names.SEL_DEV]) == (8, 0.70, 0.55)
    assert result[names.BEST_DEV] == 0.90  # the diagnostic max over dev, chosen by nothing
    assert result[names.FINAL_DEV] == 0.80 and result["final/val_main"] == 0.70
    running = [(s, m[names.SEL_STEP], m[names.SEL_DEV]) for s, m, _ in rec.reports]
    assert running == [(4, 4, 0.90), (8, 8, 0.55), (12, 8, 0.55)]
    assert [m[names.VAL] for _, m, _ in rec.reports] == [0.60, 0.70, 0.70]


def test_the_kept_student_is_the_selected_checkpoint_not_the_last(home, scripted_scores):
    # val improves at steps 4 and 8 and ties at 12: the folder must hold step 8's weights.
    from safetensors.torch import load_file

    class Snapshots(StepRecorder):
        """At each report: the resumable checkpoint's student (this step's weights) and the
        kept student folder's weights."""

        def __init__(self) -> None:
            super().__init__()
            self.now, self.kept = {}, {}

        def report(self, metrics, step, checkpoint) -> None:
            super().report(metrics, step, checkpoint)
            self.now[step] = load_state(checkpoint)["student"]
            self.kept[step] = load_file(home / "student" / "model.safetensors")

    rec = Snapshots()
    scripted_scores(rec, {4: 0.60, 8: 0.70, 12: 0.70}, {4: 0.5, 8: 0.55, 12: 0.80})
    result = run_trial(sweep(), trial("finetune"), home=home, callback=rec, device=CPU,
                       checkpoint_dir=home / "ckpt", student_dir=home / "student")
    assert result[names.SEL_STEP] == 8
    for step, want in ((4, 4), (8, 8), (12, 8)):
        assert_same_tensors(rec.kept[step], {k: v for k, v in rec.now[want].items()
                                             if k in rec.kept[step]})
    assert any(not torch.equal(rec.kept[12][k], rec.now[12][k]) for k in rec.kept[12])
    # A Hugging Face folder with the tokenizer and a model card; nothing half-written beside it.
    files = {p.name for p in (home / "student").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files
    card = (home / "student" / "README.md").read_text()
    for fact in ("| task | rte |", "| method | finetune |", "| sweep | tiny |",
                 "| sel/step | 8 |", "| sel/val_main | 0.7 |", "| sel/dev_main | 0.55 |"):
        assert fact in card
    assert [p.name for p in home.glob(".student*")] == []


def test_resume_keeps_the_selection_made_before_the_interruption(home, scripted_scores):
    # val is best at step 4, before the interruption after step 8; dev would be best at step 8
    # (where val did not improve, so dev is not even evaluated there).
    val = {4: 0.80, 8: 0.60, 12: 0.70}
    dev = {4: 0.50, 8: 0.90, 12: 0.60}
    cfg = sweep()
    full = StepRecorder()
    scripted_scores(full, val, dev)
    expected = run_trial(cfg, trial("finetune"), home=home, callback=full,
                         checkpoint_dir=home / "full", device=CPU)
    assert (expected[names.SEL_STEP], expected[names.SEL_DEV]) == (4, 0.50)

    class Interrupting(StepRecorder, InterruptAt):
        pass

    ckpt = home / "interrupted"
    stop = Interrupting(2)
    scripted_scores(stop, val, dev)
    with pytest.raises(Interrupted):
        run_trial(cfg, trial("finetune"), home=home, callback=stop, checkpoint_dir=ckpt,
                  device=CPU)
    resumed = StepRecorder()
    scripted_scores(resumed, val, dev)
    got = run_trial(cfg, trial("finetune"), home=home, callback=resumed, checkpoint_dir=ckpt,
                    resume_from=ckpt, device=CPU)
    assert [s for s, _, _ in resumed.reports] == [12]  # step 4 was not evaluated again ...
    assert resumed.reports[0][1][names.SEL_STEP] == 4  # ... yet it is still the selected one
    assert {k: v for k, v in got.items() if k.startswith(("sel/", "best/", "final/"))} == {
        k: v for k, v in expected.items() if k.startswith(("sel/", "best/", "final/"))}
    assert timeless(got) == timeless(expected)


# ----------------------------------------------------------------------------- the teacher


@pytest.fixture
def exam_calls(monkeypatch) -> list[int]:
    """Counts the trainer's calls to exam_hypergradient."""
    calls: list[int] = []
    real = step_module.exam_hypergradient

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "exam_hypergradient", counting)
    return calls


@pytest.fixture
def loaded_teachers(monkeypatch) -> list[torch.nn.Module]:
    """Every teacher model that teacher.load_teacher hands out (run_trial's live ikd teacher)."""
    models: list[torch.nn.Module] = []
    real = teacher_cache.load_teacher

    def keeping(path):
        models.append(real(path))
        return models[-1]

    monkeypatch.setattr(teacher_cache, "load_teacher", keeping)
    return models


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(a: dict, b: dict) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


@pytest.mark.parametrize("exam_every", [1, 3, 5])
def test_ikd_updates_the_teacher_every_exam_every_steps(
    home, exam_calls, loaded_teachers, exam_every
):
    cfg = sweep()
    tdir = teacher_cache.ensure_teacher(cfg, "rte", 1, home, device=CPU)
    cached = files_digest(tdir)
    result = run_trial(cfg, trial("ikd", exam_every=exam_every), home=home, device=CPU)
    assert result["steps"] == STEPS["ikd"]
    assert len(exam_calls) == STEPS["ikd"] // exam_every
    (live,) = loaded_teachers
    fresh = params(teacher_cache.load_teacher(tdir))
    moved = changed(fresh, params(live))
    assert len(moved) > len(fresh) // 2  # the hypergradient reaches most teacher tensors
    assert files_digest(tdir) == cached  # the trial trained its own copy, not the cache


def test_kd_never_changes_the_teacher(home, exam_calls):
    cfg = sweep()
    tdir = teacher_cache.ensure_teacher(cfg, "rte", 1, home, device=CPU)
    cached = files_digest(tdir)
    run_trial(cfg, trial("kd"), home=home, device=CPU)  # cached logits
    after = files_digest(tdir)
    assert {k: v for k, v in after.items() if k in cached} == cached
    assert set(after) - set(cached) <= {"train_logits.pt", "train_logits.lock"}

    # kd with a live teacher: fit must leave it exactly as it was.
    tokenizer = load_tokenizer(cfg.teacher.model)
    data = prepare_data("rte", cfg.data, tokenizer, home / "cache" / "data", 1, method="kd")
    teacher = teacher_cache.load_teacher(tdir)
    before = params(teacher)
    seed_everything(1)
    student = build_model(cfg.student, 2)
    fit(
        FitSettings.for_trial(cfg, trial("kd")),
        data.task,
        data,
        student,
        teacher=teacher,
        device=torch.device(CPU),
    )
    assert changed(before, params(teacher)) == []
    assert exam_calls == []


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: tells -0.0 from 0.0 and compares NaNs, unlike torch.equal."""
    return t.detach().contiguous().view(torch.uint8)


def test_teacher_lr_zero_control_runs_the_exams_but_never_moves_the_teacher(
    home, exam_calls, loaded_teachers
):
    cfg = sweep(search={"teacher_lr": [0]})
    control = Trial("rte", "ikd", 1, temperature=2.0, exam_every=2, teacher_lr=0.0)
    rec = Recorder()
    result = run_trial(cfg, control, home=home, callback=rec, device=CPU)
    assert len(exam_calls) == STEPS["ikd"] // 2  # the same code path as ikd: exams happen
    assert all(math.isfinite(m["exam/loss"]) for _, m in rec.logs if "exam/loss" in m)
    (live,) = loaded_teachers
    cached = teacher_cache.load_teacher(teacher_cache.teacher_dir(cfg, "rte", 1, home))
    for (name, a), (_, b) in zip(live.named_parameters(), cached.named_parameters(),
                                 strict=True):
        assert torch.equal(bits(a), bits(b)), name
    # so the teacher scores it reports never change from the cached teacher's
    assert {m[names.TEACHER_DEV] for _, m, _ in rec.reports if names.TEACHER_DEV in m} == {
        result["teacher/initial_dev_main"]}
    assert {m[names.TEACHER_VAL] for _, m, _ in rec.reports} == {
        result["teacher/initial_val_main"]}


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("estimator", ["exact", "finite_difference", "first_order"])
def test_each_estimator_runs_a_short_ikd_trial(home, exam_calls, loaded_teachers, estimator):
    cfg = sweep(ikd={"estimator": estimator}, train={"max_steps": 4})
    rec = Recorder()
    result = run_trial(cfg, trial("ikd"), home=home, callback=rec, device=CPU)
    assert result["steps"] == 4 and len(exam_calls) == 2
    assert math.isfinite(result[names.FINAL_DEV])
    assert math.isfinite(result["final/teacher_dev_main"])
    exam = [m["exam/loss"] for _, m in rec.logs if "exam/loss" in m]
    assert exam and all(math.isfinite(v) and v > 0 for v in exam)
    tdir = teacher_cache.teacher_dir(cfg, "rte", 1, home)
    assert changed(params(teacher_cache.load_teacher(tdir)), params(loaded_teachers[0]))


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_save_survives_a_crash_leftover(tmp_path, monkeypatch):
    """A save that fails midway keeps the previous checkpoint; leftovers of a process killed
    during a save do not stop later saves and are cleaned up by them."""
    ckpt = tmp_path / "checkpoint"
    trainer._save_checkpoint(ckpt, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="No space"):
            trainer._save_checkpoint(ckpt, {"step": 2})
    assert load_state(ckpt)["step"] == 1
    for stale in (".checkpoint.tmp-0dead", ".checkpoint.tmp-0dead.old"):  # killed mid-swap
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "state.pt").write_text("stale")
    trainer._save_checkpoint(ckpt, {"step": 3})
    assert load_state(ckpt)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# ----------------------------------------------------------------------------- ikd rounds


def ikd_fit(cfg: SweepConfig, home: Path, teacher: torch.nn.Module, **settings):
    """fit() of an ikd trial on RTE with a given (random tiny) teacher; returns the student."""
    tokenizer = load_tokenizer(cfg.teacher.model)
    data = prepare_data("rte", cfg.data, tokenizer, home / "cache" / "data", 1, method="ikd")
    seed_everything(3)
    student = build_model(cfg.student, 2)
    s = FitSettings.for_trial(cfg, trial("ikd"))
    for k, v in settings.items():  # a field of the train or ikd section, or of FitSettings
        section = next((x for x in (s.train, s.ikd) if k in type(x).model_fields), s)
        setattr(section, k, v)
    rec = Recorder()
    fit(s, data.task, data, student, teacher=teacher, device=torch.device(CPU), callback=rec)
    return student, data, s, rec


def tiny_teacher(cfg: SweepConfig) -> torch.nn.Module:
    seed_everything(4)
    return build_model(cfg.teacher, 2)


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.mark.parametrize("order", ["student_first", "teacher_first"])
def test_ikd_round_order_and_which_teacher_gives_the_targets(home, monkeypatch, order):
    tiny = tiny_spec(**NO_DROPOUT).model_dump(mode="json")
    cfg = sweep(teacher=tiny, student=tiny, train={"warmup_ratio": 0.0, "max_grad_norm": None})
    teacher = tiny_teacher(cfg)
    t_ids = {id(p) for p in teacher.parameters()}
    events: list[tuple] = []
    real_step = torch.optim.AdamW.step

    def recording_step(opt, *a, **kw):
        ps = [p for g in opt.param_groups for p in g["params"]]
        who = "teacher" if id(ps[0]) in t_ids else "student"
        events.append((who, params(teacher), {id(p): p.grad.clone() for p in ps},
                       {id(p): p.detach().clone() for p in ps}))
        return real_step(opt, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    student, data, s, _ = ikd_fit(cfg, home, teacher, max_steps=2, exam_every=1, order=order)
    whos = [e[0] for e in events]
    if order == "student_first":
        assert whos == ["student", "teacher", "student", "teacher"]
    else:
        assert whos == ["teacher", "student", "teacher", "student"]

    # Each student step's gradient is the course gradient on the targets of the teacher as it
    # was at that moment: the old teacher (student_first) or the just-updated one (teacher_first).
    rows = trainer.batch_order(data.train, s.train.batch_size, s.seed * 1000)
    student_steps = [e for e in events if e[0] == "student"]
    if order == "student_first":  # the alternative: the teacher after that round's update
        others = [e[1] for e in student_steps[1:]] + [params(teacher)]
    else:  # the alternative: the teacher before that round's update
        others = [e[1] for e in events if e[0] == "teacher"]
    for i, (_, t_state, grads, weights) in enumerate(student_steps):
        batch = trainer.collate(data.train, rows[i], 0)
        got = [grads[id(q)] for q in student.parameters()]
        before = {n: weights[id(q)] for n, q in student.named_parameters()}
        want = replay_course_grad(student, before, teacher, t_state, batch, s)
        alt = replay_course_grad(student, before, teacher, others[i], batch, s)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7)
                   for a, b in zip(got, want, strict=True))
        assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-7)
                       for a, b in zip(got, alt, strict=True))


def replay_course_grad(student, s_state, teacher, t_state, batch, s: FitSettings):
    """The course gradient of `student` at `s_state` on `teacher`-at-`t_state`'s targets."""
    stu, tch = copy.deepcopy(student), copy.deepcopy(teacher)
    stu.load_state_dict(s_state, strict=False)
    tch.load_state_dict(t_state, strict=False)
    with torch.no_grad():
        t_logits = tch(**model_inputs(batch)).logits
    out = stu(**model_inputs(batch))
    loss = step_module.course_loss(out.logits, t_logits, batch["labels"],
                               temperature=s.temperature, alpha=s.train.alpha)
    return torch.autograd.grad(loss, list(stu.parameters()))


@pytest.mark.parametrize("lookahead", ["sgd", "adam"])
def test_fused_exam_and_course_step_give_the_same_training(home, lookahead):
    """With dropout on: the real step reuses the exam's gradient, with the exam's masks."""
    cfg = sweep(ikd={"lookahead": lookahead})
    runs = {}
    for fuse in (True, False):
        teacher = tiny_teacher(cfg)
        forwards: list[int] = []
        teacher.register_forward_hook(lambda *_, n=forwards: n.append(1))
        student, _, _, rec = ikd_fit(cfg, home, teacher, max_steps=6, exam_every=2,
                                     fuse_exam=fuse)
        runs[fuse] = (params(student), params(teacher), rec, len(forwards))
    (s1, t1, r1, n1), (s0, t0, _, n0) = runs[True], runs[False]
    for a, b in ((s1, s0), (t1, t0)):
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert changed(t1, params(tiny_teacher(cfg)))  # the teacher did learn
    # Three exams: the fused run skips one live teacher forward per exam (dev evals aside).
    assert n0 - n1 == 3
    logged = {k for _, m in r1.logs for k in m}
    assert {"exam/hypergrad_norm", "exam/teacher_update_norm",
            "exam/lookahead_over_real_step"} <= logged


def random_batch(b: int = 4, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (b, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (b,), generator=g), "idx": torch.arange(b)}


@pytest.mark.parametrize("schedule, ce_weight", [("constant", 0.0), ("linear", 0.5)])
def test_teacher_step_is_unit_norm_feedback_on_the_chosen_schedule(schedule, ce_weight):
    cfg = sweep()
    seed_everything(0)
    teacher, student = build_model(cfg.teacher, 2), build_model(cfg.student, 2)
    s = FitSettings.for_trial(cfg, trial("ikd"))
    s.ikd.teacher_schedule, s.ikd.teacher_ce_weight, s.train.warmup_ratio = schedule, ce_weight, 0.5
    opt = torch.optim.AdamW(student.parameters(), lr=s.train.lr)
    sched = trainer.get_linear_schedule_with_warmup(opt, 2, 4)  # lr factor 0, .5, 1, .5
    t_opt = torch.optim.AdamW(teacher.parameters(), lr=s.teacher_lr, weight_decay=0.0)
    seen: list[tuple[float, float]] = []  # (teacher lr, norm of the gradient it steps on)
    real_step = t_opt.step

    def recording_step(*a, **kw):
        norm = torch.cat([p.grad.flatten() for p in teacher.parameters()]).norm().item()
        seen.append((t_opt.param_groups[0]["lr"], norm))
        return real_step(*a, **kw)

    t_opt.step = recording_step
    step = trainer.TrainStep(s, student, opt, sched, torch.device(CPU), teacher=teacher,
                             t_opt=t_opt)
    for i in range(4):
        out = step(random_batch(seed=2 * i), random_batch(seed=2 * i + 1))
        assert out["hypergrad_norm"] > 0 and out["teacher_update_norm"] >= 0
    lrs, norms = zip(*seen, strict=True)
    if schedule == "linear":  # the student's warmup/decay shape, peak teacher_lr
        assert lrs == pytest.approx([0.0, 0.5 * s.teacher_lr, s.teacher_lr, 0.5 * s.teacher_lr])
    else:
        assert lrs == pytest.approx([s.teacher_lr] * 4)
    if ce_weight == 0:  # the hypergradient's own scale is gone: unit norm
        assert norms == pytest.approx([1.0] * 4, rel=1e-5)
    else:  # unit feedback + 0.5 x unit gold gradient: between 0.5 and 1.5
        assert all(0.5 <= n <= 1.5 for n in norms)


def test_compile_is_ignored_on_cpu_with_one_message(caplog):
    cfg = sweep(train={"compile": True})
    seed_everything(0)
    student = build_model(cfg.student, 2)
    s = FitSettings.for_trial(cfg, trial("finetune"))
    assert s.train.compile
    opt = torch.optim.AdamW(student.parameters(), lr=s.train.lr)
    sched = trainer.get_linear_schedule_with_warmup(opt, 0, 4)
    with caplog.at_level("WARNING", logger="ikd_sweep.step"):
        step = trainer.TrainStep(s, student, opt, sched, torch.device(CPU))
        for i in range(2):
            step(random_batch(seed=i))
    assert step.s_fwd is student  # eager
    msgs = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert msgs == ["train.compile is ignored on cpu: torch.compile is used on CUDA only"]
