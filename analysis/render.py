"""Render a :class:`~analysis.tables.Report` as Markdown, CSV, LaTeX (booktabs) and one
self-contained HTML page (plots embedded as base64 data URIs, nothing fetched from elsewhere).

The cells come from ``analysis.display``; CSV files keep the raw values so that they can be
analysed further.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.display import (
    KNOBS_TITLE,
    SEARCH_LABEL,
    SEARCH_MARK,
    best_runs_table,
    budget_display,
    budget_note,
    comparisons_table,
    headline_warning,
    knobs_note,
    knobs_table,
    main_table,
    notes,
    selected_table,
    status_display,
    status_method_display,
)
from analysis.frames import AVG
from analysis.knobs import SOURCE as KNOB_SOURCE
from analysis.tables import INCOMPLETE_MARK, Report
from ikd_sweep.names import CONFIRM, SEARCH

#: File-name endings of the plots shown under "What the knobs do" (analysis.plots names them).
KNOB_PLOTS = ("_knobs", "_ikd_parallel")


def split_plots(plots: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(the knob plots, the others), each in the order given."""
    knob = [Path(p) for p in plots if Path(p).stem.endswith(KNOB_PLOTS)]
    return knob, [Path(p) for p in plots if Path(p) not in knob]

# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table. The cells are display text already: tabulate must
    not parse "81.00" as a number and print it as 81."""
    if frame.empty:
        return "_(none)_"
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)



def to_markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    """The whole report as Markdown (main table first: it is what the terminal shows)."""
    parts = [f"## Sweep `{report.sweep}`: KD vs IKD" if report.sweep else "## KD vs IKD", ""]
    if warning := headline_warning(report):
        parts += [f"**⚠ {warning}**", ""]
    parts += [md_table(main_table(report)), ""]
    parts += [f"- {n}" for n in notes(report)]
    if not report.comparisons.empty:
        parts += ["", "### Paired comparisons", "", md_table(comparisons_table(report))]
    budget = budget_display(report)
    if not budget.empty:
        parts += ["", "### Budget-fair view", "", md_table(budget), "", f"- {budget_note(report)}"]
    knob_plots, plots = split_plots(plots)
    knobs = knobs_table(report)
    if not knobs.empty or knob_plots:
        parts += ["", f"### {KNOBS_TITLE}", "", md_table(knobs), "", f"- {knobs_note(report)}"]
        parts += [""] + [f"![{p.stem}](plots/{p.name})" for p in knob_plots]
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
        # warning: the search-seeds label on each row whose headline is not confirmed.
        "comparisons.csv": report.comparisons.assign(warning=report.comparisons["source"].map(
            {SEARCH: SEARCH_LABEL}).fillna("")),
        "average.csv": report.average.assign(tasks=";".join(report.avg_tasks)),
        "candidates.csv": report.candidates,
        "budget.csv": report.budget,
        "budget_at.csv": report.budget_at,
        # Where the knob tables come from, on every row (they never read dev).
        "sensitivity.csv": report.sensitivity.assign(source=KNOB_SOURCE),
        "importance.csv": report.importance.assign(source=KNOB_SOURCE),
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
    scale = report.scale
    sources = set(report.selected["source"]) if report.has_results else set()
    seeds = "confirmation seeds" if sources == {CONFIRM} else "seeds"
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
        + "; difference: mean paired difference with its paired t-interval (95\\%; Avg: "
        "Welch-Satterthwaite); p: paired t-test (Holm across tasks); can tell apart: smallest "
        "difference found with 80\\% power; P: share of seeds where IKD beats KD "
        "(Clopper-Pearson 95\\% interval)"
        + (f"; {AVG} over {_latex_text(', '.join(report.avg_tasks))}" if report.avg_tasks else "")
        + "."
    )
    parts = ["% Generated by ikd-sweep report. Requires \\usepackage{booktabs}; UTF-8.\n"]
    main = _latex_tabular(main_table(report), caption, "tab:ikd-main")
    if warning := headline_warning(report):
        # A table footnote under the tabular: the headline is not a result yet.
        main = main.replace("\\end{tabular}\n", "\\end{tabular}\n\\par\\footnotesize\\textbf{"
                            f"Note: {_latex_text(warning)}.}}\n", 1)
        main = main.replace("\\caption{", "\\caption{(" + _latex_text(warning) + ") ", 1)
    parts.append(main)
    for title, frame, label in (
        ("Budget-fair view: expected dev score of the val-selected setting among n settings "
         "drawn without replacement (Dodge et al., 2019)", budget_display(report),
         "tab:ikd-budget"),
        # The note has %, _ and backticks: escaped as the cells are.
        (f"{KNOBS_TITLE}. {_latex_text(knobs_note(report).replace('`', ''))}",
         knobs_table(report), "tab:ikd-knobs"),
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
p.warning { color: #a40000; font-weight: bold; }
figure { display: inline-block; margin: 0.5em; }
figure img { max-width: 520px; border: 1px solid #eee; }
figure.wide img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; text-align: center; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>(none)</em></p>"
    return frame.to_html(index=False, escape=True, border=0, na_rep="–")


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure(path: Path) -> str:
    caption = html.escape(Path(path).stem.replace("_", " "))
    # The knob panels (one per knob, side by side) are read at full width.
    wide = ' class="wide"' if Path(path).stem.endswith("_knobs") else ""
    return (f'<figure{wide}><img alt="{caption}" src="{png_data_uri(Path(path))}">'
            f"<figcaption>{caption}</figcaption></figure>")


def to_html(report: Report, plots: Sequence[Path] = ()) -> str:
    """One self-contained page: all tables, the plots inlined as data URIs."""
    title = f"ikd-sweep report: {report.sweep}" if report.sweep else "ikd-sweep report"
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>KD vs IKD</h2>"]
    if warning := headline_warning(report):
        body.append(f'<p class="warning">⚠ {html.escape(warning)}</p>')
    body.append(_html_table(main_table(report)))
    body.append(
        '<ul class="notes">'
        + "".join(f"<li>{html.escape(n)}</li>" for n in notes(report))
        + "</ul>"
    )
    knob_plots, plots = split_plots(plots)
    sections = [
        ("Paired comparisons", comparisons_table(report)),
        ("Budget-fair view", budget_display(report)),
        (KNOBS_TITLE, knobs_table(report)),
        ("Selected settings", selected_table(report)),
        ("Best single run (by val)", best_runs_table(report)),
        ("Trial status", status_display(report)),
        ("Trial status per method", status_method_display(report)),
    ]
    for name, frame in sections:
        body += [f"<h2>{html.escape(name)}</h2>", _html_table(frame)]
        if name == "Budget-fair view" and not frame.empty:
            body.append(f'<p class="notes">{html.escape(budget_note(report))}</p>')
        if name == KNOBS_TITLE:
            body.append(f'<p class="notes">{html.escape(knobs_note(report))}</p>')
            body += [_figure(p) for p in knob_plots]
    if plots:
        body.append("<h2>Plots</h2>")
        body += [_figure(p) for p in plots]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
