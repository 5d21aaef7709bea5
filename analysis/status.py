"""What happened to a sweep's trials: counts per (task, method) and per method, failure and
early-stop rates (the report's status tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.frames import Index, method_order, sort_rows, task_order


def _rates(frame: pd.DataFrame) -> pd.DataFrame:
    ended = frame["finished"] + frame["failed"] + frame["killed"]
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["failure_rate"] = np.where(ended > 0, frame["failed"] / ended.clip(lower=1), np.nan)
        frame["stop_rate"] = np.where(ended > 0, frame["killed"] / ended.clip(lower=1), np.nan)
    return frame


STATUS_COUNTS = ("expected", "finished", "failed", "killed", "running", "missing")


def trial_status(ix: Index) -> pd.DataFrame:
    """Per (task, method): trials expected, finished, failed, killed (early-stopped), still
    running, missing (expected, no run); failure_rate and stop_rate over the trials that ended."""
    columns = ["task", "method", *STATUS_COUNTS, "failure_rate", "stop_rate"]
    runs, exp = ix.runs, ix.expected
    status = runs["status"]
    ids = pd.concat([runs["trial_id"], exp["trial_id"]], ignore_index=True)
    tid = pd.factorize(ids)[0]  # -1 for a missing trial id
    seen = np.zeros(tid.max(initial=-1) + 2, dtype=bool)
    seen[tid[: len(runs)]] = True
    seen[-1] = False
    counts = {
        "expected": ix.per_setting(ix.exp_sid),
        "finished": ix.per_setting(ix.run_sid[status.eq("FINISHED").to_numpy(dtype=bool)]),
        "failed": ix.per_setting(ix.run_sid[status.eq("FAILED").to_numpy(dtype=bool)]),
        "killed": ix.per_setting(ix.run_sid[status.eq("KILLED").to_numpy(dtype=bool)]),
        "running": ix.per_setting(
            ix.run_sid[status.isin(["RUNNING", "SCHEDULED"]).to_numpy(dtype=bool)]
        ),
        "missing": ix.per_setting(ix.exp_sid[~seen[tid[len(runs) :]]]),
    }
    frame = ix.settings[["task", "method"]].assign(**counts).dropna(subset=["task", "method"])
    if frame.empty:
        return pd.DataFrame(columns=columns)
    table = frame.groupby(["task", "method"], sort=False)[list(STATUS_COUNTS)].sum()
    table = table.astype(int).reset_index()
    table = sort_rows(table, task_order(table["task"]), method_order(table["method"]))
    return _rates(table)[columns]


def status_by_method(status: pd.DataFrame) -> pd.DataFrame:
    """``status`` summed over tasks, per method, with the rates recomputed."""
    counts = list(STATUS_COUNTS)
    if status.empty:
        return pd.DataFrame(columns=["method", *counts, "failure_rate", "stop_rate"])
    frame = status.groupby("method", sort=False)[counts].sum()
    frame = frame.reindex(method_order(frame.index.to_series())).reset_index()
    return _rates(frame)
