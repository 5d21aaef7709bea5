"""Watching a sweep: the live view's lines and `ikd-sweep status` from the store. (The run
metadata every MLflow run carries and the `train` bar's total: test_tracking.py.)"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from helpers import SHARED_TRIALS, end_to_end, migrated_store, runs_of, start_sweep
from rich.console import Console
from typer.testing import CliRunner

from ikd_sweep.cli import app
from ikd_sweep.names import SEL_DEV, SEL_VAL
from ikd_sweep.progress import SweepView, estimate_eta
from ikd_sweep.tracking import TAG, SweepTracker


def _trial(trial_id: str, task: str, method: str) -> dict:
    return {"trial_id": trial_id, "task": task, "method": method, "seed": 1, "phase": "search"}


EXPECTED = [_trial("rte-kd-a", "rte", "kd"), _trial("rte-kd-b", "rte", "kd"),
            _trial("rte-ikd-a", "rte", "ikd"), _trial("rte-ikd-b", "rte", "ikd"),
            _trial("wnli-kd-a", "wnli", "kd")]


def test_status_counts_trials_and_shows_the_best_selected_score(tmp_path, tmp_path_factory,
                                                                monkeypatch):
    home = tmp_path / "runs"
    tracker = SweepTracker(migrated_store(tmp_path_factory, home), "watched")
    parent = start_sweep(tracker, "watched", {"name": "watched"}, EXPECTED)

    def run(t: dict) -> str:
        return tracker.trial_run(parent, t["trial_id"], tags={}, params=t)

    # rte-kd-a: finished, the better kd; rte-kd-b: finished, worse; rte-ikd-a: failed;
    # rte-ikd-b: still running, one evaluation so far; wnli-kd-a: not started.
    for t, sel in ((EXPECTED[0], (0.71, 0.66)), (EXPECTED[1], (0.64, 0.69))):
        rid = run(t)
        tracker.log_metrics(rid, {SEL_VAL: sel[0], SEL_DEV: sel[1]}, 10)
        tracker.finish_trial(rid, "FINISHED", final_metrics={SEL_VAL: sel[0]})
    tracker.finish_trial(run(EXPECTED[2]), "FAILED", error="ValueError: boom")
    rid = run(EXPECTED[3])
    tracker.client.log_metric(rid, SEL_VAL, 0.55, step=4)
    tracker.client.log_metric(rid, SEL_DEV, 0.5, step=4)

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cli = CliRunner()
    out = cli.invoke(app, ["status", "--sweep", "watched", "--home", str(home)])
    assert out.exit_code == 0, out.output
    assert ("watched [RUNNING]: 2/5 done, 1 running, 1 failed, 0 stopped, 1 pending"
            in out.output)
    rows = {line.split()[0]: line for line in out.output.splitlines() if line.strip()}
    assert "0.7100 (dev 0.6600)" in rows["rte"]  # the best sel/val_main, not the best dev
    assert "0.5500 (dev 0.5000)" in rows["rte"]  # a running trial's selection so far
    assert "0.69" not in out.output
    # Without --sweep: the latest sweep; an unknown name is bad input that names the sweeps.
    assert "watched [RUNNING]" in cli.invoke(app, ["status", "--home", str(home)]).output
    bad = cli.invoke(app, ["status", "--sweep", "nope", "--home", str(home)])
    assert bad.exit_code == 2 and "known sweeps: watched" in bad.output
    # A folder without a store is reported, not created.
    empty = cli.invoke(app, ["status", "--home", str(tmp_path / "none")])
    assert empty.exit_code == 2 and "no tracking store" in empty.output
    assert not (tmp_path / "none" / "mlflow.db").exists()


def test_live_view_prints_teacher_epochs_counts_and_new_bests():
    buf, now = io.StringIO(), [0.0]
    view = SweepView("demo", 3, console=Console(file=buf, width=200), clock=lambda: now[0])
    view.expect([SimpleNamespace(trial_id=t["trial_id"], task=t["task"], method=t["method"])
                 for t in EXPECTED[:3]])

    def result(tid: str, kind: str, **m) -> None:
        report = {"kind": kind, "step": 1, "time_ms": 0, "metrics": m}
        view.on_trial_result(trial=SimpleNamespace(config={"trial_id": tid}),
                             result={"ikd": report})

    a, b, c = (SimpleNamespace(config={"trial_id": t["trial_id"]},
                               get_error=lambda: ValueError("boom")) for t in EXPECTED[:3])
    with view:
        view.on_trial_start(trial=a)
        result("rte-kd-a", "teacher", task="rte", seed=1, epoch=1, epochs=3, dev_main=0.61)
        view.on_trial_start(trial=b)
        now[0] = 10.0
        result("rte-kd-a", "final", **{SEL_VAL: 0.7, SEL_DEV: 0.65})
        view.on_trial_complete(trial=a)
        view.on_trial_complete(trial=b)  # no final report: stopped early
        view.on_trial_start(trial=c)
        view.on_trial_error(trial=c)
    lines = buf.getvalue().splitlines()
    assert "teacher rte seed 1: epoch 1/3, dev 0.6100" in lines
    assert any(line.startswith("demo: 0/3 done, 2 running, 0 failed, 0 stopped, 1 pending")
               for line in lines)
    assert any("| new best rte/kd 0.7000 (dev 0.6500)" in line for line in lines)
    assert lines[-1].startswith("demo: 1/3 done, 0 running, 1 failed, 1 stopped, 0 pending")
    # A failure is one line (type and message), printed once: no traceback.
    assert [line for line in lines if "boom" in line] == ["FAILED rte-ikd-a: ValueError: boom"]
    assert "\x1b[" not in buf.getvalue()  # no ANSI codes when the output is not a terminal


def test_eta_uses_finished_durations_and_concurrency():
    assert estimate_eta([], [5.0], 3, 2) is None
    # 2 pending x 100 s + (100 - 40) s left of a running one, on 2 slots
    assert estimate_eta([80.0, 120.0], [40.0], 2, 2) == pytest.approx(130.0)


@end_to_end
def test_a_sweep_prints_the_view_not_ray_and_status_reads_it_back(finished_sweep, monkeypatch):
    p, name = finished_sweep.run, finished_sweep.name
    n = sum(SHARED_TRIALS.values())
    out = p.stdout + p.stderr
    assert f"{name}: {n}/{n} done, 0 running, 0 failed, 0 stopped, 0 pending" in p.stderr
    assert "new best rte/finetune" in p.stderr and "new best stsb/ikd" in p.stderr
    # Ray's own chatter is off: no trial tables, config boxes, checkpoint lines, hints, ANSI.
    for noise in ("Trial status", "Checkpoint successfully created", "TensorBoard",
                  "Configuration for experiment", "\x1b["):
        assert noise not in out, noise
    # 223 lines for 5 trials before issue 12: now the view's lines and the summary
    assert len(out.splitlines()) < 8 * n, out
    _, children = runs_of(finished_sweep.home, name)
    assert {c.data.tags[TAG.DEVICE] for c in children} == {"cpu"}  # the workers' reports,
    # tagged by the driver

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status = CliRunner().invoke(app, ["status", "--home", str(finished_sweep.home)])
    assert status.exit_code == 0, status.output
    assert f"{name} [FINISHED]: {n}/{n} done, 0 running, 0 failed, 0 stopped, 0 pending" in \
        status.output
