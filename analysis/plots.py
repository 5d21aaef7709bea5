"""PNG plots of a sweep: what each knob does, the IKD runs in parallel coordinates, the
budget-fair curves, learning curves, the IKD teacher.

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
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedLocator,
    FormatStrFormatter,
    FuncFormatter,
    MaxNLocator,
    NullLocator,
)
from scipy import stats

from analysis.knobs import LOG_KNOBS, knob_runs
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


def _knob_panel(ax: Axes, report: Report, task: str, hparam: str) -> None:
    """Val score vs one knob: one line per method that sweeps it, 95 % interval bars; the
    teacher_lr axis is logarithmic, with the control (teacher_lr 0) as a band."""
    scale = report.scale
    sens = report.sensitivity
    rows = sens[sens["task"].eq(task) & sens["hparam"].eq(hparam)]
    for method, pts in rows.groupby("method", sort=False):
        y = pts["mean"].to_numpy(dtype=float) * scale
        lo = np.nan_to_num(y - pts["ci_low"].to_numpy(dtype=float) * scale)
        hi = np.nan_to_num(pts["ci_high"].to_numpy(dtype=float) * scale - y)
        ax.errorbar(pts["value"].to_numpy(dtype=float), y, yerr=[lo, hi], marker="o",
                    capsize=4, color=_color(str(method)), label=_label(str(method)) + (
                        " (no interval: one run per value)" if pts["ci_low"].isna().all()
                        else ""))
    if hparam == "teacher_lr":
        ax.set_xscale("log")
        control = _control_val(report, task)
        if control is not None:
            mean, low, high = (v * scale for v in control)
            ax.axhline(mean, color=_color(CONTROL), ls="--",
                       label=f"{_label(CONTROL)} (teacher_lr 0)")
            if np.isfinite(low):
                ax.axhspan(low, high, color=_color(CONTROL), alpha=0.15, lw=0)
    # Ticks at the values swept (a grid of 2, 4 has no 2.5), also on the log axis.
    values = np.unique(rows["value"].to_numpy(dtype=float))
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel=LABELS.get(hparam, hparam), title=hparam)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _control_val(report: Report, task: str) -> tuple[float, float, float] | None:
    """The control's mean val score on ``task`` over its finished search runs, with a 95 %
    t-interval over its settings' means (none with one setting); None without a control."""
    cand = report.candidates
    mine = cand[cand["task"].eq(task) & cand["method"].eq(CONTROL) & cand["n"].gt(0)]
    if mine.empty:
        return None
    n = mine["n"].to_numpy(dtype=float)
    mean = float(np.sum(mine["val_mean"].to_numpy(dtype=float) * n) / n.sum())
    if len(mine) < 2:
        return mean, math.nan, math.nan
    spread = float(np.std(mine["val_mean"].to_numpy(dtype=float), ddof=1))
    half = float(stats.t.ppf(0.975, len(mine) - 1)) * spread / math.sqrt(len(mine))
    return mean, mean - half, mean + half


def _knobs(report: Report, task: str, path: Path) -> Path | None:
    """One panel per swept knob of ``task``: val score (search phase) vs its values."""
    sens = report.sensitivity
    knobs = [h for h in HPARAMS if (sens["task"].eq(task) & sens["hparam"].eq(h)).any()]
    if not knobs:
        return None
    fig = Figure(figsize=(4.2 * len(knobs), 3.8))
    axes = fig.subplots(1, len(knobs), squeeze=False)[0]
    for ax, hparam in zip(axes, knobs, strict=True):
        _knob_panel(ax, report, task, hparam)
    axes[0].set_ylabel("val score, search runs" + (" (×100)" if report.scale == 100 else ""))
    fig.suptitle(f"{task}: val score by knob\n(mean over the other knobs and seeds, 95% CI)",
                 fontsize=9)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def _parallel(report: Report, runs: pd.DataFrame, task: str, path: Path) -> Path | None:
    """Parallel coordinates of the finished ikd search runs on ``task``, coloured by val."""
    frame, swept = knob_runs(runs)
    knobs = swept.get((task, "ikd"))
    mine = frame[frame["task"].eq(task) & frame["method"].eq("ikd")]
    if not knobs or len(mine) < 2:
        return None
    axes_of = list(HPARAMS)
    # Each axis spans its own values (teacher_lr in log10), placed on [0, 1].
    cols = []
    for h in axes_of:
        v = mine[h].to_numpy(dtype=float)
        v = np.log10(v) if h in LOG_KNOBS else v
        lo, hi = np.nanmin(v), np.nanmax(v)
        cols.append((v - lo) / (hi - lo) if hi > lo else np.full(v.shape, 0.5))
    val = mine["val"].to_numpy(dtype=float) * report.scale
    norm = Normalize(np.min(val), np.max(val))
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(axes_of))
    rng = np.random.default_rng(0)  # a little jitter so that seeds of one setting separate
    for i in np.argsort(val):  # the best runs drawn last, on top
        y = np.array([c[i] for c in cols]) + rng.uniform(-0.015, 0.015, len(axes_of))
        ax.plot(x, y, color=cmap(norm(val[i])), alpha=0.7, lw=1)
    for j, h in enumerate(axes_of):
        ax.axvline(j, color="#444", lw=0.8)
        for value in sorted(mine[h].dropna().unique()):
            v = np.log10(value) if h in LOG_KNOBS else value
            raw = mine[h].to_numpy(dtype=float)
            raw = np.log10(raw) if h in LOG_KNOBS else raw
            lo, hi = np.nanmin(raw), np.nanmax(raw)
            ax.text(j + 0.03, (v - lo) / (hi - lo) if hi > lo else 0.5, f"{value:g}",
                    fontsize=7, va="center")
    ax.set_xticks(x, [LABELS.get(h, h) for h in axes_of], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes_of) - 0.6)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax)
    bar.set_label("val score" + (" (×100)" if report.scale == 100 else ""))
    ax.set_title(f"{task}: IKD search runs ({len(mine)}), coloured by val score")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


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
        mean = pts["expected_dev"].to_numpy(dtype=float) * scale
        if "sd_dev" in pts:
            sd = np.nan_to_num(pts["sd_dev"].to_numpy(dtype=float)) * scale
            ax.fill_between(pts["n"].to_numpy(dtype=float), mean - sd, mean + sd,
                            color=_color(str(method)), alpha=0.15, lw=0)
        ax.plot(
            pts["n"],
            mean,
            marker="o" if len(pts) < 12 else None,
            ms=4,
            color=_color(str(method)),
            label=f"{_label(str(method))} ({len(pts)} setting{'s' if len(pts) > 1 else ''})",
        )
    at = report.budget_at
    budget = at.loc[at["task"].eq(task) & at["n_settings"].gt(1), "n"]
    if len(budget):
        ax.axvline(int(budget.max()), color="#555", ls=":", lw=1, label="same budget")
    _integer_ticks(ax, int(curves["n_settings"].max()))
    return _save(fig, ax, path, "settings tried (n, drawn without replacement; band ± sd "
                 "over the draws)",
                 "expected dev score" + (" (×100)" if scale == 100 else ""),
                 f"{task}: expected dev score of the val-selected setting")


def _integer_ticks(ax: Axes, most: int) -> None:
    """Whole numbers on a count axis (log-spaced beyond 12)."""
    if most > 12:
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if t < most]
        ax.xaxis.set_major_locator(FixedLocator([*ticks, most]))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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

    Per task: what the knobs do (val score of the search runs vs each swept knob, one panel per
    knob, from ``report.sensitivity``; empty without ``knob_stats``); parallel coordinates of
    the IKD search runs coloured by val score; the budget-fair curves (expected dev score of the
    val-selected setting vs settings tried, ± sd band); with ``history``: dev/main learning curves
    of the selected settings' runs, and the IKD teacher's own dev score over training.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for task in report.tasks:
        name = _safe(task)
        jobs: list[Callable[[], Path | None]] = [
            lambda t=task, n=name: _knobs(report, t, out_dir / f"{n}_knobs.png"),
            lambda t=task, n=name: _parallel(report, runs, t, out_dir / f"{n}_ikd_parallel.png"),
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
