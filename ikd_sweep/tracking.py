"""MLflow, the store's one writer and its reader: one experiment, one parent run per sweep, one
child run per trial (get-or-create, so a resumed or retried trial never gets a second run).

One process writes a sweep's store: the Ray driver or `ikd-sweep train`, each through one
`TrialRecorder` (a trial's start, device, metrics, kept student and end). Metrics go through
MLflow's asynchronous `log_batch` (its HTTP client retries with backoff); a batch it could not
deliver is appended to `<home>/lost-metrics/<run_id>.jsonl` and counted in the tag
`ikd.lost_metrics`, so a loss is reported, never silent. `finish_trial` waits for the run's
metrics before ending it. The reader (`search_runs`, `find_parent`, `trial_runs`,
`load_trials`) serves the tracker, `status` and analysis/collect.py alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import Future, wait
from contextlib import nullcontext
from functools import cached_property, partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from ikd_sweep.config import SweepConfig
from ikd_sweep.errors import UnknownSweep
from ikd_sweep.home import Home
from ikd_sweep.names import SEL_DEV, SEL_VAL
from ikd_sweep.store import (
    ROLE_SWEEP,
    ROLE_TRIAL,
    STUDENT_ARTIFACT,
    TAG,
    TRIALS_ARTIFACT,
    absolute_sqlite_uri,
    code_metadata,
    default_artifact_root,
    device_tags,
    home_for,
    require_store,
    sqlite_path,
    trial_tags,
)
from ikd_sweep.trials import Trial, flat_params, flatten, trial_record

_log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment of this kind on its training-runs table.
EXPERIMENT_KIND = "custom_model_development"


def _param_value(value: Any) -> str:
    nested = isinstance(value, (list, tuple, dict))
    return (json.dumps(value, sort_keys=True, default=str) if nested else str(value))[:6000]


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy/torch scalars become numbers, anything else unknown a string."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def quiet_mlflow() -> None:
    """MLflow's own INFO messages (database set-up) and artifact download bars off: the CLI's
    output is its own."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow set INFO when imported


# -- the store reader: shared by the tracker, `status`, `export` and analysis/collect.py ------


def search_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str
                ) -> list[Any]:
    """Every run matching ``filter_string`` (all pages), oldest first, run id as tie-break:
    so the first run of a trial is its one canonical run."""
    runs: list[Any] = []
    for chunk in (experiment_ids[i:i + 100] for i in range(0, len(experiment_ids), 100)):
        token = None  # search_runs takes a bounded list of experiments per call
        while token != "":
            page = client.search_runs(chunk, filter_string, max_results=1000, page_token=token)
            runs += page
            token = page.token or ""
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def sweep_parents(client: MlflowClient) -> list[Any]:
    """Every live (not superseded) sweep parent run of the store's active experiments, newest
    first."""
    ids, token = [], None
    while token != "":
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                         page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token or ""
    parents = [r for r in search_runs(client, ids, f"tags.`{TAG.ROLE}` = '{ROLE_SWEEP}'")
               if r.data.tags.get(TAG.SUPERSEDED) != "true"]
    return sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True)


def find_parent(client: MlflowClient, sweep: str | None) -> Any:
    """The newest live parent run of ``sweep`` (of any sweep when None). Raises
    `UnknownSweep`, naming the sweeps the store has."""
    parents = sweep_parents(client)
    parent = next((r for r in parents if sweep is None or r.data.tags.get(TAG.SWEEP) == sweep),
                  None)
    if parent is None:
        names = ", ".join(dict.fromkeys(r.data.tags.get(TAG.SWEEP, "") for r in parents))
        where = f"the store at {client.tracking_uri}"
        raise UnknownSweep(f"no sweep {sweep!r} in {where} (known sweeps: {names or 'none'})"
                           if sweep else f"no sweep in {where}; run one first")
    return parent


def trial_runs(client: MlflowClient, parent: Any) -> list[Any]:
    """The trial (child) runs of a parent run, oldest first."""
    runs = search_runs(client, [parent.info.experiment_id],
                       f"tags.`{TAG.PARENT}` = '{parent.info.run_id}'")
    return [r for r in runs if r.data.tags.get(TAG.ROLE, ROLE_TRIAL) == ROLE_TRIAL]


def load_trials(client: MlflowClient, parent_run_id: str) -> list[dict[str, Any]]:
    """The parent run's ``trials.json`` ([] when it has none yet)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_run_id, TRIALS_ARTIFACT, tmp)
        except Exception:  # no such artifact yet
            return []
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    return list(data) if isinstance(data, list) else []


class SweepTracker:
    """Records sweeps in MLflow from one process (the Ray driver or ``ikd-sweep train``)."""

    def __init__(self, tracking_uri: str, experiment: str, *, home: str | Path | None = None,
                 flush_timeout_s: float = 120.0) -> None:
        self.tracking_uri, self.experiment = absolute_sqlite_uri(tracking_uri), experiment
        self.artifact_root = default_artifact_root(self.tracking_uri)
        self.home = Path(home).expanduser().resolve() if home else home_for(self.tracking_uri)
        self.flush_timeout_s = float(flush_timeout_s)  # finish_trial's wait for the metrics
        # A failed batch is reported here (one warning per outage, the lost-metrics file), not
        # by MLflow's queue once per batch.
        logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(
            logging.CRITICAL)
        self.tags = dict(code_metadata())
        # Per run: [future of an async log_batch, its metrics, written-as-lost]; MLflow
        # completes the futures on its own threads, hence the lock.
        self._inflight: dict[str, list[list[Any]]] = {}
        self._lock, self._outage = threading.Lock(), False

    def _store_lock(self) -> Any:
        # Opening a fresh SQLite file runs MLflow's schema migration, and two processes doing
        # that at once (two sweeps started together) break each other; so does creating one
        # experiment twice.
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        return nullcontext() if db is None else FileLock(f"{db}.lock")

    @cached_property
    def client(self) -> MlflowClient:
        with self._store_lock():
            return MlflowClient(tracking_uri=self.tracking_uri)

    @cached_property
    def experiment_id(self) -> str:
        """The experiment's id, created if needed (restored if deleted)."""
        client = self.client
        with self._store_lock():
            if client.get_experiment_by_name(self.experiment) is None:
                location = None if self.artifact_root is None else (
                    f"{self.artifact_root.rstrip('/')}/{quote(self.experiment, safe='')}")
                try:
                    client.create_experiment(self.experiment, artifact_location=location)
                except MlflowException as exc:  # a server: another host was first
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            exp = client.get_experiment_by_name(self.experiment)
            if exp.lifecycle_stage == "deleted":
                _log.warning("Restoring deleted MLflow experiment %r", self.experiment)
                client.restore_experiment(exp.experiment_id)
            if TAG.EXPERIMENT_KIND not in exp.tags:  # a kind chosen in the UI is kept
                client.set_experiment_tag(exp.experiment_id, TAG.EXPERIMENT_KIND,
                                          EXPERIMENT_KIND)
            return exp.experiment_id

    def _search(self, filter_string: str) -> list[Any]:
        return search_runs(self.client, [self.experiment_id], filter_string)

    # -- sweep (parent) runs ------------------------------------------------------------------

    def start_sweep(self, sweep_name: str, config: dict[str, Any], *,
                    restart: bool = False) -> str:
        """Get (or, with ``restart``, replace) the sweep's parent run and set it RUNNING;
        records ``config`` (the expected trials: `set_expected_trials`). Returns its run id."""
        client = self.client
        parents = [r for r in self._search(f"tags.`{TAG.ROLE}` = '{ROLE_SWEEP}'")
                   if r.data.tags.get(TAG.SWEEP) == sweep_name
                   and r.data.tags.get(TAG.SUPERSEDED) != "true"]
        if parents and not restart:
            run_id = parents[-1].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])
        else:
            for old in parents:  # kept, not deleted: browsable, and analysis skips them
                client.set_tag(old.info.run_id, TAG.SUPERSEDED, "true")
            tags = {TAG.SWEEP: sweep_name, TAG.ROLE: ROLE_SWEEP, **self.tags}
            run_id = client.create_run(self.experiment_id, tags=tags, run_name=sweep_name
                                       ).info.run_id
        client.log_dict(run_id, _jsonable(config), "sweep.json")
        return run_id

    def set_expected_trials(self, parent_run_id: str, trials: list[dict[str, Any]]) -> None:
        """The sweep's list of expected trials (``trials.json`` of the parent run)."""
        self.client.log_dict(parent_run_id, _jsonable(list(trials)), TRIALS_ARTIFACT)

    def end_sweep(self, parent_run_id: str, status: str) -> None:
        self.client.set_terminated(parent_run_id, status=status)

    # -- trial (child) runs -------------------------------------------------------------------

    def trial_run(self, parent_run_id: str, trial_id: str, *, tags: dict[str, str],
                  params: dict[str, object]) -> str:
        """Get-or-create the child run of ``trial_id``; it is RUNNING afterwards."""
        client, flat = self.client, flatten(dict(params))
        all_tags = {tag: str(flat[key]) for tag, key in
                    ((TAG.TASK, "task"), (TAG.METHOD, "method"), (TAG.SEED, "seed"))
                    if flat.get(key) is not None}
        all_tags[TAG.SWEEP] = client.get_run(parent_run_id).data.tags.get(TAG.SWEEP, "")
        all_tags.update({**{k: str(v) for k, v in tags.items() if v is not None}, **self.tags,
                         TAG.ROLE: ROLE_TRIAL, TAG.TRIAL_ID: trial_id, TAG.PARENT: parent_run_id})
        run = next((r for r in self._children(parent_run_id)  # the oldest: the canonical one
                    if r.data.tags.get(TAG.TRIAL_ID) == trial_id), None)
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            if TAG.ERROR in run.data.tags:  # a retry of a failed trial: the old error is stale
                client.delete_tag(run.info.run_id, TAG.ERROR)
        else:
            run = client.create_run(self.experiment_id, tags=all_tags, run_name=trial_id)
        # MLflow forbids changing a logged param: a param logged before keeps its value.
        new = [Param(k, _param_value(v)) for k, v in flat.items()
               if v is not None and k not in run.data.params]
        client.log_batch(run.info.run_id, params=new,  # MLflow splits it into its batch limits
                         tags=[RunTag(k, v[:8000]) for k, v in all_tags.items()])
        return run.info.run_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Add tags to a run (e.g. the device a worker reported)."""
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])

    def _children(self, parent_run_id: str) -> list[Any]:
        return self._search(f"tags.`{TAG.PARENT}` = '{parent_run_id}'")

    def child_runs(self, parent_run_id: str) -> list[dict[str, Any]]:
        """``[{run_id, trial_id, status, error}]`` for every child of the parent run."""
        return [{"run_id": r.info.run_id, "trial_id": r.data.tags.get(TAG.TRIAL_ID, ""),
                 "status": r.info.status, "error": r.data.tags.get(TAG.ERROR)}
                for r in self._children(parent_run_id)]

    def mark_unfinished(self, parent_run_id: str, status: str = "KILLED") -> int:
        """Set children still RUNNING/SCHEDULED to ``status`` (after Ctrl-C); returns how many."""
        runs = [r for r in self.child_runs(parent_run_id)
                if r["status"] in ("RUNNING", "SCHEDULED")]
        for run in runs:
            self.client.set_terminated(run["run_id"], status=status)
        return len(runs)

    # -- metrics ------------------------------------------------------------------------------

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """Queue metrics for MLflow's async logging; ``timestamp_ms`` is when they were measured
        (a worker's clock), default now. Non-finite values are skipped; never raises."""
        stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        batch = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        if not batch:
            return
        try:
            # RunOperations: one future per call (a batch under MLflow's 1000-metric limit)
            future = self.client.log_batch(run_id, metrics=batch, synchronous=False
                                           )._operation_futures[0]
        except Exception as exc:  # e.g. the async queue refused the batch
            future = Future()
            future.set_exception(exc)
        entry = [future, batch, False]
        with self._lock:
            self._inflight.setdefault(run_id, []).append(entry)
        future.add_done_callback(lambda f: self._delivered(run_id, entry))

    def _delivered(self, run_id: str, entry: list[Any]) -> None:
        exc = entry[0].exception()
        with self._lock:
            was_down, self._outage = self._outage, exc is not None
        if exc is None and was_down:
            _log.warning("MLflow tracking is reachable again")
        elif exc is not None:
            if not was_down:
                _log.warning("MLflow tracking unreachable (%s); undelivered metrics go to %s",
                             (str(exc).splitlines() or [type(exc).__name__])[0][:300],
                             Home(self.home).lost_metrics)
            self._write_lost(run_id, entry, str(exc))

    def lost_metrics_path(self, run_id: str) -> Path:
        return Home(self.home).lost_metrics / f"{run_id}.jsonl"

    def _write_lost(self, run_id: str, entry: list[Any], reason: str) -> None:
        with self._lock:
            if entry[2]:  # reported at the end of the trial already
                return
            entry[2] = True
            path = self.lost_metrics_path(run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as out:
                out.writelines(json.dumps({"run_id": run_id, "key": m.key, "value": m.value,
                                           "step": m.step, "timestamp": m.timestamp,
                                           "reason": reason[:500]}) + "\n" for m in entry[1])

    # -- the selected student -----------------------------------------------------------------

    def log_student(self, run_id: str, folder: Path) -> None:
        """Log a trial's selected-student folder as the run's ``student`` artifact."""
        self.client.log_artifacts(run_id, str(folder), STUDENT_ARTIFACT)

    # -- end of a trial -----------------------------------------------------------------------

    def finish_trial(self, run_id: str, status: str, *, error: str | None = None,
                     final_metrics: dict[str, Any] | None = None,
                     trial_config: dict[str, Any] | None = None) -> None:
        """Wait for the run's metrics, log artifacts and the error, and end it with ``status``."""
        with self._lock:
            inflight = self._inflight.pop(run_id, [])
        # (MLflow's set_terminated below also drains its whole async queue, all runs included.)
        _, late = wait([e[0] for e in inflight], timeout=self.flush_timeout_s)
        for entry in (e for e in inflight if e[0] in late):  # may still arrive: report it anyway
            self._write_lost(run_id, entry, "not delivered when the trial ended")
        with self._lock:
            lost = sum(len(e[1]) for e in inflight if e[2])
        if lost:
            _log.warning("%d metrics of run %s could not be delivered to MLflow; saved to %s",
                         lost, run_id, self.lost_metrics_path(run_id))
        c = self.client  # the error: the end of a traceback (the exception and its message)
        tags = {TAG.LOST: str(lost) if lost else None, TAG.ERROR: error[-5000:] if error else None}
        steps = [(f"tag {k}", partial(c.set_tag, run_id, k, v)) for k, v in tags.items() if v]
        steps += [(n, partial(c.log_dict, run_id, _jsonable(v), n)) for n, v in
                  (("trial_config.json", trial_config), ("final_metrics.json", final_metrics))
                  if v is not None]
        steps.append(("status", partial(c.set_terminated, run_id, status=status)))
        failed = []
        for name, fn in steps:
            try:
                fn()
            except Exception as exc:  # reported below; must not stop the sweep
                _log.warning("Run %s: could not record %s in MLflow: %s", run_id, name, exc)
                failed.append(name)
        if failed:  # the end of the run could not be recorded either: keep it on disk
            path = Home(self.home).lost_metrics / f"{run_id}.finish.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run_id": run_id, "status": status, "error": error,
                                        "final_metrics": final_metrics, "not_recorded": failed},
                                       indent=2, default=str))
            _log.warning("End of run %s saved to %s", run_id, path)


class TrialRecorder:
    """The trials of one sweep's parent run as they happen: start, device, metrics, kept
    student, finish. The sweep's Tune callback, the driver's reconciliation after a Tuner and
    `ikd-sweep train` all record through it, so a trial is recorded the same way everywhere."""

    def __init__(self, tracker: SweepTracker, parent: str, cfg: SweepConfig) -> None:
        self.tracker, self.parent, self.cfg = tracker, parent, cfg
        self.runs: dict[str, str] = {}  # trial_id -> run_id, of the trials recorded so far

    def start(self, trial: Trial, run_id: str | None = None) -> str:
        """The trial's run, RUNNING (created if new); `run_id`: one the store already has."""
        self.runs[trial.trial_id] = run_id or self.tracker.trial_run(
            self.parent, trial.trial_id, tags=trial_tags(self.cfg, trial),
            params=flat_params(self.cfg, trial))
        return self.runs[trial.trial_id]

    def _run(self, trial: Trial) -> str:
        return self.runs.get(trial.trial_id) or self.start(trial)

    def device(self, trial: Trial, info: dict[str, str]) -> None:
        self.tracker.set_tags(self._run(trial), device_tags(info))

    def metrics(self, trial: Trial, metrics: dict[str, float], step: int,
                time_ms: int | None = None) -> None:
        self.tracker.log_metrics(self._run(trial), metrics, step, time_ms)

    def keep_student(self, trial: Trial, folder: Path) -> bool:
        """Log the trial's selected-student folder as its run's `student` artifact; False
        (with a warning) when there is none or the upload failed."""
        if not folder.is_dir():
            return False
        try:
            self.tracker.log_student(self._run(trial), folder)
        except Exception as exc:
            _log.warning("MLflow: the student of %s was not logged (%s); it stays in %s",
                         trial.trial_id, exc, folder)
            return False
        return True

    def finish(self, trial: Trial, status: str, *, final: dict[str, Any] | None = None,
               error: str | None = None) -> None:
        """End the trial's run with `status` (FINISHED, FAILED, KILLED), its final metrics or
        its error (the whole text, traceback included, goes to the tag ikd.error)."""
        run_id = self._run(trial)
        if final is not None:
            self.tracker.log_metrics(run_id, final, int(final.get("steps", 0)))
        self.tracker.finish_trial(run_id, status, error=error, final_metrics=final,
                                  trial_config=trial_record(self.cfg, trial))


def sweep_progress(tracking_uri: str, sweep: str | None = None) -> dict[str, Any]:
    """What ``ikd-sweep status`` shows, read from the store alone: the newest live parent run
    of ``sweep`` (of any sweep when None), its expected trials and one entry per trial run.
    Raises `UnknownSweep` or `StoreError`; never creates a store."""
    client = MlflowClient(tracking_uri=require_store(tracking_uri))
    parent = find_parent(client, sweep)
    runs: dict[str, dict[str, Any]] = {}
    for r in trial_runs(client, parent):  # oldest first: the canonical run wins
        tags, m = r.data.tags, r.data.metrics
        runs.setdefault(tags.get(TAG.TRIAL_ID, ""), {
            "trial_id": tags.get(TAG.TRIAL_ID, ""), "task": tags.get(TAG.TASK),
            "method": tags.get(TAG.METHOD), "status": r.info.status,
            "error": tags.get(TAG.ERROR), "start_ms": r.info.start_time,
            "end_ms": r.info.end_time, "sel_val_main": m.get(SEL_VAL),
            "sel_dev_main": m.get(SEL_DEV)})
    return {"sweep": parent.data.tags.get(TAG.SWEEP), "run_id": parent.info.run_id,
            "status": parent.info.status, "start_ms": parent.info.start_time,
            "expected": load_trials(client, parent.info.run_id), "runs": list(runs.values())}
