"""MLflow: one experiment, one parent run per sweep, one child run per trial (get-or-create,
so a resumed or retried trial never gets a second run).

One process writes a sweep's store: the Ray driver (the Tune callback in tune.py) or
`ikd-sweep train`. Metrics go through MLflow's asynchronous `log_batch` (its HTTP client
retries with backoff); a batch it could not deliver is appended to
`<home>/lost-metrics/<run_id>.jsonl` and counted in the tag `ikd.lost_metrics`, so a loss is
reported, never silent. `finish_trial` waits for the run's metrics before ending it.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, wait
from contextlib import nullcontext
from functools import cache, cached_property, partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils import mlflow_tags

from ikd_sweep import __version__
from ikd_sweep.config import SweepConfig, default_home
from ikd_sweep.trials import Trial, flatten

_log = logging.getLogger(__name__)

DB_NAME, ARTIFACTS_DIR, LOST_METRICS_DIR = "mlflow.db", "mlartifacts", "lost-metrics"
STUDENT_ARTIFACT = "student"  # a trial run's selected student (a Hugging Face model folder)


class TAG:
    """The one table of MLflow tag names; tune.py, the CLI and analysis/collect.py use these."""

    SWEEP = "ikd.sweep"
    ROLE = "ikd.role"  # ROLE_SWEEP on the parent run, ROLE_TRIAL on each child
    TRIAL_ID = "ikd.trial_id"
    TASK = "ikd.task"
    METHOD = "ikd.method"
    SEED = "ikd.seed"
    PHASE = "ikd.phase"  # "search" | "confirm"
    ERROR = "ikd.error"
    SUPERSEDED = "ikd.superseded"  # a parent replaced by `run --restart`
    LOST = "ikd.lost_metrics"
    VERSION = "ikd.version"
    GIT = "ikd.git_commit"
    GIT_DIRTY = "ikd.git_dirty"  # "true": the code had uncommitted changes (tracked files)
    LIB = "ikd.lib."  # + library name: its installed version
    DEVICE = "ikd.device"  # where the trial trained (reported by the worker): cuda | cpu | mps
    GPU = "ikd.gpu"  # the GPU's name, "none" on CPU
    PARENT = "mlflow.parentRunId"
    EXPERIMENT_KIND = "mlflow.experimentKind"  # experiment tag: which view the MLflow UI opens


# MLflow 3's UI opens an experiment of this kind on its training-runs table.
EXPERIMENT_KIND = "custom_model_development"
LIBRARIES = ("torch", "transformers", "ray", "mlflow")


ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"


def resolve_tracking_uri(uri: str | None, home: Path) -> str:
    """Explicit ``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<home>/mlflow.db`` (absolute;
    ``home`` is created so that SQLite can create the database in it)."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return _absolute_sqlite_uri(uri or os.environ["MLFLOW_TRACKING_URI"])
    Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(home).expanduser().resolve()}/{DB_NAME}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for anything else (or in-memory)."""
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    ok = tracking_uri.startswith("sqlite:///") and path not in ("", ":memory:")
    return Path(unquote(path)) if ok else None


def _absolute_sqlite_uri(uri: str) -> str:
    # A relative sqlite path depends on the working directory of whoever opens it.
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    return f"sqlite:///{path.resolve()}" + (f"?{uri.split('?', 1)[1]}" if "?" in uri else "")


def home_for(tracking_uri: str) -> Path:
    """The SQLite database's folder, else :func:`default_home` (for a tracking server)."""
    return path.parent if (path := sqlite_path(tracking_uri)) else default_home().resolve()


def default_artifact_root(tracking_uri: str) -> str | None:
    """``file://<home>/mlartifacts`` for SQLite stores; None for servers (the server decides)."""
    path = sqlite_path(tracking_uri)
    return None if path is None else (path.parent / ARTIFACTS_DIR).resolve().as_uri()


def _param_value(value: Any) -> str:
    nested = isinstance(value, (list, tuple, dict))
    return (json.dumps(value, sort_keys=True, default=str) if nested else str(value))[:6000]


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy/torch scalars become numbers, anything else unknown a string."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _git(*args: str) -> str | None:
    # The package's own checkout, not the working directory: a sweep launched from elsewhere
    # still records the code it ran.
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@cache
def code_metadata() -> dict[str, str]:
    """Tags every run carries: library versions, git commit and dirty flag of the package's
    checkout (none when installed from a wheel), and MLflow's own source tags."""
    tags = {TAG.VERSION: __version__, mlflow_tags.MLFLOW_SOURCE_TYPE: "LOCAL",
            mlflow_tags.MLFLOW_SOURCE_NAME: " ".join(["ikd-sweep", *sys.argv[1:2]])}
    for lib in LIBRARIES:
        try:
            tags[TAG.LIB + lib] = version(lib)
        except PackageNotFoundError:
            tags[TAG.LIB + lib] = "not installed"
    try:
        tags[mlflow_tags.MLFLOW_USER] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        pass
    sha = _git("rev-parse", "HEAD")
    if sha:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        tags.update({TAG.GIT: sha, mlflow_tags.MLFLOW_GIT_COMMIT: sha,
                     TAG.GIT_DIRTY: "unknown" if dirty is None else str(bool(dirty)).lower()})
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[mlflow_tags.MLFLOW_GIT_BRANCH] = branch
    return tags


def quiet_mlflow() -> None:
    """MLflow's own INFO messages (database set-up) and artifact download bars off: the CLI's
    output is its own."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow set INFO when imported


def device_tags(info: dict[str, str]) -> dict[str, str]:
    """``{"device": "cuda", "gpu": "NVIDIA H200"}`` (a worker's report) as run tags."""
    return {TAG.DEVICE: str(info.get("device", "unknown")), TAG.GPU: str(info.get("gpu", "none"))}


def trial_tags(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    return {TAG.SWEEP: cfg.name, TAG.TASK: trial.task, TAG.METHOD: trial.method,
            TAG.SEED: str(trial.seed), TAG.TRIAL_ID: trial.trial_id, TAG.PHASE: trial.phase}


class SweepTracker:
    """Records sweeps in MLflow from one process (the Ray driver or ``ikd-sweep train``)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None, *,
                 home: str | Path | None = None, flush_timeout_s: float = 120.0) -> None:
        self.tracking_uri, self.experiment = _absolute_sqlite_uri(tracking_uri), experiment
        self.artifact_root = (artifact_root if artifact_root is not None
                              else default_artifact_root(self.tracking_uri))
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
        runs, token = [], None
        while token != "":
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token or ""
        # Oldest first, run id as the tie-break: one canonical run per trial.
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    # -- sweep (parent) runs ------------------------------------------------------------------

    def start_sweep(self, sweep_name: str, config: dict[str, Any],
                    trials: list[dict[str, Any]] | None = None, *, restart: bool = False) -> str:
        """Get (or, with ``restart``, replace) the sweep's parent run and set it RUNNING;
        records ``config`` and, when given, the expected ``trials``. Returns its run id."""
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
        if trials is not None:
            self.set_expected_trials(run_id, trials)
        return run_id

    def set_expected_trials(self, parent_run_id: str, trials: list[dict[str, Any]]) -> None:
        """The sweep's list of expected trials (``trials.json`` of the parent run)."""
        self.client.log_dict(parent_run_id, _jsonable(list(trials)), "trials.json")

    def expected_trials(self, parent_run_id: str) -> list[dict[str, Any]]:
        """The parent run's ``trials.json`` ([] when it has none)."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(parent_run_id, "trials.json", tmp)
            except Exception:  # no such artifact yet
                return []
            return list(json.loads(Path(path).read_text()))

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
                             self.home / LOST_METRICS_DIR)
            self._write_lost(run_id, entry, str(exc))

    def lost_metrics_path(self, run_id: str) -> Path:
        return self.home / LOST_METRICS_DIR / f"{run_id}.jsonl"

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
            path = self.home / LOST_METRICS_DIR / f"{run_id}.finish.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"run_id": run_id, "status": status, "error": error,
                                        "final_metrics": final_metrics, "not_recorded": failed},
                                       indent=2, default=str))
            _log.warning("End of run %s saved to %s", run_id, path)


def sweep_progress(tracking_uri: str, sweep: str | None = None) -> dict[str, Any]:
    """What ``ikd-sweep status`` shows, read from the store alone: the newest live parent run
    of ``sweep`` (of any sweep when None), its expected trials and one entry per trial run.
    Raises LookupError (naming the sweeps there are) when there is no such sweep; never
    creates a store."""
    db = sqlite_path(_absolute_sqlite_uri(tracking_uri))
    if db is not None and not db.exists():
        raise LookupError(f"no tracking store at {db} (run a sweep first, or pass --home or "
                          "--tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)

    def search(ids: list[str], filter_string: str) -> list[Any]:  # read-only: no tracker
        runs = []
        for chunk in (ids[i:i + 100] for i in range(0, len(ids), 100)):
            token = None
            while token != "":
                page = client.search_runs(chunk, filter_string, max_results=1000,
                                          page_token=token)
                runs += page
                token = page.token or ""
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    exps = {e.experiment_id: e.name for e in client.search_experiments(max_results=1000)}
    parents = [r for r in search(list(exps), f"tags.`{TAG.ROLE}` = '{ROLE_SWEEP}'")
               if r.data.tags.get(TAG.SUPERSEDED) != "true"]
    parents.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    names = list(dict.fromkeys(r.data.tags.get(TAG.SWEEP, "") for r in parents))
    parent = next((r for r in parents if sweep is None or r.data.tags.get(TAG.SWEEP) == sweep),
                  None)
    if parent is None:
        raise LookupError(f"no sweep {sweep!r} in the store at {tracking_uri}; sweeps there: "
                          f"{', '.join(names) or 'none'}" if sweep else
                          f"no sweep in the store at {tracking_uri}")
    runs: dict[str, dict[str, Any]] = {}
    children = search([parent.info.experiment_id],
                      f"tags.`{TAG.PARENT}` = '{parent.info.run_id}'")
    for r in children:  # oldest first: the canonical run wins
        tags, m = r.data.tags, r.data.metrics
        runs.setdefault(tags.get(TAG.TRIAL_ID, ""), {
            "trial_id": tags.get(TAG.TRIAL_ID, ""), "task": tags.get(TAG.TASK),
            "method": tags.get(TAG.METHOD), "status": r.info.status,
            "error": tags.get(TAG.ERROR), "start_ms": r.info.start_time,
            "end_ms": r.info.end_time, "sel_val_main": m.get("sel/val_main"),
            "sel_dev_main": m.get("sel/dev_main")})
    return {"sweep": parent.data.tags.get(TAG.SWEEP), "run_id": parent.info.run_id,
            "status": parent.info.status, "start_ms": parent.info.start_time,
            "expected": SweepTracker(tracking_uri, exps[parent.info.experiment_id]
                                     ).expected_trials(parent.info.run_id),
            "runs": list(runs.values())}
# -- a trial's student, for `ikd-sweep export` ------------------------------------------------


def download_student(tracking_uri: str, run_id: str, dest: Path) -> Path:
    """Copy run ``run_id``'s ``student`` artifact into the folder ``dest`` (created; must be
    empty). Raises LookupError when the run kept no student."""
    client = MlflowClient(tracking_uri=_absolute_sqlite_uri(tracking_uri))
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
    client = MlflowClient(tracking_uri=_absolute_sqlite_uri(tracking_uri))
    try:
        client.create_registered_model(name, description="ikd-sweep selected students")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/{STUDENT_ARTIFACT}",
                                          run_id=run_id)
    return str(version.version)
