"""Render a :class:`~analysis.tables.Report` as Markdown, CSV, LaTeX (booktabs) and one
self-contained HTML page (plots embedded as base64 data URIs, nothing fetched from elsewhere).

Scores are shown ×100 when they are fractions (see ``tables.display_scale``); CSV files keep the
raw values so that they can be analysed further.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.tables import AVG, HPARAMS, INCOMPLETE_MARK, Report, display_scale

METHOD_LABELS = {"finetune": "Fine-tune", "kd": "KD", "ikd": "IKD"}
HPARAM_SHORT = {"temperature": "T", "exam_every": "exam_every", "teacher_lr": "teacher_lr"}
MAIN_DIFF = ("ikd", "kd")


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def diff_label(a: str, b: str, style: str = "text") -> str:
    minus = "$-$" if style == "latex" else "−"
    return f"{method_label(a)} {minus} {method_label(b)}"


def report_scale(report: Report) -> float:
    return display_scale(report.candidates["mean"]) if not report.candidates.empty else 1.0


def _num(value: float, scale: float, digits: int = 2) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value) * scale:.{digits}f}"


def _pval(p: float) -> str:
    if p is None or pd.isna(p):
        return "p=n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _hp(value: float) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):g}"


def setting_text(row: pd.Series) -> str:
    """``T=2, exam_every=5`` (used hyperparameters only); ``–`` for fine-tuning."""
    parts = [f"{HPARAM_SHORT[h]}={_hp(row[h])}" for h in HPARAMS if h in row and pd.notna(row[h])]
    return ", ".join(parts) if parts else "–"


def _cell(row: pd.Series, scale: float, style: str) -> str:
    pm = " $\\pm$ " if style == "latex" else " ± "
    mark = ("$^\\dagger$" if style == "latex" else INCOMPLETE_MARK) if row["incomplete"] else ""
    std = "" if pd.isna(row["std"]) else f"{pm}{_num(row['std'], scale)}"
    return f"{_num(row['mean'], scale)}{std} ({int(row['n'])}){mark}"


def _diff_cell(row: pd.Series | None, scale: float, style: str) -> str:
    if row is None:
        return "--" if style == "latex" else "–"
    sign = "+" if row["diff"] >= 0 else ("$-$" if style == "latex" else "−")
    text = f"{sign}{abs(float(row['diff'])) * scale:.2f}"
    if row["task"] == AVG:
        return text
    p = _pval(row["p_value"])
    if style == "latex":
        p = p.replace("<", "$<$")
    return f"{text} ({p}, n={int(row['n_pairs'])})"


def main_table(report: Report, style: str = "text") -> pd.DataFrame:
    """Rows: tasks and Avg; columns: each method's ``mean ± std (n)`` and IKD − KD with its
    paired-test p-value. ``style`` is ``text`` (Markdown/HTML) or ``latex``."""
    scale = report_scale(report)
    sel = report.selected
    comp = report.comparisons
    a, b = MAIN_DIFF
    with_diff = a in report.methods and b in report.methods
    none = "--" if style == "latex" else "–"
    rows = []
    for task in [*report.tasks, AVG]:
        if task == AVG and not report.avg_tasks:
            continue
        row: dict[str, str] = {"Task": task}
        for method in report.methods:
            if task == AVG:
                avg = report.average[report.average["method"].eq(method)]
                row[method_label(method)] = _num(avg["mean"].iloc[0], scale) if len(avg) else none
                continue
            pick = sel[sel["task"].eq(task) & sel["method"].eq(method)]
            row[method_label(method)] = _cell(pick.iloc[0], scale, style) if len(pick) else none
        if with_diff:
            hit = comp[comp["task"].eq(task) & comp["a"].eq(a) & comp["b"].eq(b)]
            row[diff_label(a, b, style)] = _diff_cell(
                hit.iloc[0] if len(hit) else None, scale, style
            )
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons_table(report: Report) -> pd.DataFrame:
    scale = report_scale(report)
    rows = []
    for _, r in report.comparisons.iterrows():
        rows.append(
            {
                "Task": r["task"],
                "Comparison": diff_label(r["a"], r["b"]),
                "Difference": _diff_cell(r, scale, "text").split(" (")[0],
                "Paired diff": _num(r["paired_diff"], scale),
                "Shared seeds": int(r["n_pairs"]),
                "t": "–" if pd.isna(r["t"]) else f"{r['t']:.2f}",
                "p": "–" if pd.isna(r["p_value"]) else f"{r['p_value']:.4f}",
            }
        )
    return pd.DataFrame(rows)


def selected_table(report: Report) -> pd.DataFrame:
    scale = report_scale(report)
    rows = []
    for _, r in report.selected.iterrows():
        exp = "?" if pd.isna(r["n_expected"]) else str(int(r["n_expected"]))
        rows.append(
            {
                "Task": r["task"],
                "Method": method_label(r["method"]),
                "Selected setting": setting_text(r),
                "Dev mean": _num(r["mean"], scale),
                "Std": _num(r["std"], scale),
                "Seeds (finished/expected)": f"{int(r['n'])}/{exp}"
                + (f" {INCOMPLETE_MARK}" if r["incomplete"] else ""),
                "Settings tried": int(r["n_settings"]),
            }
        )
    return pd.DataFrame(rows)


def best_runs_table(report: Report) -> pd.DataFrame:
    scale = report_scale(report)
    rows = []
    for _, r in report.best_runs.iterrows():
        rows.append(
            {
                "Task": r["task"],
                "Method": method_label(r["method"]),
                "Trial": r["trial_id"],
                "Seed": "" if pd.isna(r["seed"]) else int(r["seed"]),
                "Setting": setting_text(r),
                "Best dev": _num(r["best_dev_main"], scale),
                "Final dev": _num(r["final_dev_main"], scale),
            }
        )
    return pd.DataFrame(rows)


def status_display(report: Report) -> pd.DataFrame:
    frame = report.status.copy()
    if frame.empty:
        return frame
    frame["method"] = frame["method"].map(method_label)
    total = {"task": "Total", "method": ""}
    total.update({c: int(frame[c].sum()) for c in frame.columns if c not in ("task", "method")})
    frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
    return frame.rename(columns=lambda c: c.capitalize())


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``)."""
    if frame.empty:
        return "_(none)_"

    def esc(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(esc(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(esc(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _notes(report: Report) -> list[str]:
    scale = report_scale(report)
    notes = [
        "Dev score (`best/dev_main`, each task's GLUE metric)"
        + (" ×100" if scale == 100 else "")
        + "; per task and method the hyperparameter setting with the best mean over finished "
        "seeds is selected; cells are mean ± sample std (n seeds).",
    ]
    if not report.selected.empty and report.selected["incomplete"].any():
        notes.append(f"{INCOMPLETE_MARK} fewer finished seeds than the sweep expected.")
    if a_b := [m for m in MAIN_DIFF if m in report.methods]:
        if len(a_b) == 2:
            notes.append(
                f"{diff_label(*MAIN_DIFF)}: difference of the selected means; p from a paired "
                "t-test over the seeds both share (n/a with fewer than 2)."
            )
    if report.avg_tasks:
        notes.append(f"{AVG}: mean of the per-task means over {', '.join(report.avg_tasks)}.")
    missing = [t for t in report.tasks if t not in report.avg_tasks]
    if report.avg_tasks and missing:
        notes.append(f"Not in {AVG} (a method has no result): {', '.join(missing)}.")
    return notes


def to_markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    """The whole report as Markdown (main table first: it is what the terminal shows)."""
    parts = [f"## Sweep `{report.sweep}`: KD vs IKD" if report.sweep else "## KD vs IKD", ""]
    parts += [md_table(main_table(report)), ""]
    parts += [f"- {n}" for n in _notes(report)]
    if not report.comparisons.empty:
        parts += ["", "### Paired comparisons", "", md_table(comparisons_table(report))]
    parts += ["", "### Selected settings", "", md_table(selected_table(report))]
    parts += ["", "### Best single run", "", md_table(best_runs_table(report))]
    parts += ["", "### Trial status", "", md_table(status_display(report))]
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
        "comparisons.csv": report.comparisons,
        "average.csv": report.average.assign(tasks=";".join(report.avg_tasks)),
        "candidates.csv": report.candidates,
        "best_runs.csv": report.best_runs,
        "status.csv": report.status,
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

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "−": r"$-$",
    "–": r"--",
    INCOMPLETE_MARK: r"$^\dagger$",
}


def latex_escape(text: object) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_tabular(frame: pd.DataFrame, raw_columns: Sequence[str] = ()) -> list[str]:
    """booktabs tabular; ``raw_columns`` (header and cells) are already LaTeX, the rest is
    escaped."""
    align = "l" + "r" * (len(frame.columns) - 1)
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule"]
    header = [c if c in raw_columns else latex_escape(c) for c in frame.columns]
    lines.append(" & ".join(header) + r" \\")
    lines.append("\\midrule")
    for i, row in enumerate(frame.itertuples(index=False)):
        if i == len(frame) - 1 and str(row[0]) in (AVG, "Total") and len(frame) > 1:
            lines.append("\\midrule")
        cells = [
            str(v) if c in raw_columns else latex_escape(v)
            for c, v in zip(frame.columns, row, strict=True)
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return lines


def to_latex(report: Report) -> str:
    """booktabs tables (main, best run, status) ready for ``\\input``; needs ``booktabs``."""
    scale = report_scale(report)
    main = main_table(report, style="latex")
    # Method cells and the difference column are built as LaTeX already.
    raw = [c for c in main.columns if c != "Task"]
    caption = (
        f"Dev results of sweep {latex_escape(report.sweep)}"
        + (" ($\\times$100)" if scale == 100 else "")
        + ": mean $\\pm$ std (n seeds) of the setting selected on dev"
        + ("; $^\\dagger$ fewer seeds than expected" if report.selected["incomplete"].any() else "")
        + (f"; {AVG} over {latex_escape(', '.join(report.avg_tasks))}" if report.avg_tasks else "")
        + "."
    )
    lines = ["% Generated by ikd-sweep report. Requires \\usepackage{booktabs}.", ""]
    lines += ["\\begin{table}[t]", "\\centering", "\\small"]
    lines += _latex_tabular(main, raw_columns=raw)
    lines += [f"\\caption{{{caption}}}", "\\label{tab:ikd-main}", "\\end{table}", ""]
    for title, frame, label in (
        ("Best single run per task and method", best_runs_table(report), "tab:ikd-best"),
        ("Trial status", status_display(report), "tab:ikd-status"),
    ):
        if frame.empty:
            continue
        lines += ["\\begin{table}[t]", "\\centering", "\\small"]
        lines += _latex_tabular(frame)
        lines += [f"\\caption{{{title}.}}", f"\\label{{{label}}}", "\\end{table}", ""]
    return "\n".join(lines)


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
        ("Selected settings", selected_table(report)),
        ("Best single run", best_runs_table(report)),
        ("Trial status", status_display(report)),
    ]
    for name, frame in sections:
        body += [f"<h2>{html.escape(name)}</h2>", _html_table(frame)]
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
