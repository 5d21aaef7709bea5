"""SweepTracker against real MLflow stores (SQLite in tmp_path; an unreachable http server)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import (
    CLI,
    ROOT,
    cli_env,
    free_port,
    migrated_store,
    needs_glue,
    start_sweep,
    sweep_file,
)
from mlflow import MlflowClient

from ikd_sweep.cli import ui_command
from ikd_sweep.home import default_home
from ikd_sweep.names import DEV, FINAL_DEV
from ikd_sweep.store import ROLE_SWEEP, ROLE_TRIAL, TAG, resolve_tracking_uri, sqlite_path
from ikd_sweep.tracking import SweepTracker

TRIALS = [
    {
        "trial_id": "sst2-ft-s1",
        "task": "sst2",
        "method": "finetune",
        "seed": 1,
        "temperature": None,
        "exam_every": None,
        "teacher_lr": None,
    },
    {
        "trial_id": "sst2-kd-s1",
        "task": "sst2",
        "method": "kd",
        "seed": 1,
        "temperature": 2.0,
        "exam_every": None,
        "teacher_lr": None,
    },
]


def _params(trial: dict) -> dict:
    return {**trial, "train": {"lr": 3e-5, "alpha": 0.5}, "ikd": {"estimator": "exact"}}


@pytest.fixture
def tracker_store(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SweepTracker, MlflowClient, Path]:
    home = tmp_path / "runs"
    uri = migrated_store(tmp_path_factory, home)
    tracker = SweepTracker(uri, "demo")
    return tracker, MlflowClient(uri), home


def test_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IKD_SWEEP_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    monkeypatch.delenv("IKD_SWEEP_HOME")
    assert default_home() == Path("ikd-runs")

    home = tmp_path / "home"
    uri = resolve_tracking_uri(None, home)
    assert home.is_dir() and uri == f"sqlite:///{home.resolve()}/mlflow.db"
    assert sqlite_path(uri) == home.resolve() / "mlflow.db"
    assert resolve_tracking_uri("http://x:5000", home) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri(None, home) == "http://server:5000"
    assert resolve_tracking_uri("sqlite:///explicit.db", home).endswith("/explicit.db")

    tracker = SweepTracker(uri, "e")
    assert tracker.artifact_root == (home.resolve() / "mlartifacts").as_uri()
    assert SweepTracker("http://127.0.0.1:1", "e").artifact_root is None

    argv = ui_command(uri, port=5123)
    assert argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    assert argv[argv.index("--default-artifact-root") + 1] == tracker.artifact_root
    assert argv[argv.index("--artifacts-destination") + 1] == tracker.artifact_root
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "5123" in argv
    assert "--default-artifact-root" not in ui_command("http://h:1")


def test_parent_reuse_and_restart(tracker_store) -> None:
    tracker, client, home = tracker_store
    config = {"name": "demo", "tasks": ["sst2"], "path": Path("/x")}
    first = start_sweep(tracker, "demo", config, TRIALS)
    again = start_sweep(tracker, "demo", config, TRIALS)
    assert again == first
    run = client.get_run(first)
    assert run.info.status == "RUNNING"
    assert run.data.tags[TAG.SWEEP] == "demo" and run.data.tags[TAG.ROLE] == ROLE_SWEEP
    assert run.data.tags["ikd.version"]

    # Artifacts: sweep.json and trials.json, in <home>/mlartifacts.
    local = Path(client.download_artifacts(first, "trials.json", str(home / "dl")))
    assert json.loads(local.read_text()) == TRIALS
    assert str(home.resolve() / "mlartifacts") in client.get_run(first).info.artifact_uri.replace(
        "file://", ""
    )

    tracker.end_sweep(first, "FINISHED")
    # A fresh tracker (e.g. after a restart of the driver) reuses it and sets it RUNNING again.
    assert start_sweep(SweepTracker(tracker.tracking_uri, "demo"), "demo", config, TRIALS) == first
    assert client.get_run(first).info.status == "RUNNING"

    restarted = start_sweep(tracker, "demo", config, TRIALS, restart=True)
    assert restarted != first
    assert client.get_run(first).data.tags["ikd.superseded"] == "true"
    assert start_sweep(tracker, "demo", config, TRIALS) == restarted
    # Another sweep in the same experiment gets its own parent.
    assert start_sweep(tracker, "other", config, TRIALS) not in (first, restarted)


def test_trial_run_idempotent_metrics_and_artifacts(tracker_store) -> None:
    tracker, client, home = tracker_store
    parent = start_sweep(tracker, "demo", {"name": "demo"}, TRIALS)
    trial = TRIALS[1]
    ids = {
        tracker.trial_run(parent, trial["trial_id"], tags={"extra": "1"}, params=_params(trial))
        for _ in range(3)
    }
    assert len(ids) == 1
    (run_id,) = ids
    # Also from a second tracker (a resumed driver).
    again = SweepTracker(tracker.tracking_uri, "demo")
    assert again.trial_run(parent, trial["trial_id"], tags={}, params=_params(trial)) == run_id
    assert [c["run_id"] for c in tracker.child_runs(parent)] == [run_id]

    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    assert run.info.run_name == "sst2-kd-s1"
    assert tags["mlflow.parentRunId"] == parent
    assert tags[TAG.TRIAL_ID] == "sst2-kd-s1" and tags[TAG.ROLE] == ROLE_TRIAL
    assert (tags[TAG.SWEEP], tags[TAG.TASK], tags[TAG.METHOD], tags[TAG.SEED]) == (
        "demo",
        "sst2",
        "kd",
        "1",
    )
    assert tags["extra"] == "1" and tags["ikd.version"]
    assert params["temperature"] == "2.0" and params["train.lr"] == "3e-05"
    assert params["ikd.estimator"] == "exact"
    assert "exam_every" not in params and "teacher_lr" not in params  # None values skipped

    for step in range(1, 6):
        tracker.log_metrics(
            run_id, {"train/loss": 1.0 / step, DEV: 0.1 * step, "nan": float("nan")}, step
        )
    tracker.finish_trial(
        run_id,
        "FINISHED",
        final_metrics={FINAL_DEV: 0.5},
        trial_config={"task": "sst2", "seed": 1},
    )
    history = client.get_metric_history(run_id, DEV)
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (s, round(0.1 * s, 6)) for s in range(1, 6)
    ]
    assert client.get_metric_history(run_id, "nan") == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"trial_config.json", "final_metrics.json"} <= names

    # A retry of the trial reuses the run and sets it RUNNING again.
    assert tracker.trial_run(parent, trial["trial_id"], tags={}, params=_params(trial)) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    assert len(tracker.child_runs(parent)) == 1


def test_failed_trial_and_mark_unfinished(tracker_store) -> None:
    tracker, client, _ = tracker_store
    parent = start_sweep(tracker, "demo", {}, TRIALS)
    failing = tracker.trial_run(parent, "sst2-ft-s1", tags={}, params=_params(TRIALS[0]))
    running = tracker.trial_run(parent, "sst2-kd-s1", tags={}, params=_params(TRIALS[1]))
    message = "Traceback ...\n" + "x" * 20000 + "\nRuntimeError: CUDA out of memory"
    tracker.finish_trial(failing, "FAILED", error=message)
    run = client.get_run(failing)
    assert run.info.status == "FAILED"
    assert run.data.tags[TAG.ERROR].endswith("RuntimeError: CUDA out of memory")
    assert len(run.data.tags[TAG.ERROR]) <= 5000

    assert tracker.mark_unfinished(parent) == 1
    assert client.get_run(running).info.status == "KILLED"
    statuses = {c["trial_id"]: c["status"] for c in tracker.child_runs(parent)}
    assert statuses == {"sst2-ft-s1": "FAILED", "sst2-kd-s1": "KILLED"}

    # Retrying the failed trial clears the stale error.
    assert tracker.trial_run(parent, "sst2-ft-s1", tags={}, params=_params(TRIALS[0])) == failing
    assert TAG.ERROR not in client.get_run(failing).data.tags


_RACE = textwrap.dedent(
    """
    import sys, time
    from ikd_sweep.tracking import SweepTracker
    uri, start = sys.argv[1], float(sys.argv[2])
    tracker = SweepTracker(uri, "race")
    time.sleep(max(0.0, start - time.time()))
    print(tracker.experiment_id)
    """
)


def test_two_processes_create_experiment_in_fresh_store(tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    uri = f"sqlite:///{tmp_path / 'fresh'}/mlflow.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    # Both start after their imports are done, so they hit the empty database at the same time.
    start = str(time.time() + 4.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, uri, start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(ids) == 1
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments() if e.name == "race"] == ["race"]


def test_unreachable_server_keeps_training_and_reports_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = SweepTracker(
        f"http://127.0.0.1:{free_port()}", "down", home=tmp_path, flush_timeout_s=1.0
    )
    run_id = "0123456789abcdef0123456789abcdef"
    t0 = time.monotonic()
    for step in range(5):
        tracker.log_metrics(run_id, {"train/loss": 1.0 + step, "bad": float("inf")}, step)
    assert time.monotonic() - t0 < 10

    t0 = time.monotonic()
    tracker.finish_trial(run_id, "FINISHED", final_metrics={FINAL_DEV: 0.5})
    assert time.monotonic() - t0 < 30
    lost = tracker.lost_metrics_path(run_id)
    assert lost == tmp_path / "lost-metrics" / f"{run_id}.jsonl"
    records = [json.loads(line) for line in lost.read_text().splitlines()]
    assert sorted((r["key"], r["step"], r["value"]) for r in records) == [
        ("train/loss", s, 1.0 + s) for s in range(5)
    ]
    finish = json.loads((tmp_path / "lost-metrics" / f"{run_id}.finish.json").read_text())
    assert finish["status"] == "FINISHED" and "status" in finish["not_recorded"]


def test_rejected_batch_is_reported_lost_and_tagged(tracker_store, caplog) -> None:
    tracker, client, _ = tracker_store
    parent = start_sweep(tracker, "demo", {}, TRIALS)
    run_id = tracker.trial_run(parent, "sst2-kd-s1", tags={}, params=_params(TRIALS[1]))
    real = tracker.client.log_batch
    outage = {"left": 1}

    def flaky(*args, **kwargs):
        # The tracking store refuses the first metric batch (what MLflow reports once its own
        # HTTP retries are used up), then works again.
        if outage["left"] > 0 and kwargs.get("metrics"):
            outage["left"] -= 1
            raise ConnectionError("tracking server restarting")
        return real(*args, **kwargs)

    tracker.client.log_batch = flaky
    for step in range(4):
        tracker.log_metrics(run_id, {DEV: float(step)}, step, timestamp_ms=1000 + step)
    tracker.finish_trial(run_id, "FINISHED")
    history = client.get_metric_history(run_id, DEV)
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [
        (s, float(s), 1000 + s) for s in range(1, 4)
    ]
    lost = [json.loads(line) for line in tracker.lost_metrics_path(run_id).read_text().splitlines()]
    assert [(r["key"], r["step"], r["timestamp"]) for r in lost] == [(DEV, 0, 1000)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ikd.lost_metrics"] == "1"
    messages = [r.getMessage() for r in caplog.records]
    assert any("MLflow tracking unreachable" in m for m in messages)
    assert any("MLflow tracking is reachable again" in m for m in messages)


def test_hanging_server_costs_one_timeout_not_one_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that accepts connections (the kernel's backlog does) but never answers.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        tracker = SweepTracker(uri, "hung", home=tmp_path, flush_timeout_s=1.0)
        run_id = "f" * 32
        t0 = time.monotonic()
        for step in range(20):
            tracker.log_metrics(run_id, {"train/loss": float(step)}, step)
        assert time.monotonic() - t0 < 3.0  # asynchronous: no call waits for the server
        tracker.finish_trial(run_id, "FINISHED")
        assert time.monotonic() - t0 < 15.0
        lines = tracker.lost_metrics_path(run_id).read_text().splitlines()
        assert len(lines) == 20


def _cli(code: str | None, args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (`python -c CODE` when given) from `cwd`."""
    env = cli_env(home, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-c", code] if code else CLI
    return subprocess.run([*argv, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


# None in sys.modules makes any `import mlflow` / `import ray` fail, as on a bare GPU box.
_NO_MLFLOW_NO_RAY = ("import sys; sys.modules['mlflow'] = sys.modules['ray'] = None; "
                     "from ikd_sweep.cli import app; app()")
TRAIN = ["--task", "wnli", "--method", "finetune"]


@needs_glue
def test_train_records_its_trial_under_its_own_parent_run_tagged_with_code_and_device(
        tmp_path: Path):
    home = tmp_path / "home"
    sweep_file(tmp_path, "single", methods=["finetune"])
    # Launched outside the checkout: the commit is the package's, not the working folder's.
    args = ["train", "single.yaml", *TRAIN, "--device", "cpu"]
    p = _cli(None, args, home, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = json.loads(p.stdout)["steps"]
    assert f"{steps}/{steps}" in p.stderr  # the bar knew its total
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("single")
    assert exp.tags[TAG.EXPERIMENT_KIND] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(TAG.ROLE) == ROLE_SWEEP]
    (child,) = [r for r in runs if r.data.tags.get(TAG.ROLE) == ROLE_TRIAL]
    assert parent.data.tags[TAG.SWEEP] == "single-train"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags[TAG.TRIAL_ID] == "wnli-finetune-s1"
    assert child.info.status == "FINISHED" and child.data.params["train.lr"] == "0.001"
    total = int(child.data.metrics["steps"])
    losses = client.get_metric_history(child.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, total + 1))
    assert FINAL_DEV in child.data.metrics
    # Every run carries the code, the libraries and where it ran.
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    for r in runs:
        tags = r.data.tags
        assert tags["mlflow.source.git.commit"] == tags[TAG.GIT] == sha
        assert tags[TAG.GIT_DIRTY] in ("true", "false")
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"] == "ikd-sweep train"
        assert tags["mlflow.user"]
        for lib in ("torch", "transformers", "ray", "mlflow"):
            assert tags[f"ikd.lib.{lib}"][0].isdigit()
    assert child.data.tags[TAG.DEVICE] == "cpu" and child.data.tags[TAG.GPU] == "none"
    # The same trial again: the same run, not a second one.
    assert _cli(None, args, home, cwd=tmp_path).returncode == 0
    assert len(client.search_runs([exp.experiment_id])) == 2


@needs_glue
def test_train_no_track_runs_without_mlflow_or_ray(tmp_path: Path):
    home = tmp_path / "home"
    path = str(sweep_file(tmp_path, "single", methods=["finetune"]))
    p = _cli(_NO_MLFLOW_NO_RAY, ["train", path, *TRAIN, "--no-track"], home, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["status"] == "FINISHED"
    assert not (home / "mlflow.db").exists()
    # ... and without --no-track the missing mlflow is what stops it.
    p = _cli(_NO_MLFLOW_NO_RAY, ["train", path, *TRAIN], home, cwd=ROOT)
    assert p.returncode != 0 and "mlflow" in p.stderr


def test_the_names_users_and_scripts_rely_on_stay_as_they_are():
    """Tests and code spell names through ikd_sweep.names and store.TAG; this pins their text,
    which queries, dashboards and scripts use."""
    from ikd_sweep import names

    assert (names.VAL, names.DEV, names.SEL_VAL, names.SEL_DEV, names.SEL_STEP) == (
        "val/main", "dev/main", "sel/val_main", "sel/dev_main", "sel/step")
    assert (names.FINAL_DEV, names.BEST_DEV, names.TEACHER_VAL, names.TEACHER_DEV,
            names.STARTUP) == ("final/dev_main", "best/dev_main", "teacher/val_main",
                               "teacher/dev_main", "sys/startup_s")
    assert names.METHOD_ORDER == ("finetune", "kd", "ikd", "ikd-control")
    assert names.PHASES == ("search", "confirm")
    assert names.HPARAMS == ("temperature", "exam_every", "teacher_lr")
    assert (TAG.SWEEP, TAG.ROLE, TAG.TRIAL_ID, TAG.TASK, TAG.METHOD, TAG.SEED, TAG.PHASE,
            TAG.ERROR) == ("ikd.sweep", "ikd.role", "ikd.trial_id", "ikd.task", "ikd.method",
                           "ikd.seed", "ikd.phase", "ikd.error")
    assert (ROLE_SWEEP, ROLE_TRIAL) == ("sweep", "trial")
