"""The working folder and every path under it: one `Home`, one rule per folder.

    <home>/mlflow.db            the SQLite tracking store (`store_uri`)
    <home>/mlartifacts/         its artifacts
    <home>/lost-metrics/        metrics the store refused, kept for a later run to replay
    <home>/cache/data/          tokenized splits
    <home>/cache/teachers/KEY/  a fine-tuned teacher (and its cached train logits)
    <home>/ray/SWEEP/[PART/]    Ray Tune's storage of a sweep (resume), SWEEP.session.json
    <home>/students/SWEEP/ID/   a trial's selected student until the driver records it
    <home>/single/SWEEP/ID/     `ikd-sweep train`'s run folder
    <home>/locks/SWEEP.lock     held by the one `run` of a sweep
    <home>/reports/NAME/        `ikd-sweep report`'s default output

Standard library only: the trainer's assembly, Ray workers and the CLI all read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DB_NAME, ARTIFACTS_DIR, LOST_METRICS_DIR = "mlflow.db", "mlartifacts", "lost-metrics"


def default_home() -> Path:
    """The working folder: ``$IKD_SWEEP_HOME`` or ``./ikd-runs`` (not created here)."""
    env = os.environ.get("IKD_SWEEP_HOME")
    return Path(env).expanduser() if env else Path("ikd-runs")


@dataclass(frozen=True)
class Home:
    """Paths under one working folder `root` (nothing is created here)."""

    root: Path

    def __init__(self, root: Path | str | Home) -> None:
        object.__setattr__(self, "root", Path(root.root if isinstance(root, Home) else root))

    @classmethod
    def default(cls) -> Home:
        return cls(default_home())

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def store_uri(self) -> str:
        """``sqlite:///<home>/mlflow.db``, absolute."""
        return f"sqlite:///{self.root.expanduser().resolve()}/{DB_NAME}"

    @property
    def artifacts(self) -> Path:
        return self.root / ARTIFACTS_DIR

    @property
    def lost_metrics(self) -> Path:
        return self.root / LOST_METRICS_DIR

    @property
    def data_cache(self) -> Path:
        return self.root / "cache" / "data"

    def teacher(self, key: str) -> Path:
        return self.root / "cache" / "teachers" / key

    def ray(self, sweep: str, part: str | None = None) -> Path:
        """Ray Tune's storage of a sweep: its search experiment, and below it each `part` (an
        optuna study's name, or names.CONFIRM for the confirmation runs)."""
        folder = self.root / "ray" / sweep
        return folder if part is None else folder / part

    def session_record(self, sweep: str) -> Path:
        return self.root / "ray" / f"{sweep}.session.json"

    def students(self, sweep: str) -> Path:
        return self.root / "students" / sweep

    def student(self, sweep: str, trial_id: str) -> Path:
        """Where a sweep's trial keeps its selected student until the driver records it."""
        return self.students(sweep) / trial_id

    def single(self, sweep: str, trial_id: str) -> Path:
        """`ikd-sweep train`'s folder of one trial."""
        return self.root / "single" / sweep / trial_id

    def lock(self, sweep: str) -> Path:
        return self.root / "locks" / f"{sweep}.lock"

    def report(self, name: str) -> Path:
        """`ikd-sweep report`'s default folder (`name`: the sweep's name, made path-safe)."""
        return self.root / "reports" / name
