"""Read a sweep's runs from MLflow into tidy DataFrames, and a run's student out of it (the only
MLflow module of ``analysis``; the store reader itself is ``ikd_sweep.tracking``'s).

The run layout is the one ``ikd_sweep.tracking`` writes: one parent run per sweep (tags
``ikd.sweep``, ``ikd.role=sweep``; artifact ``trials.json``) and one child run per trial.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ikd_sweep.names import (
    BEST_DEV,
    FINAL_DEV,
    HPARAMS,
    METHOD_HPARAMS,
    PHASES,
    SEL_DEV,
    SEL_STEP,
    SEL_VAL,
    TEACHER_DEV,
)
from ikd_sweep.store import STUDENT_ARTIFACT, TAG, absolute_sqlite_uri, require_store
from ikd_sweep.tracking import find_parent, load_trials, trial_runs

# Hyperparameters a method does not use (METHOD_HPARAMS) are NaN whatever a run's params say,
# so a default that leaked into a finetune run's params cannot split its seeds into two settings.
TRIAL_COLUMNS = ("trial_id", "task", "method", "seed", *HPARAMS, "phase")
#: Result metric -> column. ``sel/*`` is the run's checkpoint with the best ``val/main``;
#: ``best/dev_main`` (max over dev) is a diagnostic that the report never selects on.
RESULT_METRICS = {
    m: m.replace("/", "_") for m in (SEL_VAL, SEL_DEV, SEL_STEP, FINAL_DEV, BEST_DEV, TEACHER_DEV)
}
RUN_COLUMNS = (
    "run_id",
    *TRIAL_COLUMNS,
    "estimator",
    "status",
    "error",
    *RESULT_METRICS.values(),
    "start_time",
    "end_time",
    "duration_s",
)


@dataclass
class SweepRuns:
    """The runs of one sweep: one row per child run, plus the trials the sweep expected."""

    sweep: str
    parent_run_id: str
    tracking_uri: str
    runs: pd.DataFrame
    expected: pd.DataFrame
    _client: Any = field(default=None, repr=False, compare=False)

    def history(self, run_id: str, metric: str) -> pd.DataFrame:
        """``step, value`` of a metric over training, one row per step (the last value logged
        for a step wins: a resumed trial re-logs the steps after its checkpoint)."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        points = self._client.get_metric_history(run_id, metric)
        frame = pd.DataFrame(
            [(m.step, m.timestamp, m.value) for m in points], columns=["step", "timestamp", "value"]
        )
        if frame.empty:
            return pd.DataFrame({"step": pd.Series(dtype="int64"), "value": pd.Series(dtype=float)})
        frame = frame.sort_values(["step", "timestamp"], kind="stable")
        frame = frame.drop_duplicates("step", keep="last")
        return frame[["step", "value"]].reset_index(drop=True)


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _seed(value: Any) -> int | None:
    number = _float(value)
    return None if math.isnan(number) else int(number)


def _expected_frame(trials: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {
            "trial_id": str(t.get("trial_id")),
            "task": t.get("task"),
            "method": t.get("method"),
            "seed": _seed(t.get("seed")),
            **{h: _float(t.get(h)) for h in HPARAMS},
            "phase": _phase(t.get("phase"), f"trials.json entry {t.get('trial_id')!r}"),
        }
        for t in trials
    ]
    frame = pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
    frame["seed"] = frame["seed"].astype("Int64")
    for h in HPARAMS:
        frame[h] = frame[h].astype(float)
    return _blank_unused(frame)


def _phase(value: Any, where: str) -> str:
    """A recorded phase, checked."""
    if value not in PHASES:
        raise ValueError(f"{where}: phase {value!r} is not one of {', '.join(PHASES)}")
    return str(value)


def _blank_unused(frame: pd.DataFrame) -> pd.DataFrame:
    for method, used in METHOD_HPARAMS.items():
        rows = frame["method"].eq(method)
        for h in HPARAMS:
            if h not in used:
                frame.loc[rows, h] = math.nan
    return frame


def _timestamp(ms: int | None) -> pd.Timestamp:
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def _run_row(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    method = tags.get(TAG.METHOD)
    start, end = run.info.start_time, run.info.end_time
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "trial_id": tags.get(TAG.TRIAL_ID),
        "task": tags.get(TAG.TASK),
        "method": method,
        "seed": _seed(tags.get(TAG.SEED)),
        **{h: _float(params.get(h)) for h in HPARAMS},
        # The estimator only means something for IKD (other methods may carry the default).
        "estimator": params.get("ikd.estimator") if method == "ikd" else None,
        "phase": tags.get(TAG.PHASE),  # filled from trials.json, then checked, in collect()
        "status": run.info.status,
        "error": tags.get(TAG.ERROR),
        **{col: _float(metrics.get(key)) for key, col in RESULT_METRICS.items()},
        "start_time": _timestamp(start),
        "end_time": _timestamp(end) if run.info.status != "RUNNING" else pd.NaT,
        "duration_s": (end - start) / 1000.0
        if start and end and run.info.status != "RUNNING"
        else math.nan,
    }
    for key, value in metrics.items():
        if key.startswith("final/dev_") and key != FINAL_DEV:
            row["final_dev_" + key[len("final/dev_") :]] = _float(value)
    return row


def _dedupe(runs: pd.DataFrame) -> pd.DataFrame:
    # tracking.py keeps one run per trial; should a store still hold two (a run copied by
    # hand, an old client), prefer a FINISHED one, then the most recent.
    if runs.empty or not runs["trial_id"].duplicated().any():
        return runs
    order = runs.assign(_finished=runs["status"].eq("FINISHED"))
    order = order.sort_values(["_finished", "start_time"], ascending=[False, False], kind="stable")
    return order.drop_duplicates("trial_id").drop(columns="_finished")


def collect(sweep: str | None, tracking_uri: str) -> SweepRuns:
    """The runs of ``sweep`` (the latest sweep when None) from the store at ``tracking_uri``."""
    client = MlflowClient(tracking_uri=require_store(tracking_uri))
    parent = find_parent(client, sweep)
    sweep, parent_id = parent.data.tags.get(TAG.SWEEP), parent.info.run_id
    rows = [_run_row(r) for r in trial_runs(client, parent)]
    extra = sorted({k for row in rows for k in row if k not in RUN_COLUMNS})
    runs = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *extra])
    for h in HPARAMS:
        runs[h] = runs[h].astype(float)
    for col in (*RESULT_METRICS.values(), "duration_s", *extra):
        runs[col] = runs[col].astype(float)
    runs["start_time"] = pd.to_datetime(runs["start_time"], utc=True)
    runs["end_time"] = pd.to_datetime(runs["end_time"], utc=True)
    expected = _expected_frame(load_trials(client, parent_id))
    runs = _blank_unused(_fill_from_expected(_dedupe(runs), expected))
    runs = runs.sort_values(["task", "method", "trial_id"], kind="stable").reset_index(drop=True)
    return SweepRuns(
        sweep=sweep,
        parent_run_id=parent_id,
        tracking_uri=tracking_uri,
        runs=runs,
        expected=expected,
        _client=client,
    )


def _fill_from_expected(runs: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    """Fill what a run lacks (a trial that failed before its params were logged) from
    ``trials.json``; the run's own record wins where it has one."""
    runs = runs.copy()
    if not expected.empty and not runs.empty:
        ref = expected.set_index("trial_id")
        ref = ref[~ref.index.duplicated()]
        for col in ("task", "method", "seed", *HPARAMS, "phase"):
            fill = runs["trial_id"].map(ref[col])
            runs[col] = runs[col].where(runs[col].notna(), fill)
    runs["phase"] = [
        _phase(p, f"run {r} tag {TAG.PHASE}")
        for p, r in zip(runs["phase"], runs["run_id"], strict=True)
    ]
    runs["seed"] = pd.array([None if pd.isna(s) else int(s) for s in runs["seed"]], dtype="Int64")
    if runs["seed"].notna().all():
        runs["seed"] = runs["seed"].astype("int64")
    for h in HPARAMS:
        runs[h] = runs[h].astype(float)
    return runs


# -- a run's student, for `ikd-sweep export` -------------------------------------------------


def download_student(tracking_uri: str, run_id: str, dest: Path) -> Path:
    """Copy run ``run_id``'s ``student`` artifact into the folder ``dest`` (created; must be
    empty). Raises LookupError when the run kept no student."""
    client = MlflowClient(tracking_uri=absolute_sqlite_uri(tracking_uri))
    if not any(f.path == STUDENT_ARTIFACT for f in client.list_artifacts(run_id)):
        raise LookupError(f"run {run_id} has no {STUDENT_ARTIFACT!r} artifact (it kept no "
                          "student: a sweep run before students were kept, or a failed upload)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = Path(client.download_artifacts(run_id, STUDENT_ARTIFACT, tmp))
        for item in got.iterdir():
            os.replace(item, dest / item.name)
    return dest


def register_student(tracking_uri: str, run_id: str, name: str) -> str:
    """Register run ``run_id``'s ``student`` artifact as a new version of the registered model
    ``name`` (created if needed); returns the version. The artifact is a Hugging Face folder,
    not an MLflow Model, so the version points at the run's artifact (``runs:/<id>/student``):
    MLflow 3's ``mlflow.register_model`` looks for a logged MLflow Model there and fails."""
    client = MlflowClient(tracking_uri=absolute_sqlite_uri(tracking_uri))
    try:
        client.create_registered_model(name, description="ikd-sweep selected students")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/{STUDENT_ARTIFACT}",
                                          run_id=run_id)
    return str(version.version)
