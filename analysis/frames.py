"""The vocabulary of a sweep's run frames (pure pandas/numpy): column names, method and task
order, the ``ikd-control`` relabelling, and one integer id per hyperparameter setting that every
table of ``analysis.tables`` groups by.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ikd_sweep.names import CONTROL, HPARAMS, METHOD_ORDER, PHASES, SEARCH, is_control

KEYS = ("task", "method", *HPARAMS)
GLUE_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
AVG = "Avg"
# The columns `prepare` keeps by default (a subset of `analysis.collect.RUN_COLUMNS`).
PREPARED_COLUMNS = (
    "run_id",
    "trial_id",
    "task",
    "method",
    "seed",
    "status",
    "phase",
    "sel_val_main",
    "sel_dev_main",
    "final_dev_main",
    "best_dev_main",
    *HPARAMS,
)
EXPECTED_COLUMNS = ("trial_id", "task", "method", "seed", "phase", *HPARAMS)


def display_scale(values: pd.Series | list[float]) -> float:
    """100 when every score lies in [-1, 1] (GLUE metrics as fractions, shown as points the way
    papers print them), else 1 (the trainer already reports percentages)."""
    arr = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    arr = arr[np.isfinite(arr)]
    return 100.0 if arr.size and np.all(np.abs(arr) <= 1.0) else 1.0


def task_order(tasks: list[str] | pd.Series) -> list[str]:
    """GLUE's order for GLUE tasks, then the others alphabetically."""

    def key(task: str) -> tuple[int, str]:
        norm = re.sub(r"[^a-z0-9]", "", str(task).lower())
        norm = {"mnlim": "mnli", "mnlimatched": "mnli"}.get(norm, norm)
        return (GLUE_ORDER.index(norm) if norm in GLUE_ORDER else len(GLUE_ORDER), str(task))

    return sorted({str(t) for t in pd.unique(pd.Series(tasks)) if not pd.isna(t)}, key=key)


def method_order(methods: list[str] | pd.Series) -> list[str]:
    present = {str(m) for m in pd.unique(pd.Series(methods)) if not pd.isna(m)}
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def sort_rows(frame: pd.DataFrame, tasks: list[str], methods: list[str]) -> pd.DataFrame:
    """Rows in table order: tasks (GLUE order), then methods (finetune, kd, ikd, control)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = np.lexsort((rank(frame["method"], methods), rank(frame["task"], [*tasks, AVG])))
    return frame.iloc[order].reset_index(drop=True)


def rank(values: pd.Series, order: list[str]) -> np.ndarray:
    """Position of each value in ``order`` (unknown values last)."""
    pos = pd.Index(order, dtype=object).get_indexer(values.astype(object))
    return np.where(pos < 0, len(order), pos)


def setting_mask(frame: pd.DataFrame, setting: pd.Series | dict) -> pd.Series:
    """Rows of ``frame`` with the hyperparameters of ``setting`` (NaN equals NaN)."""
    mask = pd.Series(True, index=frame.index)
    for h in HPARAMS:
        value = setting[h]
        col = frame[h].astype(float)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            mask &= col.isna()
        else:
            mask &= np.isclose(col, float(value), rtol=1e-9, atol=0.0) & col.notna()
    return mask


def prepare(frame: pd.DataFrame | None,
            columns: tuple[str, ...] = PREPARED_COLUMNS) -> pd.DataFrame:
    """A new frame with just ``columns`` (NaN where absent): hyperparameters as floats, ``phase``
    "search" where unset, and ``ikd`` with ``teacher_lr == 0`` relabelled ``ikd-control``.
    Raises ``ValueError`` for a phase other than search or confirm."""
    frame = pd.DataFrame() if frame is None else frame
    nan = pd.Series(np.nan, index=frame.index, dtype=float)
    out = pd.DataFrame({c: frame[c] if c in frame.columns else nan for c in columns})
    out = out.reset_index(drop=True)
    for h in HPARAMS:
        if h in out.columns:
            out[h] = pd.to_numeric(out[h], errors="coerce").astype(float)
    if "phase" in out.columns:
        if out["phase"].isna().any():
            phase = out["phase"].astype(object)
            out["phase"] = phase.where(phase.notna(), SEARCH).astype("str")
        bad = sorted(str(v) for v in pd.unique(out["phase"]) if v not in PHASES)
        if bad:
            raise ValueError(f"column 'phase' has {bad}; valid values: {', '.join(PHASES)}")
    if "method" in out.columns and "teacher_lr" in out.columns:
        control = np.fromiter((is_control(m, t) for m, t in zip(out["method"], out["teacher_lr"],
                                                                 strict=True)),
                              dtype=bool, count=len(out))
        if control.any():
            out["method"] = out["method"].astype(object).where(~control, CONTROL).astype("str")
    return out


def finished(frame: pd.DataFrame, metric: str) -> np.ndarray:
    """Rows that FINISHED with a finite ``metric``."""
    values = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float)
    return frame["status"].eq("FINISHED").to_numpy(dtype=bool) & np.isfinite(values)


# ------------------------------------------------------------------------------------------
# Index: one integer id per setting, for runs and expected trials alike
# ------------------------------------------------------------------------------------------


def codes(columns: list[pd.Series]) -> np.ndarray:
    """Dense int codes of the row tuples of ``columns`` (NaN is a value like any other)."""
    code = np.zeros(len(columns[0]), dtype=np.int64)
    for col in columns:
        part, uniques = pd.factorize(col, use_na_sentinel=False)
        # Re-densify after each column so the running code can never overflow.
        code = pd.factorize(code * len(uniques) + part)[0].astype(np.int64)
    return code


@dataclass
class Index:
    """Runs and expected trials with the setting id of each row (``run_sid``, ``exp_sid``)."""

    runs: pd.DataFrame
    expected: pd.DataFrame
    #: One row per setting id: task, method, hyperparameters, and ``tm`` ((task, method) id).
    settings: pd.DataFrame
    run_sid: np.ndarray
    exp_sid: np.ndarray

    @property
    def size(self) -> int:
        return len(self.settings)

    def per_setting(self, sid: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(sid, weights=weights, minlength=self.size)


def setting_index(runs: pd.DataFrame, expected: pd.DataFrame | None) -> Index:
    """Runs and expected trials (``prepare``d) with one setting id per (task, method,
    hyperparameters)."""
    runs, expected = prepare(runs), prepare(expected, EXPECTED_COLUMNS)
    keys = list(KEYS)
    both = {c: pd.concat([runs[c], expected[c]], ignore_index=True) for c in keys}
    sid = codes([both[c] for c in keys])
    first = np.unique(sid, return_index=True)[1] if len(sid) else np.empty(0, dtype=int)
    settings = pd.DataFrame({c: both[c].iloc[first].to_numpy() for c in keys})
    settings["tm"] = codes([settings["task"], settings["method"]]) if len(settings) else 0
    return Index(runs, expected, settings, sid[: len(runs)], sid[len(runs) :])

