"""`ikd-sweep run` end to end: real local Ray, real SQLite MLflow store, tiny models, real GLUE.

Each test drives the CLI in a subprocess, as a user would, and then reads the MLflow store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
CLI = [sys.executable, "-m", "ikd_sweep.cli"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64}

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")


def sweep_file(tmp: Path, name: str, **over) -> Path:
    cfg = {
        "name": name,
        "tasks": ["rte", "wnli"],
        "methods": ["finetune", "kd", "ikd"],
        "data": {"source": "glue_dir", "glue_dir": str(GLUE), "max_length": 32,
                 "max_train_samples": 64, "max_eval_samples": 32},
        "teacher": {"model": "minilm", "init": "random", "config": TINY, "epochs": 1,
                    "lr": 1e-3, "batch_size": 16},
        "student": {"model": "minilm", "init": "random", "config": TINY},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "eval_every": 2, "log_every": 1},
        "search": {"temperature": [1, 4], "exam_every": [2], "teacher_lr": [1e-4], "seeds": [1]},
        "resources": {"cpu": 1},
        "max_failures": 0,
    }
    for k, v in over.items():
        cfg[k] = v if not isinstance(v, dict) else {**cfg.get(k, {}), **v}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env_for(home: Path) -> dict[str, str]:
    env = {**os.environ, "IKD_SWEEP_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(args: list[str], home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env_for(home), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def store(home: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home}/mlflow.db")


def runs_of(home: Path, sweep: str) -> tuple[list, list]:
    client = store(home)
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ikd.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ikd.role") == "trial"]
    return parents, children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_records_one_parent_and_every_trial(tmp_path):
    home = tmp_path / "home"
    sweep = sweep_file(tmp_path, "two-tasks")
    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "finished 10, failed 0" in p.stdout
    parents, children = runs_of(home, "two-tasks")
    assert len(parents) == 1
    # 2 tasks x (finetune + kd x 2 temperatures + ikd x 2 temperatures) x 1 seed
    assert len(children) == 10
    assert len({c.data.tags["ikd.trial_id"] for c in children}) == 10
    client = store(home)
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.data.params["task"] in ("rte", "wnli")
        assert "train.lr" in c.data.params
        hist = client.get_metric_history(c.info.run_id, "dev/main")
        assert len(hist) >= 2 and len({h.step for h in hist}) == len(hist)
        assert "final/dev_main" in c.data.metrics
        if c.data.tags["ikd.method"] == "ikd":
            assert client.get_metric_history(c.info.run_id, "exam/loss")
            assert "teacher/dev_main" in c.data.metrics
    # teachers were fine-tuned once per (task, seed), before the trials
    assert len(list((home / "cache" / "teachers").glob("*/DONE"))) == 2


def test_failed_trial_is_recorded_and_run_exits_3(tmp_path):
    # An absurd teacher learning rate (used by ikd only) blows the teacher up: the ikd trial
    # stops on a non-finite loss, every other trial must still finish.
    home = tmp_path / "home"
    sweep = sweep_file(tmp_path, "with-failure", tasks=["stsb"],
                       search={"temperature": [2], "exam_every": [2], "teacher_lr": [1e30],
                               "seeds": [1]})
    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "FAILED stsb-ikd" in p.stdout and "non-finite loss" in p.stdout
    _, children = runs_of(home, "with-failure")
    status = {c.data.tags["ikd.method"]: c for c in children}
    assert len(children) == 3
    assert status["ikd"].info.status == "FAILED"
    assert "non-finite loss" in status["ikd"].data.tags["ikd.error"]
    assert status["kd"].info.status == status["finetune"].info.status == "FINISHED"


def test_killed_driver_resumes_without_rerun_or_duplicates(tmp_path):
    home = tmp_path / "home"
    sweep = sweep_file(tmp_path, "killed", tasks=["rte"], methods=["finetune", "kd"],
                       search={"temperature": [1, 2, 3, 4, 5], "seeds": [1]},
                       train={"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 2,
                              "log_every": 1},
                       max_concurrent_trials=1)
    proc = subprocess.Popen([*CLI, "run", str(sweep)], env=env_for(home), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    finished_before: dict[str, int] = {}
    try:
        while time.time() < deadline:
            time.sleep(1)
            if (home / "mlflow.db").exists():
                try:
                    _, children = runs_of(home, "killed")
                except Exception:
                    continue
                finished_before = {c.data.tags["ikd.trial_id"]: c.info.end_time
                                   for c in children if c.info.status == "FINISHED"}
                if len(finished_before) >= 2:
                    break
        assert len(finished_before) >= 2, "sweep made no progress"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 0, p.stdout + p.stderr
    parents, children = runs_of(home, "killed")
    assert len(parents) == 1
    ids = [c.data.tags["ikd.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 6  # finetune + 5 kd temperatures, one run each
    assert all(c.info.status == "FINISHED" for c in children)
    after = {c.data.tags["ikd.trial_id"]: c.info.end_time for c in children}
    for trial_id, end in finished_before.items():
        assert after[trial_id] == end, f"{trial_id} was run again after the resume"


def test_two_sweeps_start_at_once_into_a_fresh_store(tmp_path):
    home = tmp_path / "home"
    over = {"tasks": ["wnli"], "methods": ["finetune"], "search": {"seeds": [1]}}
    files = [sweep_file(tmp_path, f"concurrent-{i}", **over) for i in (1, 2)]
    procs = [subprocess.Popen([*CLI, "run", str(f)], env=env_for(home), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for f in files]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    for i in (1, 2):
        parents, children = runs_of(home, f"concurrent-{i}")
        assert len(parents) == 1 and len(children) == 1
        assert children[0].info.status == "FINISHED"


def test_dry_run_lists_trials_and_starts_nothing(tmp_path):
    home = tmp_path / "home"
    p = run_cli(["run", str(sweep_file(tmp_path, "dry")), "--dry-run"], home)
    assert p.returncode == 0, p.stderr
    assert "10 trials" in p.stdout and "rte-ikd-s1-T4-E2-tlr0.0001" in p.stdout
    assert not (home / "mlflow.db").exists()


def test_ui_serves_the_mlflow_page_on_localhost(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    proc = subprocess.Popen([*CLI, "ui", "--port", str(port)], env=env_for(home), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        body, deadline = "", time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode(errors="replace")
                    break
            except OSError:
                time.sleep(1)
        assert "mlflow" in body.lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
