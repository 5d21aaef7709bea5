"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient


def migrated_store(factory: pytest.TempPathFactory, home: Path) -> str:
    """A SQLite tracking URI in ``home`` whose schema is already migrated.

    Migrating a fresh MLflow database takes seconds; the template is built once per test
    session (shared by the test modules through pytest's base temp folder) and copied.
    """
    template = factory.getbasetemp() / "ikd-mlflow-template" / "mlflow.db"
    if not template.exists():
        build = template.parent / f"build-{os.getpid()}"
        build.mkdir(parents=True, exist_ok=True)
        MlflowClient(f"sqlite:///{build / 'mlflow.db'}").search_experiments()
        os.replace(build / "mlflow.db", template)
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, home / "mlflow.db")
    return f"sqlite:///{home.resolve()}/mlflow.db"
