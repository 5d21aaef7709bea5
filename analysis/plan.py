"""``ikd-sweep plan``: how many confirmation seeds a sweep needs to detect an effect.

Per task and comparison, the selected settings' paired differences give the sd of a seed's
difference; the seeds needed are the smallest n at which a paired t-test detects the effect with
80 % power at α 0.05 (``analysis.stats.seeds_needed``). The spread comes from the search seeds;
where they pair fewer than 2 seeds (a search with one seed, as in the demo) and the
confirmation seeds pair at least 2, from those (``phase`` says which). The Avg row plans the
same seeds for every task, for the average over tasks; it needs every task's spread (none when a
task has none: an average cannot be planned from the tasks that have one). The search seeds'
mean difference is selection-biased; their spread is what a fresh seed will show, which is all
that planning needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis import stats
from analysis.display import diff_label
from analysis.frames import AVG, prepare
from analysis.tables import build_report
from ikd_sweep.names import CONFIRM, SEARCH

COLUMNS = ["task", "comparison", "phase", "n_pairs", "sd", "mde", "seeds_needed"]


def _spreads(comp: pd.DataFrame, phase: str) -> pd.DataFrame:
    rows = comp[comp["task"].ne(AVG)]
    ok = rows["n_pairs"].ge(2)
    sd = (rows["se"] * rows["n_pairs"].clip(lower=1) ** 0.5).where(ok)
    return rows.assign(phase=phase, sd=sd)[["task", "comparison", "phase", "n_pairs", "sd",
                                            "mde"]]


def _average(rows: pd.DataFrame, effect: float) -> dict[str, object]:
    """The Avg row of one comparison: NaN unless every task has a spread."""
    var = rows["sd"].to_numpy(dtype=float) ** 2
    row = {"task": AVG, "comparison": rows["comparison"].iloc[0], "phase": "/".join(
        sorted(set(rows["phase"]))), "n_pairs": int(rows["n_pairs"].sum()), "sd": np.nan,
        "mde": np.nan, "seeds_needed": np.nan}
    if len(var) and np.all(np.isfinite(var)):
        # Same arithmetic as the report's Avg row (analysis.compare): sd of a seed's average
        # difference, Welch-Satterthwaite df per seed.
        df_per_seed = var.sum() ** 2 / np.sum(var**2) if var.sum() > 0 else 1.0
        sd_seed = np.sqrt(var.sum()) / len(var)
        row["seeds_needed"] = stats.seeds_needed(effect, np.array([sd_seed]), df_per_seed)[0]
    return row


def plan_seeds(runs: pd.DataFrame, expected: pd.DataFrame | None, effect_pt: float = 0.5
               ) -> tuple[pd.DataFrame, float]:
    """Per task and comparison (and Avg): the phase whose pairs give the spread, the seeds
    paired (``n_pairs``), the sd of a seed's difference, the smallest difference those seeds
    can tell apart (``mde``) and the seeds needed for ``effect_pt`` (in displayed points).
    Also the display scale."""
    runs = prepare(runs)
    search = build_report(runs[runs["phase"].eq(SEARCH)], expected, effect_pt=effect_pt)
    frame = _spreads(search.comparisons, SEARCH)
    if runs["phase"].eq(CONFIRM).any():
        full = build_report(runs, expected, effect_pt=effect_pt).comparisons
        confirm = _spreads(full[full["source"].eq(CONFIRM)], CONFIRM)
        confirm = confirm[confirm["n_pairs"].ge(2)].set_index(["task", "comparison"])
        frame = frame.set_index(["task", "comparison"])
        short = frame.index[frame["n_pairs"].lt(2)].intersection(confirm.index)
        frame.loc[short] = confirm.loc[short, frame.columns]
        frame = frame.reset_index()
    effect = effect_pt / search.scale
    frame["seeds_needed"] = stats.seeds_needed(effect, frame["sd"].to_numpy(dtype=float))
    frame["n_pairs"] = frame["n_pairs"].astype(int)
    parts = []
    for _, rows in frame.groupby("comparison", sort=False):
        parts += [rows, pd.DataFrame([_average(rows, effect)])]
    out = pd.concat(parts, ignore_index=True) if parts else frame
    return out.reindex(columns=COLUMNS).reset_index(drop=True), search.scale


def plan_text(sweep: str, frame: pd.DataFrame, scale: float, effect_pt: float) -> str:
    """The plan in a few lines: per comparison, the seeds each task needs and the Avg's, and
    which phase's seeds each spread comes from."""
    unit = " pt" if scale == 100 else ""
    if frame.empty:
        return f"{sweep}: no comparison with at least two paired seeds to plan from."
    lines = [f"{sweep}: confirmation seeds needed to detect {effect_pt:g}{unit} (80% power, "
             "α 0.05), from the spread of the paired differences of the selected settings "
             "(search seeds; confirmation seeds where the search pairs fewer than 2):"]
    for name, rows in frame.groupby("comparison", sort=False):
        a, b = str(name).split("-", 1)
        cells = [f"{r.task} {_seeds(r.seeds_needed)} ({_phase(r)})" for r in rows.itertuples()
                 if r.task != AVG]
        lines.append(f"  {diff_label(a, b)}: " + ", ".join(cells))
        avg = rows[rows["task"].eq(AVG)]
        if len(avg) and pd.notna(avg["seeds_needed"].iloc[0]):
            lines.append(f"    {AVG} over the tasks: {_seeds(avg['seeds_needed'].iloc[0])} "
                         "seeds per task")
        elif len(rows) > 2:
            lines.append(f"    {AVG} over the tasks: ? (a task has fewer than 2 paired seeds)")
    lines.append("Set search.confirm_seeds to that many fresh seeds (not in search.seeds).")
    return "\n".join(lines)


def _phase(row: Any) -> str:
    """Where a row's spread comes from: ``from 2 confirmation seed pairs``."""
    n = int(row.n_pairs)
    where = "confirmation" if row.phase == CONFIRM else "search"
    short = "; needs at least 2" if n < 2 else ""
    return f"from {n} {where} seed pair{'s' if n != 1 else ''}{short}"


def _seeds(value: float) -> str:
    if pd.isna(value):
        return "?"
    return "> 100000" if value == float("inf") else str(int(value))
