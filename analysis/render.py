"""Render a :class:`~analysis.tables.Report` as Markdown, CSV, LaTeX (booktabs) and one
self-contained HTML page (plots embedded as base64 data URIs, nothing fetched from elsewhere).

Scores are shown ×100 when they are fractions (see ``tables.display_scale``); CSV files keep the
raw values so that they can be analysed further.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from analysis.tables import AVG, CONTROL, HPARAMS, INCOMPLETE_MARK, Report, display_scale

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


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def diff_label(a: str, b: str) -> str:
    return f"{method_label(a)} − {SHORT_LABELS.get(b, method_label(b))}"


def report_scale(report: Report) -> float:
    values = pd.concat([report.candidates["mean"], report.selected["mean"]], ignore_index=True)
    return display_scale(values) if len(values) else 1.0


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
    if mark_search and row["source"] == "search":
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
    if row is None or row["task"] == AVG or pd.isna(row["p_value"]):
        return "–"
    return f"{_p(row['p_value'])} ({_p(row['p_holm'])})"


def _rows(frame: pd.DataFrame, row: Callable[[pd.Series], dict[str, object]]) -> pd.DataFrame:
    """A display table with one row per row of ``frame``."""
    return pd.DataFrame([row(r) for _, r in frame.iterrows()])


def main_table(report: Report) -> pd.DataFrame:
    """Rows: tasks and Avg; columns: each method's ``mean ± std (n)``, IKD − KD with its 95 %
    bootstrap CI, and the paired test's p with Holm's p beside it."""
    scale = report_scale(report)
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
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons_table(report: Report) -> pd.DataFrame:
    scale = report_scale(report)
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
        "Settings a / b": f"{int(r['n_settings_a'])} / {int(r['n_settings_b'])}",
    })


def _seeds_text(r: pd.Series) -> str:
    exp = "?" if pd.isna(r["n_expected"]) else str(int(r["n_expected"]))
    return f"{int(r['n'])}/{exp}" + (f" {INCOMPLETE_MARK}" if r["incomplete"] else "")


def selected_table(report: Report) -> pd.DataFrame:
    scale = report_scale(report)
    return _rows(report.selected, lambda r: {
        "Task": r["task"],
        "Method": method_label(r["method"]),
        "Selected setting (on val)": setting_text(r),
        "Val score": _num(r["val_score"], scale),
        "Reported on": "confirmation seeds" if r["source"] == "confirm" else "search seeds",
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
    scale = report_scale(report)
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
    scale = report_scale(report)
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


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table. The cells are display text already: tabulate must
    not parse "81.00" as a number and print it as 81."""
    if frame.empty:
        return "_(none)_"
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def _settings_counts(report: Report) -> dict[str, str]:
    """Per method: the number of settings it was given per task (``4`` or ``30–36``)."""
    out = {}
    for method in report.methods:
        counts = report.selected.loc[report.selected["method"].eq(method), "n_settings"]
        lo, hi = int(counts.min()), int(counts.max())
        out[method] = str(lo) if lo == hi else f"{lo}–{hi}"
    return out


def _notes(report: Report) -> list[str]:
    scale = report_scale(report)
    sel = report.selected
    notes = [
        "Cells: dev score (`sel/dev_main`, the task's GLUE metric"
        + (" ×100" if scale == 100 else "")
        + ") at each run's checkpoint with the best val score, mean ± sample std (n seeds), of "
        "the setting selected on the validation split (best mean `sel/val_main` over the search "
        "seeds). GLUE dev chooses nothing: no checkpoint, setting or early stop.",
        "Failed, early-stopped, unfinished and missing search seeds count against their setting: "
        "each is scored as the worst finished val score of the task when settings are ranked.",
    ]
    if report.has_results:
        sources = set(sel.loc[sel["n"] > 0, "source"])
        if sources == {"confirm"}:
            notes.append(
                "All cells use only the confirmation seeds: fresh seeds that played no part in "
                "the selection."
            )
        elif sources == {"search"}:
            notes.append(
                "No confirmation runs (search.confirm_seeds): cells use the search seeds that "
                "also selected the setting. Val chose it, so dev noise did not; a seed that was "
                "lucky on both val and dev still favours the method given more settings, which "
                "confirmation seeds remove."
            )
        elif sources:
            notes.append(
                f"Cells use only the confirmation seeds, except those marked {SEARCH_MARK} "
                "(no finished confirmation run yet: search seeds)."
            )
    if report.has_results and sel["incomplete"].any():
        notes.append(f"{INCOMPLETE_MARK} fewer finished seeds than the sweep expected.")
    counts = _settings_counts(report) if report.has_results else {}
    if counts:
        notes.append(
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
                notes.append(
                    f"{method_label(more)} was given more settings than {method_label(fewer)}. "
                    "Selection on val keeps its dev score unbiased, but it had more chances; "
                    "the budget-fair table compares both at the same number of settings."
                )
    if a_b := [m for m in MAIN_DIFF if m in report.methods]:
        if len(a_b) == 2:
            notes.append(
                f"{diff_label(*MAIN_DIFF)}: mean paired difference over the seeds both share, "
                "with a percentile bootstrap 95% CI (seeds resampled). With 3–5 seeds such CIs "
                "are too narrow (A/A simulation, benchmarks/aa_simulation.py's design: per-task "
                "CIs covered the truth 74–79% of the time, Avg CIs 86%); the p-values are "
                "calibrated. p: paired t-test (n/a with fewer than 2 pairs), Holm's correction "
                "across tasks in brackets."
            )
    if report.avg_tasks:
        notes.append(
            f"{AVG}: mean of the per-task means over {', '.join(report.avg_tasks)}; its CI "
            "resamples seeds within each task."
        )
    missing = [t for t in report.tasks if t not in report.avg_tasks]
    if report.avg_tasks and missing:
        notes.append(f"Not in {AVG} (a method has no result): {', '.join(missing)}.")
    if CONTROL in report.methods:
        notes.append(
            f"{method_label(CONTROL)}: IKD's code path with a teacher that never moves; "
            "a control, selected separately."
        )
    return notes


def _budget_note(report: Report) -> str:
    return (
        "Expected dev score of the setting a method would have selected on val had it tried only "
        "n of its settings (drawn without replacement; exact over the val ranks, Dodge et al. "
        "2019). n per task: the smallest number of settings a tuned method had; each cell shows "
        "n=used/pooled (a setting none of whose seeds finished is not in the pool)."
    )


def to_markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    """The whole report as Markdown (main table first: it is what the terminal shows)."""
    parts = [f"## Sweep `{report.sweep}`: KD vs IKD" if report.sweep else "## KD vs IKD", ""]
    parts += [md_table(main_table(report)), ""]
    parts += [f"- {n}" for n in _notes(report)]
    if not report.comparisons.empty:
        parts += ["", "### Paired comparisons", "", md_table(comparisons_table(report))]
    budget = budget_display(report)
    if not budget.empty:
        parts += ["", "### Budget-fair view", "", md_table(budget), "", f"- {_budget_note(report)}"]
    parts += ["", "### Selected settings", "", md_table(selected_table(report))]
    parts += ["", "### Best single run (by val)", "", md_table(best_runs_table(report))]
    parts += ["", "### Trial status", "", md_table(status_display(report))]
    parts += ["", "Per method:", "", md_table(status_method_display(report))]
    if plots:
        parts += ["", "### Plots", ""]
        parts += [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------


def to_csv(report: Report, out_dir: Path, runs: pd.DataFrame | None = None) -> list[Path]:
    """Tidy CSV files, raw (unscaled) values: one per table, plus ``runs.csv`` when given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {
        "selected.csv": report.selected,
        "scores.csv": report.scores,
        "comparisons.csv": report.comparisons,
        "average.csv": report.average.assign(tasks=";".join(report.avg_tasks)),
        "candidates.csv": report.candidates,
        "budget.csv": report.budget,
        "budget_at.csv": report.budget_at,
        "best_runs.csv": report.best_runs,
        "status.csv": report.status,
        "status_by_method.csv": report.status_by_method,
    }
    if runs is not None:
        frames["runs.csv"] = runs
    written = []
    for name, frame in frames.items():
        frame = frame.copy()
        for col in frame.columns:
            # Lists (seeds, run ids) as ';'-joined strings so the file reads back cleanly.
            if frame[col].map(lambda v: isinstance(v, (list, tuple))).any():
                frame[col] = frame[col].map(
                    lambda v: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                )
        path = out_dir / name
        frame.to_csv(path, index=False)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------
# LaTeX
# ------------------------------------------------------------------------------------------

def _latex_tabular(frame: pd.DataFrame, caption: str, label: str) -> str:
    """One booktabs ``table``: pandas escapes the cells and headers (a task named ``a_b``
    prints as such); ±, −, –, † and § stay UTF-8, which LaTeX reads natively since 2018."""
    styler = (frame.style.hide(axis="index").format(escape="latex", na_rep="–")
              .format_index(escape="latex", axis="columns")
              .set_table_styles([{"selector": "small", "props": ":;"}], overwrite=False))
    tex = styler.to_latex(hrules=True, column_format="l" + "r" * (len(frame.columns) - 1),
                          environment="table", position="t", position_float="centering",
                          caption=caption, label=label)
    last = str(frame.iloc[-1, 0])
    if len(frame) > 1 and last in (AVG, "Total"):  # a rule above the summary row
        head, _, tail = tex.rpartition(f"\n{_latex_text(last)} & ")
        tex = f"{head}\n\\midrule\n{_latex_text(last)} & {tail}"
    return tex


def _latex_text(text: str) -> str:
    """``text`` escaped for LaTeX by pandas, the same way as the table cells."""
    return (pd.DataFrame([[text]]).style.hide(axis="index").hide(axis="columns")
            .format(escape="latex").to_string(delimiter="").strip())


def to_latex(report: Report) -> str:
    """booktabs tables (main, budget-fair, best run, status) ready for ``\\input``; needs
    ``booktabs``."""
    scale = report_scale(report)
    sources = set(report.selected["source"]) if report.has_results else set()
    seeds = "confirmation seeds" if sources == {"confirm"} else "seeds"
    caption = (
        f"Dev results of sweep {_latex_text(report.sweep)}"
        + (" ($\\times$100)" if scale == 100 else "")
        + f": mean $\\pm$ std (n {seeds}) of the setting selected on the validation split"
        + (
            f"; {INCOMPLETE_MARK} fewer seeds than expected"
            if report.has_results and report.selected["incomplete"].any()
            else ""
        )
        + (f"; {SEARCH_MARK} search seeds" if len(sources) > 1 else "")
        + "; difference: mean paired difference with a bootstrap 95\\% CI; p: paired t-test "
        "(Holm across tasks)"
        + (f"; {AVG} over {_latex_text(', '.join(report.avg_tasks))}" if report.avg_tasks else "")
        + "."
    )
    parts = ["% Generated by ikd-sweep report. Requires \\usepackage{booktabs}; UTF-8.\n"]
    parts.append(_latex_tabular(main_table(report), caption, "tab:ikd-main"))
    for title, frame, label in (
        ("Budget-fair view: expected dev score of the val-selected setting among n settings "
         "drawn without replacement (Dodge et al., 2019)", budget_display(report),
         "tab:ikd-budget"),
        ("Best single run per task and method (chosen on val)", best_runs_table(report),
         "tab:ikd-best"),
        ("Trial status", status_display(report), "tab:ikd-status"),
        ("Trial status per method", status_method_display(report), "tab:ikd-status-method"),
    ):
        if not frame.empty:
            parts.append(_latex_tabular(frame, f"{title}.", label))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; }
ul.notes { color: #555; font-size: 0.9em; }
figure { display: inline-block; margin: 0.5em; }
figure img { max-width: 520px; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; text-align: center; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>(none)</em></p>"
    return frame.to_html(index=False, escape=True, border=0, na_rep="–")


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def to_html(report: Report, plots: Sequence[Path] = ()) -> str:
    """One self-contained page: all tables, the plots inlined as data URIs."""
    title = f"ikd-sweep report: {report.sweep}" if report.sweep else "ikd-sweep report"
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>KD vs IKD</h2>", _html_table(main_table(report))]
    body.append(
        '<ul class="notes">'
        + "".join(f"<li>{html.escape(n)}</li>" for n in _notes(report))
        + "</ul>"
    )
    sections = [
        ("Paired comparisons", comparisons_table(report)),
        ("Budget-fair view", budget_display(report)),
        ("Selected settings", selected_table(report)),
        ("Best single run (by val)", best_runs_table(report)),
        ("Trial status", status_display(report)),
        ("Trial status per method", status_method_display(report)),
    ]
    for name, frame in sections:
        body += [f"<h2>{html.escape(name)}</h2>", _html_table(frame)]
        if name == "Budget-fair view" and not frame.empty:
            body.append(f'<p class="notes">{html.escape(_budget_note(report))}</p>')
    if plots:
        body.append("<h2>Plots</h2>")
        for path in plots:
            caption = html.escape(Path(path).stem.replace("_", " "))
            body.append(
                f'<figure><img alt="{caption}" src="{png_data_uri(Path(path))}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
