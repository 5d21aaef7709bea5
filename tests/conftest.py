"""Shared fixtures: the local GLUE files beside the repository, and a scratch working folder."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """../shared/data/glue beside the repository (the original GLUE TSVs); skip if absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
    if not path.is_dir():
        pytest.skip(f"no local GLUE data at {path}")
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder, also set as $IKD_SWEEP_HOME."""
    path = tmp_path / "ikd-runs"
    path.mkdir()
    monkeypatch.setenv("IKD_SWEEP_HOME", str(path))
    return path
