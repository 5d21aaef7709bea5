"""``ikd-sweep report``: collect a sweep from MLflow, build the tables, write the chosen formats.

Files are written into a temporary folder next to the destination and moved in only once all
of them rendered, so a failure (a plot, a full disk) leaves the previous report as it was.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from analysis import render
from analysis.collect import SweepRuns, collect
from analysis.plots import make_plots
from analysis.tables import Report, build_report
from ikd_sweep.errors import UserError

_log = logging.getLogger(__name__)

FORMATS = ("md", "csv", "latex", "html")


class NoFinishedRuns(UserError):
    """The sweep exists but none of its trials has FINISHED, so there is nothing to compare."""

    def __init__(self, sweep: str, counts: dict[str, int], hint: str = "") -> None:
        self.sweep = sweep
        self.counts = dict(counts)
        shown = ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "no runs at all"
        message = f"Sweep {sweep!r} has no FINISHED runs yet ({shown})."
        if hint:
            message += f" {hint}"
        super().__init__(message)


def normalize_formats(formats: Sequence[str] | str) -> list[str]:
    """``["md", "html"]`` from user input (``all``, comma lists); rejects the unknown."""
    if isinstance(formats, str):
        formats = [formats]
    wanted: list[str] = []
    for item in formats:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                names = list(FORMATS)
            elif name in FORMATS:
                names = [name]
            else:
                raise ValueError(
                    f"Unknown report format {name!r}; choose from {', '.join(FORMATS)} or all"
                )
            wanted += [n for n in names if n not in wanted]
    return wanted or ["md"]


def status_counts(data: SweepRuns) -> dict[str, int]:
    """Runs by status, plus expected trials that have no run (``MISSING``)."""
    counts = {str(k): int(v) for k, v in data.runs["status"].value_counts().items()}
    if not data.expected.empty:
        seen = set(data.runs["trial_id"].dropna())
        missing = int((~data.expected["trial_id"].isin(seen)).sum())
        if missing:
            counts["MISSING"] = missing
    return counts


def _check_finished(data: SweepRuns) -> None:
    finished = data.runs["status"].eq("FINISHED")
    if finished.any() and data.runs.loc[finished, "sel_val_main"].notna().any():
        return
    hint = ""
    errors = data.runs["error"].dropna() if "error" in data.runs else []
    if len(errors):
        last_line = str(errors.iloc[0]).strip().splitlines()[-1][:300]
        hint = f"First error: {last_line}"
    raise NoFinishedRuns(data.sweep, status_counts(data), hint)


def default_out_dir(tracking_uri: str, sweep: str) -> Path:
    """``<home>/reports/<sweep>``: next to the SQLite store, or under the default home."""
    from ikd_sweep.home import Home
    from ikd_sweep.tracking import home_for

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sweep).strip("._") or "sweep"
    return Home(home_for(tracking_uri)).report(safe)


def make_report(
    sweep: str | None,
    tracking_uri: str,
    formats: Sequence[str] = ("md",),
    out: Path | None = None,
) -> tuple[str, list[Path]]:
    """Build the report of ``sweep`` (the latest when None).

    Returns the Markdown of the tables (for the terminal) and the files written. Files are
    written when ``out`` is given or a format other than ``md`` is asked for (then into
    ``<home>/reports/<sweep>``); plots only when ``html`` is asked for or ``out`` is given.
    Raises ``LookupError`` for an unknown sweep and :class:`NoFinishedRuns` when nothing finished.
    """
    wanted = normalize_formats(formats)
    data = collect(sweep, tracking_uri)
    _check_finished(data)
    report = build_report(data.runs, data.expected, data.sweep, knob_stats=True)
    text = render.to_markdown(report)
    if out is None and wanted == ["md"]:
        return text, []
    out_dir = Path(out) if out is not None else default_out_dir(tracking_uri, data.sweep)
    with_plots = out is not None or "html" in wanted
    files = _write(report, data, wanted, out_dir, with_plots)
    return text, files


def _write(
    report: Report, data: SweepRuns, wanted: list[str], out_dir: Path, with_plots: bool
) -> list[Path]:
    out_dir = out_dir.expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        plots: list[Path] = []
        if with_plots:
            plots = make_plots(report, data.runs, tmp / "plots", history=data.history)
        staged: list[Path] = []
        if "md" in wanted:
            staged.append(tmp / "report.md")
            staged[-1].write_text(render.to_markdown(report, plots), encoding="utf-8")
        if "csv" in wanted:
            staged += render.to_csv(report, tmp, runs=data.runs)
        if "latex" in wanted:
            staged.append(tmp / "report.tex")
            staged[-1].write_text(render.to_latex(report), encoding="utf-8")
        if "html" in wanted:
            staged.append(tmp / "report.html")
            staged[-1].write_text(render.to_html(report, plots), encoding="utf-8")
        staged += plots
        return _move_into(tmp, out_dir, staged, replace_plots=with_plots)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(tmp: Path, out_dir: Path, staged: list[Path], replace_plots: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if replace_plots and (out_dir / "plots").is_dir():
        # Plots of an earlier report may no longer apply (a setting was dropped): replace them.
        shutil.rmtree(out_dir / "plots")
    final: list[Path] = []
    for path in staged:
        target = out_dir / path.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)  # same filesystem: tmp lies next to out_dir
        final.append(target)
    return final
