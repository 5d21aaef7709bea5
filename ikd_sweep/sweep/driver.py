"""The sweep driver: both phases of a sweep, one Tuner at a time, recorded in the store.

Search: every trial of the plan (and the optuna studies). Confirmation (when
`search.confirm_seeds` is set): the setting the report selects per (task, method) re-run on
those seeds; the trials are worked out once, recorded in the parent run's `trials.json`, and
taken from there on every later run of the command. Each phase runs one Tuner per task (per
(task, method) under ASHA, so early stops compare trials of one method only), stored under
`<home>/ray/<sweep>/`. A teacher is fine-tuned inside the first trial that needs it (the others
of its seed wait on the cache's lock), and the grid is ordered so that teachers of different
seeds and finetune trials run side by side. Re-running the command restores each Tuner (Tune
state it cannot read is set aside) and restarts errored trials; the MLflow store decides what
has finished: a trial whose run is FINISHED is never trained again. One `run` per working
folder and sweep (`<home>/locks/<sweep>.lock`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ikd_sweep.config import SweepConfig
from ikd_sweep.files import sweep_lock
from ikd_sweep.home import Home
from ikd_sweep.names import CONFIRM
from ikd_sweep.sweep import cluster
from ikd_sweep.sweep.events import DONE_KEY, FINAL, describe_error, plain, report_of
from ikd_sweep.sweep.record import Forward, Recording, drop_checkpoints, forwarding, keep_suggested
from ikd_sweep.sweep.search import tuner_setup
from ikd_sweep.sweep.worker import trainable
from ikd_sweep.tracking import SweepTracker, TrialRecorder
from ikd_sweep.trials import Study, SweepPlan, Trial

_log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)    # trial_id -> error
    stopped: list[str] = field(default_factory=list)        # early-stopped by the scheduler
    confirm: list[str] = field(default_factory=list)        # confirmation trial ids
    interrupted: bool = False
    parent_run_id: str = ""


@dataclass
class _Run:
    """What every Tuner of one `run` shares."""

    plan: SweepPlan
    home: Path
    recorder: TrialRecorder
    listeners: Sequence[Any]
    out: SweepOutcome
    verbose: int
    attempt: str  # this driver's run: teacher failures are remembered for it only

    @property
    def sweep(self) -> SweepConfig:
        return self.plan.cfg


def _interrupt_sentinel(signum, frame):  # pragma: no cover - replaced by Ray during fit
    raise KeyboardInterrupt


def run_sweep(plan: SweepPlan, *, home: Path, tracker: SweepTracker,
              listeners: Sequence[Any] = (), address: str | None = None,
              restart: bool = False, verbose: int = 0, tracebacks: bool = False
              ) -> SweepOutcome:
    """Run (or resume) both phases of `plan`; return what happened to each trial.

    `listeners` get every trial event (see `record.forwarding`) and, before each Tuner,
    `expect(trials)` with the trials it runs. `tracebacks`: Ray's own traceback of a failed
    trial (else one line per failure in the live view). Raises `files.SweepBusy` when another
    process runs this sweep in `home`, `cluster.ResourceError` when no node can hold a trial
    (both before the parent run is touched)."""
    home, sweep = home.resolve(), plan.cfg
    with sweep_lock(home, sweep.name):
        if not address:
            cluster.cleanup_leftover_ray(home, sweep.name)
        started = not ray.is_initialized()
        try:
            cluster.init_ray(address, verbose, tracebacks)
            if started and not address:
                cluster.record_session(home, sweep.name)
            cluster.check_resources(sweep, joined=bool(address))
            return _run_sweep(plan, home, tracker, listeners, restart, verbose)
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
                if not address:
                    Home(home).session_record(sweep.name).unlink(missing_ok=True)


def _run_sweep(plan: SweepPlan, home: Path, tracker: SweepTracker, listeners: Sequence[Any],
               restart: bool, verbose: int) -> SweepOutcome:
    from ikd_sweep.selection import selected_settings
    from ikd_sweep.tracking import load_trials

    sweep = plan.cfg
    # Checkpoints are small and frequent by design (one per evaluation); Ray's hint is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Training-curve reports carry no val/main; only evaluation reports do (ASHA skips others).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    storage = Home(home).ray(sweep.name)  # the search; studies and confirmation below it
    if restart and storage.exists():
        shutil.rmtree(storage)
    if restart:  # students an earlier run kept but never logged (its trials start over)
        shutil.rmtree(Home(home).students(sweep.name), ignore_errors=True)
    parent = tracker.start_sweep(sweep.name, sweep.model_dump(mode="json"), restart=restart)
    recorder = TrialRecorder(tracker, parent, sweep)
    run = _Run(plan, home, recorder, listeners, SweepOutcome(parent_run_id=parent), verbose,
               attempt=f"{os.getpid()}-{time.time_ns()}")
    out, search = run.out, list(plan.search)
    status = "FAILED"  # whatever ends this function, the parent never stays RUNNING
    try:
        # Confirmation trials, once worked out, are part of the sweep: never chosen again.
        recorded = [d for d in load_trials(tracker.client, parent) if d.get("phase") == CONFIRM]
        confirm = plan.confirmations(recorded) if sweep.search.confirm_seeds else []
        tracker.set_expected_trials(parent, keep_suggested(recorder, search + confirm))
        _run_phase(run, search, storage)
        for study in plan.studies:
            if not out.interrupted:
                _run_tuner(run, [], Home(home).ray(sweep.name, study.name),
                           _tokenized(run, study.task), asha=False, study=study)
        if sweep.search.confirm_seeds and not out.interrupted:
            if not confirm:
                confirm = plan.confirmations(selected_settings(sweep.name, tracker.tracking_uri))
                tracker.set_expected_trials(parent, keep_suggested(recorder, search + confirm))
            out.confirm = [t.trial_id for t in confirm]
            _run_phase(run, confirm, Home(home).ray(sweep.name, CONFIRM))
        status = "KILLED" if out.interrupted else "FAILED" if out.failed else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            if status != "FINISHED":
                tracker.mark_unfinished(parent, "KILLED")
            tracker.end_sweep(parent, status)
        except Exception as exc:  # the trials are done; the next run of the command sets it
            _log.warning("MLflow: could not record the end of the sweep: %s", exc)
    return out


def _tokenized(run: _Run, task: str) -> dict:
    from ikd_sweep.data import tokenize_splits
    from ikd_sweep.models import load_tokenizer
    from ikd_sweep.tasks import get_task

    sweep = run.sweep
    return tokenize_splits(get_task(task), sweep.data, load_tokenizer(sweep.teacher.model),
                           Home(run.home).data_cache)


def _grid_order(trials: list[Trial]) -> list[Trial]:
    """The first trial of each seed that needs a teacher (it fine-tunes it) alternating with
    the finetune trials, then the rest: teachers of different seeds and trials that need none
    run side by side instead of waiting for each other."""
    first: dict[int, Trial] = {}
    for t in trials:
        if t.method != "finetune":
            first.setdefault(t.seed, t)
    leaders = list(first.values())
    free = [t for t in trials if t.method == "finetune"]
    head: list[Trial] = []
    for i in range(max(len(leaders), len(free))):
        head += leaders[i:i + 1] + free[i:i + 1]
    return head + [t for t in trials if t not in head]


def _run_phase(run: _Run, trials: list[Trial], storage: Path) -> None:
    if not trials:  # e.g. an optuna sweep without fixed settings: its studies run it all
        return
    # Only the search phase is early-stopped: a confirmation run is the measurement itself.
    asha = run.sweep.search.scheduler == "asha" and trials[0].phase == "search"
    for task in run.sweep.tasks:
        task_trials = _grid_order([t for t in trials if t.task == task])
        groups = ([[t for t in task_trials if t.method == m] for m in run.sweep.methods]
                  if asha else [task_trials])
        splits = _tokenized(run, task) if task_trials else None
        for group in groups:
            if group and not run.out.interrupted:
                name = task if not asha else f"{task}-{group[0].method}"
                _run_tuner(run, group, storage / name, splits, asha)
        if run.out.interrupted:
            return


def _set_aside(path: Path, why: str) -> None:
    """Move Tune state that cannot be used out of the way; the MLflow store keeps what counts."""
    dest = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(path), str(dest))
    print(f"warning: Tune state {path} set aside as {dest.name} ({why}); its finished trials "
          "are kept in MLflow, the others start over", file=sys.stderr)


def _unreadable(path: Path) -> str | None:
    """What in a Tune experiment folder cannot be read back (e.g. written on a full disk)."""
    from ray import cloudpickle

    for f in sorted(path.rglob("*")):
        name = f.relative_to(path)
        # Tune's own state: pickles (basic-variant-state is one, despite its name) and JSON.
        pickled = f.suffix == ".pkl" or f.name.startswith("basic-variant-state")
        if "checkpoint_" in str(name) or not f.is_file() or not (
                pickled or f.name.startswith("experiment_state")):
            continue
        if f.stat().st_size == 0:
            return f"{name} is empty"
        try:
            cloudpickle.loads(f.read_bytes()) if pickled else json.loads(f.read_text())
        except Exception as exc:
            return f"{name}: {type(exc).__name__}"
    return None


def _restore(path: Path, fn: Any, ids: list[str]) -> tune.Tuner | None:
    """The Tuner saved at `path` if it can be read and holds exactly these trials (for an
    optuna study: its name), else None (with the state set aside). A searcher's state comes
    back with its Tuner."""
    record = path.with_name(f".{path.name}.trials.json")
    if not path.exists():
        return None
    try:
        if not tune.Tuner.can_restore(str(path)):
            raise ValueError("no Tuner state")
        if not record.exists() or json.loads(record.read_text()) != ids:
            raise ValueError("it holds other trials than the sweep has now")
        if why := _unreadable(path):
            raise ValueError(why)
        # Errored trials start again: a failure may have been the machine's, not the trial's.
        return tune.Tuner.restore(str(path), fn, resume_unfinished=True, resume_errored=False,
                                  restart_errored=True)
    except Exception as exc:
        _set_aside(path, plain(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _build_tuner(run: _Run, trials: list[Trial], path: Path, splits: dict | None, asha: bool,
                 study: Study | None, done: frozenset[str]) -> tune.Tuner:
    """The Tuner of `trials` (or of `study`) at `path`: restored when its state is usable,
    else new (and the trials it holds written beside it)."""
    sweep = run.sweep
    fn = tune.with_parameters(trainable, sweep=sweep, home=str(run.home), done=done,
                              trials={t.trial_id: t.to_dict() for t in trials}, splits=splits,
                              attempt=run.attempt)
    fn = tune.with_resources(fn, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    ids = [f"optuna:{study.name}"] if study else [t.trial_id for t in trials]
    tuner = _restore(path, fn, ids)
    if tuner is not None:
        return tuner
    space, tune_config = tuner_setup(sweep, trials, study, asha)
    run_config = tune.RunConfig(
        name=path.name, storage_path=str(path.parent), verbose=run.verbose,
        callbacks=[Forward()], failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(f".{path.name}.trials.json").write_text(json.dumps(ids))
    return tune.Tuner(fn, param_space=space, tune_config=tune_config, run_config=run_config)


def _run_tuner(run: _Run, trials: list[Trial], path: Path, splits: dict | None, asha: bool,
               study: Study | None = None) -> None:
    """One Tuner: a grid over `trials`, or (`study`) num_samples x seeds trials an optuna
    searcher chooses; a trial whose MLflow run is FINISHED is never trained again."""
    tracker, parent = run.recorder.tracker, run.recorder.parent
    by_id = {t.trial_id: t for t in trials}
    done = frozenset(r["trial_id"] for r in tracker.child_runs(parent)
                     if r["status"] == "FINISHED" and (study or r["trial_id"] in by_id))
    recording = Recording(run.recorder, run.home, dict(by_id), done)
    tuner = _build_tuner(run, trials, path, splits, asha, study, done)
    for listener in run.listeners:
        if hasattr(listener, "expect"):
            listener.expect(trials)
    # Ray swaps in its own SIGINT handler during fit and puts the previous one back after the
    # first Ctrl-C; finding our sentinel back afterwards means the user interrupted the sweep.
    previous = signal.signal(signal.SIGINT, _interrupt_sentinel)
    try:
        with forwarding([recording, *run.listeners]):
            grid = tuner.fit()
    finally:
        interrupted = signal.getsignal(signal.SIGINT) is _interrupt_sentinel
        signal.signal(signal.SIGINT, previous)
    _reconcile(run, grid, recording, path, asha, interrupted)


def _reconcile(run: _Run, grid: tune.ResultGrid, recording: Recording, path: Path, asha: bool,
               interrupted: bool) -> None:
    """What the Tuner says happened, into the outcome, and into the store where the driver
    missed it (a driver killed after Tune saved a trial as done; an early stop)."""
    out = run.out
    try:
        runs = {r["trial_id"]: r for r in run.recorder.tracker.child_runs(run.recorder.parent)}
    except Exception as exc:  # the tracking server is down: the outcome is Tune's alone
        _log.warning("MLflow: could not read the trials' runs: %s", exc)
        runs = {}
    for i in range(len(grid)):
        try:
            result = grid[i]
            # A trial that never started has no config; its folder is named after it. A
            # searcher's trial always has its config: its Trial's dict.
            tid = (result.config or {}).get("trial_id") or Path(result.path).name
            t = recording.trials.get(tid) or Trial.from_dict(result.config)
            m, store, error = result.metrics or {}, runs.get(t.trial_id), result.error
        except Exception as exc:  # e.g. an error.pkl Ray could not write in full
            _log.warning("Tune: result %d of %s unreadable: %s", i, path.name, exc)
            continue
        if error is not None:
            out.failed[t.trial_id] = (recording.errors.get(t.trial_id)
                                      or (store or {}).get("error") or describe_error(error))
        elif m.get(DONE_KEY):
            out.finished.append(t.trial_id)
            drop_checkpoints(Path(result.path))  # also when the driver missed the completion
            rep = report_of(m)
            if store and store["status"] != "FINISHED" and rep.get("kind") == FINAL:
                # Tune saved the trial as done but the driver died before MLflow heard of it.
                run.recorder.start(t, store["run_id"])
                recording.finished(t, rep["metrics"])
        elif not interrupted and asha:
            out.stopped.append(t.trial_id)  # early-stopped: record it as such, not as running
            if store and store["status"] == "RUNNING":
                run.recorder.start(t, store["run_id"])
                run.recorder.finish(t, "KILLED", error="stopped early by the asha scheduler")
        else:
            interrupted = True
    out.interrupted = out.interrupted or interrupted
