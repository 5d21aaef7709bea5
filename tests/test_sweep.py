"""`ikd-sweep run` end to end: real local Ray, real SQLite MLflow store, tiny models, real GLUE.

Each test drives the CLI in a subprocess, as a user would, and then reads the MLflow store.
The tests that only read a finished sweep share one (`finished_sweep` in conftest.py); the
others make their own store because they break it, stop it or race for it.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    SHARED_TRIALS,
    free_port,
    needs_glue,
    run_cli,
    runs_of,
    start_cli,
    store,
    sweep_file,
)

from ikd_sweep.names import DEV, FINAL_DEV, TEACHER_DEV, VAL
from ikd_sweep.store import TAG

pytestmark = [pytest.mark.slow, needs_glue]
N_TRIALS = SHARED_TRIALS["search"] + SHARED_TRIALS["confirm"]


def test_sweep_records_one_parent_and_every_trial(finished_sweep):
    home, run = finished_sweep.home, finished_sweep.run
    assert f"finished {N_TRIALS}, failed 0" in run.stdout, run.stdout
    parents, children = runs_of(home, finished_sweep.name)
    assert len(parents) == 1
    # 2 tasks x (finetune + kd x 2 temperatures + ikd x 2 temperatures) x search seed 1, then
    # 2 tasks x 3 selected settings x confirmation seed 2
    assert len(children) == N_TRIALS
    assert len({c.data.tags[TAG.TRIAL_ID] for c in children}) == N_TRIALS
    client = store(home)
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.data.params["task"] in ("rte", "stsb")
        assert "train.lr" in c.data.params
        hist = client.get_metric_history(c.info.run_id, DEV)
        assert len(hist) >= 2 and len({h.step for h in hist}) == len(hist)
        assert FINAL_DEV in c.data.metrics
        if c.data.tags[TAG.METHOD] == "ikd":
            assert client.get_metric_history(c.info.run_id, "exam/loss")
            assert TEACHER_DEV in c.data.metrics
    # teachers were fine-tuned once per (task, seed), inside the first trial that needed one
    assert len(list((home / "cache" / "teachers").glob("*/DONE"))) == 4


def test_store_is_written_by_the_driver_only(finished_sweep):
    """The shared sweep's Ray workers ran where `import mlflow` fails (and with no tracking
    URI): every metric of every trial still reached the store, so the driver alone wrote it."""
    home = finished_sweep.home
    assert finished_sweep.workers, "no Ray worker ran with the mlflow blocker"
    _, children = runs_of(home, finished_sweep.name)
    client = store(home)
    for c in children:
        assert c.info.status == "FINISHED", c.data.tags.get(TAG.ERROR)
        total = int(c.data.metrics["steps"])
        hist = {key: {m.step for m in client.get_metric_history(c.info.run_id, key)}
                for key in ("train/loss", VAL)}
        # log_every 4, eval_every 2 (and at the end): every logged step, every evaluation.
        evals = set(range(2, total + 1, 2)) | {total}
        assert hist["train/loss"] == set(range(4, total + 1, 4)) | evals
        assert hist[VAL] == evals
        assert FINAL_DEV in c.data.metrics
        if c.data.tags[TAG.METHOD] == "ikd":
            assert client.get_metric_history(c.info.run_id, "exam/loss")
    assert not (home / "lost-metrics").exists()


def test_confirmation_phase_runs_the_selected_settings_once(finished_sweep):
    from analysis.collect import collect
    from analysis.tables import build_report

    home, tmp, p = finished_sweep.home, finished_sweep.tmp, finished_sweep.run
    n_search, n_confirm = SHARED_TRIALS["search"], SHARED_TRIALS["confirm"]
    assert f"({n_confirm} confirmation)" in p.stdout, p.stdout
    words = " ".join(p.stdout.split())  # the summary table may wrap its title
    assert "selected setting" in words and "(n=" in words, p.stdout  # the report's numbers
    parents, children = runs_of(home, finished_sweep.name)
    phase = {c.data.tags[TAG.TRIAL_ID]: c.data.tags[TAG.PHASE] for c in children}
    confirm = [c for c in children if phase[c.data.tags[TAG.TRIAL_ID]] == "confirm"]
    assert sorted((c.data.params["task"], c.data.tags[TAG.METHOD], int(c.data.tags[TAG.SEED]))
                  for c in confirm) == [(task, method, 2) for task in ("rte", "stsb")
                                        for method in ("finetune", "ikd", "kd")]
    # The setting is the one the report selects from the search runs.
    runs = collect(finished_sweep.name, f"sqlite:///{home}/mlflow.db")
    search = runs.runs[runs.runs["trial_id"].map(phase).eq("search")]
    selected = build_report(search, runs.expected[runs.expected["trial_id"].map(phase).eq(
        "search")]).selected.set_index(["task", "method"])
    for c in confirm:
        want = selected.at[(c.data.params["task"], c.data.tags[TAG.METHOD]), "temperature"]
        got = c.data.params.get("temperature")
        assert (got is None and want != want) or float(got) == want, (got, want)
    # The parent's list of expected trials holds both phases.
    client = store(home)
    trials = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "trials.json",
                                                       str(tmp / "dl"))).read_text())
    assert sorted(t["phase"] for t in trials) == ["confirm"] * n_confirm + ["search"] * n_search

    # Re-running the finished sweep creates nothing and runs nothing again.
    again = finished_sweep.again
    assert again.returncode == 0, again.stdout + again.stderr
    parents, children = runs_of(home, finished_sweep.name)
    assert len(parents) == 1
    assert {c.info.run_id: c.info.end_time for c in children} == finished_sweep.ends


def test_dry_run_lists_trials_and_starts_nothing(finished_sweep):
    dry = finished_sweep.dry
    assert dry.returncode == 0, dry.stderr
    n_search, n_confirm = SHARED_TRIALS["search"], SHARED_TRIALS["confirm"]
    assert f"{n_search + n_confirm} trials ({n_search} search, {n_confirm} confirm)" \
        in dry.stdout, dry.stdout
    assert "rte-ikd-s1-T4-E2-tlr0.0001" in dry.stdout
    assert "stsb-kd-s2" in dry.stdout and "selected setting" in dry.stdout
    assert not finished_sweep.dry_made_store


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
            done = {c.data.tags[TAG.TRIAL_ID]: c.info.end_time
                    for c in children if c.info.status == "FINISHED"}
            if len(done) >= at_least:
                return done
    raise AssertionError(f"sweep made no progress:\n{log.read_text(errors='replace')[-5000:]}")


KILLED_TRIALS = 7  # finetune + 6 kd temperatures, one at a time


def killed_sweep(tmp_path: Path, name: str) -> Path:
    return sweep_file(tmp_path, name, tasks=["rte"], methods=["finetune", "kd"],
                      search={"temperature": [1, 2, 3, 4, 5, 6], "seeds": [1]},
                      train={"epochs": 1, "batch_size": 8, "lr": 1e-3, "eval_every": 2,
                             "log_every": 1},
                      max_concurrent_trials=1)


def finished_trials(home: Path, sweep: str) -> dict[str, int]:
    return {c.data.tags[TAG.TRIAL_ID]: c.info.end_time for c in runs_of(home, sweep)[1]
            if c.info.status == "FINISHED"}


def assert_resumed_once(home: Path, sweep: str, before: dict[str, int]) -> None:
    parents, children = runs_of(home, sweep)
    assert len(parents) == 1
    ids = [c.data.tags[TAG.TRIAL_ID] for c in children]
    assert len(ids) == len(set(ids)) == KILLED_TRIALS  # one run each
    assert all(c.info.status == "FINISHED" for c in children)
    after = {c.data.tags[TAG.TRIAL_ID]: c.info.end_time for c in children}
    for trial_id, end in before.items():
        assert after[trial_id] == end, f"{trial_id} was run again after the resume"


def test_ctrl_c_exits_130_a_killed_driver_resumes_and_nothing_runs_twice(tmp_path):
    """Ctrl-C, then a re-run that is SIGKILLed mid-sweep (driver and all it started), then a
    re-run that finishes: no trial runs twice, none is recorded twice."""
    home, name = tmp_path / "home", "interrupted"
    sweep = killed_sweep(tmp_path, name)
    log = tmp_path / "first.log"
    proc = start_cli(["run", str(sweep)], home, log)
    try:
        wait_finished(proc, home, name, log, at_least=1)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 130, f"exit {rc}:\n{text[-5000:]}"
    assert "re-run the same command to resume" in text, text[-5000:]
    _, children = runs_of(home, name)
    assert not [c for c in children if c.info.status == "RUNNING"], "runs left RUNNING"
    after_ctrl_c = finished_trials(home, name)

    log = tmp_path / "second.log"
    proc = start_cli(["run", str(sweep)], home, log)
    try:
        before_kill = wait_finished(proc, home, name, log, at_least=len(after_ctrl_c) + 1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    for trial_id, end in after_ctrl_c.items():
        assert before_kill[trial_id] == end, f"{trial_id} was run again after Ctrl-C"

    p = run_cli(["run", str(sweep)], home)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_resumed_once(home, name, before_kill)


def test_ui_serves_the_mlflow_page_on_localhost(finished_sweep, tmp_path):
    # The store of a finished sweep, as a user browses it (already migrated: no start-up wait).
    home = finished_sweep.home
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
