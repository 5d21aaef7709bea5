"""``ikd-sweep plan``: how many confirmation seeds a sweep needs to detect an effect.

From a finished search phase: per task, the selected settings' paired differences over the
search seeds (IKD − KD, and each other comparison) give the sd of a seed's difference; the
seeds needed are the smallest n at which a paired t-test detects the effect with 80 % power at
α 0.05 (``analysis.stats.seeds_needed``). The Avg row plans the same seeds for every task, for
the average over tasks. The search seeds' mean difference is selection-biased; their spread is
what a fresh seed will show, which is all that planning needs.
"""

from __future__ import annotations

import pandas as pd

from analysis.display import diff_label
from analysis.frames import AVG, prepare
from analysis.tables import build_report

COLUMNS = ["task", "comparison", "n_pairs", "sd", "mde", "seeds_needed"]


def plan_seeds(runs: pd.DataFrame, expected: pd.DataFrame | None, effect_pt: float = 0.5
               ) -> tuple[pd.DataFrame, float]:
    """Per task and comparison (and Avg): the search seeds paired (``n_pairs``), the sd of a
    seed's difference, the smallest difference the search seeds can tell apart (``mde``) and
    the seeds needed for ``effect_pt`` (in displayed points). Also the display scale."""
    runs = prepare(runs)
    search = runs[runs["phase"].eq("search")]
    report = build_report(search, expected, stats=True, effect_pt=effect_pt)
    comp = report.comparisons
    sd = comp["se"] * comp["n_pairs"].clip(lower=1) ** 0.5
    out = comp.assign(sd=sd.where(comp["task"].ne(AVG)), seeds_needed=comp["seeds_for_effect"])
    return out[COLUMNS].reset_index(drop=True), report.scale


def plan_text(sweep: str, frame: pd.DataFrame, scale: float, effect_pt: float) -> str:
    """The plan in a few lines: per comparison, the seeds each task needs and the Avg's."""
    unit = " pt" if scale == 100 else ""
    if frame.empty:
        return f"{sweep}: no comparison with at least two paired search seeds to plan from."
    lines = [f"{sweep}: confirmation seeds needed to detect {effect_pt:g}{unit} (80% power, "
             "α 0.05), from the spread of the search seeds' paired differences:"]
    for name, rows in frame.groupby("comparison", sort=False):
        a, b = str(name).split("-", 1)
        cells = [f"{r.task} {_seeds(r.seeds_needed)}" for r in rows.itertuples()
                 if r.task != AVG]
        lines.append(f"  {diff_label(a, b)}: " + ", ".join(cells))
        avg = rows[rows["task"].eq(AVG)]
        if len(avg):
            lines.append(f"    {AVG} over the tasks: {_seeds(avg['seeds_needed'].iloc[0])} "
                         "seeds per task")
    lines.append("Set search.confirm_seeds to that many fresh seeds (not in search.seeds).")
    return "\n".join(lines)


def _seeds(value: float) -> str:
    if pd.isna(value):
        return "? (fewer than 2 paired seeds)"
    return "> 100000" if value == float("inf") else str(int(value))
