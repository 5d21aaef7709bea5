"""The report's selection of a sweep, read from the store: per (task, method label) the setting
chosen on val, and the runs the report scores it with. The sweep driver (the confirmation
phase), `run`'s summary and `export` all read it here, so it is computed once per call and the
same way for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from analysis.collect import SweepRuns


@dataclass
class Selection:
    runs: SweepRuns  # the sweep's runs as analysis collects them
    selected: pd.DataFrame  # analysis.tables.Report.selected: one row per (task, method label)
    scores: pd.DataFrame  # Report.scores: the runs (run_id, seed, phase) behind each mean
    warning: str | None  # set when the headline comes from search seeds (selection-biased)


def selection(sweep: str | None, tracking_uri: str) -> Selection:
    """The selection of `sweep` (the latest sweep when None) in the store at `tracking_uri`."""
    from analysis.collect import collect
    from analysis.display import headline_warning
    from analysis.tables import build_report

    runs = collect(sweep, tracking_uri)
    # Selection alone: no intervals or tests are computed for it.
    report = build_report(runs.runs, runs.expected, runs.sweep, stats=False)
    return Selection(runs, report.selected, report.scores, headline_warning(report))


def selected_settings(sweep: str, tracking_uri: str) -> list[dict[str, Any]]:
    """The selected settings as rows (task, method label, hyperparameters): what the
    confirmation phase re-runs (`trials.SweepPlan.confirmations`)."""
    return selection(sweep, tracking_uri).selected.to_dict("records")
