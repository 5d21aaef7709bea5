"""`ikd-sweep run` end to end: real local Ray, real SQLite MLflow store, tiny models, real GLUE.

Each test drives the CLI in a subprocess, as a user would, and then reads the MLflow store.
"""

from __future__ import annotations

import json
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
from filelock import FileLock
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


def run_cli(args: list[str], home: Path, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*CLI, *args], env=env or env_for(home), capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # show what the command printed before it hung
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                      for x in (e.stdout, e.stderr))
        raise AssertionError(f"{' '.join(args)} ran past {timeout} s:\n{out[-5000:]}") from None


def store(home: Path) -> MlflowClient:
    # Under the driver's store lock: opening a fresh SQLite file migrates its schema, and a
    # reader that does so while the driver migrates it breaks the driver (issue 13, item 8).
    with FileLock(f"{home}/mlflow.db.lock"):
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
    # teachers were fine-tuned once per (task, seed), inside the first trial that needed one
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


def start_cli(args: list[str], home: Path, log: Path, env: dict | None = None):
    """The CLI in its own session (so the test can signal everything it started), its output
    kept in `log` for the failure message."""
    with open(log, "w") as out:
        return subprocess.Popen([*CLI, *args], env=env or env_for(home), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_finished(proc, home: Path, sweep: str, log: Path, at_least: int) -> dict[str, int]:
    """Poll the store until `at_least` trials are FINISHED; {trial_id: end_time}. Fails at once
    if the driver exits first."""
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, (f"driver exited with {proc.returncode} first:\n"
                                     f"{log.read_text(errors='replace')[-5000:]}")
        time.sleep(1)
        # The driver prints its Ray line after it set up the store: reading it earlier would
        # race the driver's schema migration of the fresh database.
        if "Ray: " in log.read_text(errors="replace"):
            try:
                _, children = runs_of(home, sweep)
            except Exception:  # the store is still being created
                continue
            done = {c.data.tags["ikd.trial_id"]: c.info.end_time
                    for c in children if c.info.status == "FINISHED"}
            if len(done) >= at_least:
                return done
    raise AssertionError(f"sweep made no progress:\n{log.read_text(errors='replace')[-5000:]}")


def killed_sweep(tmp_path: Path, name: str) -> Path:
    return sweep_file(tmp_path, name, tasks=["rte"], methods=["finetune", "kd"],
                      search={"temperature": [1, 2, 3, 4, 5], "seeds": [1]},
                      train={"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 2,
                             "log_every": 1},
                      max_concurrent_trials=1)


def assert_resumed_once(home: Path, sweep: str, before: dict[str, int]) -> None:
    parents, children = runs_of(home, sweep)
    assert len(parents) == 1
    ids = [c.data.tags["ikd.trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 6  # finetune + 5 kd temperatures, one run each
    assert all(c.info.status == "FINISHED" for c in children)
    after = {c.data.tags["ikd.trial_id"]: c.info.end_time for c in children}
    for trial_id, end in before.items():
        assert after[trial_id] == end, f"{trial_id} was run again after the resume"


def test_killed_driver_resumes_without_rerun_or_duplicates(tmp_path):
    home, log = tmp_path / "home", tmp_path / "driver.log"
    sweep = killed_sweep(tmp_path, "killed")
    proc = start_cli(["run", str(sweep)], home, log)
    try:
        finished_before = wait_finished(proc, home, "killed", log, at_least=2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_resumed_once(home, "killed", finished_before)


def test_ctrl_c_exits_130_and_the_rerun_resumes(tmp_path):
    home, log = tmp_path / "home", tmp_path / "driver.log"
    sweep = killed_sweep(tmp_path, "interrupted")
    proc = start_cli(["run", str(sweep)], home, log)
    try:
        finished_before = wait_finished(proc, home, "interrupted", log, at_least=1)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 130, f"exit {rc}:\n{text[-5000:]}"
    assert "re-run the same command to resume" in text, text[-5000:]
    _, children = runs_of(home, "interrupted")
    assert not [c for c in children if c.info.status == "RUNNING"], "runs left RUNNING"
    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_resumed_once(home, "interrupted", finished_before)


def test_store_is_written_by_the_driver_only(tmp_path):
    """Ray workers run where `import mlflow` fails (and with no tracking URI): every metric
    of every trial still reaches the store, so the driver alone wrote it."""
    home, log = tmp_path / "home", tmp_path / "driver.log"
    blocker = tmp_path / "no-mlflow"
    (blocker / "mlflow").mkdir(parents=True)
    (blocker / "mlflow" / "__init__.py").write_text(
        "raise ImportError('mlflow is blocked in Ray workers by the test')\n")
    pids = tmp_path / "worker-pids"
    # sitecustomize runs in every Python process with `blocker` on its path: proof that the
    # workers did run under the blocker.
    (blocker / "sitecustomize.py").write_text(
        f"import os\nwith open({str(pids)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n")
    env = env_for(home)
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]),
        "MLFLOW_TRACKING_URI": ""}}})
    sweep = sweep_file(tmp_path, "one-writer", tasks=["wnli"], methods=["finetune", "ikd"],
                       search={"temperature": [2], "exam_every": [2], "teacher_lr": [1e-4],
                               "seeds": [1]})
    proc = start_cli(["run", str(sweep)], home, log, env=env)
    rc = proc.wait(timeout=600)
    text = log.read_text(errors="replace")
    assert rc == 0, f"exit {rc}:\n{text[-5000:]}"
    workers = set(pids.read_text().split()) - {str(proc.pid)} if pids.exists() else set()
    assert workers, "no Ray worker ran with the mlflow blocker"
    parents, children = runs_of(home, "one-writer")
    assert len(parents) == 1 and len(children) == 2
    client = store(home)
    for c in children:
        assert c.info.status == "FINISHED", c.data.tags.get("ikd.error")
        total = int(c.data.metrics["steps"])
        hist = {key: {m.step for m in client.get_metric_history(c.info.run_id, key)}
                for key in ("train/loss", "val/main")}
        # log_every 1, eval_every 2 (and at the end): the whole curve, every evaluation.
        assert hist["train/loss"] == set(range(1, total + 1))
        assert hist["val/main"] == set(range(2, total + 1, 2)) | {total}
        assert "final/dev_main" in c.data.metrics
        if c.data.tags["ikd.method"] == "ikd":
            assert client.get_metric_history(c.info.run_id, "exam/loss")
    assert not (home / "lost-metrics").exists()


def test_confirmation_phase_runs_the_selected_settings_once(tmp_path):
    from analysis.collect import collect
    from analysis.tables import build_report

    home = tmp_path / "home"
    sweep = sweep_file(tmp_path, "confirm", tasks=["wnli"], methods=["finetune", "kd"],
                       search={"temperature": [1, 4], "seeds": [1], "confirm_seeds": [2, 3]})
    dry = run_cli(["run", str(sweep), "--dry-run"], home)
    assert dry.returncode == 0, dry.stderr
    assert "7 trials (3 search, 4 confirm)" in dry.stdout
    assert "wnli-kd-s3" in dry.stdout and "selected setting" in dry.stdout

    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "finished 7, failed 0" in p.stdout and "(4 confirmation)" in p.stdout, p.stdout
    words = " ".join(p.stdout.split())  # the summary table may wrap its title
    assert "selected setting" in words and "(n=" in words, p.stdout  # the report's numbers
    parents, children = runs_of(home, "confirm")
    assert len(parents) == 1 and len(children) == 7
    phase = {c.data.tags["ikd.trial_id"]: c.data.tags["ikd.phase"] for c in children}
    confirm = [c for c in children if phase[c.data.tags["ikd.trial_id"]] == "confirm"]
    assert sorted((c.data.tags["ikd.method"], int(c.data.tags["ikd.seed"])) for c in confirm) \
        == [("finetune", 2), ("finetune", 3), ("kd", 2), ("kd", 3)]
    assert all(c.info.status == "FINISHED" for c in children)
    # The setting is the one the report selects from the search runs.
    runs = collect("confirm", f"sqlite:///{home}/mlflow.db")
    search = runs.runs[runs.runs["trial_id"].map(phase).eq("search")]
    selected = build_report(search, runs.expected[runs.expected["trial_id"].map(phase).eq(
        "search")]).selected.set_index("method")
    for c in confirm:
        want = selected.at[c.data.tags["ikd.method"], "temperature"]
        got = c.data.params.get("temperature")
        assert (got is None and want != want) or float(got) == want, (got, want)
    # The parent's list of expected trials holds both phases.
    client = store(home)
    trials = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "trials.json",
                                                       str(tmp_path / "dl"))).read_text())
    assert sorted(t["phase"] for t in trials) == ["confirm"] * 4 + ["search"] * 3
    # Confirm seeds got their own teachers (kd needs one per task and seed).
    assert len(list((home / "cache" / "teachers").glob("*/DONE"))) == 3

    # Re-running the finished sweep creates nothing and runs nothing again.
    ends = {c.info.run_id: c.info.end_time for c in children}
    again = run_cli(["run", str(sweep)], home)
    assert again.returncode == 0, again.stdout + again.stderr
    parents, children = runs_of(home, "confirm")
    assert len(parents) == 1
    assert {c.info.run_id: c.info.end_time for c in children} == ends


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
    port, log = free_port(), tmp_path / "ui.log"
    proc = start_cli(["ui", "--port", str(port)], home, log)
    try:
        body, deadline = "", time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, f"ui exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode(errors="replace")
                    break
            except OSError:
                time.sleep(1)
        assert "mlflow" in body.lower(), log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
