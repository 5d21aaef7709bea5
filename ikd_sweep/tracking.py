"""MLflow tracking for sweeps: one experiment, one parent run per sweep, one child run per trial.

This module and ``analysis/collect.py`` are the only places that import mlflow. Everything the
Ray trainable needs goes through :class:`SweepTracker`, which is picklable (it holds strings and
numbers only and builds its ``MlflowClient`` lazily in whichever process uses it).

Guarantees the rest of the system relies on:

* ``trial_run`` is get-or-create, so resuming or retrying a trial never duplicates its run;
* ``log_metrics`` never raises for connectivity problems and never blocks training for more than
  ``call_timeout_s`` per call: batches that fail stay in memory and are retried with backoff;
* ``finish_trial`` flushes what is pending for up to ``flush_timeout_s`` and writes whatever still
  could not be delivered to ``<home>/lost-metrics/<run_id>.jsonl`` (and says so), so loss is
  reported, never silent;
* the first initialisation of a fresh SQLite store is serialised across processes with a file
  lock, because MLflow's schema migration is not safe to run twice at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from ikd_sweep.config import default_home  # one definition of the working folder

_log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOST_METRICS_DIR = "lost-metrics"

# Tag keys: the analysis package and the CLI read these, so they are part of the contract.
TAG_SWEEP = "ikd.sweep"
TAG_ROLE = "ikd.role"
TAG_TRIAL_ID = "ikd.trial_id"
TAG_TASK = "ikd.task"
TAG_METHOD = "ikd.method"
TAG_SEED = "ikd.seed"
TAG_VERSION = "ikd.version"
TAG_GIT = "ikd.git_commit"
TAG_ERROR = "ikd.error"
TAG_SUPERSEDED = "ikd.superseded"
TAG_LOST = "ikd.lost_metrics"
TAG_PARENT = "mlflow.parentRunId"

ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow limits: param values 6000 chars, tag values 8000, 1000 metrics / 100 params per batch.
MAX_PARAM_LEN = 6000
MAX_ERROR_LEN = 5000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100

# Error codes that no retry will fix: such a batch is written to the lost-metrics file at once.
_PERMANENT_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
)


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None, home: Path) -> str:
    """Explicit ``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<home>/mlflow.db``.

    The SQLite default is an absolute path (Ray workers run in other working directories), and
    ``home`` is created so that SQLite can create the database file in it.
    """
    if uri:
        return _absolute_sqlite_uri(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return _absolute_sqlite_uri(env)
    home = Path(home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home.resolve()}/{DB_NAME}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for anything else (or in-memory)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    rest = tracking_uri[len("sqlite:") :]
    if not rest.startswith("///"):
        return None  # sqlite:// (in-memory) or a form we do not understand
    path = rest[3:].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(unquote(path))


def _absolute_sqlite_uri(uri: str) -> str:
    # A relative sqlite path would point somewhere else in a Ray worker (other cwd).
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    absolute = f"sqlite:///{path.resolve()}"
    return f"{absolute}?{query}" if query else absolute


def home_for(tracking_uri: str) -> Path:
    """The working folder belonging to a tracking URI: the SQLite database's folder, else
    :func:`default_home` (for a tracking server)."""
    path = sqlite_path(tracking_uri)
    if path is not None:
        return path.parent
    return default_home().resolve()


def default_artifact_root(tracking_uri: str) -> str | None:
    """``file://<home>/mlartifacts`` for SQLite stores; None for servers (the server decides)."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    return (path.parent / ARTIFACTS_DIR).resolve().as_uri()


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """argv that serves this store in the MLflow UI (``python -m mlflow ui``).

    For SQLite the artifact root is passed explicitly: ``mlflow ui`` would otherwise resolve
    ``./mlartifacts`` against its own working directory, not against the database's folder.
    """
    tracking_uri = _absolute_sqlite_uri(tracking_uri)
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    root = default_artifact_root(tracking_uri)
    if root is not None:
        argv += ["--default-artifact-root", root, "--artifacts-destination", root]
    argv += ["--host", host, "--port", str(port)]
    return argv


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def package_version() -> str:
    try:
        from ikd_sweep import __version__

        return str(__version__)
    except Exception:  # the package may be half-written or not importable
        pass
    try:
        from importlib.metadata import version

        return version("ikd-sweep")
    except Exception:
        return "unknown"


def git_commit(cwd: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``cwd``, or None when that is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-5}}`` -> ``{"train.lr": 1e-5}`` (the param naming of the runs)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return text[:MAX_PARAM_LEN]


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy (numpy scalars become numbers, paths and the like become strings)."""

    def default(o: Any) -> Any:
        if hasattr(o, "item"):  # numpy / torch scalars
            with contextlib.suppress(Exception):
                return o.item()
        if hasattr(o, "tolist"):
            with contextlib.suppress(Exception):
                return o.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=str)
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _truncate_error(error: str) -> str:
    # Keep the end of a traceback: that is where the exception and its message are.
    if len(error) <= MAX_ERROR_LEN:
        return error
    return "...[truncated]\n" + error[-(MAX_ERROR_LEN - 16) :]


def _experiment_dir(experiment: str) -> str:
    # A folder name for the experiment's artifacts; a hash keeps names that differ only in
    # characters we replace apart.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    if safe != experiment:
        safe = f"{safe}-{hashlib.sha1(experiment.encode()).hexdigest()[:8]}"
    return safe


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None) if isinstance(exc, MlflowException) else None


def _is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc).lower()


def _is_permanent(exc: BaseException) -> bool:
    return _error_code(exc) in _PERMANENT_CODES and not _is_locked(exc)


def _retry_locked(fn: Callable[[], T], attempts: int = 8) -> T:
    """Run ``fn``; on SQLite's 'database is locked' (many writers at once) retry with backoff."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # re-raised unless it is the lock error
            if not _is_locked(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive fcntl lock on ``path`` (no-op when path is None or fcntl is missing)."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process protection
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _quote(value: str) -> str | None:
    """A search-filter literal, or None when the value cannot be put in one safely."""
    if "'" in value or "\\" in value:
        return None
    return f"'{value}'"


class _Sender:
    """One daemon thread that runs MLflow calls for a tracker, so a caller can stop waiting.

    A call to an unreachable tracking server can block for minutes inside MLflow's own retry
    loop; running it here lets ``log_metrics`` return after ``call_timeout_s`` while the call
    finishes (or fails) in the background. A daemon thread never holds up interpreter exit.
    """

    def __init__(self) -> None:
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="ikd-mlflow-sender", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                fn, future = self._jobs.pop(0)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------


class SweepTracker:
    """Records one sweep in MLflow. Picklable: send it to Ray workers as is."""

    #: Longest a ``log_metrics`` call waits for the tracking store before returning.
    call_timeout_s: float = 2.0
    #: How long ``finish_trial`` keeps retrying pending metrics before declaring them lost.
    flush_timeout_s: float = 60.0
    #: Backoff between retries of failed metric batches (doubling, capped).
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    #: Pending metrics kept in memory per tracker before the oldest are spilled to disk.
    max_pending: int = 200_000

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: str | None = None,
        *,
        home: str | Path | None = None,
        flush_timeout_s: float | None = None,
        call_timeout_s: float | None = None,
    ) -> None:
        self.tracking_uri = _absolute_sqlite_uri(tracking_uri)
        self.experiment = experiment
        self.artifact_root = (
            artifact_root if artifact_root is not None else default_artifact_root(self.tracking_uri)
        )
        # Resolved now: Ray workers run in other working directories.
        self.home = str(Path(home).expanduser().resolve() if home else home_for(self.tracking_uri))
        if flush_timeout_s is not None:
            self.flush_timeout_s = float(flush_timeout_s)
        if call_timeout_s is not None:
            self.call_timeout_s = float(call_timeout_s)
        self.version = package_version()
        # Taken in the driver (the repository); a Ray worker's cwd is its trial folder.
        self.git_commit = git_commit()
        self._experiment_id: str | None = None
        self._init_runtime()

    # -- pickling: strings and numbers only; the client and the thread are rebuilt lazily ----

    def _init_runtime(self) -> None:
        self._client: MlflowClient | None = None
        self._lock = threading.RLock()
        self._sender: _Sender | None = None
        self._pending: list[tuple[str, Metric]] = []  # (run_id, metric), in logging order
        # (future, batch, monotonic start) of the one log_batch call on the sender thread.
        self._inflight: tuple[Future, list[tuple[str, Metric]], float] | None = None
        self._next_try = 0.0
        self._backoff = self.backoff_initial_s
        self._outage_warned = False
        self._sweep_of_parent: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        with self._lock:
            if self._pending:
                _log.warning(
                    "SweepTracker pickled with %d undelivered metrics; they stay with the "
                    "original object",
                    len(self._pending),
                )
        for key in list(state):
            if key.startswith("_") and key != "_experiment_id":
                del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- the client ---------------------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            db = sqlite_path(self.tracking_uri)
            lock = db.with_name(db.name + ".lock") if db is not None else None
            # MlflowClient builds the store eagerly, and building a SQLite store runs the schema
            # migration when the tables are missing: two processes doing that at once corrupt
            # each other's migration. Serialise it.
            with _file_lock(lock):
                self._client = _retry_locked(lambda: MlflowClient(tracking_uri=self.tracking_uri))
        return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating the experiment if needed (safe against races)."""
        if self._experiment_id is None:
            db = sqlite_path(self.tracking_uri)
            lock = db.with_name(db.name + ".lock") if db is not None else None
            client = self.client
            with _file_lock(lock):
                self._experiment_id = _retry_locked(lambda: self._get_or_create_experiment(client))
        return self._experiment_id

    def _get_or_create_experiment(self, client: MlflowClient) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                _log.warning("Restoring deleted MLflow experiment %r", self.experiment)
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if self.artifact_root is not None:
            location = f"{self.artifact_root.rstrip('/')}/{quote(_experiment_dir(self.experiment))}"
        try:
            return client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException as exc:
            # Another process (e.g. a tracking server client elsewhere) won the race.
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _search(self, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = _retry_locked(
                lambda token=token: self.client.search_runs(
                    [self.experiment_id],
                    filter_string=filter_string,
                    max_results=1000,
                    order_by=order_by,
                    page_token=token,
                )
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    # -- sweep (parent) runs --------------------------------------------------------------------

    def _base_tags(self) -> dict[str, str]:
        tags = {TAG_VERSION: self.version}
        if self.git_commit:
            tags[TAG_GIT] = self.git_commit
        return tags

    def start_sweep(
        self,
        sweep_name: str,
        config: dict[str, Any],
        trials: list[dict[str, Any]],
        *,
        restart: bool = False,
    ) -> str:
        """Get (or, with ``restart``, replace) the sweep's parent run; returns its run id."""
        client = self.client
        parents = [
            run
            for run in self._search(
                f"tags.`{TAG_ROLE}` = '{ROLE_SWEEP}'", order_by=["attributes.start_time DESC"]
            )
            if run.data.tags.get(TAG_SWEEP) == sweep_name
            and run.data.tags.get(TAG_SUPERSEDED) != "true"
        ]
        run_id: str | None = None
        if parents and not restart:
            run_id = parents[0].info.run_id
            _retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
        else:
            for old in parents:
                # Kept, not deleted: the old results stay browsable, analysis ignores them.
                _retry_locked(
                    lambda old=old: client.set_tag(old.info.run_id, TAG_SUPERSEDED, "true")
                )
        if run_id is None:
            tags = {TAG_SWEEP: sweep_name, TAG_ROLE: ROLE_SWEEP, **self._base_tags()}
            run = _retry_locked(
                lambda: client.create_run(self.experiment_id, tags=tags, run_name=sweep_name)
            )
            run_id = run.info.run_id
        else:
            tags = self._base_tags()
            _retry_locked(
                lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            )
        config_json = _jsonable(config)
        trials_json = _jsonable(list(trials))
        _retry_locked(lambda: client.log_dict(run_id, config_json, "sweep.json"))
        _retry_locked(lambda: client.log_dict(run_id, trials_json, "trials.json"))
        self._sweep_of_parent[run_id] = sweep_name
        return run_id

    def end_sweep(self, parent_run_id: str, status: str) -> None:
        _retry_locked(lambda: self.client.set_terminated(parent_run_id, status=status))

    # -- trial (child) runs ---------------------------------------------------------------------

    def _children(self, parent_run_id: str, trial_id: str | None = None) -> list[Any]:
        filt = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
        literal = _quote(trial_id) if trial_id is not None else None
        if literal is not None:
            filt += f" and tags.`{TAG_TRIAL_ID}` = {literal}"
        runs = self._search(filt, order_by=["attributes.start_time ASC"])
        if trial_id is not None:
            runs = [r for r in runs if r.data.tags.get(TAG_TRIAL_ID) == trial_id]
        # Oldest first, run id as the tie-break, so every process agrees which one is canonical.
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _sweep_name(self, parent_run_id: str) -> str | None:
        if parent_run_id not in self._sweep_of_parent:
            run = _retry_locked(lambda: self.client.get_run(parent_run_id))
            self._sweep_of_parent[parent_run_id] = run.data.tags.get(TAG_SWEEP, "")
        return self._sweep_of_parent[parent_run_id] or None

    def trial_run(
        self,
        parent_run_id: str,
        trial_id: str,
        *,
        tags: dict[str, str],
        params: dict[str, object],
    ) -> str:
        """Get-or-create the child run of ``trial_id``; it is RUNNING afterwards."""
        client = self.client
        flat = flatten(dict(params))
        all_tags: dict[str, str] = {}
        # Task/method/seed tags default to the params of the same name, so callers may omit them.
        for tag, key in ((TAG_TASK, "task"), (TAG_METHOD, "method"), (TAG_SEED, "seed")):
            if flat.get(key) is not None:
                all_tags[tag] = str(flat[key])
        sweep = self._sweep_name(parent_run_id)
        if sweep:
            all_tags[TAG_SWEEP] = sweep
        all_tags.update({k: str(v) for k, v in tags.items() if v is not None})
        all_tags.update(self._base_tags())
        all_tags.update({TAG_ROLE: ROLE_TRIAL, TAG_TRIAL_ID: trial_id, TAG_PARENT: parent_run_id})

        existing = self._children(parent_run_id, trial_id)
        if existing:
            run = existing[0]
            run_id = run.info.run_id
            _retry_locked(lambda: client.update_run(run_id, status="RUNNING"))
            if TAG_ERROR in run.data.tags:  # a retry of a failed trial: the old error is stale
                _retry_locked(lambda: client.delete_tag(run_id, TAG_ERROR))
            old_params = run.data.params
        else:
            run = _retry_locked(
                lambda: client.create_run(self.experiment_id, tags=all_tags, run_name=trial_id)
            )
            run_id = run.info.run_id
            old_params = {}
            # Two processes may have created the trial at the same moment: keep the oldest.
            twins = self._children(parent_run_id, trial_id)
            if len(twins) > 1 and twins[0].info.run_id != run_id:
                _retry_locked(lambda: client.delete_run(run_id))
                return self.trial_run(parent_run_id, trial_id, tags=tags, params=params)

        new_params: list[Param] = []
        for key, value in flat.items():
            if value is None:
                continue
            text = _param_value(value)
            if key in old_params:
                if old_params[key] != text:
                    # MLflow forbids changing a logged param; the run keeps the first value.
                    _log.warning(
                        "Trial %s: param %s was %r, now %r; keeping the logged value",
                        trial_id,
                        key,
                        old_params[key],
                        text,
                    )
                continue
            new_params.append(Param(key, text))
        tag_list = [RunTag(k, v[:8000]) for k, v in all_tags.items()]
        for start in range(0, max(len(new_params), 1), MAX_PARAMS_PER_BATCH):
            chunk = new_params[start : start + MAX_PARAMS_PER_BATCH]
            batch_tags = tag_list if start == 0 else []
            _retry_locked(lambda c=chunk, t=batch_tags: client.log_batch(run_id, params=c, tags=t))
        return run_id

    def child_runs(self, parent_run_id: str) -> list[dict[str, str]]:
        """``[{run_id, trial_id, status, error}]`` for every live child of the parent run."""
        return [
            {
                "run_id": r.info.run_id,
                "trial_id": r.data.tags.get(TAG_TRIAL_ID, r.info.run_name or ""),
                "status": r.info.status,
                "error": r.data.tags.get(TAG_ERROR),
            }
            for r in self._children(parent_run_id)
        ]

    def mark_unfinished(self, parent_run_id: str, status: str = "KILLED") -> int:
        """Set children still RUNNING/SCHEDULED to ``status`` (after Ctrl-C); returns how many."""
        count = 0
        for run in self._children(parent_run_id):
            if run.info.status in ("RUNNING", "SCHEDULED"):
                _retry_locked(
                    lambda run=run: self.client.set_terminated(run.info.run_id, status=status)
                )
                count += 1
        return count

    def finished_metrics(self, parent_run_id: str, trial_id: str) -> dict[str, float] | None:
        """The latest metrics of the trial's run if it is FINISHED, else None.

        A resumed sweep asks this before training a trial, so a trial that finished just
        before the driver died is neither trained nor recorded twice."""
        for run in self._children(parent_run_id, trial_id):
            if run.info.status == "FINISHED":
                return dict(run.data.metrics)
        return None

    # -- metrics ----------------------------------------------------------------------------------

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue metrics and try to deliver them; never raises for connectivity errors."""
        timestamp = int(time.time() * 1000)
        entries: list[tuple[str, Metric]] = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):  # MLflow rejects NaN/inf in some backends; skip them
                entries.append((run_id, Metric(key, number, timestamp, int(step))))
        with self._lock:
            self._pending.extend(entries)
            self._spill_overflow()
        self._pump(time.monotonic() + self.call_timeout_s)

    def flush(self, timeout_s: float | None = None) -> int:
        """Deliver pending metrics, retrying up to ``timeout_s``; returns how many remain."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        while True:
            remaining = self._pump(deadline, patient=True)
            if remaining == 0 or time.monotonic() >= deadline:
                return remaining
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _pump(self, deadline: float, *, patient: bool = False) -> int:
        """Send pending batches one at a time until done, failing, or out of time.

        Returns the number of metrics not yet confirmed delivered. ``patient`` (flushing) caps
        the backoff so that the flush window sees several attempts.
        """
        with self._lock:
            while True:
                if self._inflight is not None:
                    future, batch, started = self._inflight
                    # A request that hangs (a server that accepts but never answers) costs a
                    # training loop ``call_timeout_s`` once, not on every later call.
                    until = deadline if patient else min(deadline, started + self.call_timeout_s)
                    wait = until - time.monotonic()
                    if not future.done() and wait > 0:
                        self._lock.release()
                        try:
                            with contextlib.suppress(Exception):
                                future.result(timeout=wait)
                        finally:
                            self._lock.acquire()
                    if not future.done():
                        return len(self._pending) + len(batch)
                    self._inflight = None
                    exc = future.exception()
                    if exc is None:
                        if self._outage_warned:
                            _log.warning("MLflow tracking is reachable again; pending metrics sent")
                        self._outage_warned = False
                        self._backoff = self.backoff_initial_s
                        self._next_try = 0.0
                    elif _is_permanent(exc):
                        _log.warning("MLflow rejected %d metrics (%s)", len(batch), exc)
                        self._write_lost(batch, reason=str(exc))
                    else:
                        # Put them back in front, in order, and back off before the next try.
                        self._pending[:0] = batch
                        if not self._outage_warned:
                            _log.warning(
                                "MLflow tracking unreachable (%s); keeping %d metrics in memory "
                                "and retrying",
                                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                                len(self._pending),
                            )
                            self._outage_warned = True
                        self._next_try = time.monotonic() + self._backoff
                        cap = min(self.backoff_max_s, 5.0) if patient else self.backoff_max_s
                        self._backoff = min(self._backoff * 2, cap)
                        if patient:
                            self._next_try = min(self._next_try, time.monotonic() + cap)
                if not self._pending:
                    return 0
                now = time.monotonic()
                if now < self._next_try:
                    if not patient or self._next_try >= deadline:
                        return len(self._pending)
                    self._lock.release()
                    try:
                        time.sleep(self._next_try - now)
                    finally:
                        self._lock.acquire()
                    continue
                if now >= deadline:
                    return len(self._pending)
                batch = self._take_batch()
                self._inflight = (self._submit_batch(batch), batch, time.monotonic())

    def _take_batch(self) -> list[tuple[str, Metric]]:
        # One run per log_batch call, at most MLflow's 1000 metrics.
        run_id = self._pending[0][0]
        batch: list[tuple[str, Metric]] = []
        rest: list[tuple[str, Metric]] = []
        for item in self._pending:
            if item[0] == run_id and len(batch) < MAX_METRICS_PER_BATCH:
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        return batch

    def _submit_batch(self, batch: list[tuple[str, Metric]]) -> Future:
        run_id = batch[0][0]
        metrics = [m for _, m in batch]
        client_holder: list[MlflowClient] = []

        def send() -> None:
            if not client_holder:
                client_holder.append(self.client)
            _retry_locked(lambda: client_holder[0].log_batch(run_id, metrics=metrics), attempts=3)

        return self._get_sender().submit(send)

    def _get_sender(self) -> _Sender:
        if self._sender is None:
            self._sender = _Sender()
        return self._sender

    def _call(self, fn: Callable[[], T], timeout_s: float) -> T:
        """Run an MLflow call on the sender thread and wait at most ``timeout_s`` for it."""
        future = self._get_sender().submit(lambda: _retry_locked(fn))
        return future.result(timeout=max(timeout_s, 0.1))

    def _spill_overflow(self) -> None:
        if len(self._pending) <= self.max_pending:
            return
        overflow = self._pending[: len(self._pending) - self.max_pending]
        self._pending = self._pending[len(overflow) :]
        _log.warning("More than %d metrics undelivered; spilling the oldest", self.max_pending)
        self._write_lost(overflow, reason="in-memory buffer full while tracking was unreachable")

    def lost_metrics_path(self, run_id: str) -> Path:
        return Path(self.home) / LOST_METRICS_DIR / f"{run_id}.jsonl"

    def _write_lost(self, items: list[tuple[str, Metric]], reason: str) -> dict[str, int]:
        """Append undelivered metrics to ``<home>/lost-metrics/<run_id>.jsonl``; counts by run."""
        counts: dict[str, int] = {}
        by_run: dict[str, list[Metric]] = {}
        for run_id, metric in items:
            by_run.setdefault(run_id, []).append(metric)
        for run_id, metrics in by_run.items():
            path = self.lost_metrics_path(run_id)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:
                    for m in metrics:
                        record = {
                            "run_id": run_id,
                            "key": m.key,
                            "value": m.value,
                            "step": m.step,
                            "timestamp": m.timestamp,
                            "reason": reason[:500],
                        }
                        handle.write(json.dumps(record) + "\n")
            except OSError as exc:
                _log.error("Could not write lost metrics of run %s to %s: %s", run_id, path, exc)
            _log.warning(
                "%d metrics of run %s could not be delivered to MLflow; saved to %s",
                len(metrics),
                run_id,
                path,
            )
            counts[run_id] = counts.get(run_id, 0) + len(metrics)
        return counts

    # -- end of a trial -----------------------------------------------------------------------

    def finish_trial(
        self,
        run_id: str,
        status: str,
        *,
        error: str | None = None,
        final_metrics: dict[str, Any] | None = None,
        trial_config: dict[str, Any] | None = None,
    ) -> None:
        """Flush metrics, log artifacts and the error, and end the run with ``status``."""
        deadline = time.monotonic() + self.flush_timeout_s
        self.flush(self.flush_timeout_s)
        lost: list[tuple[str, Metric]] = []
        with self._lock:
            # Whatever is left for this run now counts as lost (an in-flight batch included:
            # it may still arrive, so the file errs on the side of reporting).
            if self._inflight is not None and self._inflight[1][0][0] == run_id:
                lost.extend(self._inflight[1])
                self._inflight = None
            lost.extend(item for item in self._pending if item[0] == run_id)
            self._pending = [item for item in self._pending if item[0] != run_id]
        client = self.client
        steps: list[tuple[str, Callable[[], Any]]] = []
        if lost:
            count = self._write_lost(lost, reason="tracking unreachable at the end of the trial")
            steps.append(
                ("lost-metrics tag", lambda: client.set_tag(run_id, TAG_LOST, str(count[run_id])))
            )
        if trial_config is not None:
            config_json = _jsonable(trial_config)
            steps.append(
                (
                    "trial_config.json",
                    lambda: client.log_dict(run_id, config_json, "trial_config.json"),
                )
            )
        if final_metrics is not None:
            final_json = _jsonable(final_metrics)
            steps.append(
                (
                    "final_metrics.json",
                    lambda: client.log_dict(run_id, final_json, "final_metrics.json"),
                )
            )
        if error:
            message = _truncate_error(error)
            steps.append(("error tag", lambda: client.set_tag(run_id, TAG_ERROR, message)))
        steps.append(("status", lambda: client.set_terminated(run_id, status=status)))
        failed: list[str] = []
        for name, fn in steps:
            try:
                # A few seconds per step even when the flush used up the window.
                floor = min(5.0, self.flush_timeout_s)
                self._call(fn, max(deadline - time.monotonic(), floor))
            except Exception as exc:  # reported below, must not kill the trial
                _log.warning("Run %s: could not record %s in MLflow: %s", run_id, name, exc)
                failed.append(name)
        if failed:
            self._write_finish_record(run_id, status, error, final_metrics, failed)

    def _write_finish_record(
        self,
        run_id: str,
        status: str,
        error: str | None,
        final_metrics: dict[str, Any] | None,
        failed: list[str],
    ) -> None:
        # The end of the trial could not be recorded either: keep it next to the lost metrics.
        path = Path(self.home) / LOST_METRICS_DIR / f"{run_id}.finish.json"
        record = {
            "run_id": run_id,
            "status": status,
            "error": error,
            "final_metrics": final_metrics,
            "not_recorded": failed,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
            _log.warning("End of run %s saved to %s", run_id, path)
        except OSError as exc:
            _log.error("Could not write %s: %s", path, exc)
