"""analysis: stores written through SweepTracker with known numbers -> tables, plots, renderers."""

from __future__ import annotations

import base64
import math
import re
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import migrated_store, start_sweep
from scipy import stats

from analysis import render
from analysis.collect import collect
from analysis.display import SEARCH_LABEL, headline_warning
from analysis.plan import plan_seeds
from analysis.plots import make_plots
from analysis.report import NoFinishedRuns, make_report, normalize_formats
from analysis.stats import holm
from analysis.tables import budget_curves, build_report, select_settings
from ikd_sweep.names import (
    BEST_DEV,
    CONTROL,
    DEV,
    FINAL_DEV,
    SEL_DEV,
    SEL_STEP,
    SEL_VAL,
    TEACHER_DEV,
    VAL,
)
from ikd_sweep.store import TAG
from ikd_sweep.tracking import SweepTracker

SEEDS = (1, 2, 3)
CONFIRM_SEEDS = (4, 5)
EXAM_EVERY, TEACHER_LR = 5.0, 1e-5

# (val, dev) at each run's val-selected checkpoint, per (task, method, temperature), seeds 1-3.
# Selection on val, by hand (dev would choose differently where marked !):
#   sst2: kd T=1 val .86 > T=4 .84 -> T=1 (dev .83; T=4's dev .85 !)   ikd T=1 .88 > .86 -> T=1
#   rte:  kd T=1 val .67 > T=4 .64 -> T=1 (dev .67; T=4's dev .71 !)   ikd T=4 .70 > .68 -> T=4
SCORES = {
    ("sst2", "finetune", None): ([0.80, 0.82, 0.81], [0.79, 0.83, 0.81]),
    ("sst2", "kd", 1.0): ([0.86, 0.85, 0.87], [0.83, 0.84, 0.82]),
    ("sst2", "kd", 4.0): ([0.84, 0.85, 0.83], [0.85, 0.86, 0.84]),
    ("sst2", "ikd", 1.0): ([0.88, 0.87, 0.89], [0.86, 0.88, 0.87]),
    ("sst2", "ikd", 4.0): ([0.85, 0.86, 0.87], [0.84, 0.85, 0.86]),
    ("rte", "finetune", None): ([0.60, 0.63, 0.66], [0.60, 0.62, 0.64]),
    ("rte", "kd", 1.0): ([0.66, 0.67, 0.68], [0.65, 0.66, 0.70]),
    ("rte", "kd", 4.0): ([0.63, 0.64, 0.65], [0.70, 0.71, 0.72]),
    ("rte", "ikd", 1.0): ([0.66, 0.69, 0.69], [0.66, 0.69, 0.69]),
    ("rte", "ikd", 4.0): ([0.70, 0.71, 0.69], [0.70, 0.71, 0.69]),
}
SELECTED = {
    ("sst2", "finetune"): None,
    ("sst2", "kd"): 1.0,
    ("sst2", "ikd"): 1.0,
    ("rte", "finetune"): None,
    ("rte", "kd"): 1.0,
    ("rte", "ikd"): 4.0,
}
# sst2's selected settings re-run on fresh seeds 4, 5 (dev scores); rte has no confirmation.
CONFIRMED = {
    ("sst2", "finetune", None): [0.80, 0.82],
    ("sst2", "kd", 1.0): [0.84, 0.83],
    ("sst2", "ikd", 1.0): [0.86, 0.89],
}
STEPS = (100, 200, 300)


def _markdown(report) -> str:
    """The report's Markdown with tabulate's column padding collapsed (one space each side)."""
    return re.sub(r" {2,}", " ", render.to_markdown(report))


def trial_dict(
    task: str, method: str, temperature: float | None, seed: int, phase: str = "search"
) -> dict:
    ikd = method == "ikd"
    tag = "" if temperature is None else f"-T{temperature:g}"
    return {
        "trial_id": f"{task}-{method}{tag}-{'s' if phase == 'search' else 'c'}{seed}",
        "task": task,
        "method": method,
        "seed": seed,
        "temperature": temperature,
        "exam_every": EXAM_EVERY if ikd else None,
        "teacher_lr": TEACHER_LR if ikd else None,
        "phase": phase,
    }


def run_trial(
    tracker: SweepTracker,
    parent: str,
    trial: dict,
    val: float,
    dev: float,
    status: str = "FINISHED",
    error: str | None = None,
    tag_phase: bool = True,
) -> str:
    """A run logged the way the trainer reports: val/main peaks at the middle evaluation (the
    selected checkpoint, where dev/main = ``dev``), while dev/main peaks at the first (the
    diagnostic best/dev_main = dev + .03) and ends at dev − .01 (final/dev_main)."""
    params = {
        **{k: v for k, v in trial.items() if k != "phase"},
        "train": {"lr": 3e-5, "alpha": 0.5},
        "ikd": {"estimator": "exact"},
    }
    tags = {TAG.PHASE: trial["phase"]} if tag_phase else {}
    run_id = tracker.trial_run(parent, trial["trial_id"], tags=tags, params=params)
    vals = [val - 0.02, val, val - 0.01]
    devs = [dev + 0.03, dev, dev - 0.01]
    best_val, best_dev = -math.inf, -math.inf
    for i, step in enumerate(STEPS):
        best_dev = max(best_dev, devs[i])
        metrics = {"train/loss": 1.0 / step, VAL: vals[i], DEV: devs[i]}
        metrics["dev/accuracy"] = devs[i]
        if vals[i] > best_val:
            best_val = vals[i]
            sel = {SEL_VAL: vals[i], SEL_DEV: devs[i], SEL_STEP: step}
        metrics.update(sel)
        metrics[BEST_DEV] = best_dev
        if trial["method"] == "ikd":
            metrics[TEACHER_DEV] = 0.9 + step / 10000
        tracker.log_metrics(run_id, metrics, step)
    if status == "RUNNING":
        return run_id
    final = {**sel, FINAL_DEV: devs[-1], "final/dev_accuracy": devs[-1]}
    final[BEST_DEV] = best_dev
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
    """2 tasks × {finetune, kd (2 T), ikd (2 T × 1 exam_every × 1 teacher_lr)} × 3 seeds, and
    sst2's selected settings confirmed on 2 fresh seeds."""
    tracker = new_tracker(tmp_path_factory, tmp_path_factory.mktemp("glue"), "glue_demo")
    trials = [
        trial_dict(task, method, temp, seed) for (task, method, temp) in SCORES for seed in SEEDS
    ]
    trials += [
        trial_dict(task, method, temp, seed, "confirm")
        for (task, method, temp) in CONFIRMED
        for seed in CONFIRM_SEEDS
    ]
    parent = start_sweep(tracker, "glue_demo", {"name": "glue_demo"}, trials)
    for (task, method, temp), (vals, devs) in SCORES.items():
        for seed, val, dev in zip(SEEDS, vals, devs, strict=True):
            run_trial(tracker, parent, trial_dict(task, method, temp, seed), val, dev)
    for (task, method, temp), devs in CONFIRMED.items():
        for seed, dev in zip(CONFIRM_SEEDS, devs, strict=True):
            trial = trial_dict(task, method, temp, seed, "confirm")
            # One run without the ikd.phase tag: its phase comes from trials.json.
            untagged = (method, seed) == ("finetune", 5)
            run_trial(tracker, parent, trial, dev + 0.01, dev, tag_phase=not untagged)
    tracker.end_sweep(parent, "FINISHED")
    return tracker.tracking_uri, parent


@pytest.fixture(scope="module")
def glue_report(glue_store):
    uri, _ = glue_store
    data = collect("glue_demo", uri)
    return data, build_report(data.runs, data.expected, data.sweep, knob_stats=True)


def _search_dev(task: str, method: str) -> np.ndarray:
    return np.array(SCORES[(task, method, SELECTED[(task, method)])][1])


def _reported(task: str, method: str) -> np.ndarray:
    """What a cell reports: confirmation seeds where they exist, else the search seeds."""
    key = (task, method, SELECTED[(task, method)])
    return np.array(CONFIRMED[key]) if key in CONFIRMED else _search_dev(task, method)


def test_collect_runs_frame(glue_store, glue_report) -> None:
    _, parent = glue_store
    data, _ = glue_report
    runs = data.runs
    assert data.parent_run_id == parent and data.sweep == "glue_demo"
    assert len(runs) == 36 and len(data.expected) == 36
    assert set(runs["status"]) == {"FINISHED"}
    assert runs["seed"].dtype.kind == "i"
    assert runs["phase"].value_counts().to_dict() == {"search": 30, "confirm": 6}
    assert data.expected["phase"].value_counts().to_dict() == {"search": 30, "confirm": 6}
    assert runs.set_index("trial_id").loc["sst2-finetune-c5", "phase"] == "confirm"  # untagged
    row = runs.set_index("trial_id").loc["sst2-ikd-T4-s2"]
    assert (row["task"], row["method"], row["seed"]) == ("sst2", "ikd", 2)
    assert (row["temperature"], row["exam_every"], row["teacher_lr"]) == (4.0, 5.0, 1e-5)
    assert row["estimator"] == "exact"
    assert row["sel_val_main"] == pytest.approx(0.86)
    assert row["sel_dev_main"] == pytest.approx(0.85)
    assert row["sel_step"] == 200
    assert row["final_dev_main"] == pytest.approx(0.84)
    assert row["best_dev_main"] == pytest.approx(0.88)
    assert row["final_dev_accuracy"] == pytest.approx(0.84)
    assert row["teacher_dev_main"] == pytest.approx(0.93)
    assert row["duration_s"] >= 0
    ft = runs.set_index("trial_id").loc["rte-finetune-s1"]
    assert math.isnan(ft["temperature"]) and pd.isna(ft["estimator"])
    hist = data.history(row["run_id"], DEV)
    assert list(hist["step"]) == list(STEPS)
    assert list(hist["value"]) == pytest.approx([0.88, 0.85, 0.84])


def test_selection_on_val_reports_dev(glue_report) -> None:
    _, report = glue_report
    sel = report.selected.set_index(["task", "method"])
    assert report.tasks == ["sst2", "rte"]  # GLUE order
    assert report.methods == ["finetune", "kd", "ikd"]
    for (task, method), temp in SELECTED.items():
        row = sel.loc[(task, method)]
        expected = _reported(task, method)
        if temp is None:
            assert math.isnan(row["temperature"])
        else:
            assert row["temperature"] == temp
        assert row["source"] == ("confirm" if task == "sst2" else "search")
        assert row["mean"] == pytest.approx(expected.mean())
        assert row["std"] == pytest.approx(expected.std(ddof=1))
        assert row["n"] == row["n_expected"] == len(expected) and not row["incomplete"]
        if method == "ikd":
            assert (row["exam_every"], row["teacher_lr"]) == (EXAM_EVERY, TEACHER_LR)
    # By hand. kd picks T=1 on val although T=4 has the better dev score on both tasks.
    assert sel.loc[("rte", "kd"), "val_score"] == pytest.approx(0.67)
    assert sel.loc[("rte", "kd"), "mean"] == pytest.approx(0.67)
    assert sel.loc[("rte", "kd"), "std"] == pytest.approx(np.sqrt(0.0007))
    assert sel.loc[("sst2", "kd"), "mean"] == pytest.approx(0.835)  # confirmation seeds 4, 5
    assert sel.loc[("sst2", "kd"), "seeds"] == [4, 5]
    assert sel.loc[("sst2", "kd"), "n_settings"] == 2
    cand = report.candidates.set_index(["task", "method", "temperature"])
    assert cand.loc[("sst2", "kd", 4.0), "mean"] == pytest.approx(0.85)  # search dev, unchosen
    assert cand.loc[("sst2", "kd", 1.0), "val_score"] == pytest.approx(0.86)
    # best/dev_main (max over dev, .03 above the selected checkpoint) enters nothing.
    assert not np.isclose(report.selected["mean"], 0.88).any()


def test_differences_tests_and_cis(glue_report) -> None:
    _, report = glue_report
    comp = report.comparisons.set_index(["task", "comparison"])
    for task in ("sst2", "rte"):
        for a, b in (("ikd", "kd"), ("ikd", "finetune"), ("kd", "finetune")):
            x, y = _reported(task, a), _reported(task, b)
            row = comp.loc[(task, f"{a}-{b}")]
            assert row["diff"] == pytest.approx((x - y).mean())
            assert row["n_pairs"] == len(x)
            test = stats.ttest_rel(x, y)
            assert row["p_value"] == pytest.approx(test.pvalue)
            ci = tuple(test.confidence_interval())
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(ci)
            assert row["p_improve"] == pytest.approx(np.mean(x > y))
            assert row["source"] == ("confirm" if task == "sst2" else "search")
            assert (row["n_settings_a"], row["n_settings_b"]) == (
                1 if a == "finetune" else 2,
                1 if b == "finetune" else 2,
            )
    # sst2 ikd − kd on seeds 4, 5: [.02, .06] -> mean .04, se .02, t = 2, p = 0.2952 (df 1);
    # t-interval .04 ± 12.706 × .02; the t-test finds 16.33 se (.327) with 80 % power at df 1.
    sst2 = comp.loc[("sst2", "ikd-kd")]
    assert sst2["diff"] == pytest.approx(0.04)
    assert sst2["p_value"] == pytest.approx(0.295167, rel=1e-4)
    assert (sst2["ci_low"], sst2["ci_high"]) == pytest.approx((0.04 - 0.25412, 0.04 + 0.25412),
                                                              rel=1e-4)
    assert sst2["mde"] == pytest.approx(16.334 * 0.02, rel=1e-3)
    # Seeds to detect 0.5 pt (.005) with sd .0283: n with power(.005 √n / .0283, n − 1) ≥ .8.
    assert sst2["seeds_for_effect"] == 254
    # IKD ahead on both seeds: 100 %, Clopper-Pearson [0.025^(1/2) = .158, 1].
    assert (sst2["p_improve"], sst2["p_improve_low"], sst2["p_improve_high"]) == pytest.approx(
        (1.0, 0.158114, 1.0), rel=1e-4)
    # rte: ikd T=4 − kd T=1 = [.05, .05, −.01] -> mean .03, t = 1.5, p = 0.2724 (df 2).
    rte = comp.loc[("rte", "ikd-kd")]
    assert rte["diff"] == pytest.approx(0.03)
    assert rte["p_value"] == pytest.approx(0.272393, rel=1e-4)
    # Holm over the two tasks: 2 × 0.2724 = 0.5448 for both (monotone step-down).
    assert rte["p_holm"] == pytest.approx(2 * 0.272393, rel=1e-4)
    assert sst2["p_holm"] == pytest.approx(2 * 0.272393, rel=1e-4)
    # Reproducible: the same report twice gives the same CIs.
    again = build_report(glue_report[0].runs, glue_report[0].expected, "again").comparisons
    pd.testing.assert_frame_equal(again, report.comparisons)


def test_glue_average(glue_report) -> None:
    _, report = glue_report
    avg = report.average.set_index("method")["mean"]
    assert report.avg_tasks == ["sst2", "rte"]
    assert avg["finetune"] == pytest.approx((0.81 + 0.62) / 2)
    assert avg["kd"] == pytest.approx((0.835 + 0.67) / 2)
    assert avg["ikd"] == pytest.approx((0.875 + 0.70) / 2)
    avg_row = report.comparisons.set_index(["task", "comparison"]).loc[("Avg", "ikd-kd")]
    assert avg_row["diff"] == pytest.approx(0.035) and math.isnan(avg_row["p_holm"])
    # Welch: se² = (.02² + .02²) / 4 (sst2: sd .0283 over 2 seeds, rte: sd .0346 over 3);
    # df = (v1 + v2)² / (v1² / 1 + v2² / 2) with v1 = v2 = .0004 -> 2.667.
    assert avg_row["se"] == pytest.approx(np.sqrt(0.0004 + 0.0004) / 2, rel=1e-4)
    assert avg_row["df"] == pytest.approx(0.0008**2 / (0.0004**2 + 0.0004**2 / 2), rel=1e-4)
    lo, hi = stats.t.interval(0.95, avg_row["df"], 0.035, avg_row["se"])
    assert (avg_row["ci_low"], avg_row["ci_high"]) == pytest.approx((lo, hi))
    assert avg_row["p_improve"] == pytest.approx(4 / 5)  # sst2 2/2, rte 2/3


def test_budget_fair_view(glue_report) -> None:
    _, report = glue_report
    curve = report.budget.set_index(["task", "method", "n"])["expected_dev"]
    # n = 1: a random setting (mean of the settings' search dev); n = all: the val-selected one.
    assert curve[("sst2", "kd", 1)] == pytest.approx((0.83 + 0.85) / 2)
    assert curve[("sst2", "kd", 2)] == pytest.approx(0.83)
    assert curve[("rte", "ikd", 2)] == pytest.approx(0.70)
    assert curve[("rte", "finetune", 1)] == pytest.approx(0.62)
    at = report.budget_at.set_index(["task", "method"])
    assert at.loc[("sst2", "ikd"), "n"] == 2 and at.loc[("sst2", "finetune"), "n"] == 1
    assert at.loc[("Avg", "kd"), "expected_dev"] == pytest.approx((0.83 + 0.67) / 2)


def test_best_single_run_by_val(glue_report) -> None:
    _, report = glue_report
    best = report.best_runs.set_index(["task", "method"])
    assert best.loc[("sst2", "ikd"), "trial_id"] == "sst2-ikd-T1-s3"
    assert best.loc[("sst2", "ikd"), "sel_dev_main"] == pytest.approx(0.87)
    assert best.loc[("rte", "ikd"), "trial_id"] == "rte-ikd-T4-s2"
    assert best.loc[("rte", "kd"), "trial_id"] == "rte-kd-T1-s3"
    assert best.loc[("rte", "finetune"), "seed"] == 3
    assert best.loc[("sst2", "kd"), "final_dev_main"] == pytest.approx(0.81)
    assert best.loc[("sst2", "kd"), "best_dev_main"] == pytest.approx(0.85)


def test_renderers(glue_report, tmp_path: Path) -> None:
    data, report = glue_report
    md = _markdown(report)
    assert ("| Task | Fine-tune | KD | IKD | IKD − KD [95% CI] | p (Holm) | Can tell apart "
            "| P(IKD > KD) |") in md
    assert (
        "| sst2 | 81.00 ± 1.41 (2) | 83.50 ± 0.71 (2) | 87.50 ± 2.12 (2) | +4.00 [−21.41, +29.41] "
        "| 0.295 (0.545) | ≥ 32.67 pt | 100% [16, 100] |"
    ) in md
    # rte's headline is from search seeds: labelled in every format.
    assert f"**⚠ {SEARCH_LABEL}**" in md and "this table can tell apart differences of ≥" in md
    # rte has no confirmation runs yet: its cells are marked as search seeds.
    assert "| rte | 62.00 ± 2.00 (3)§ | 67.00 ± 2.65 (3)§ | 70.00 ± 1.00 (3)§ | +3.00 [" in md
    assert "| 0.272 (0.545) |" in md
    assert "| Avg | 71.50 | 75.25 | 78.75 | +3.50 [" in md
    assert "Settings tried per task: Fine-tune 1, KD 2, IKD 2." in md
    assert "except those marked §" in md
    for section in ("### Budget-fair view", "### Trial status", "### Best single run (by val)"):
        assert section in md
    assert "| sst2 | 2 | 81.00 (n=1/1) | 83.00 (n=2/2) | 87.00 (n=2/2) | +4.00 |" in md
    # What the knobs do, on val: sst2 kd T=1 (.86, .85, .87) vs T=4 (.84, .85, .83); intervals
    # t(2) over the 3 seeds; p of the seed-blocked ANOVA = the paired t-test (1.73 on 2 df).
    assert ("| sst2 | KD | temperature | T=1: 86.00 [83.52, 88.48] (n=3); T=4: 84.00 [81.52, "
            "86.48] (n=3) | 3 | 0.225 (0.225) | 100% (only knob) |") in md

    files = render.to_csv(report, tmp_path / "csv", runs=data.runs)
    back = pd.read_csv(tmp_path / "csv" / "selected.csv")
    assert len(back) == 6 and set(back.columns) >= {"task", "method", "mean", "std", "n", "source"}
    sel = back.set_index(["task", "method"])
    assert sel.loc[("rte", "ikd"), "mean"] == pytest.approx(0.70)
    assert sel.loc[("sst2", "ikd"), "seeds"] == "4;5"
    comp = pd.read_csv(tmp_path / "csv" / "comparisons.csv", keep_default_na=False)
    assert set(comp.loc[comp["task"].eq("rte"), "warning"]) == {SEARCH_LABEL}
    assert set(comp.loc[comp["task"].eq("sst2"), "warning"]) == {""}
    assert {"mde", "seeds_for_effect", "p_improve", "p_improve_low", "source"} <= set(comp)
    assert len(pd.read_csv(tmp_path / "csv" / "runs.csv")) == 36
    budget = pd.read_csv(tmp_path / "csv" / "budget.csv")
    assert len(budget) == 10  # 2 × (1 + 2 + 2) points
    # All of a method's settings drawn: the selected one is certain, the band closes.
    last = budget.groupby(["task", "method"]).tail(1)
    assert (last["sd_dev"] == 0).all() and (budget["sd_dev"] >= 0).all()
    assert all(p.exists() for p in files)

    tex = render.to_latex(report)
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}"):
        assert rule in tex
    assert "glue\\_demo" in tex and "glue_demo" not in tex.replace("glue\\_demo", "")
    assert "87.50 ± 2.12 (2)" in tex and "IKD − KD [95\\% CI]" in tex
    assert "\\midrule\nAvg & " in tex  # a rule above the summary row
    assert "tab:ikd-budget" in tex
    assert f"\\footnotesize\\textbf{{Note: {SEARCH_LABEL}.}}" in tex

    plots = make_plots(report, data.runs, tmp_path / "plots", history=data.history)
    names = sorted(p.name for p in plots)
    assert names == sorted(
        f"{t}_{kind}.png"
        for t in ("sst2", "rte")
        for kind in ("knobs", "ikd_parallel", "budget", "learning_curves", "ikd_teacher")
    )
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = render.to_html(report, plots)
    assert page.count("data:image/png;base64,") == len(plots)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:4] == b"\x89PNG"
    assert "<table" in page and "IKD − KD [95% CI]" in page and "Budget-fair view" in page
    assert f'<p class="warning">⚠ {SEARCH_LABEL}</p>' in page
    # The knob plots sit under "What the knobs do", ahead of the other plots.
    knobs_at = page.index("<h2>What the knobs do</h2>")
    assert knobs_at < page.index('alt="sst2 knobs"') < page.index("<h2>Plots</h2>")
    # Confirmation seeds only (sst2): no label.
    sst2 = data.runs[data.runs["task"].eq("sst2")]
    confirmed = build_report(sst2, data.expected[data.expected["task"].eq("sst2")], "sst2")
    assert headline_warning(confirmed) is None and SEARCH_LABEL not in render.to_markdown(confirmed)
    assert headline_warning(report) == SEARCH_LABEL


def test_make_report_writes_all_formats(glue_store, tmp_path: Path) -> None:
    uri, _ = glue_store
    text, files = make_report("glue_demo", uri, formats=["all"], out=tmp_path / "rep")
    assert "| Task | Fine-tune | KD | IKD |" in re.sub(r" {2,}", " ", text)
    names = {p.relative_to(tmp_path / "rep").as_posix() for p in files}
    assert {"report.md", "report.tex", "report.html", "selected.csv", "status.csv"} <= names
    assert {"budget.csv", "budget_at.csv", "scores.csv", "status_by_method.csv"} <= names
    assert "plots/sst2_budget.png" in names
    assert all(p.exists() for p in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep.tmp")]
    # What the knobs do: KD's and IKD's temperature (1, 4) on each task, val scores of the
    # search runs (sst2 kd T=1: .86, .85, .87 -> mean .86), in every format.
    assert {"sensitivity.csv", "importance.csv", "plots/sst2_knobs.png",
            "plots/rte_ikd_parallel.png"} <= names
    sens = pd.read_csv(tmp_path / "rep" / "sensitivity.csv")
    assert {"task", "method", "hparam", "value", "n", "mean", "ci_low", "ci_high"} <= set(sens)
    assert set(sens["hparam"]) == {"temperature"} and len(sens) == 8
    kd1 = sens.set_index(["task", "method", "value"]).loc[("sst2", "kd", 1.0)]
    assert (kd1["n"], kd1["mean"]) == (3, pytest.approx(0.86))
    assert set(sens["source"]) == {"search phase, val split (sel/val_main); dev is not read"}
    imp = pd.read_csv(tmp_path / "rep" / "importance.csv")
    assert {"task", "method", "hparam", "p_value", "p_holm", "importance"} <= set(imp)
    # sst2 kd: T=1 (.86, .85, .87) vs T=4 (.84, .85, .83), seeds as blocks: a paired t-test.
    kd = imp.set_index(["task", "method"]).loc[("sst2", "kd")]
    assert kd["p_value"] == pytest.approx(stats.ttest_rel([.86, .85, .87], [.84, .85, .83]).pvalue)
    assert kd["importance"] == 1.0
    for name in ("report.md", "report.html", "report.tex"):
        page = (tmp_path / "rep" / name).read_text()
        assert "What the knobs do" in page and "dev is not read" not in page
        assert "nothing here reads dev" in page.replace("\\", "")
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
        # (method, temperature, seed, status or None for a missing trial, val); dev = val − .1
        ("finetune", None, 1, "FINISHED", 0.50),
        ("finetune", None, 2, "FINISHED", 0.53),
        ("finetune", None, 3, None, 0.0),
        ("kd", 1.0, 1, "FINISHED", 0.55),
        ("kd", 1.0, 2, "FINISHED", 0.57),
        ("kd", 1.0, 3, "FAILED", 0.99),
        ("kd", 2.0, 1, "FINISHED", 0.58),
        ("kd", 2.0, 2, "KILLED", 0.98),
        ("kd", 2.0, 3, "RUNNING", 0.97),
        ("ikd", 1.0, 1, "FINISHED", 0.60),
        ("ikd", 1.0, 2, None, 0.0),
        ("ikd", 1.0, 3, None, 0.0),
    ]
    trials = [trial_dict("cola", m, t, s) for m, t, s, _, _ in plan]
    parent = start_sweep(tracker, "messy", {}, trials)
    for (method, temp, seed, status, val), trial in zip(plan, trials, strict=True):
        assert trial["seed"] == seed and trial["method"] == method and trial["temperature"] == temp
        if status is not None:
            error = "Traceback\nRuntimeError: boom" if status == "FAILED" else None
            run_trial(tracker, parent, trial, val, val - 0.1, status=status, error=error)

    time.sleep(0.05)  # distinct start times: the newest sweep must be unambiguous
    failing = new_tracker(tmp_path_factory, Path(tracker.home), "broken")
    trials = [trial_dict("cola", "kd", 1.0, s) for s in (1, 2)]
    parent = start_sweep(failing, "broken", {}, trials)
    for trial in trials:
        run_trial(failing, parent, trial, 0.5, 0.4, status="FAILED", error="ValueError: bad config")
    return tracker.tracking_uri


def test_failed_seeds_count_against_their_setting(messy_store: str, tmp_path: Path) -> None:
    data = collect("messy", messy_store)
    report = build_report(data.runs, data.expected, data.sweep, knob_stats=True)
    status = report.status.set_index("method")
    assert status.loc["finetune"].to_dict() == pytest.approx(
        {
            "task": "cola",
            "expected": 3,
            "finished": 2,
            "failed": 0,
            "killed": 0,
            "running": 0,
            "missing": 1,
            "failure_rate": 0.0,
            "stop_rate": 0.0,
        }
    )
    kd = status.loc["kd"]
    assert (kd["expected"], kd["finished"], kd["failed"], kd["killed"], kd["running"]) == (
        6,
        3,
        1,
        1,
        1,
    )
    assert kd["missing"] == 0
    assert (kd["failure_rate"], kd["stop_rate"]) == pytest.approx((0.2, 0.2))  # of 5 that ended
    assert (status.loc["ikd", "finished"], status.loc["ikd", "missing"]) == (1, 2)
    by_method = report.status_by_method.set_index("method")
    assert by_method.loc["kd", "failure_rate"] == pytest.approx(0.2)
    assert data.runs.set_index("trial_id").loc["cola-kd-T1-s3", "error"].endswith("boom")

    # Worst finished val of cola: .50 (finetune seed 1). kd T=2 finished one seed, its best:
    # on its survivor it would rank .58 > T=1's .56; scored with the worst for its killed and
    # running seeds it ranks (.58 + .50 + .50) / 3 = .5267 < T=1's (.55 + .57 + .50) / 3 = .54.
    cand = report.candidates.set_index(["method", "temperature"])
    assert cand.loc[("kd", 2.0), "val_score"] == pytest.approx((0.58 + 0.5 + 0.5) / 3)
    assert cand.loc[("kd", 1.0), "val_score"] == pytest.approx(0.54)
    assert (cand.loc[("kd", 2.0), "n"], cand.loc[("kd", 2.0), "slots"]) == (1, 3)
    sel = report.selected.set_index("method")
    assert sel.loc["kd", "temperature"] == 1.0
    # FAILED .99 / KILLED .98 / RUNNING .97 never enter a mean.
    assert sel.loc["kd", "mean"] == pytest.approx(0.46)
    assert (sel.loc["kd", "n"], sel.loc["kd", "n_expected"]) == (2, 3)
    assert bool(sel.loc["kd", "incomplete"]) and bool(sel.loc["finetune", "incomplete"])
    assert sel.loc["ikd", "n"] == 1 and math.isnan(sel.loc["ikd", "std"])
    assert set(sel["source"]) == {"search"}
    best = report.best_runs.set_index("method")
    assert best.loc["kd", "sel_val_main"] == pytest.approx(0.58)

    comp = report.comparisons[report.comparisons["task"].eq("cola")].set_index("comparison")
    assert comp.loc["ikd-kd", "n_pairs"] == 1 and math.isnan(comp.loc["ikd-kd", "p_value"])
    assert math.isnan(comp.loc["ikd-kd", "ci_low"])
    assert comp.loc["kd-finetune", "n_pairs"] == 2
    assert comp.loc["kd-finetune", "p_value"] == pytest.approx(
        stats.ttest_rel([0.45, 0.47], [0.40, 0.43]).pvalue
    )

    md = _markdown(report)
    assert "| cola | 41.50 ± 2.12 (2)† | 46.00 ± 1.41 (2)† | 50.00 (1)† | +5.00 | – |" in md
    assert f"{SEARCH_LABEL}: no confirmation runs" in md and "§" not in md
    status_md = md.split("### Trial status")[1]
    assert "| cola | KD | 6 | 3 | 1 | 1 | 1 | 0 | 20% | 20% |" in status_md
    assert "| Total | | 12 | 6 | 1 | 1 | 1 | 3 | 12% | 12% |" in status_md
    assert "| KD | 6 | 3 | 1 | 1 | 1 | 0 | 20% | 20% |" in status_md  # per method
    # kd's temperature: 3 finished runs over 2 values and 2 seeds leave no residual degree of
    # freedom: no p, and the reason; its means are still shown (one run at T=2: no interval).
    knob = report.importance.set_index(["method", "hparam"]).loc[("kd", "temperature")]
    assert math.isnan(knob["p_value"]) and knob["note"] in md
    assert knob["note"] == "needs more runs: none left over to estimate the noise"
    sens = report.sensitivity.set_index(["method", "value"])
    assert sens.loc[("kd", 2.0), "n"] == 1 and math.isnan(sens.loc[("kd", 2.0), "ci_low"])
    # Plots with a single point or missing data are skipped, never crash (ikd: one run).
    plots = make_plots(report, data.runs, tmp_path, history=data.history)
    assert sorted(p.name for p in plots) == [
        "cola_budget.png",
        "cola_ikd_teacher.png",
        "cola_knobs.png",
        "cola_learning_curves.png",
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
    assert collect(None, messy_store).sweep == "broken"
    with pytest.raises(LookupError, match="known sweeps: broken, messy"):
        collect("nope", messy_store)
    empty = new_tracker(tmp_path_factory, tmp_path / "empty", "x")
    assert empty.experiment_id
    with pytest.raises(LookupError, match="no sweep in the store"):
        collect(None, empty.tracking_uri)


def two_kd_runs(task: str) -> pd.DataFrame:
    """Two finished kd seeds of `task`: nothing but the columns a report needs."""
    return pd.DataFrame({"run_id": ["a", "b"], "trial_id": ["t1", "t2"], "task": [task, task],
                         "method": ["kd", "kd"], "seed": [1, 2],
                         "status": ["FINISHED", "FINISHED"], "sel_val_main": [0.55, 0.75],
                         "sel_dev_main": [0.5, 0.7]})


def test_tables_without_expected_or_columns() -> None:
    # Pure-pandas input with nothing but the essentials: no expected trials, no hparam columns.
    runs = two_kd_runs("sst2")
    report = build_report(runs, pd.DataFrame(), "plain")
    row = report.selected.iloc[0]
    assert row["mean"] == pytest.approx(0.6) and not row["incomplete"]
    assert pd.isna(row["n_expected"]) and row["source"] == "search"
    assert report.avg_tasks == ["sst2"]
    assert "60.00 ± 14.14 (2)" in _markdown(report)
    with pytest.raises(ValueError, match="column 'phase' has \\['later'\\]; valid values: search"):
        build_report(runs.assign(phase="later"), None)


def test_latex_escapes_names() -> None:
    # A task and a sweep named with LaTeX's special characters must print as typed.
    runs = two_kd_runs("my_task&co")
    tex = render.to_latex(build_report(runs, None, "50%_sweep#1"))
    assert "my\\_task\\&co & 60.00 ± 14.14 (2) \\\\" in tex
    assert "sweep 50\\%\\_sweep\\#1" in tex
    assert "my_task" not in tex and "50%" not in tex and "sweep#1" not in tex
    # main, budget-fair, best run, status, status per method
    assert tex.count("\\begin{table}") == tex.count("\\bottomrule") == 5


def _frame(rows: list[tuple]) -> pd.DataFrame:
    columns = ["task", "method", "seed", "temperature", "teacher_lr", "phase", "status"]
    columns += ["sel_val_main", "sel_dev_main"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["run_id"] = frame["trial_id"] = [f"r{i}" for i in range(len(frame))]
    frame["exam_every"] = np.where(frame["method"].str.startswith("ikd"), 5.0, np.nan)
    return frame


def test_control_confirmation_and_selection_api() -> None:
    ok = "FINISHED"
    rows = []
    for seed in (1, 2):
        rows += [
            ("rte", "kd", seed, 2.0, None, "search", ok, 0.60, 0.50 + seed / 100),
            ("rte", "ikd", seed, 2.0, 1e-5, "search", ok, 0.61, 0.52 + seed / 100),
            ("rte", "ikd", seed, 4.0, 1e-5, "search", ok, 0.62, 0.40 + seed / 100),
            ("rte", "ikd", seed, 2.0, 0.0, "search", ok, 0.70, 0.45 + seed / 100),
        ]
    # Confirmation of ikd's selected setting (T=4) only; a FAILED confirmation run is ignored.
    rows += [
        ("rte", "ikd", 7, 4.0, 1e-5, "confirm", ok, 0.50, 0.60),
        ("rte", "ikd", 8, 4.0, 1e-5, "confirm", ok, 0.50, 0.64),
        ("rte", "ikd", 9, 4.0, 1e-5, "confirm", "FAILED", np.nan, np.nan),
    ]
    runs = _frame(rows)
    picked = select_settings(runs, None).set_index("method")
    # teacher_lr 0 is a control, selected on its own: its .70 val does not win ikd's selection.
    assert set(picked.index) == {"kd", "ikd", CONTROL}
    assert picked.loc["ikd", "temperature"] == 4.0 and picked.loc["ikd", "teacher_lr"] == 1e-5
    assert picked.loc[CONTROL, "teacher_lr"] == 0.0
    assert picked.loc[CONTROL, "base_method"] == "ikd"
    assert math.isnan(picked.loc["kd", "teacher_lr"]) and math.isnan(picked.loc["kd", "exam_every"])

    report = build_report(runs, None, "control")
    assert report.methods == ["kd", "ikd", CONTROL]
    sel = report.selected.set_index("method")
    assert sel.loc["ikd", "source"] == "confirm" and sel.loc["ikd", "seeds"] == [7, 8]
    assert sel.loc["ikd", "mean"] == pytest.approx(0.62)
    assert sel.loc["kd", "source"] == "search"
    # The same columns the sweep driver reads from build_report(...).selected.
    assert list(report.selected.columns[:5]) == ["task", "method", "base_method", "temperature",
                                                 "exam_every"]
    assert "teacher_lr" in report.selected.columns
    comp = report.comparisons[report.comparisons["task"].eq("rte")].set_index("comparison")
    assert comp.loc["ikd-ikd-control", "n_pairs"] == 0  # confirm seeds vs search seeds
    assert "ikd-kd" in comp.index and "kd-finetune" not in comp.index  # no finetune runs
    md = _markdown(report)
    assert "IKD control (teacher_lr=0)" in md and "a control, selected separately" in md
    assert "IKD was given more settings than KD" in md


def test_holm_against_hand_values() -> None:
    # p sorted .01, .02, .03, .04 (m = 4): 4×.01, 3×.02, 2×.03, 1×.04 -> .04, .06, .06, .06.
    got = holm([0.03, 0.01, np.nan, 0.04, 0.02])
    assert got[[1, 4, 0, 3]] == pytest.approx([0.04, 0.06, 0.06, 0.06])
    assert math.isnan(got[2])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_budget_curve_matches_enumeration() -> None:
    rng = np.random.default_rng(0)
    val = rng.normal(size=7)
    dev = rng.normal(size=7)
    candidates = pd.DataFrame({"task": "rte", "method": "kd", "temperature": np.arange(7.0),
                               "exam_every": np.nan, "teacher_lr": np.nan, "n": 3,
                               "val_score": val, "mean": dev})
    curve = budget_curves(candidates)["expected_dev"].to_numpy()
    for n in range(1, 8):
        picks = [dev[list(c)][np.argmax(val[list(c)])] for c in combinations(range(7), n)]
        assert curve[n - 1] == pytest.approx(np.mean(picks))
    assert curve[-1] == pytest.approx(dev[np.argmax(val)])


def test_plan_from_the_search_phase(glue_store) -> None:
    from typer.testing import CliRunner

    from ikd_sweep.cli import app

    uri, _ = glue_store
    data = collect("glue_demo", uri)
    frame, scale = plan_seeds(data.runs, data.expected, effect_pt=0.5)
    row = frame.set_index(["task", "comparison"]).loc[("sst2", "ikd-kd")]
    # Search seeds of the selected settings (T=1 both): ikd − kd = [.03, .04, .05], sd .01.
    assert row["n_pairs"] == 3 and row["sd"] == pytest.approx(0.01)
    assert row["seeds_needed"] == 34  # power(.005 √n / .01, n − 1) reaches .8 at n = 34
    result = CliRunner().invoke(app, ["plan", "glue_demo", "--tracking-uri", uri, "--effect",
                                      "0.5"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "detect 0.5 pt" in result.stdout and "sst2 34" in result.stdout
    bad = CliRunner().invoke(app, ["plan", "nope", "--tracking-uri", uri])
    assert bad.exit_code == 2 and "known sweeps" in bad.output


def test_plan_uses_confirmation_pairs_where_the_search_has_too_few(glue_store) -> None:
    uri, _ = glue_store
    data = collect("glue_demo", uri)
    # A search with one seed (as the demo's): sst2's confirmation seeds 4, 5 pair; rte's do not.
    runs = data.runs[data.runs["phase"].eq("confirm") | data.runs["seed"].eq(1)]
    frame, scale = plan_seeds(runs, data.expected, effect_pt=0.5)
    rows = frame[frame["comparison"].eq("ikd-kd")].set_index("task")
    assert rows.loc["sst2", "phase"] == "confirm" and rows.loc["sst2", "n_pairs"] == 2
    # Confirmation ikd − kd on sst2: .86 − .84, .89 − .83 -> [.02, .06], sd .0283.
    assert rows.loc["sst2", "sd"] == pytest.approx(np.std([0.02, 0.06], ddof=1))
    assert rows.loc["rte", "phase"] == "search" and rows.loc["rte", "n_pairs"] == 1
    assert math.isnan(rows.loc["rte", "seeds_needed"])
    # No Avg answer where a task has none.
    assert math.isnan(rows.loc["Avg", "seeds_needed"])
    from analysis.plan import plan_text

    text = plan_text("glue_demo", frame, scale, 0.5)
    assert "sst2 " + str(int(rows.loc["sst2", "seeds_needed"])) in text
    assert "(from 2 confirmation seed pairs)" in text
    assert "rte ? (from 1 search seed pair; needs at least 2)" in text
    assert "Avg over the tasks: ? (a task has fewer than 2 paired seeds)" in text
    assert "seeds per task" not in text.split("IKD − KD")[1].split("\n  ")[0]


def test_plan_and_export_print_no_download_bars(glue_store, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from ikd_sweep.cli import app

    uri, _ = glue_store
    # As in a fresh shell: nothing has switched MLflow's progress bars off yet.
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    result = CliRunner().invoke(app, ["plan", "glue_demo", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "Downloading artifacts" not in result.output
    # A student artifact on sst2's kd runs (a stand-in folder), for export to download.
    from mlflow import MlflowClient

    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    client = MlflowClient(uri)
    kd = collect("glue_demo", uri).runs
    for run_id in kd.loc[kd["task"].eq("sst2") & kd["method"].eq("kd"), "run_id"]:
        client.log_artifacts(run_id, str(tmp_path / "student"), "student")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    got = CliRunner().invoke(app, ["export", "--sweep", "glue_demo", "--task", "sst2", "--method",
                                   "kd", "--out", str(tmp_path / "out"), "--tracking-uri", uri])
    assert got.exit_code == 0, got.output
    assert (tmp_path / "out" / "config.json").exists()
    assert "Downloading artifacts" not in got.output
