"""Read a sweep's runs from MLflow into tidy DataFrames (the only MLflow module of ``analysis``).

The run layout is the one ``ikd_sweep.tracking`` writes: one parent run per sweep (tags
``ikd.sweep``, ``ikd.role=sweep``; artifact ``trials.json``) and one child run per trial.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType

from ikd_sweep.tracking import (  # the one table of tag names
    ROLE_SWEEP,
    ROLE_TRIAL,
    TAG,
    sqlite_path,
)
from ikd_sweep.trials import HPARAMS, METHOD_HPARAMS

# Hyperparameters a method does not use (METHOD_HPARAMS) are NaN whatever a run's params say,
# so a default that leaked into a finetune run's params cannot split its seeds into two settings.
TRIAL_COLUMNS = ("trial_id", "task", "method", "seed", *HPARAMS, "phase")
PHASES = ("search", "confirm")
#: Result metric -> column. ``sel/*`` is the run's checkpoint with the best ``val/main``;
#: ``best/dev_main`` (max over dev) is a diagnostic that the report never selects on.
RESULT_METRICS = {
    "sel/val_main": "sel_val_main",
    "sel/dev_main": "sel_dev_main",
    "sel/step": "sel_step",
    "final/dev_main": "final_dev_main",
    "best/dev_main": "best_dev_main",
    "teacher/dev_main": "teacher_dev_main",
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


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_ids(client: MlflowClient) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def _search(
    client: MlflowClient,
    experiment_ids: list[str],
    filter_string: str,
    order_by: list[str] | None = None,
    limit: int | None = None,
) -> list[Any]:
    runs: list[Any] = []
    token = None
    # search_runs accepts a bounded list of experiments per call.
    for start in range(0, len(experiment_ids), 100):
        chunk = experiment_ids[start : start + 100]
        while True:
            page = client.search_runs(
                chunk,
                filter_string=filter_string,
                max_results=min(limit or 1000, 1000),
                order_by=order_by,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token or (limit is not None and len(runs) >= limit):
                break
        token = None
    return runs


def _parent_runs(client: MlflowClient) -> list[Any]:
    """All live, not superseded sweep parent runs, newest first."""
    ids = _experiment_ids(client)
    if not ids:
        return []
    runs = _search(client, ids, f"tags.`{TAG.ROLE}` = '{ROLE_SWEEP}'")
    runs = [r for r in runs if r.data.tags.get(TAG.SUPERSEDED) != "true"]
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def latest_sweep_name(tracking_uri: str) -> str | None:
    """The sweep of the most recently started parent run, or None when there is none."""
    for run in _parent_runs(_client(tracking_uri)):
        name = run.data.tags.get(TAG.SWEEP)
        if name:
            return name
    return None


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
    """``search`` when unset (runs recorded before confirmation existed)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "":
        return "search"
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


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    # MLflow draws a tqdm bar for every artifact download; on the report's terminal output
    # that is noise. Scoped so that the caller's setting comes back afterwards.
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _load_trials(client: MlflowClient, parent_run_id: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        try:
            path = client.download_artifacts(parent_run_id, "trials.json", tmp)
        except Exception:  # a parent without trials.json: expected trials are unknown
            return []
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data if isinstance(data, list) else []


def _timestamp(ms: int | None) -> pd.Timestamp:
    return pd.to_datetime(ms, unit="ms", utc=True) if ms else pd.NaT


def _run_row(run: Any) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    method = tags.get(TAG.METHOD, params.get("method"))
    start, end = run.info.start_time, run.info.end_time
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "trial_id": tags.get(TAG.TRIAL_ID, run.info.run_name),
        "task": tags.get(TAG.TASK, params.get("task")),
        "method": method,
        "seed": _seed(tags.get(TAG.SEED, params.get("seed"))),
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
        if key.startswith("final/dev_") and key != "final/dev_main":
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
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create (and migrate) an empty one
        raise LookupError(f"no tracking store at {db}; run a sweep first or pass --tracking-uri")
    client = _client(tracking_uri)
    parents = _parent_runs(client)
    names = []
    for run in parents:
        name = run.data.tags.get(TAG.SWEEP)
        if name and name not in names:
            names.append(name)
    if sweep is None:
        if not names:
            raise LookupError(f"No sweeps found in the MLflow store at {tracking_uri}")
        sweep = names[0]
    matching = [r for r in parents if r.data.tags.get(TAG.SWEEP) == sweep]
    if not matching:
        known = ", ".join(names) if names else "none"
        raise LookupError(
            f"Sweep {sweep!r} not found in the MLflow store at {tracking_uri} "
            f"(known sweeps: {known})"
        )
    parent = matching[0]
    parent_id = parent.info.run_id
    children = _search(
        client, [parent.info.experiment_id], f"tags.`{TAG.PARENT}` = '{parent_id}'"
    )
    rows = [_run_row(r) for r in children if r.data.tags.get(TAG.ROLE, ROLE_TRIAL) == ROLE_TRIAL]
    extra = sorted({k for row in rows for k in row if k not in RUN_COLUMNS})
    runs = pd.DataFrame(rows, columns=[*RUN_COLUMNS, *extra])
    for h in HPARAMS:
        runs[h] = runs[h].astype(float)
    for col in (*RESULT_METRICS.values(), "duration_s", *extra):
        runs[col] = runs[col].astype(float)
    runs["start_time"] = pd.to_datetime(runs["start_time"], utc=True)
    runs["end_time"] = pd.to_datetime(runs["end_time"], utc=True)
    expected = _expected_frame(_load_trials(client, parent_id))
    runs = _blank_unused(_fill_from_expected(_dedupe(runs), expected))
    # A trainer that never logged best/dev_main: the best dev/main it logged is the same thing.
    for i in runs.index[runs["best_dev_main"].isna() & runs["status"].eq("FINISHED")]:
        points = client.get_metric_history(runs.at[i, "run_id"], "dev/main")
        values = [m.value for m in points if math.isfinite(m.value)]
        if values:
            runs.at[i, "best_dev_main"] = max(values)
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
