"""PNG plots of a sweep: sensitivity to each hyperparameter, learning curves, the IKD teacher.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through pyplot, so plotting leaves no global state behind and needs no display. Every plot is
skipped (not drawn empty) when its data is missing.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.frames import setting_mask
from analysis.tables import Report
from ikd_sweep.names import CONTROL, DEV, HPARAMS, METHOD_ORDER

_log = logging.getLogger(__name__)

#: ``history(run_id, metric)`` -> DataFrame with columns step, value (``SweepRuns.history``).
HistoryFn = Callable[[str, str], pd.DataFrame]

COLORS = {"finetune": "#7f7f7f", "kd": "#1f77b4", "ikd": "#d62728", CONTROL: "#ff9896"}
LABELS = {
    "temperature": "temperature T",
    "exam_every": "exam every (course steps)",
    "teacher_lr": "teacher learning rate",
}
METHOD_LABELS = {"finetune": "fine-tune", "kd": "KD", "ikd": "IKD", CONTROL: "IKD control"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "task"


def _color(method: str) -> str:
    return COLORS.get(method, "#2ca02c")


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _save(fig: Figure, ax: Axes, path: Path, xlabel: str, ylabel: str, title: str,
          legend_title: str | None = None) -> Path:
    """Label the plot, add the grid and legend, and write the PNG."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=legend_title, title_fontsize=8)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def _selected(report: Report, task: str, method: str) -> pd.Series | None:
    sel = report.selected
    if sel.empty:
        return None
    pick = sel[sel["task"].eq(task) & sel["method"].eq(method)]
    return None if pick.empty else pick.iloc[0]


def _sweep_points(report: Report, task: str, method: str, param: str) -> pd.DataFrame | None:
    """Candidates of ``method`` on ``task`` along ``param``, the other hyperparameters held at
    the selected setting's values."""
    best = _selected(report, task, method)
    cand = report.candidates
    if best is None or cand.empty or param not in cand.columns:
        return None
    rows = cand[cand["task"].eq(task) & cand["method"].eq(method)]
    # Hold every hyperparameter but ``param`` at the selected value: blank ``param`` on both
    # sides and compare the settings.
    fixed = {h: (best[h] if h != param else math.nan) for h in HPARAMS}
    rows = rows[setting_mask(rows.assign(**{param: math.nan}), fixed).to_numpy()]
    rows = rows[rows[param].notna()].sort_values(param)
    return rows if len(rows) else None


def _sensitivity(
    report: Report, task: str, param: str, methods: tuple[str, ...], path: Path
) -> Path | None:
    series = {m: _sweep_points(report, task, m, param) for m in methods}
    series = {m: s for m, s in series.items() if s is not None}
    if not series or max(len(s) for s in series.values()) < 2:
        return None  # one point is not a curve
    scale = report.scale
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for method, pts in series.items():
        x = pts[param].to_numpy(dtype=float)
        y = pts["mean"].to_numpy(dtype=float) * scale
        err = np.nan_to_num(pts["std"].to_numpy(dtype=float) * scale)
        ax.errorbar(
            x,
            y,
            yerr=err,
            marker="o",
            capsize=4,
            color=_color(method),
            label=f"{_label(method)} (mean ± std over seeds)",
        )
    ft = _selected(report, task, "finetune")
    if ft is not None:
        ax.axhline(float(ft["mean"]) * scale, color=_color("finetune"), ls="--", label="fine-tune")
    if param == "teacher_lr" and all((s[param] > 0).all() for s in series.values()):
        ax.set_xscale("log")
    held = [h for h in HPARAMS if h != param]
    name = LABELS.get(param, param)
    ylabel = "dev score, search seeds" + (" (×100)" if scale == 100 else "")
    return _save(fig, ax, path, name, ylabel, f"{task}: dev score vs {name}",
                 f"other hparams ({', '.join(held)}) at best")


def _selected_run_ids(report: Report, task: str, method: str) -> list[str]:
    """The runs behind a reported cell (confirmation runs when it has them), by seed."""
    scores = report.scores
    mine = scores[scores["task"].eq(task) & scores["method"].eq(method)]
    return [str(r) for r in mine.sort_values("seed")["run_id"] if isinstance(r, str)]


def _budget(report: Report, task: str, path: Path) -> Path | None:
    """Expected dev score of the val-selected setting vs number of settings tried."""
    curves = report.budget[report.budget["task"].eq(task)]
    if curves.empty or curves["n_settings"].max() < 2:
        return None
    scale = report.scale
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for method, pts in curves.groupby("method", sort=False):
        ax.plot(
            pts["n"],
            pts["expected_dev"].astype(float) * scale,
            marker="o" if len(pts) < 12 else None,
            ms=4,
            color=_color(str(method)),
            label=f"{_label(str(method))} ({len(pts)} setting{'s' if len(pts) > 1 else ''})",
        )
    at = report.budget_at
    budget = at.loc[at["task"].eq(task) & at["n_settings"].gt(1), "n"]
    if len(budget):
        ax.axvline(int(budget.max()), color="#555", ls=":", lw=1, label="same budget")
    if curves["n_settings"].max() > 12:
        ax.set_xscale("log")
    return _save(fig, ax, path, "settings tried (n, drawn without replacement)",
                 "expected dev score" + (" (×100)" if scale == 100 else ""),
                 f"{task}: expected dev score of the val-selected setting")


def _curves(
    report: Report,
    runs: pd.DataFrame,
    task: str,
    history: HistoryFn,
    metric: str,
    methods: tuple[str, ...],
    title: str,
    ylabel: str,
    path: Path,
) -> Path | None:
    drawn = False
    # Same units as the tables (×100 for fractions).
    scale = report.scale
    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    for method in methods:
        labelled = False
        for run_id in _selected_run_ids(report, task, method):
            try:
                points = history(run_id, metric)
            except Exception as exc:  # a missing history is a skipped line, not a failed report
                _log.warning("No %s history for run %s: %s", metric, run_id, exc)
                continue
            if points is None or points.empty or not {"step", "value"} <= set(points.columns):
                continue
            points = points.sort_values("step")
            ax.plot(
                points["step"],
                points["value"].astype(float) * scale,
                color=_color(method),
                alpha=0.8,
                lw=1.2,
                marker="." if len(points) < 30 else None,
                label=None if labelled else f"{_label(method)} (one line per seed)",
            )
            labelled = drawn = True
    if not drawn:
        return None
    return _save(fig, ax, path, "optimizer step",
                 ylabel + (" (×100)" if scale == 100 else ""), title)


def make_plots(
    report: Report,
    runs: pd.DataFrame,
    out_dir: Path,
    history: HistoryFn | None = None,
) -> list[Path]:
    """Write every plot there is data for into ``out_dir``; returns the written paths.

    Per task: dev score vs temperature (KD and IKD), vs exam_every and vs teacher_lr (IKD), each
    at the best values of the other hyperparameters; the budget-fair curves (expected dev score
    of the val-selected setting vs settings tried); with ``history``: dev/main learning curves
    of the selected settings' runs, and the IKD teacher's own dev score over training.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for task in report.tasks:
        name = _safe(task)
        jobs: list[Callable[[], Path | None]] = [
            lambda t=task, n=name: _sensitivity(
                report, t, "temperature", ("kd", "ikd"), out_dir / f"{n}_temperature.png"
            ),
            lambda t=task, n=name: _sensitivity(
                report, t, "exam_every", ("ikd",), out_dir / f"{n}_exam_every.png"
            ),
            lambda t=task, n=name: _sensitivity(
                report, t, "teacher_lr", ("ikd",), out_dir / f"{n}_teacher_lr.png"
            ),
            lambda t=task, n=name: _budget(report, t, out_dir / f"{n}_budget.png"),
        ]
        if history is not None:
            jobs += [
                lambda t=task, n=name: _curves(
                    report,
                    runs,
                    t,
                    history,
                    DEV,
                    METHOD_ORDER,
                    f"{t}: dev score during training (selected settings)",
                    "dev score",
                    out_dir / f"{n}_learning_curves.png",
                ),
                lambda t=task, n=name: _curves(
                    report,
                    runs,
                    t,
                    history,
                    "teacher/dev_main",
                    ("ikd",),
                    f"{t}: IKD teacher's own dev score during training",
                    "teacher dev score",
                    out_dir / f"{n}_ikd_teacher.png",
                ),
            ]
        for job in jobs:
            try:
                path = job()
            except Exception as exc:  # one bad plot must not cost the whole report
                _log.warning("Plot for task %s skipped: %s", task, exc)
                continue
            if path is not None:
                written.append(path)
    return written
