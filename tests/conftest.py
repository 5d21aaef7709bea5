"""Shared fixtures: the local GLUE files, a scratch working folder, and one finished sweep that
the tests which only read a store share (running a sweep is what the suite's time goes to)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    CLI,
    GLUE,
    ROOT,
    SHARED,
    SHARED_OVER,
    cli_env,
    run_cli,
    runs_of,
    sweep_file,
)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """../shared/data/glue beside the repository (the original GLUE TSVs); skip if absent."""
    if not GLUE.is_dir():
        pytest.skip(f"no local GLUE data at {GLUE}")
    return GLUE


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder, also set as $IKD_SWEEP_HOME."""
    path = tmp_path / "ikd-runs"
    path.mkdir()
    monkeypatch.setenv("IKD_SWEEP_HOME", str(path))
    return path


@dataclass
class FinishedSweep:
    """A sweep run once by the real CLI (and once more, finished), read by many tests."""

    name: str
    path: Path  # the sweep file
    home: Path  # its working folder (with mlflow.db)
    tmp: Path  # a scratch folder beside it
    dry: subprocess.CompletedProcess  # `run --dry-run` before the run
    dry_made_store: bool  # whether the dry run left a tracking store behind
    run: subprocess.CompletedProcess  # the run (stdout and stderr kept apart)
    again: subprocess.CompletedProcess  # the same command, re-run once the sweep finished
    ends: dict[str, int]  # {run id: end time} of the trial runs after the first run
    workers: set[str]  # pids of the processes that ran with mlflow blocked (the Ray workers)


# Ray workers run where `import mlflow` fails and with no tracking URI: every metric of every
# trial still reaching the store proves that the driver alone wrote it. The sitecustomize
# module runs in every Python process with the blocker on its path and records its pid.
BLOCKER = "raise ImportError('mlflow is blocked in Ray workers by the test')\n"
PIDS = "import os\nwith open({path!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    if not GLUE.is_dir():
        pytest.skip(f"no local GLUE data at {GLUE}")
    tmp = tmp_path_factory.mktemp("shared-sweep")
    home = tmp / "home"
    path = sweep_file(tmp, SHARED, **SHARED_OVER)
    blocker, pids = tmp / "no-mlflow", tmp / "worker-pids"
    (blocker / "mlflow").mkdir(parents=True)
    (blocker / "mlflow" / "__init__.py").write_text(BLOCKER)
    (blocker / "sitecustomize.py").write_text(PIDS.format(path=str(pids)))
    env = cli_env(home, RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps({"runtime_env": {"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), "MLFLOW_TRACKING_URI": ""}}}))

    dry = run_cli(["run", str(path), "--dry-run"], home)
    dry_made_store = (home / "mlflow.db").exists()
    proc = subprocess.Popen([*CLI, "run", str(path)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    run = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert run.returncode == 0, f"the shared sweep exited {run.returncode}:\n{out}\n{err[-5000:]}"
    _, children = runs_of(home, SHARED)
    ends = {c.info.run_id: c.info.end_time for c in children}
    again = run_cli(["run", str(path)], home)
    workers = set(pids.read_text().split()) - {str(proc.pid)} if pids.exists() else set()
    return FinishedSweep(SHARED, path, home, tmp, dry, dry_made_store, run, again, ends, workers)

