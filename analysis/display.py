"""What a report shows: its tables as display frames (text cells, scores ×100 when they are
fractions, see ``Report.scale``), the notes under the main table, and the label of a headline
that comes from search seeds. ``analysis.render`` writes these in each format.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from analysis.compare import EFFECT_PT
from analysis.frames import AVG
from analysis.tables import INCOMPLETE_MARK, Report
from ikd_sweep.names import CONFIRM, CONTROL, HPARAMS, SEARCH

METHOD_LABELS = {
    "finetune": "Fine-tune",
    "kd": "KD",
    "ikd": "IKD",
    CONTROL: "IKD control (teacher_lr=0)",
}
SHORT_LABELS = {CONTROL: "control"}
HPARAM_SHORT = {"temperature": "T", "exam_every": "exam_every", "teacher_lr": "teacher_lr"}
MAIN_DIFF = ("ikd", "kd")
#: Marks a cell reported on search seeds while others have confirmation seeds.
SEARCH_MARK = "§"
#: The label of every headline that comes from search seeds, in every format.
SEARCH_LABEL = "search seeds — selection-biased, run confirmation seeds"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def diff_label(a: str, b: str) -> str:
    return f"{method_label(a)} − {SHORT_LABELS.get(b, method_label(b))}"


def headline_warning(report: Report) -> str | None:
    """:data:`SEARCH_LABEL` when the compared methods' headline cells (IKD and KD, else all)
    come from search seeds, on some task or all; None when they are confirmation seeds."""
    sel = report.selected
    if sel.empty:
        return None
    compared = [m for m in MAIN_DIFF if m in report.methods]
    compared = compared if len(compared) == 2 else report.methods
    if len(compared) < 2:
        return None
    mine = sel[sel["method"].isin(compared) & (sel["n"] > 0)]
    return SEARCH_LABEL if mine["source"].eq(SEARCH).any() else None


def _num(value: float, scale: float, digits: int = 2) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value) * scale:.{digits}f}"


def _signed(value: float, scale: float) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{'+' if value >= 0 else '−'}{abs(float(value)) * scale:.2f}"


def _p(p: float) -> str:
    if p is None or pd.isna(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _hp(value: float) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):g}"


def setting_text(row: pd.Series) -> str:
    """``T=2, exam_every=5`` (used hyperparameters only); ``–`` for fine-tuning."""
    parts = [f"{HPARAM_SHORT[h]}={_hp(row[h])}" for h in HPARAMS if h in row and pd.notna(row[h])]
    return ", ".join(parts) if parts else "–"


def _mixed_sources(report: Report) -> bool:
    return report.selected["source"].nunique() > 1 if not report.selected.empty else False


def _cell(row: pd.Series, scale: float, mark_search: bool) -> str:
    if int(row["n"]) == 0:
        return "–"
    mark = INCOMPLETE_MARK if row["incomplete"] else ""
    if mark_search and row["source"] == SEARCH:
        mark += SEARCH_MARK
    std = "" if pd.isna(row["std"]) else f" ± {_num(row['std'], scale)}"
    return f"{_num(row['mean'], scale)}{std} ({int(row['n'])}){mark}"


def _ci(row: pd.Series, scale: float) -> str:
    if pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return ""
    return f" [{_signed(row['ci_low'], scale)}, {_signed(row['ci_high'], scale)}]"


def _diff_cell(row: pd.Series | None, scale: float) -> str:
    return "–" if row is None else _signed(row["diff"], scale) + _ci(row, scale)


def _p_cell(row: pd.Series | None) -> str:
    if row is None or pd.isna(row["p_value"]):
        return "–"
    return _p(row["p_value"]) + ("" if pd.isna(row["p_holm"]) else f" ({_p(row['p_holm'])})")


def _mde_cell(row: pd.Series | None, scale: float) -> str:
    """The smallest true difference the row finds with 80 % power."""
    if row is None or pd.isna(row["mde"]):
        return "–"
    return f"≥ {_num(row['mde'], scale)}" + (" pt" if scale == 100 else "")


def _improve_cell(row: pd.Series | None) -> str:
    if row is None or pd.isna(row["p_improve"]):
        return "–"
    pct = [f"{100 * float(row[c]):.0f}" for c in ("p_improve", "p_improve_low", "p_improve_high")]
    return f"{pct[0]}% [{pct[1]}, {pct[2]}]"


def _seeds_cell(value: float) -> str:
    return "–" if pd.isna(value) else "> 100000" if value == float("inf") else str(int(value))


def _rows(frame: pd.DataFrame, row: Callable[[pd.Series], dict[str, object]]) -> pd.DataFrame:
    """A display table with one row per row of ``frame``."""
    return pd.DataFrame([row(r) for _, r in frame.iterrows()])


def main_table(report: Report) -> pd.DataFrame:
    """Rows: tasks and Avg; columns: each method's ``mean ± std (n)``, IKD − KD with its 95 %
    t-interval, the paired test's p with Holm's p beside it, the smallest difference the row
    can tell apart (80 % power), and the probability of improvement."""
    scale = report.scale
    sel = report.selected.set_index(["task", "method"]) if report.has_results else None
    comp = report.comparisons
    a, b = MAIN_DIFF
    with_diff = a in report.methods and b in report.methods
    mixed = _mixed_sources(report)
    rows = []
    for task in [*report.tasks, AVG]:
        if task == AVG and not report.avg_tasks:
            continue
        row: dict[str, str] = {"Task": task}
        for method in report.methods:
            if task == AVG:
                avg = report.average[report.average["method"].eq(method)]
                row[method_label(method)] = _num(avg["mean"].iloc[0], scale) if len(avg) else "–"
            elif sel is not None and (task, method) in sel.index:
                row[method_label(method)] = _cell(sel.loc[(task, method)], scale, mixed)
            else:
                row[method_label(method)] = "–"
        if with_diff:
            hit = comp[comp["task"].eq(task) & comp["a"].eq(a) & comp["b"].eq(b)]
            pick = hit.iloc[0] if len(hit) else None
            row[f"{diff_label(a, b)} [95% CI]"] = _diff_cell(pick, scale)
            row["p (Holm)"] = _p_cell(pick)
            row["Can tell apart"] = _mde_cell(pick, scale)
            row[f"P({method_label(a)} > {method_label(b)})"] = _improve_cell(pick)
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons_table(report: Report) -> pd.DataFrame:
    scale = report.scale
    return _rows(report.comparisons, lambda r: {
        "Task": r["task"],
        "Comparison": diff_label(r["a"], r["b"]),
        "Mean a": _num(r["mean_a"], scale),
        "Mean b": _num(r["mean_b"], scale),
        "Paired difference": _signed(r["diff"], scale),
        "95% CI": _ci(r, scale).strip() or "–",
        "Shared seeds": int(r["n_pairs"]),
        "t": "–" if pd.isna(r["t"]) else f"{r['t']:.2f}".replace("-", "−"),
        "p": "–" if pd.isna(r["p_value"]) else f"{r['p_value']:.4f}",
        "p (Holm)": "–" if pd.isna(r["p_holm"]) else f"{r['p_holm']:.4f}",
        "Can tell apart (80% power)": _mde_cell(r, scale),
        f"Seeds for {EFFECT_PT:g}{' pt' if scale == 100 else ''}": _seeds_cell(
            r["seeds_for_effect"]),
        "P(a > b) [95% CI]": _improve_cell(r),
        "Seeds": "confirmation" if r["source"] == CONFIRM else f"search ({SEARCH_LABEL})",
        "Settings a / b": f"{int(r['n_settings_a'])} / {int(r['n_settings_b'])}",
    })


def _seeds_text(r: pd.Series) -> str:
    exp = "?" if pd.isna(r["n_expected"]) else str(int(r["n_expected"]))
    return f"{int(r['n'])}/{exp}" + (f" {INCOMPLETE_MARK}" if r["incomplete"] else "")


def selected_table(report: Report) -> pd.DataFrame:
    scale = report.scale
    return _rows(report.selected, lambda r: {
        "Task": r["task"],
        "Method": method_label(r["method"]),
        "Selected setting (on val)": setting_text(r),
        "Val score": _num(r["val_score"], scale),
        "Reported on": "confirmation seeds" if r["source"] == CONFIRM else "search seeds",
        "Dev mean": _num(r["mean"], scale),
        "Std": _num(r["std"], scale),
        "Seeds (finished/expected)": _seeds_text(r),
        "Settings tried": int(r["n_settings"]),
    })


def budget_display(report: Report) -> pd.DataFrame:
    """Expected dev score of the val-chosen setting at the same budget per task (n settings
    drawn at random from those each method tried), with IKD − KD at that budget."""
    at = report.budget_at
    if at.empty:
        return pd.DataFrame()
    scale = report.scale
    methods = [m for m in report.methods if m in set(at["method"])]
    a, b = MAIN_DIFF
    rows = []
    for task in [*report.tasks, AVG]:
        mine = at[at["task"].eq(task)].set_index("method")
        if mine.empty:
            continue
        row: dict[str, str] = {"Task": task}
        budget = mine.loc[mine["n_settings"].fillna(0).astype(int) > 1, "n"]
        row["Budget n"] = "" if task == AVG or budget.empty else str(int(budget.max()))
        for m in methods:
            if m in mine.index:
                used = "" if task == AVG else f" (n={int(mine.at[m, 'n'])}/"
                used += "" if task == AVG else f"{int(mine.at[m, 'n_settings'])})"
                row[method_label(m)] = _num(mine.at[m, "expected_dev"], scale) + used
            else:
                row[method_label(m)] = "–"
        if a in mine.index and b in mine.index:
            row[diff_label(a, b)] = _signed(
                mine.at[a, "expected_dev"] - mine.at[b, "expected_dev"], scale
            )
        rows.append(row)
    return pd.DataFrame(rows)


def best_runs_table(report: Report) -> pd.DataFrame:
    scale = report.scale
    scores = {"Val": "sel_val_main", "Dev": "sel_dev_main", "Final dev": "final_dev_main",
              "Max dev (diagnostic)": "best_dev_main"}
    return _rows(report.best_runs, lambda r: {
        "Task": r["task"], "Method": method_label(r["method"]), "Trial": r["trial_id"],
        "Seed": "" if pd.isna(r["seed"]) else int(r["seed"]), "Setting": setting_text(r),
        **{name: _num(r[column], scale) for name, column in scores.items()},
    })


def _pct(value: float) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * float(value):.0f}%"


def _status_frame(frame: pd.DataFrame, total_label: str | None) -> pd.DataFrame:
    if frame.empty:
        return frame
    frame = frame.copy()
    frame["method"] = frame["method"].map(method_label)
    counts = ["expected", "finished", "failed", "killed", "running", "missing"]
    if total_label is not None:
        total = {"task": total_label, "method": ""}
        total.update({c: int(frame[c].sum()) for c in counts})
        ended = total["finished"] + total["failed"] + total["killed"]
        total["failure_rate"] = total["failed"] / ended if ended else float("nan")
        total["stop_rate"] = total["killed"] / ended if ended else float("nan")
        frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
    frame["failure_rate"] = frame["failure_rate"].map(_pct)
    frame["stop_rate"] = frame["stop_rate"].map(_pct)
    names = {"killed": "Killed (early stop)", "failure_rate": "Failure rate"}
    names["stop_rate"] = "Early-stop rate"
    return frame.rename(columns=lambda c: names.get(c, c.capitalize()))


def status_display(report: Report) -> pd.DataFrame:
    """Per (task, method) trial counts, failure and early-stop rates, and a total row."""
    return _status_frame(report.status, "Total")


def status_method_display(report: Report) -> pd.DataFrame:
    """Per method over all tasks: counts, failure and early-stop rates."""
    return _status_frame(report.status_by_method, None)



def _settings_counts(report: Report) -> dict[str, str]:
    """Per method: the number of settings it was given per task (``4`` or ``30–36``)."""
    out = {}
    for method in report.methods:
        counts = report.selected.loc[report.selected["method"].eq(method), "n_settings"]
        lo, hi = int(counts.min()), int(counts.max())
        out[method] = str(lo) if lo == hi else f"{lo}–{hi}"
    return out


def _seed_notes(report: Report) -> list[str]:
    """Which seeds the cells use (confirmation, search or both), and incomplete cells."""
    sel, out = report.selected, []
    if report.has_results:
        sources = set(sel.loc[sel["n"] > 0, "source"])
        if sources == {CONFIRM}:
            out.append(
                "All cells use only the confirmation seeds: fresh seeds that played no part in "
                "the selection."
            )
        elif sources == {SEARCH}:
            out.append(
                f"{SEARCH_LABEL}: no confirmation runs (search.confirm_seeds), so cells use the "
                "search seeds that also selected the setting. A run lucky on val is lucky on "
                "dev too, so these favour the method given more settings (A/A simulation: "
                "+0.42 pt for 36 vs 4 settings); `ikd-sweep plan` says how many "
                "confirmation seeds to run."
            )
        elif sources:
            out.append(
                f"Cells use only the confirmation seeds, except those marked {SEARCH_MARK}: "
                f"{SEARCH_LABEL} (no finished confirmation run yet)."
            )
    if report.has_results and sel["incomplete"].any():
        out.append(f"{INCOMPLETE_MARK} fewer finished seeds than the sweep expected.")
    return out


def _settings_notes(report: Report) -> list[str]:
    """How many settings each method was given, and a warning where IKD and KD differ."""
    sel, out = report.selected, []
    counts = _settings_counts(report) if report.has_results else {}
    if counts:
        out.append(
            "Settings tried per task: "
            + ", ".join(f"{method_label(m)} {c}" for m, c in counts.items())
            + "."
        )
        a, b = MAIN_DIFF
        if a in counts and b in counts:
            n_a = sel.loc[sel["method"].eq(a), "n_settings"].max()
            n_b = sel.loc[sel["method"].eq(b), "n_settings"].max()
            more, fewer = (a, b) if n_a > n_b else (b, a)
            if n_a != n_b:
                out.append(
                    f"{method_label(more)} was given more settings than {method_label(fewer)}. "
                    "Selection on val keeps its dev score unbiased, but it had more chances; "
                    "the budget-fair table compares both at the same number of settings."
                )
    return out


def notes(report: Report) -> list[str]:
    """The notes under the main table: what the cells are, where the seeds come from, what the
    statistics mean."""
    scale = report.scale
    out = [
        "Cells: dev score (`sel/dev_main`, the task's GLUE metric"
        + (" ×100" if scale == 100 else "")
        + ") at each run's checkpoint with the best val score, mean ± sample std (n seeds), of "
        "the setting selected on the validation split (best mean `sel/val_main` over the search "
        "seeds). GLUE dev chooses nothing: no checkpoint, setting or early stop.",
        "Failed, early-stopped, unfinished and missing search seeds count against their setting: "
        "each is scored as the worst finished val score of the task when settings are ranked.",
    ]
    out += _seed_notes(report) + _settings_notes(report)
    if len([m for m in MAIN_DIFF if m in report.methods]) == 2:
        unit = " pt" if scale == 100 else ""
        out.append(
            f"{diff_label(*MAIN_DIFF)}: mean paired difference over the seeds both share, with "
            "its paired t-interval (95%); p: paired t-test (n/a with fewer than 2 pairs), "
            "Holm's correction across tasks in brackets. Can tell apart: this table can tell "
            "apart differences of ≥ X" + unit + ", the smallest true difference its test finds "
            "4 times in 5 (80% power, α 0.05) with the seeds run and the spread seen; smaller "
            "gains may be real but this table cannot show them (seeds needed for "
            f"{EFFECT_PT:g}{unit}: Paired comparisons). P(IKD > KD): share of the seeds on which "
            "IKD beat KD, with its Clopper-Pearson 95% interval."
        )
    if report.avg_tasks:
        out.append(
            f"{AVG}: mean of the per-task means over {', '.join(report.avg_tasks)}; its interval "
            "is a t-interval whose standard error adds up the per-task variances of the mean "
            "differences, with Welch-Satterthwaite degrees of freedom (chosen by the A/A "
            "simulation: it covers ≥ 95% at 3 and 5 seeds; a bootstrap over seeds covers only "
            "82–90%); none when a task has fewer than 2 pairs. Its P(IKD > KD) pools all pairs."
        )
    missing = [t for t in report.tasks if t not in report.avg_tasks]
    if report.avg_tasks and missing:
        out.append(f"Not in {AVG} (a method has no result): {', '.join(missing)}.")
    if CONTROL in report.methods:
        out.append(
            f"{method_label(CONTROL)}: IKD's code path with a teacher that never moves; "
            "a control, selected separately."
        )
    return out


def budget_note(report: Report) -> str:
    return (
        "Expected dev score of the setting a method would have selected on val had it tried only "
        "n of its settings (drawn without replacement; exact over the val ranks, Dodge et al. "
        "2019). n per task: the smallest number of settings a tuned method had; each cell shows "
        "n=used/pooled (a setting none of whose seeds finished is not in the pool)."
    )



# ------------------------------------------------------------------------------------------
# What the knobs do
# ------------------------------------------------------------------------------------------

#: The section's title, the same in every format.
KNOBS_TITLE = "What the knobs do"


def _knob_value(hparam: str, value: float) -> str:
    return f"{HPARAM_SHORT.get(hparam, hparam)}={_hp(value)}"


def knobs_table(report: Report) -> pd.DataFrame:
    """One row per (task, method, swept knob): the mean val score at each value with its 95 %
    interval and runs, the knob test's p (Holm across the method's knobs) and its importance
    share. Empty when no knob was swept."""
    imp, sens = report.importance, report.sensitivity
    if imp.empty:
        return pd.DataFrame()
    scale = report.scale
    groups = dict(list(sens.groupby(["task", "method", "hparam"], sort=False)))
    # A method's only swept knob has all of the knobs' share by definition: say so.
    alone = imp.groupby(["task", "method"], sort=False).size().eq(1)

    def values(r: pd.Series) -> str:
        rows = groups.get((r["task"], r["method"], r["hparam"]))
        if rows is None:
            return "–"
        return "; ".join(
            f"{_knob_value(r['hparam'], v.value)}: {_num(v.mean, scale)}"
            + ("" if pd.isna(v.ci_low) else f" [{_num(v.ci_low, scale)}, {_num(v.ci_high, scale)}]")
            + f" (n={int(v.n)})"
            for v in rows.itertuples()
        )

    return _rows(imp, lambda r: {
        "Task": r["task"],
        "Method": method_label(r["method"]),
        "Knob": r["hparam"],
        "Val score by value: mean [95% CI] (runs)": values(r),
        "Seeds": int(r["n_seeds"]),
        "p (Holm)": "–" if pd.isna(r["p_value"]) else f"{_p(r['p_value'])} ({_p(r['p_holm'])})",
        "Importance": "–" if pd.isna(r["importance"]) else f"{100 * r['importance']:.0f}%"
        + (" (only knob)" if alone[(r["task"], r["method"])] else ""),
        "Note": r["note"] or "",
    })


def knobs_note(report: Report) -> str:
    """What the knob table is computed from and what its numbers mean (every format)."""
    one_seed = not report.importance.empty and report.importance["n_seeds"].lt(2).any()
    return (
        "Search phase and val split only (`sel/val_main` of the finished search runs): nothing "
        "here reads dev. Mean: the val score at each value of the knob, averaged over the other "
        "knobs within each seed, then over seeds; its 95% t-interval is over seeds (runs of one "
        "seed share its luck)"
        + ("; with one seed, over that seed's runs, so it leaves out the seed's own luck"
           if one_seed else "")
        + ". p: does the knob change the val score, an F-test in an additive ANOVA with the "
        "seed as a block and the other knobs as factors, Holm's correction across the knobs of "
        "a task and method in brackets (chosen by simulation, benchmarks/README.md: with no knob "
        "effect and a seed's runs sharing its luck, p < 0.05 in 5.4% of cells at 3 seeds; a "
        "temperature effect of +1 pt per step found in 98% of IKD's 36-setting grids at 3 "
        "seeds, in 40% of KD's 4 settings). Importance: the knob's share of the variance the knobs "
        "explain (Optuna's fANOVA over the finished runs, val centred within seed). "
        f"{method_label(CONTROL)} is its own method: IKD's teacher_lr is swept over its "
        "positive values only. A knob with one value is not listed."
    )
