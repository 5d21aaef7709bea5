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
from typer.testing import CliRunner

from ikd_sweep import teacher as teacher_cache
from ikd_sweep import trainer
from ikd_sweep.cli import app
from ikd_sweep.config import SweepConfig
from ikd_sweep.data import prepare_data
from ikd_sweep.models import build_model, load_tokenizer, tiny_spec
from ikd_sweep.trainer import FitSettings, NonFiniteLoss, fit, seed_everything
from ikd_sweep.trial import run_trial
from ikd_sweep.trials import Trial

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
pytestmark = pytest.mark.skipif(
    not (GLUE / "RTE" / "train.tsv").is_file(), reason=f"GLUE data not found at {GLUE}"
)
CPU = "cpu"
# 200 RTE rows -> 20 val + 20 quiz + 160 rest. With quiz parity finetune and kd train on
# 180 rows (batch 16 -> 12 steps, last batch of 4), ikd on 160 (10 steps).
STEPS = {"finetune": 12, "kd": 12, "ikd": 10}


# ----------------------------------------------------------------------------- helpers


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sweep_raw(**over) -> dict:
    """A tiny sweep: 2-layer hidden-64 random-init models on MiniLM's vocabulary, RTE."""
    tiny = tiny_spec().model_dump(mode="json")
    raw = {
        "name": "tiny",
        "tasks": ["rte"],
        "methods": ["finetune", "kd", "ikd"],
        "data": {
            "source": "glue_dir",
            "glue_dir": str(GLUE),
            "max_length": 64,
            "max_train_samples": 200,
            "max_eval_samples": 100,
        },
        "teacher": {**tiny, "epochs": 1, "lr": 1e-3, "batch_size": 16},
        "student": tiny,
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "eval_every": 4, "log_every": 2},
        "search": {"temperature": [2], "exam_every": [2], "teacher_lr": [1e-4], "seeds": [1]},
    }
    return _merge(raw, over)


def sweep(**over) -> SweepConfig:
    return SweepConfig.model_validate(sweep_raw(**over))


def trial(method: str, seed: int = 1, task: str = "rte", exam_every: int = 2) -> Trial:
    if method == "finetune":
        return Trial(task, method, seed)
    if method == "kd":
        return Trial(task, method, seed, temperature=2.0)
    return Trial(task, method, seed, temperature=2.0, exam_every=exam_every, teacher_lr=1e-4)


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
        """Logged values without wall-clock throughput, which never repeats exactly."""
        return [
            (s, {k: v for k, v in m.items() if k != "samples_per_s"})
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
    assert ra == rb
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
    assert got == expected  # exactly, on CPU, the selection (sel/*) included
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
    real = trainer.course_loss

    def nan_on_third_call(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = real(*args, **kwargs)
        return loss + math.nan if calls == 3 else loss

    # kd calls course_loss twice per step (loss, then the logged KD term): call 3 is step 2.
    monkeypatch.setattr(trainer, "course_loss", nan_on_third_call)
    with pytest.raises(NonFiniteLoss, match=rf"step 2 of {STEPS['kd']}\b.*train/loss=nan"):
        run_trial(sweep(), trial("kd"), home=home, device=CPU)


def test_cli_train_exits_nonzero_with_failed_status_on_absurd_lr(tmp_path, new_home):
    home = new_home()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep_raw()))
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(path),
            "--task",
            "rte",
            "--method",
            "kd",
            "--set",
            "train.lr=1e30",
            "--home",
            str(home),
            "--device",
            "cpu",
        ],
    )
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
    assert {"val/main", "val/accuracy", "dev/main", "dev/accuracy", "best/dev_main"} <= reported
    assert {"sel/val_main", "sel/dev_main", "sel/step"} <= reported
    distill = {"train/kd_loss"}
    teacher = {"teacher/val_main", "teacher/dev_main"}
    ikd_only = {"exam/loss"}
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
    assert {"final/dev_main", "final/dev_accuracy", "final/val_main", "best/dev_main"} <= (
        result.keys())
    assert result["best/dev_main"] == max(m["dev/main"] for _, m, _ in rec.reports)
    assert result["final/dev_main"] == rec.reports[-1][1]["dev/main"]
    # the result is the evaluation with the best val/main, reported with its dev score
    chosen = max(rec.reports, key=lambda r: r[1]["val/main"])  # max keeps the first of ties
    assert (result["sel/step"], result["sel/val_main"], result["sel/dev_main"]) == (
        chosen[0], chosen[1]["val/main"], chosen[1]["dev/main"])


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
    real_prepare = trainer.prepare_data

    def keeping(*args, **kwargs):
        prepared.append(real_prepare(*args, **kwargs))
        return prepared[-1]

    monkeypatch.setattr(trainer, "prepare_data", keeping)

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
    assert (result["sel/step"], result["sel/val_main"], result["sel/dev_main"]) == (8, 0.70, 0.55)
    assert result["best/dev_main"] == 0.90  # the diagnostic max over dev, chosen by nothing
    assert result["final/dev_main"] == 0.80 and result["final/val_main"] == 0.70
    running = [(s, m["sel/step"], m["sel/dev_main"]) for s, m, _ in rec.reports]
    assert running == [(4, 4, 0.90), (8, 8, 0.55), (12, 8, 0.55)]
    assert [m["val/main"] for _, m, _ in rec.reports] == [0.60, 0.70, 0.70]


def test_resume_keeps_the_selection_made_before_the_interruption(home, scripted_scores):
    # val is best at step 4, before the interruption after step 8; dev is best at step 8.
    val = {4: 0.80, 8: 0.60, 12: 0.70}
    dev = {4: 0.50, 8: 0.90, 12: 0.60}
    cfg = sweep()
    full = StepRecorder()
    scripted_scores(full, val, dev)
    expected = run_trial(cfg, trial("finetune"), home=home, callback=full,
                         checkpoint_dir=home / "full", device=CPU)
    assert (expected["sel/step"], expected["sel/dev_main"]) == (4, 0.50)

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
    assert resumed.reports[0][1]["sel/step"] == 4  # ... yet it is still the selected one
    assert {k: v for k, v in got.items() if k.startswith(("sel/", "best/", "final/"))} == {
        k: v for k, v in expected.items() if k.startswith(("sel/", "best/", "final/"))}
    assert got == expected


# ----------------------------------------------------------------------------- the teacher


@pytest.fixture
def exam_calls(monkeypatch) -> list[int]:
    """Counts the trainer's calls to exam_hypergradient."""
    calls: list[int] = []
    real = trainer.exam_hypergradient

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "exam_hypergradient", counting)
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
    assert {m["teacher/dev_main"] for _, m, _ in rec.reports} == {
        result["teacher/initial_dev_main"]}
    assert {m["teacher/val_main"] for _, m, _ in rec.reports} == {
        result["teacher/initial_val_main"]}


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("estimator", ["exact", "finite_difference", "first_order"])
def test_each_estimator_runs_a_short_ikd_trial(home, exam_calls, loaded_teachers, estimator):
    cfg = sweep(ikd={"estimator": estimator}, train={"max_steps": 4})
    rec = Recorder()
    result = run_trial(cfg, trial("ikd"), home=home, callback=rec, device=CPU)
    assert result["steps"] == 4 and len(exam_calls) == 2
    assert math.isfinite(result["final/dev_main"])
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
