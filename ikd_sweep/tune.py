"""Ray Tune: sweep -> trials, the trainable, Tuner build/restore, the tracking callback.

The only module that imports Ray. Trials only `tune.report`: training curves at `log_every`,
evaluations with their checkpoints, the final result. `TrackingCallback`, on the driver, hands
every report to the `tracking.SweepTracker`, so a sweep's store has one writer.

A sweep runs in two phases. Search: every trial of the sweep file. Confirmation (when
`search.confirm_seeds` is set): the setting the report selects per (task, method) re-run on
those seeds; the trials are worked out once, recorded in the parent run's `trials.json`, and
taken from there on every later run of the command. Each phase runs one Tuner per task (per
(task, method) under ASHA, so early stops compare trials of one method only), stored under
`<home>/ray/<sweep>/`; a task's teachers are fine-tuned first (one Ray task per seed). Re-running
the command restores each Tuner; a trial whose MLflow run is FINISHED is never trained again.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ikd_sweep.config import SweepConfig
from ikd_sweep.trials import (
    Trial,
    confirm_trials,
    expand_trials,
    flat_params,
    trial_record,
    trial_seed,
)

if TYPE_CHECKING:  # Ray workers never import MLflow: only the driver records
    from ikd_sweep.tracking import SweepTracker

_log = logging.getLogger(__name__)

REPORT = "ikd"  # a trial's report: {"ikd": {"kind", "step", "time_ms", "metrics"|"error"}}
DONE_KEY = "ikd_done"  # present in a trial's last report only when the trial completed
EVALS = "ikd_evals"  # evaluations so far: ASHA's time axis (evaluation reports only)


# ------------------------------------------------------------------------------ worker side


def _report(info: dict[str, Any], top: dict[str, Any] | None = None,
            checkpoint: tune.Checkpoint | None = None) -> None:
    # Stamped here: the metrics keep the time they were measured, whenever MLflow gets them.
    tune.report({**(top or {}), REPORT: {**info, "time_ms": int(time.time() * 1000)}},
                checkpoint=checkpoint)


class _Reporter:
    """Trainer callback inside a Ray trial: everything goes to Tune, nothing to MLflow."""

    def __init__(self, evals: int) -> None:
        self.evals = evals  # carried in the checkpoint's metadata across a resume

    def log(self, metrics: dict[str, float], step: int) -> None:
        _report({"kind": "log", "step": int(step), "metrics": dict(metrics)})

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        self.evals += 1
        ckpt = None
        if checkpoint is not None:
            ckpt = tune.Checkpoint.from_directory(str(checkpoint))
            ckpt.set_metadata({EVALS: self.evals})
        top = {EVALS: self.evals, **({"val/main": metrics["val/main"]}
                                     if "val/main" in metrics else {})}
        _report({"kind": "eval", "step": int(step), "metrics": dict(metrics)}, top, ckpt)


def trainable(config: dict, *, sweep: SweepConfig, home: str, trials: dict[str, dict],
              done: frozenset[str], splits: dict | None = None) -> None:
    """One Ray Tune trial: run the trainer and report to Tune (the driver records it)."""
    from ikd_sweep.trial import run_trial

    if config["trial_id"] in done:  # FINISHED in MLflow already: never train it twice
        _report({"kind": "recorded", "step": 0, "metrics": {}}, {DONE_KEY: 1})
        return
    trial = Trial.from_dict(trials[config["trial_id"]])
    ckpt = tune.get_checkpoint()
    if ckpt is not None and Path(ckpt.path).is_dir() and not any(
            not p.name.startswith(".") for p in Path(ckpt.path).iterdir()):
        ckpt = None  # emptied by drop_checkpoints, yet not FINISHED in MLflow: start over
    reporter = _Reporter((ckpt.get_metadata() or {}).get(EVALS, 0) if ckpt else 0)
    work = Path(tempfile.mkdtemp(prefix=f"ikd-{trial.trial_id}-"))
    # On the working folder's (shared) storage, so the driver can log it to MLflow.
    student = student_dir(Path(home), sweep.name, trial.trial_id)
    try:
        with (ckpt.as_directory() if ckpt else nullcontext()) as resume_dir:
            final = run_trial(sweep, trial, home=Path(home), callback=reporter,
                              checkpoint_dir=work / "checkpoint",
                              resume_from=Path(resume_dir) if resume_dir else None,
                              splits=splits, student_dir=student)
    except Exception as e:
        _report({"kind": "error", "step": 0,
                 "error": f"{type(e).__name__}: {e}\n\n{traceback.format_exc(limit=8)}"})
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if student.is_dir():
        final = {**final, "student_dir": str(student)}
    _report({"kind": "final", "step": int(final.get("steps", 0)), "metrics": final},
            {DONE_KEY: 1})


def student_dir(home: Path, sweep: str, trial_id: str) -> Path:
    """Where a Ray trial keeps its selected student until the driver has logged it."""
    return home / "students" / sweep / trial_id


# ------------------------------------------------------------------------------ driver side


class TrackingCallback(tune.Callback):
    """On the driver: one MLflow child run per trial, every report logged at its own step."""

    def __init__(self, tracker: SweepTracker, parent: str, sweep: SweepConfig,
                 trials: dict[str, Trial], done: frozenset[str]) -> None:
        self.tracker, self.parent, self.sweep = tracker, parent, sweep
        self.trials, self.done = trials, done
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.final: dict[str, dict] = {}
        self.errors: dict[str, str] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from ikd_sweep.tracking import trial_tags

        tid = trial.config["trial_id"]
        if tid not in self.done:
            t = self.trials[tid]
            self.runs[tid] = self.tracker.trial_run(self.parent, tid,
                                                    tags=trial_tags(self.sweep, t),
                                                    params=flat_params(self.sweep, t))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        tid, rep = trial.config["trial_id"], result.get(REPORT) or {}
        if tid in self.done or rep.get("kind") in (None, "recorded"):
            return
        if tid not in self.runs:  # its start could not be recorded: try again now
            self.on_trial_start(iteration, trials, trial)
        run_id = self.runs[tid]
        if rep["kind"] == "error":
            self.errors[tid] = rep["error"]
            return
        if rep["kind"] == "final":
            self.final[tid] = rep["metrics"]
        self.tracker.log_metrics(run_id, rep["metrics"], rep["step"], rep["time_ms"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Without a final result the trial was stopped (scheduler or Ctrl-C): run_sweep decides.
        tid = trial.config["trial_id"]
        if tid in self.runs and tid in self.final:
            keep_student(self.tracker, self.runs[tid], self.final[tid])
            self.tracker.finish_trial(self.runs[tid], "FINISHED", final_metrics=self.final[tid],
                                      trial_config=trial_record(self.sweep, self.trials[tid]))
        if tid in self.final and trial.path:
            drop_checkpoints(Path(trial.path))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.config["trial_id"]
        if tid in self.runs:
            self.errors[tid] = self.errors.get(tid) or str(trial.get_error() or "trial failed")
            self.tracker.finish_trial(self.runs[tid], "FAILED", error=self.errors[tid],
                                      trial_config=trial_record(self.sweep, self.trials[tid]))


def keep_student(tracker: SweepTracker, run_id: str, final: dict[str, Any]) -> None:
    """Log a finished trial's student folder to its run, then delete the local copy (the bytes
    exist once: in the artifact store). If the upload fails the folder stays, with a warning."""
    folder = Path(final["student_dir"]) if final.get("student_dir") else None
    if folder is None or not folder.is_dir():
        return
    try:
        tracker.log_student(run_id, folder)
    except Exception as exc:
        _log.warning("MLflow: the student of run %s was not logged (%s); it stays in %s",
                     run_id, exc, folder)
        return
    shutil.rmtree(folder, ignore_errors=True)


def drop_checkpoints(trial_path: Path) -> None:
    """Empty a finished trial's Tune checkpoints: resumable state (optimizer states of student
    and teacher, RNG) that only an unfinished trial needs. The folders and Tune's own dotfiles
    stay: a driver killed before Tune saved the trial as finished restores it from there on the
    next run, and the trainable then finds it FINISHED in MLflow and trains nothing."""
    for ckpt in trial_path.glob("checkpoint_*"):
        for item in ckpt.iterdir() if ckpt.is_dir() else ():
            if not item.name.startswith("."):
                shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)


_live: TrackingCallback | None = None  # this driver's callback of the Tuner being fit


class _Forward(tune.Callback):
    """What the Tuner stores with its state, and gets back on restore: a stateless stand-in
    (the tracker holds a live MLflow client) that hands each event to this process's
    TrackingCallback. A tracking failure is logged; it never ends the sweep."""

    def _call(self, hook: str, kw: dict) -> None:
        if _live is not None:
            try:
                getattr(_live, hook)(**kw)
            except Exception as exc:
                _log.warning("MLflow: %s of %s not recorded: %s", hook,
                             kw["trial"].config.get("trial_id"), exc)

    def on_trial_start(self, **kw: Any) -> None:
        self._call("on_trial_start", kw)

    def on_trial_result(self, **kw: Any) -> None:
        self._call("on_trial_result", kw)

    def on_trial_complete(self, **kw: Any) -> None:
        self._call("on_trial_complete", kw)

    def on_trial_error(self, **kw: Any) -> None:
        self._call("on_trial_error", kw)


def _trial_name(trial) -> str:
    return trial.config["trial_id"]


def _prepare_teacher(sweep: SweepConfig, task: str, seed: int, home: str) -> str:
    """Ray task: fine-tune (or find) the teacher, and cache its kd logits if kd will need them."""
    from ikd_sweep import teacher as tc
    from ikd_sweep.data import prepare_data
    from ikd_sweep.models import load_tokenizer
    from ikd_sweep.trainer import pick_device

    tdir = tc.ensure_teacher(sweep, task, seed, Path(home))
    if "kd" in sweep.methods:
        tok = load_tokenizer(sweep.teacher.model)
        data = prepare_data(task, sweep.data, tok, Path(home) / "cache" / "data",
                            trial_seed(sweep, seed), method="kd")
        tc.train_logits(tdir, data, pick_device())
    return str(tdir)


def _tokenized(sweep: SweepConfig, task: str, home: str) -> dict:
    from ikd_sweep.data import tokenize_splits
    from ikd_sweep.models import load_tokenizer
    from ikd_sweep.tasks import get_task

    return tokenize_splits(get_task(task), sweep.data, load_tokenizer(sweep.teacher.model),
                           Path(home) / "cache" / "data")


@dataclass
class SweepOutcome:
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)    # trial_id -> error
    stopped: list[str] = field(default_factory=list)        # early-stopped by the scheduler
    confirm: list[str] = field(default_factory=list)        # confirmation trial ids
    interrupted: bool = False
    parent_run_id: str = ""


def _interrupt_sentinel(signum, frame):  # pragma: no cover - replaced by Ray during fit
    raise KeyboardInterrupt


def init_ray(address: str | None) -> str:
    """Join the cluster at `address` (e.g. auto, HOST:6379) or start a local Ray."""
    if not ray.is_initialized():
        # A Ray this driver starts listens on loopback only and runs no dashboard; a cluster
        # it joins keeps its own settings.
        extra = {} if address else {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        ray.init(address=address, log_to_driver=True, configure_logging=False, **extra)
    gcs = ray.get_runtime_context().gcs_address
    print(f"Ray: {'joined ' + gcs if address else 'local, at ' + gcs}; "
          f"{ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs", file=sys.stderr)
    return gcs


def _confirmations(sweep: SweepConfig, settings: list[dict[str, Any]]) -> list[Trial]:
    """Each setting (of a task and method still in the sweep) × `search.confirm_seeds`."""
    out: list[Trial] = []
    for st in settings:
        if st["task"] in sweep.tasks and st["method"] in sweep.methods:
            out += confirm_trials(sweep, st["task"], st["method"], st)
    return list(dict.fromkeys(out))


def selected_settings(sweep: SweepConfig, tracking_uri: str) -> list[dict[str, Any]]:
    """The report's own selection per (task, method): `ikd-control` is ikd with teacher_lr 0."""
    from analysis.collect import collect
    from analysis.tables import build_report

    runs = collect(sweep.name, tracking_uri)
    selected = build_report(runs.runs, runs.expected, sweep.name).selected
    return [{**row, "method": row.get("base_method") or row["method"]}
            for row in selected.to_dict("records")]


def run_sweep(sweep: SweepConfig, *, home: Path, tracker: SweepTracker,
              address: str | None = None, restart: bool = False, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) both phases of `sweep`; return what happened to each trial."""
    search = expand_trials(sweep)
    home = home.resolve()
    # Checkpoints are small and frequent by design (one per evaluation); Ray's hint is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Training-curve reports carry no val/main; only evaluation reports do (ASHA skips others).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    storage = home / "ray" / sweep.name
    if restart and storage.exists():
        shutil.rmtree(storage)
    if restart:  # students an earlier run kept but never logged (its trials start over)
        shutil.rmtree(student_dir(home, sweep.name, "x").parent, ignore_errors=True)
    parent = tracker.start_sweep(sweep.name, sweep.model_dump(mode="json"), restart=restart)
    # Confirmation trials, once worked out, are part of the sweep: never chosen a second time.
    recorded = [d for d in tracker.expected_trials(parent) if d.get("phase") == "confirm"]
    confirm = _confirmations(sweep, recorded) if sweep.search.confirm_seeds else []
    tracker.set_expected_trials(parent, [t.to_dict() for t in search + confirm])
    out = SweepOutcome(parent_run_id=parent)
    init_ray(address)
    _run_phase(sweep, search, home, storage, tracker, parent, out, verbose)
    if sweep.search.confirm_seeds and not out.interrupted:
        if not confirm:
            confirm = _confirmations(sweep, selected_settings(sweep, tracker.tracking_uri))
            tracker.set_expected_trials(parent, [t.to_dict() for t in search + confirm])
        out.confirm = [t.trial_id for t in confirm]
        _run_phase(sweep, confirm, home, storage / "confirm", tracker, parent, out, verbose)
    try:
        if out.interrupted:
            tracker.mark_unfinished(parent, "KILLED")
        tracker.end_sweep(parent, "KILLED" if out.interrupted else
                          "FAILED" if out.failed else "FINISHED")
    except Exception as exc:  # the trials are done; the next run of the command sets it
        _log.warning("MLflow: could not record the end of the sweep: %s", exc)
    return out


def _run_phase(sweep: SweepConfig, trials: list[Trial], home: Path, storage: Path,
               tracker: SweepTracker, parent: str, out: SweepOutcome, verbose: int) -> None:
    from ikd_sweep.tracking import trial_tags

    res = {"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}
    prep = ray.remote(_prepare_teacher).options(num_cpus=res["CPU"], num_gpus=res["GPU"],
                                                max_retries=sweep.max_failures)
    # Only the search phase is early-stopped: a confirmation run is the measurement itself.
    asha = sweep.search.scheduler == "asha" and trials[0].phase == "search"
    for task in sweep.tasks:
        task_trials = [t for t in trials if t.task == task]
        # Teachers first (one per task and seed), one Ray task per seed, in parallel.
        seeds = sorted({t.seed for t in task_trials if t.method != "finetune"})
        futures = {s: prep.remote(sweep, task, s, str(home)) for s in seeds}
        bad_seeds: dict[int, str] = {}
        for s, f in futures.items():
            try:
                ray.get(f)
            except Exception as e:  # the task's teacher failed: its kd/ikd trials fail too
                bad_seeds[s] = f"teacher fine-tuning failed: {type(e).__name__}: {e}"
        runnable = []
        for t in task_trials:
            if t.method != "finetune" and t.seed in bad_seeds:
                run_id = tracker.trial_run(parent, t.trial_id, tags=trial_tags(sweep, t),
                                           params=flat_params(sweep, t))
                tracker.finish_trial(run_id, "FAILED", error=bad_seeds[t.seed],
                                     trial_config=trial_record(sweep, t))
                out.failed[t.trial_id] = bad_seeds[t.seed]
            else:
                runnable.append(t)
        groups = ([[t for t in runnable if t.method == m] for m in sweep.methods] if asha
                  else [runnable])
        splits = _tokenized(sweep, task, str(home)) if runnable else None
        for group in groups:
            if group and not out.interrupted:
                name = task if not asha else f"{task}-{group[0].method}"
                _run_tuner(sweep, group, home, storage / name, tracker, parent, out, verbose,
                           splits, asha)
        if out.interrupted:
            return


def _run_tuner(sweep: SweepConfig, trials: list[Trial], home: Path, path: Path,
               tracker: SweepTracker, parent: str, out: SweepOutcome, verbose: int,
               splits: dict | None, asha: bool) -> None:
    by_id = {t.trial_id: t for t in trials}
    done = frozenset(r["trial_id"] for r in tracker.child_runs(parent)
                     if r["status"] == "FINISHED" and r["trial_id"] in by_id)
    callback = TrackingCallback(tracker, parent, sweep, by_id, done)
    fn = tune.with_parameters(trainable, sweep=sweep, home=str(home), done=done,
                              trials={k: t.to_dict() for k, t in by_id.items()}, splits=splits)
    fn = tune.with_resources(fn, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    run_config = tune.RunConfig(
        name=path.name, storage_path=str(path.parent), verbose=verbose, callbacks=[_Forward()],
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    global _live
    _live = callback
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), fn, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = ASHAScheduler(time_attr=EVALS, grace_period=2, reduction_factor=2) \
            if asha else None
        tuner = tune.Tuner(
            fn,
            # The trial id is the only parameter: the trial table shows it, and the trainable
            # looks the trial up; grid_search over the expanded list never repeats a trial.
            param_space={"trial_id": tune.grid_search(list(by_id))},
            tune_config=tune.TuneConfig(
                # Selection data only: dev is never used to stop (or choose) anything.
                metric="val/main" if scheduler else None, mode="max" if scheduler else None,
                scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent_trials,
                reuse_actors=True, trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name),
            run_config=run_config,
        )
    # Ray swaps in its own SIGINT handler during fit and puts the previous one back after the
    # first Ctrl-C; finding our sentinel back afterwards means the user interrupted the sweep.
    previous = signal.signal(signal.SIGINT, _interrupt_sentinel)
    try:
        grid = tuner.fit()
    finally:
        interrupted = signal.getsignal(signal.SIGINT) is _interrupt_sentinel
        signal.signal(signal.SIGINT, previous)
    try:
        runs = {r["trial_id"]: r for r in tracker.child_runs(parent)}
    except Exception as exc:  # the tracking server is down: the outcome is Tune's alone
        _log.warning("MLflow: could not read the trials' runs: %s", exc)
        runs = {}
    for result in grid:
        # A trial that never started has no config; its folder is named after it.
        t = by_id[(result.config or {}).get("trial_id") or Path(result.path).name]
        m, run = result.metrics or {}, runs.get(t.trial_id)
        if result.error is not None:
            out.failed[t.trial_id] = (callback.errors.get(t.trial_id)
                                      or (run or {}).get("error") or str(result.error))
        elif m.get(DONE_KEY):
            out.finished.append(t.trial_id)
            drop_checkpoints(Path(result.path))  # also when the driver missed the completion
            final = (m.get(REPORT) or {}).get("metrics")
            if run and run["status"] != "FINISHED" and final:
                # Tune saved the trial as done but the driver died before MLflow heard of it.
                keep_student(tracker, run["run_id"], final)
                tracker.finish_trial(run["run_id"], "FINISHED", final_metrics=final,
                                     trial_config=trial_record(sweep, t))
        elif not interrupted and asha:
            out.stopped.append(t.trial_id)  # early-stopped: record it as such, not as running
            if run and run["status"] == "RUNNING":
                tracker.finish_trial(run["run_id"], "KILLED",
                                     error="stopped early by the asha scheduler")
        else:
            interrupted = True
    out.interrupted = out.interrupted or interrupted
