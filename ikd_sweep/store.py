"""Where a sweep's tracking store is and how its runs are named: the store's URI, the tag names
(MLflow's own included), the run roles, the provenance every run carries, the "no store yet"
check. No MLflow import: the CLI answers from here at once, and `tracking.py` (the store's
writer and reader) and `analysis/collect.py` share these names.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import unquote

from ikd_sweep import __version__
from ikd_sweep.config import SweepConfig
from ikd_sweep.errors import StoreError
from ikd_sweep.home import Home
from ikd_sweep.trials import Trial

STUDENT_ARTIFACT = "student"  # a trial run's selected student (a Hugging Face model folder)
TRIALS_ARTIFACT = "trials.json"  # the parent run's list of expected trials
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"
LIBRARIES = ("torch", "transformers", "ray", "mlflow")  # their versions tag every run


class TAG:
    """The one table of MLflow tag names; the sweep driver, the CLI and analysis use these."""

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
    SOURCE_TYPE = "mlflow.source.type"  # MLflow's own source tags (mlflow.utils.mlflow_tags)
    SOURCE_NAME = "mlflow.source.name"
    USER = "mlflow.user"
    GIT_COMMIT = "mlflow.source.git.commit"
    GIT_BRANCH = "mlflow.source.git.branch"


def resolve_tracking_uri(uri: str | None, home: Path) -> str:
    """Explicit ``uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<home>/mlflow.db`` (absolute;
    ``home`` is created so that SQLite can create the database in it)."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_sqlite_uri(uri or os.environ["MLFLOW_TRACKING_URI"])
    Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    return Home(home).store_uri


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for anything else (or in-memory)."""
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    ok = tracking_uri.startswith("sqlite:///") and path not in ("", ":memory:")
    return Path(unquote(path)) if ok else None


def absolute_sqlite_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (it would depend on the working
    directory of whoever opens it); any other URI as it is."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    return f"sqlite:///{path.resolve()}" + (f"?{uri.split('?', 1)[1]}" if "?" in uri else "")


def require_store(tracking_uri: str) -> str:
    """``tracking_uri`` (absolute) if a reader can open it without creating it: opening a
    missing SQLite file would create (and migrate) an empty store. Raises `StoreError`."""
    uri = absolute_sqlite_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise StoreError(f"no tracking store at {db}; run a sweep first or pass --home or "
                         "--tracking-uri")
    return uri


def home_for(tracking_uri: str) -> Path:
    """The SQLite database's folder, else the default home (for a tracking server)."""
    return path.parent if (path := sqlite_path(tracking_uri)) else Home.default().root.resolve()


def default_artifact_root(tracking_uri: str) -> str | None:
    """``file://<home>/mlartifacts`` for SQLite stores; None for servers (the server decides)."""
    path = sqlite_path(tracking_uri)
    return None if path is None else Home(path.parent).artifacts.resolve().as_uri()


def device_tags(info: dict[str, str]) -> dict[str, str]:
    """``{"device": "cuda", "gpu": "NVIDIA H200"}`` (a worker's report) as run tags."""
    return {TAG.DEVICE: str(info.get("device", "unknown")), TAG.GPU: str(info.get("gpu", "none"))}


def trial_tags(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    return {TAG.SWEEP: cfg.name, TAG.TASK: trial.task, TAG.METHOD: trial.method,
            TAG.SEED: str(trial.seed), TAG.TRIAL_ID: trial.trial_id, TAG.PHASE: trial.phase}


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
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (None outside one): git, not MLflow,
    so Ray workers (which never import MLflow) read it too."""
    return _git("rev-parse", "HEAD") or None


@cache
def code_metadata() -> dict[str, str]:
    """Tags every run carries: library versions, git commit and dirty flag of the package's
    checkout (none when installed from a wheel), and MLflow's own source tags."""
    tags = {TAG.VERSION: __version__, TAG.SOURCE_TYPE: "LOCAL",
            TAG.SOURCE_NAME: " ".join(["ikd-sweep", *sys.argv[1:2]])}
    for lib in LIBRARIES:
        try:
            tags[TAG.LIB + lib] = version(lib)
        except PackageNotFoundError:
            tags[TAG.LIB + lib] = "not installed"
    try:
        tags[TAG.USER] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        pass
    sha = git_commit()
    if sha:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        tags.update({TAG.GIT: sha, TAG.GIT_COMMIT: sha,
                     TAG.GIT_DIRTY: "unknown" if dirty is None else str(bool(dirty)).lower()})
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[TAG.GIT_BRANCH] = branch
    return tags
