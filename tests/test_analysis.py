"""analysis: stores written through SweepTracker with known numbers -> tables, plots, renderers."""

from __future__ import annotations

import base64
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import migrated_store
from scipy import stats

from analysis import render
from analysis.collect import collect, latest_sweep_name
from analysis.plots import make_plots
from analysis.report import NoFinishedRuns, make_report, normalize_formats
from analysis.tables import build_report
from ikd_sweep.tracking import SweepTracker

SEEDS = (1, 2, 3)
EXAM_EVERY, TEACHER_LR = 5.0, 1e-5

# best/dev_main per (task, method, temperature) and seed 1, 2, 3. Selection by hand:
#   sst2: kd T=1 mean .83, T=4 mean .85 -> T=4;   ikd T=1 mean .87, T=4 mean .85 -> T=1
#   rte:  kd T=1 mean .67, T=4 mean .64 -> T=1;   ikd T=1 mean .68, T=4 mean .70 -> T=4
SCORES = {
    ("sst2", "finetune", None): [0.79, 0.83, 0.81],
    ("sst2", "kd", 1.0): [0.83, 0.84, 0.82],
    ("sst2", "kd", 4.0): [0.85, 0.86, 0.84],
    ("sst2", "ikd", 1.0): [0.86, 0.88, 0.87],
    ("sst2", "ikd", 4.0): [0.84, 0.85, 0.86],
    ("rte", "finetune", None): [0.60, 0.62, 0.64],
    ("rte", "kd", 1.0): [0.65, 0.66, 0.70],
    ("rte", "kd", 4.0): [0.63, 0.64, 0.65],
    ("rte", "ikd", 1.0): [0.66, 0.69, 0.69],
    ("rte", "ikd", 4.0): [0.70, 0.71, 0.69],
}
SELECTED = {
    ("sst2", "finetune"): None,
    ("sst2", "kd"): 4.0,
    ("sst2", "ikd"): 1.0,
    ("rte", "finetune"): None,
    ("rte", "kd"): 1.0,
    ("rte", "ikd"): 4.0,
}
STEPS = (100, 200, 300)


def trial_dict(task: str, method: str, temperature: float | None, seed: int) -> dict:
    ikd = method == "ikd"
    tag = "" if temperature is None else f"-T{temperature:g}"
    return {
        "trial_id": f"{task}-{method}{tag}-s{seed}",
        "task": task,
        "method": method,
        "seed": seed,
        "temperature": temperature,
        "exam_every": EXAM_EVERY if ikd else None,
        "teacher_lr": TEACHER_LR if ikd else None,
    }


def run_trial(
    tracker: SweepTracker,
    parent: str,
    trial: dict,
    score: float,
    status: str = "FINISHED",
    error: str | None = None,
) -> str:
    params = {**trial, "train": {"lr": 3e-5, "alpha": 0.5}, "ikd": {"estimator": "exact"}}
    run_id = tracker.trial_run(parent, trial["trial_id"], tags={}, params=params)
    # dev/main peaks at the middle evaluation: best = score, final = score - 0.01.
    curve = [score - 0.02, score, score - 0.01]
    best = -math.inf
    for step, value in zip(STEPS, curve, strict=True):
        best = max(best, value)
        metrics = {"train/loss": 1.0 / step, "dev/main": value, "dev/accuracy": value}
        metrics["best/dev_main"] = best
        if trial["method"] == "ikd":
            metrics["teacher/dev_main"] = 0.9 + step / 10000
        tracker.log_metrics(run_id, metrics, step)
    if status == "RUNNING":
        return run_id
    final = {"final/dev_main": curve[-1], "final/dev_accuracy": curve[-1]}
    if status == "FINISHED":
        tracker.log_metrics(run_id, final, STEPS[-1])
    tracker.finish_trial(
        run_id, status, error=error, final_metrics=final if status == "FINISHED" else None
    )
    return run_id


def new_tracker(factory: pytest.TempPathFactory, home: Path, experiment: str) -> SweepTracker:
    uri = f"sqlite:///{home.resolve()}/mlflow.db"
    if not (home / "mlflow.db").exists():
        uri = migrated_store(factory, home)
    return SweepTracker(uri, experiment)


@pytest.fixture(scope="module")
def glue_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """2 tasks × {finetune, kd (2 T), ikd (2 T × 1 exam_every × 1 teacher_lr)} × 3 seeds."""
    tracker = new_tracker(tmp_path_factory, tmp_path_factory.mktemp("glue"), "glue_demo")
    trials = [
        trial_dict(task, method, temp, seed) for (task, method, temp) in SCORES for seed in SEEDS
    ]
    parent = tracker.start_sweep("glue_demo", {"name": "glue_demo"}, trials)
    for (task, method, temp), scores in SCORES.items():
        for seed, score in zip(SEEDS, scores, strict=True):
            run_trial(tracker, parent, trial_dict(task, method, temp, seed), score)
    tracker.end_sweep(parent, "FINISHED")
    return tracker.tracking_uri, parent


@pytest.fixture(scope="module")
def glue_report(glue_store):
    uri, _ = glue_store
    data = collect("glue_demo", uri)
    return data, build_report(data.runs, data.expected, data.sweep)


def _scores(task: str, method: str) -> np.ndarray:
    return np.array(SCORES[(task, method, SELECTED[(task, method)])])


def test_collect_runs_frame(glue_store, glue_report) -> None:
    _, parent = glue_store
    data, _ = glue_report
    runs = data.runs
    assert data.parent_run_id == parent and data.sweep == "glue_demo"
    assert len(runs) == 30 and len(data.expected) == 30
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["seed"].dtype.kind == "i"
    row = runs.set_index("trial_id").loc["sst2-ikd-T4-s2"]
    assert (row["task"], row["method"], row["seed"]) == ("sst2", "ikd", 2)
    assert (row["temperature"], row["exam_every"], row["teacher_lr"]) == (4.0, 5.0, 1e-5)
    assert row["estimator"] == "exact"
    assert row["best_dev_main"] == pytest.approx(0.85)
    assert row["final_dev_main"] == pytest.approx(0.84)
    assert row["final_dev_accuracy"] == pytest.approx(0.84)
    assert row["teacher_dev_main"] == pytest.approx(0.93)
    assert row["duration_s"] >= 0
    ft = runs.set_index("trial_id").loc["rte-finetune-s1"]
    assert math.isnan(ft["temperature"]) and pd.isna(ft["estimator"])
    hist = data.history(row["run_id"], "dev/main")
    assert list(hist["step"]) == list(STEPS)
    assert list(hist["value"]) == pytest.approx([0.83, 0.85, 0.84])


def test_selection_means_and_stds(glue_report) -> None:
    _, report = glue_report
    sel = report.selected.set_index(["task", "method"])
    assert report.tasks == ["sst2", "rte"]  # GLUE order
    assert report.methods == ["finetune", "kd", "ikd"]
    for (task, method), temp in SELECTED.items():
        row = sel.loc[(task, method)]
        expected = _scores(task, method)
        if temp is None:
            assert math.isnan(row["temperature"])
        else:
            assert row["temperature"] == temp
        assert row["mean"] == pytest.approx(expected.mean())
        assert row["std"] == pytest.approx(expected.std(ddof=1))
        assert row["n"] == 3 and row["n_expected"] == 3 and not row["incomplete"]
        if method == "ikd":
            assert (row["exam_every"], row["teacher_lr"]) == (EXAM_EVERY, TEACHER_LR)
    # Hard-coded too, in case the arrays above and the code share a mistake.
    assert sel.loc[("sst2", "ikd"), "mean"] == pytest.approx(0.87)
    assert sel.loc[("sst2", "ikd"), "std"] == pytest.approx(0.01)
    assert sel.loc[("rte", "kd"), "mean"] == pytest.approx(0.67)
    assert sel.loc[("rte", "kd"), "std"] == pytest.approx(np.sqrt(0.0007))
    assert sel.loc[("sst2", "kd"), "n_settings"] == 2


def test_differences_and_paired_tests(glue_report) -> None:
    _, report = glue_report
    comp = report.comparisons.set_index(["task", "comparison"])
    for task in ("sst2", "rte"):
        for a, b in (("ikd", "kd"), ("ikd", "finetune"), ("kd", "finetune")):
            x, y = _scores(task, a), _scores(task, b)
            row = comp.loc[(task, f"{a}-{b}")]
            assert row["diff"] == pytest.approx(x.mean() - y.mean())
            assert row["paired_diff"] == pytest.approx((x - y).mean())
            assert row["n_pairs"] == 3
            assert row["p_value"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    assert comp.loc[("sst2", "ikd-kd"), "diff"] == pytest.approx(0.02)
    assert comp.loc[("rte", "ikd-kd"), "diff"] == pytest.approx(0.03)
    # sst2: ikd − kd per seed = [.01, .02, .03] -> t = 3.4641, p = 0.07418 (two-sided, df 2)
    assert comp.loc[("sst2", "ikd-kd"), "p_value"] == pytest.approx(0.0741799, rel=1e-4)


def test_glue_average(glue_report) -> None:
    _, report = glue_report
    avg = report.average.set_index("method")["mean"]
    assert report.avg_tasks == ["sst2", "rte"]
    assert avg["finetune"] == pytest.approx((0.81 + 0.62) / 2)
    assert avg["kd"] == pytest.approx((0.85 + 0.67) / 2)
    assert avg["ikd"] == pytest.approx((0.87 + 0.70) / 2)
    avg_row = report.comparisons.set_index(["task", "comparison"]).loc[("Avg", "ikd-kd")]
    assert avg_row["diff"] == pytest.approx(0.025) and math.isnan(avg_row["p_value"])


def test_best_single_run(glue_report) -> None:
    _, report = glue_report
    best = report.best_runs.set_index(["task", "method"])
    assert best.loc[("sst2", "ikd"), "trial_id"] == "sst2-ikd-T1-s2"
    assert best.loc[("sst2", "ikd"), "best_dev_main"] == pytest.approx(0.88)
    assert best.loc[("rte", "ikd"), "trial_id"] == "rte-ikd-T4-s2"
    assert best.loc[("rte", "ikd"), "temperature"] == 4.0
    assert best.loc[("rte", "kd"), "trial_id"] == "rte-kd-T1-s3"
    assert best.loc[("rte", "finetune"), "seed"] == 3
    assert best.loc[("sst2", "kd"), "final_dev_main"] == pytest.approx(0.85)


def test_renderers(glue_report, tmp_path: Path) -> None:
    data, report = glue_report
    md = render.to_markdown(report)
    assert "| Task | Fine-tune | KD | IKD | IKD − KD |" in md
    assert "| sst2 | 81.00 ± 2.00 (3) | 85.00 ± 1.00 (3) | 87.00 ± 1.00 (3) | +2.00 (p=0.074" in md
    assert "| Avg | 71.50 | 76.00 | 78.50 | +2.50 |" in md
    assert "### Trial status" in md and "### Best single run" in md

    files = render.to_csv(report, tmp_path / "csv", runs=data.runs)
    back = pd.read_csv(tmp_path / "csv" / "selected.csv")
    assert len(back) == 6 and set(back.columns) >= {"task", "method", "mean", "std", "n"}
    sel = back.set_index(["task", "method"])
    assert sel.loc[("rte", "ikd"), "mean"] == pytest.approx(0.70)
    assert len(pd.read_csv(tmp_path / "csv" / "runs.csv")) == 30
    assert all(p.exists() for p in files)

    tex = render.to_latex(report)
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}"):
        assert rule in tex
    assert "glue\\_demo" in tex and "glue_demo" not in tex.replace("glue\\_demo", "")
    assert "87.00 $\\pm$ 1.00 (3)" in tex

    plots = make_plots(report, data.runs, tmp_path / "plots", history=data.history)
    names = sorted(p.name for p in plots)
    assert names == sorted(
        f"{t}_{kind}.png"
        for t in ("sst2", "rte")
        for kind in ("temperature", "learning_curves", "ikd_teacher")
    )
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = render.to_html(report, plots)
    assert page.count("data:image/png;base64,") == len(plots)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    assert "<table" in page and "IKD − KD" in page


def test_make_report_writes_all_formats(glue_store, tmp_path: Path) -> None:
    uri, _ = glue_store
    text, files = make_report("glue_demo", uri, formats=["all"], out=tmp_path / "rep")
    assert "| Task | Fine-tune | KD | IKD |" in text
    names = {p.relative_to(tmp_path / "rep").as_posix() for p in files}
    assert {"report.md", "report.tex", "report.html", "selected.csv", "status.csv"} <= names
    assert any(n.startswith("plots/") and n.endswith(".png") for n in names)
    assert all(p.exists() for p in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep.tmp")]
    # Terminal only: nothing written.
    text2, files2 = make_report(None, uri)
    assert files2 == [] and text2 == text
    with pytest.raises(ValueError, match="Unknown report format"):
        make_report("glue_demo", uri, formats=["pdf"])
    assert normalize_formats("md,html") == ["md", "html"]


@pytest.fixture(scope="module")
def messy_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Failed, killed, running and missing trials, plus a newer sweep where everything failed."""
    tracker = new_tracker(tmp_path_factory, tmp_path_factory.mktemp("messy"), "messy")
    plan = [
        # (method, temperature, seed, status or None for a missing trial, score)
        ("finetune", None, 1, "FINISHED", 0.50),
        ("finetune", None, 2, "FINISHED", 0.53),
        ("finetune", None, 3, None, 0.0),
        ("kd", 1.0, 1, "FINISHED", 0.55),
        ("kd", 1.0, 2, "FINISHED", 0.57),
        ("kd", 1.0, 3, "FAILED", 0.99),
        ("kd", 2.0, 1, "FINISHED", 0.54),
        ("kd", 2.0, 2, "KILLED", 0.98),
        ("kd", 2.0, 3, "RUNNING", 0.97),
        ("ikd", 1.0, 1, "FINISHED", 0.60),
        ("ikd", 1.0, 2, None, 0.0),
        ("ikd", 1.0, 3, None, 0.0),
    ]
    trials = [trial_dict("cola", m, t, s) for m, t, s, _, _ in plan]
    parent = tracker.start_sweep("messy", {}, trials)
    for (method, temp, seed, status, score), trial in zip(plan, trials, strict=True):
        assert trial["seed"] == seed and trial["method"] == method and trial["temperature"] == temp
        if status is not None:
            error = "Traceback\nRuntimeError: boom" if status == "FAILED" else None
            run_trial(tracker, parent, trial, score, status=status, error=error)

    time.sleep(0.05)  # distinct start times: the newest sweep must be unambiguous
    failing = new_tracker(tmp_path_factory, Path(tracker.home), "broken")
    trials = [trial_dict("cola", "kd", 1.0, s) for s in (1, 2)]
    parent = failing.start_sweep("broken", {}, trials)
    for trial in trials:
        run_trial(failing, parent, trial, 0.5, status="FAILED", error="ValueError: bad config")
    return tracker.tracking_uri


def test_status_table_and_failed_runs_excluded(messy_store: str, tmp_path: Path) -> None:
    data = collect("messy", messy_store)
    report = build_report(data.runs, data.expected, data.sweep)
    status = report.status.set_index("method")
    assert status.loc["finetune"].to_dict() == {
        "task": "cola",
        "expected": 3,
        "finished": 2,
        "failed": 0,
        "killed": 0,
        "running": 0,
        "missing": 1,
    }
    kd = status.loc["kd"]
    assert (kd["expected"], kd["finished"], kd["failed"], kd["killed"], kd["running"]) == (
        6,
        3,
        1,
        1,
        1,
    )
    assert kd["missing"] == 0
    assert (status.loc["ikd", "finished"], status.loc["ikd", "missing"]) == (1, 2)
    assert data.runs.set_index("trial_id").loc["cola-kd-T1-s3", "error"].endswith("boom")

    sel = report.selected.set_index("method")
    # FAILED 0.99 / KILLED 0.98 / RUNNING 0.97 never enter: kd T=1 (0.55, 0.57) wins over T=2.
    assert sel.loc["kd", "temperature"] == 1.0
    assert sel.loc["kd", "mean"] == pytest.approx(0.56)
    assert (sel.loc["kd", "n"], sel.loc["kd", "n_expected"]) == (2, 3)
    assert bool(sel.loc["kd", "incomplete"]) and bool(sel.loc["finetune", "incomplete"])
    assert sel.loc["ikd", "n"] == 1 and math.isnan(sel.loc["ikd", "std"])
    cand = report.candidates.set_index(["method", "temperature"])
    assert cand.loc[("kd", 2.0), "mean"] == pytest.approx(0.54)
    assert cand.loc[("kd", 2.0), "n"] == 1
    best = report.best_runs.set_index("method")
    assert best.loc["kd", "best_dev_main"] == pytest.approx(0.57)

    comp = report.comparisons[report.comparisons["task"].eq("cola")].set_index("comparison")
    assert comp.loc["ikd-kd", "n_pairs"] == 1 and math.isnan(comp.loc["ikd-kd", "p_value"])
    assert comp.loc["kd-finetune", "n_pairs"] == 2
    assert comp.loc["kd-finetune", "p_value"] == pytest.approx(
        stats.ttest_rel([0.55, 0.57], [0.50, 0.53]).pvalue
    )

    md = render.to_markdown(report)
    assert "56.00 ± 1.41 (2)†" in md and "60.00 (1)†" in md
    assert "p=n/a, n=1" in md
    status_md = md.split("### Trial status")[1]
    assert "| cola | KD | 6 | 3 | 1 | 1 | 1 | 0 |" in status_md
    assert "| Total |  | 12 | 6 | 1 | 1 | 1 | 3 |" in status_md
    # Plots with a single temperature point or missing data are skipped, never crash.
    plots = make_plots(report, data.runs, tmp_path, history=data.history)
    assert sorted(p.name for p in plots) == [
        "cola_ikd_teacher.png",
        "cola_learning_curves.png",
        "cola_temperature.png",
    ]


def test_only_failed_runs_raise(messy_store: str) -> None:
    with pytest.raises(NoFinishedRuns) as info:
        make_report("broken", messy_store)
    message = str(info.value)
    assert "'broken'" in message and "FAILED=2" in message and "bad config" in message
    assert info.value.counts == {"FAILED": 2}


def test_latest_sweep_and_lookup_errors(
    messy_store: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert latest_sweep_name(messy_store) == "broken"
    assert collect(None, messy_store).sweep == "broken"
    with pytest.raises(LookupError, match="known sweeps: broken, messy"):
        collect("nope", messy_store)
    empty = new_tracker(tmp_path_factory, tmp_path / "empty", "x")
    assert empty.experiment_id
    assert latest_sweep_name(empty.tracking_uri) is None
    with pytest.raises(LookupError, match="No sweeps"):
        collect(None, empty.tracking_uri)


def test_tables_without_expected_or_columns() -> None:
    # Pure-pandas input with nothing but the essentials: no expected trials, no hparam columns.
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "trial_id": ["t1", "t2"],
            "task": ["sst2", "sst2"],
            "method": ["kd", "kd"],
            "seed": [1, 2],
            "status": ["FINISHED", "FINISHED"],
            "best_dev_main": [0.5, 0.7],
        }
    )
    report = build_report(runs, pd.DataFrame(), "plain")
    row = report.selected.iloc[0]
    assert row["mean"] == pytest.approx(0.6) and not row["incomplete"]
    assert pd.isna(row["n_expected"])
    assert report.avg_tasks == ["sst2"]
    assert "60.00 ± 14.14 (2)" in render.to_markdown(report)
