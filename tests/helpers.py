"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path).

One home each for what the modules used to write out themselves: where the GLUE files are, the
tiny model, the tiny sweep, the environment of the real CLI and reading a sweep's runs back.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from mlflow import MlflowClient

from ikd_sweep.config import ModelConfig
from ikd_sweep.models import MINILM
from ikd_sweep.store import ROLE_SWEEP, ROLE_TRIAL, TAG

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"  # the original GLUE TSVs, beside the checkout
CLI = [sys.executable, "-m", "ikd_sweep.cli"]
# A 2-layer hidden-32 BERT config: seconds per trial on a CPU.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64}
TINY_MODEL = {"model": "minilm", "init": "random", "config": TINY}

needs_glue = pytest.mark.skipif(not (GLUE / "RTE" / "train.tsv").is_file(),
                                reason=f"needs the GLUE files at {GLUE}")


def end_to_end(test):
    """Mark a test that runs real sweeps on GLUE: `slow` (`make test` runs it, `make test-fast`
    does not), skipped where the GLUE files are absent."""
    return pytest.mark.slow(needs_glue(test))


# The shared sweep: two tasks (one of them the regression task STS-B), all three methods, two
# kd/ikd settings on search seed 1, then the selected settings on confirmation seed 2.
SHARED = "shared"
# A log line every 4 steps, an evaluation every 2: Tune's own logs of the reports stay small
# (test_export.py weighs the disk), and every logged or evaluated step reaches the store.
SHARED_OVER = {"tasks": ["rte", "stsb"], "train": {"log_every": 4, "eval_every": 2},
               "search": {"temperature": [1, 4], "seeds": [1], "confirm_seeds": [2]}}
SHARED_TRIALS = {"search": 10, "confirm": 6}  # per task: finetune + kd x 2 + ikd x 2; 3 confirm



def merge(base: dict, over: dict) -> dict:
    """`base` with `over` laid on it, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sweep_raw(name: str = "tiny", **over) -> dict:
    """The tiny sweep every CLI-level test starts from: tiny random-init models, 64 rows of one
    GLUE task, one epoch of 4 steps, one setting per method; `over` merged in per key."""
    raw = {
        "name": name,
        "tasks": ["wnli"],
        "methods": ["finetune", "kd", "ikd"],
        "data": {"source": "glue_dir", "glue_dir": str(GLUE), "max_length": 32,
                 "max_train_samples": 64, "max_eval_samples": 32},
        "teacher": {**TINY_MODEL, "epochs": 1, "lr": 1e-3, "batch_size": 16},
        "student": TINY_MODEL,
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "eval_every": 2, "log_every": 1},
        "search": {"temperature": [2], "exam_every": [2], "teacher_lr": [1e-4], "seeds": [1]},
        "resources": {"cpu": 1},
        "max_failures": 0,
    }
    return merge(raw, over)


def sweep_file(folder: Path, name: str, **over) -> Path:
    """`sweep_raw(name, **over)` written to `folder/<name>.yaml`."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep_raw(name, **over)))
    return path


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI started by a test: `home` as the working folder, no tracking
    server, Ray cluster or debug mode inherited from the caller's shell."""
    env = {**os.environ, "IKD_SWEEP_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "IKD_SWEEP_DEBUG"):
        env.pop(key, None)
    return {**env, **extra}


def run_cli(args: list[str], home: Path, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`ikd-sweep ARGS` in a subprocess, as a user runs it; its output captured."""
    try:
        return subprocess.run([*CLI, *args], env=env or cli_env(home), capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # show what the command printed before it hung
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                      for x in (e.stdout, e.stderr))
        raise AssertionError(f"{' '.join(args)} ran past {timeout} s:\n{out[-5000:]}") from None


def start_cli(args: list[str], home: Path, log: Path, env: dict | None = None):
    """The CLI in its own session (so the test can signal everything it started), its output
    kept in `log` for the failure message."""
    with open(log, "w") as out:
        return subprocess.Popen([*CLI, *args], env=env or cli_env(home), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def store(home: Path) -> MlflowClient:
    # Under the driver's store lock: opening a fresh SQLite file migrates its schema, and a
    # reader that does so while the driver migrates it breaks the driver (issue 13, item 8).
    with FileLock(f"{home}/mlflow.db.lock"):
        return MlflowClient(f"sqlite:///{home}/mlflow.db")


def runs_of(home: Path, sweep: str) -> tuple[list, list]:
    """The sweep's parent runs and trial runs in the store of `home`."""
    client = store(home)
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG.ROLE) == ROLE_SWEEP]
    children = [r for r in runs if r.data.tags.get(TAG.ROLE) == ROLE_TRIAL]
    return parents, children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def tiny_spec(**config) -> ModelConfig:
    """A 2-layer, hidden-64 random-init BERT on MiniLM's vocabulary: fast CPU tests."""
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128}
    return ModelConfig(model=MINILM, init="random", config={**base, **config})


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def start_sweep(tracker, name: str, config: dict, trials: list, **kw) -> str:
    """A sweep's parent run with its expected trials, as the driver makes it."""
    parent = tracker.start_sweep(name, config, **kw)
    tracker.set_expected_trials(parent, trials)
    return parent
