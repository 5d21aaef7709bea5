"""Ray Tune: sweep -> trials, the trainable, Tuner build/restore, the tracking callback.

The only module that imports Ray. Trials only `tune.report`: training curves at `log_every`,
evaluations with their checkpoints, the final result. `TrackingCallback`, on the driver, hands
every report to the `tracking.SweepTracker`, so a sweep's store has one writer.

A sweep runs in two phases. Search: every trial of the sweep file. Confirmation (when
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

import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater, Searcher
from ray.tune.search.repeater import TRIAL_INDEX

from ikd_sweep.config import SweepConfig
from ikd_sweep.files import sweep_lock
from ikd_sweep.trials import (
    Study,
    Trial,
    confirm_trials,
    expand_trials,
    flat_params,
    optuna_studies,
    trial_record,
)

if TYPE_CHECKING:  # Ray workers never import MLflow: only the driver records
    from ikd_sweep.tracking import SweepTracker

_log = logging.getLogger(__name__)

REPORT = "ikd"  # a trial's report: {"ikd": {"kind", "step", "time_ms", "metrics"|"error"}}
DONE_KEY = "ikd_done"  # present in a trial's last report only when the trial completed
EVALS = "ikd_evals"  # evaluations so far: ASHA's time axis (evaluation reports only)
# What search.algorithm optuna maximises, top level in a trial's final report: the selection
# metric of the comparison protocol (selection data), never dev.
OBJECTIVE = "sel/val_main"


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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def describe_error(exc: BaseException) -> str:
    """Plain text, root cause first: the original exception inside Ray's or Tune's wrappers,
    its message, then the traceback (no terminal colour codes)."""
    root, seen = exc, set()
    while id(root) not in seen:  # RayTaskError.cause, TuneError's __cause__
        seen.add(id(root))
        inner = getattr(root, "cause", None) or root.__cause__
        if not isinstance(inner, BaseException):
            break
        root = inner
    if isinstance(root, OSError) and root.errno == errno.ENOSPC:
        where = f" (writing {root.filename})" if root.filename else ""
        head = (f"OSError: no space left on device{where}; free space and re-run the same "
                "command")
    else:
        head = f"{type(root).__name__}: {str(root).strip()}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return _ANSI.sub("", f"{head}\n\n{tb}").strip()


def _teacher_first(sweep: SweepConfig, trial: Trial, home: str, attempt: str | None) -> None:
    """Fine-tune (or wait for) this trial's teacher, reporting each epoch to Tune."""
    from ikd_sweep import teacher as tc

    def progress(info: dict[str, Any]) -> None:
        _report({"kind": "teacher", "step": 0, "metrics": info})

    tc.ensure_teacher(sweep, trial.task, trial.seed, Path(home), progress=progress,
                      attempt=attempt)


def trainable(config: dict, *, sweep: SweepConfig, home: str, trials: dict[str, dict],
              done: frozenset[str], splits: dict | None = None,
              attempt: str | None = None) -> None:
    """One Ray Tune trial: its teacher if not cached yet, the trainer; all reported to Tune
    (the driver records it). `attempt` identifies the driver's run (teacher failures)."""
    from ikd_sweep.trial import run_trial

    if config["trial_id"] in done:  # FINISHED in MLflow already: never train it twice
        _report({"kind": "recorded", "step": 0, "metrics": {}}, {DONE_KEY: 1})
        return
    from ikd_sweep.trainer import describe_device, pick_device

    # The driver cannot see the worker's hardware: the trial says where it trains.
    _report({"kind": "device", "step": 0, "device": describe_device(pick_device())})
    # An optuna trial is not in `trials` (chosen during the run): its config is its Trial.
    trial = Trial.from_dict(trials.get(config["trial_id"]) or config)
    ckpt = tune.get_checkpoint()
    if ckpt is not None and Path(ckpt.path).is_dir() and not any(
            not p.name.startswith(".") for p in Path(ckpt.path).iterdir()):
        ckpt = None  # emptied by drop_checkpoints, yet not FINISHED in MLflow: start over
    reporter = _Reporter((ckpt.get_metadata() or {}).get(EVALS, 0) if ckpt else 0)
    work = Path(tempfile.mkdtemp(prefix=f"ikd-{trial.trial_id}-"))
    # On the working folder's (shared) storage, so the driver can log it to MLflow.
    student = student_dir(Path(home), sweep.name, trial.trial_id)
    try:
        if trial.method != "finetune":
            _teacher_first(sweep, trial, home, attempt)
        with (ckpt.as_directory() if ckpt else nullcontext()) as resume_dir:
            final = run_trial(sweep, trial, home=Path(home), callback=reporter,
                              checkpoint_dir=work / "checkpoint",
                              resume_from=Path(resume_dir) if resume_dir else None,
                              splits=splits, student_dir=student)
    except Exception as e:
        _report({"kind": "error", "step": 0, "error": describe_error(e)})
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if student.is_dir():
        final = {**final, "student_dir": str(student)}
    objective = final.get(OBJECTIVE)
    _report({"kind": "final", "step": int(final.get("steps", 0)), "metrics": final},
            {DONE_KEY: 1, **({OBJECTIVE: objective} if objective is not None
                             and math.isfinite(objective) else {})})


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
        if tid in self.done or rep.get("kind") in (None, "recorded", "teacher"):
            return
        if tid not in self.runs:  # its start could not be recorded: try again now
            self.on_trial_start(iteration, trials, trial)
        run_id = self.runs[tid]
        if rep["kind"] == "device":
            from ikd_sweep.tracking import device_tags

            self.tracker.set_tags(run_id, device_tags(rep["device"]))
            return
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
            error = trial.get_error()
            self.errors[tid] = self.errors.get(tid) or (describe_error(error) if error
                                                        else "trial failed")
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
# Other driver-side consumers of the same events (the CLI's live view, progress.SweepView):
# objects with on_trial_start/result/complete/error(**kw), and optionally expect(trials),
# called before each Tuner with the trials it runs. Their failures never end the sweep.
_listeners: list[Any] = []


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
                             (kw["trial"].config or {}).get("trial_id"), exc)
        for listener in _listeners:
            if hasattr(listener, hook):
                try:
                    getattr(listener, hook)(**kw)
                except Exception as exc:  # a display must never end the sweep
                    _log.warning("%s.%s failed: %s", type(listener).__name__, hook, exc)

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


class ResourceError(ValueError):
    """A trial asks for more than any node of the cluster has."""


def quiet_ray(verbose: int) -> None:
    """verbose 0: Ray's and Tune's own messages off (warnings and errors still show), so the
    driver's output is the live view (Tune's verbose 0 also drops its tables and TensorBoard
    hint); 1+: Tune's tables and Ray's logs as Ray prints them."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # Tune's new output engine prints its config box and TensorBoard hint even at verbose
        # 0; its legacy engine at verbose 0 prints nothing.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Its one warning at start-up says that token authentication is on: the safe default.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.WARNING if verbose else logging.ERROR)


def init_ray(address: str | None, verbose: int = 0) -> str:
    """Join the cluster at `address` (e.g. auto, HOST:6379) or start a local Ray."""
    quiet_ray(verbose)
    if not ray.is_initialized():
        # A local Ray runs no dashboard. Its gRPC servers listen on all interfaces (Ray has no
        # setting to bind them to loopback; README, "Ray"); its token authentication is on.
        # Workers' prints reach the driver only with --verbose: the live view replaces them.
        extra = {} if address else {"include_dashboard": False}
        ray.init(address=address, log_to_driver=verbose > 0, configure_logging=False,
                 **({} if verbose else {"logging_level": logging.WARNING}), **extra)
    gcs = ray.get_runtime_context().gcs_address
    print(f"Ray: {'joined ' + gcs if address else 'local, at ' + gcs}; "
          f"{ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs", file=sys.stderr)
    return gcs


def check_resources(sweep: SweepConfig, joined: bool) -> None:
    """Raise `ResourceError` when no node can hold one trial: Tune would wait forever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for field_, key, unit in (("cpu", "CPU", "CPUs"), ("gpu", "GPU", "GPUs")):
        need = float(getattr(sweep.resources, field_) or 0)
        biggest = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if need > biggest:
            total = sum(n.get(key, 0.0) for n in nodes)
            where = (f"the cluster has {total:g} {unit}" if len(nodes) <= 1 else
                     f"the largest of the cluster's {len(nodes)} nodes has {biggest:g} {unit} "
                     f"({total:g} in all)")
            hint = (" (a joined cluster: nodes an autoscaler has not started yet do not count; "
                    "start one that large first)" if joined else "")
            raise ResourceError(f"resources.{field_}: {need:g} requested per trial; {where}"
                                f"{hint}; lower resources.{field_} in the sweep file")


def _ray_record(home: Path, sweep: str) -> Path:
    return home / "ray" / f"{sweep}.session.json"


def _own_processes(session: str, raylet: int | None) -> list[int]:
    """PIDs of this user's processes of one Ray session (Linux /proc): its command line names
    the session folder (GCS, raylet, monitors), or its environment names the session's raylet
    (agents and workers, which rename themselves `ray::...`)."""
    tag = f"RAY_RAYLET_PID={raylet}\0".encode() if raylet else None
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid() or int(proc.name) == os.getpid():
                continue
            if session.encode() in (proc / "cmdline").read_bytes() or (
                    tag and tag in (proc / "environ").read_bytes()):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def cleanup_leftover_ray(home: Path, sweep: str) -> int:
    """End the Ray processes (raylet, GCS, agents) a killed earlier driver of this sweep left;
    only those of the session it recorded. Call with the sweep's lock held. Returns a count."""
    record = _ray_record(home, sweep)
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return 0
    session = str(info.get("session_dir") or "")
    pids = _own_processes(session, info.get("raylet")) if "session_" in session else []
    found = len(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + 10
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if "Z" not in _proc_state(pid)]
        if pids:
            time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if found:
        print(f"Ray: ended {found} processes left by a killed earlier run of {sweep}",
              file=sys.stderr)
    record.unlink(missing_ok=True)
    return found


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _record_ray_session(home: Path, sweep: str) -> None:
    try:
        node = ray._private.worker._global_node
        session = node.get_session_dir_path()
        raylet = node.all_processes["raylet"][0].process.pid
    except Exception:  # a private API: without it the next start cleans nothing up
        return
    record = _ray_record(home, sweep)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"session_dir": session, "raylet": raylet,
                                  "driver": os.getpid()}))


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
              address: str | None = None, restart: bool = False, verbose: int = 0) -> SweepOutcome:
    """Run (or resume) both phases of `sweep`; return what happened to each trial.

    Raises `files.SweepBusy` when another process runs this sweep in `home`, `ResourceError`
    when no node can hold a trial (both before the parent run is touched)."""
    home = home.resolve()
    with sweep_lock(home, sweep.name):
        if not address:
            cleanup_leftover_ray(home, sweep.name)
        started = not ray.is_initialized()
        try:
            init_ray(address, verbose)
            if started and not address:
                _record_ray_session(home, sweep.name)
            check_resources(sweep, joined=bool(address))
            return _run_sweep(sweep, home, tracker, restart, verbose)
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
                if not address:
                    _ray_record(home, sweep.name).unlink(missing_ok=True)


def _run_sweep(sweep: SweepConfig, home: Path, tracker: SweepTracker, restart: bool,
               verbose: int) -> SweepOutcome:
    search = expand_trials(sweep)
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
    out = SweepOutcome(parent_run_id=parent)
    status = "FAILED"  # whatever ends this function, the parent never stays RUNNING
    try:
        # Confirmation trials, once worked out, are part of the sweep: never chosen again.
        recorded = [d for d in tracker.expected_trials(parent) if d.get("phase") == "confirm"]
        confirm = _confirmations(sweep, recorded) if sweep.search.confirm_seeds else []
        tracker.set_expected_trials(parent, _keep_suggested(tracker, parent, search + confirm))
        # Teacher failures are remembered for this run only: the next run retries them.
        attempt = f"{os.getpid()}-{time.time_ns()}"
        _run_phase(sweep, search, home, storage, tracker, parent, out, verbose, attempt)
        if not out.interrupted:
            _run_studies(sweep, home, storage, tracker, parent, out, verbose, attempt)
        if sweep.search.confirm_seeds and not out.interrupted:
            if not confirm:
                confirm = _confirmations(sweep, selected_settings(sweep, tracker.tracking_uri))
                tracker.set_expected_trials(parent, _keep_suggested(tracker, parent,
                                                                    search + confirm))
            out.confirm = [t.trial_id for t in confirm]
            _run_phase(sweep, confirm, home, storage / "confirm", tracker, parent, out,
                       verbose, attempt)
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


def _run_phase(sweep: SweepConfig, trials: list[Trial], home: Path, storage: Path,
               tracker: SweepTracker, parent: str, out: SweepOutcome, verbose: int,
               attempt: str) -> None:
    if not trials:  # e.g. an optuna sweep without fixed settings: _run_studies runs it all
        return
    # Only the search phase is early-stopped: a confirmation run is the measurement itself.
    asha = sweep.search.scheduler == "asha" and trials[0].phase == "search"
    for task in sweep.tasks:
        task_trials = _grid_order([t for t in trials if t.task == task])
        groups = ([[t for t in task_trials if t.method == m] for m in sweep.methods] if asha
                  else [task_trials])
        splits = _tokenized(sweep, task, str(home)) if task_trials else None
        for group in groups:
            if group and not out.interrupted:
                name = task if not asha else f"{task}-{group[0].method}"
                _run_tuner(sweep, group, home, storage / name, tracker, parent, out, verbose,
                           splits, asha, attempt)
        if out.interrupted:
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
        _set_aside(path, _ANSI.sub("", str(exc)).splitlines()[0] if str(exc) else
                   type(exc).__name__)
        return None


def _run_tuner(sweep: SweepConfig, trials: list[Trial], home: Path, path: Path,
               tracker: SweepTracker, parent: str, out: SweepOutcome, verbose: int,
               splits: dict | None, asha: bool, attempt: str, study: Study | None = None
               ) -> None:
    """One Tuner: a grid over `trials`, or (`study`) num_samples x seeds trials an optuna
    searcher chooses; a trial whose MLflow run is FINISHED is never trained again."""
    by_id = {t.trial_id: t for t in trials}
    done = frozenset(r["trial_id"] for r in tracker.child_runs(parent)
                     if r["status"] == "FINISHED" and (study or r["trial_id"] in by_id))
    callback = (_SuggestedTracking if study else TrackingCallback)(tracker, parent, sweep,
                                                                    by_id, done)
    fn = tune.with_parameters(trainable, sweep=sweep, home=str(home), done=done,
                              trials={k: t.to_dict() for k, t in by_id.items()}, splits=splits,
                              attempt=attempt)
    fn = tune.with_resources(fn, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    run_config = tune.RunConfig(
        name=path.name, storage_path=str(path.parent), verbose=verbose, callbacks=[_Forward()],
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    global _live
    _live = callback
    for listener in _listeners:
        if hasattr(listener, "expect"):
            listener.expect(trials)
    ids = [f"optuna:{study.name}"] if study else list(by_id)
    tuner = restored = _restore(path, fn, ids)
    if tuner is None and study is not None:
        tuner = tune.Tuner(
            fn,
            param_space={},  # the searcher's own space (optuna distributions)
            tune_config=tune.TuneConfig(
                search_alg=optuna_searcher(sweep, study),
                num_samples=sweep.search.num_samples * len(sweep.search.seeds),
                max_concurrent_trials=sweep.max_concurrent_trials, reuse_actors=True,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=run_config)
    elif tuner is None:
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
    if restored is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(f".{path.name}.trials.json").write_text(json.dumps(ids))
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
    for i in range(len(grid)):
        try:
            result = grid[i]
            # A trial that never started has no config; its folder is named after it. A
            # searcher's trial always has its config: its Trial's dict.
            t = (by_id.get((result.config or {}).get("trial_id") or Path(result.path).name)
                 or Trial.from_dict(result.config))
            m, run, error = result.metrics or {}, runs.get(t.trial_id), result.error
        except Exception as exc:  # e.g. an error.pkl Ray could not write in full
            _log.warning("Tune: result %d of %s unreadable: %s", i, path.name, exc)
            continue
        if error is not None:
            out.failed[t.trial_id] = (callback.errors.get(t.trial_id)
                                      or (run or {}).get("error") or describe_error(error))
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


# ------------------------------------------------------------------ search.algorithm: optuna
# One Tuner per Study (a searched (task, method), see trials.optuna_studies), after the fixed
# trials of the search phase, under <home>/ray/<sweep>/<study name>. The searcher chain is
# _SeedRepeater(_Distinct(OptunaSearch)); Tune checkpoints each link's state with the
# experiment, so Tuner.restore resumes the search where it stopped.

SUGGESTED = "suggested"  # marks a trial in trials.json that a searcher chose during the run
_REDRAWS = 100  # repeats in a row after which a study's space counts as exhausted


class _Distinct(Searcher):
    """Between the Repeater and OptunaSearch: a suggestion that rounds to a setting already
    suggested (small integer ranges) is told back as pruned and drawn again, so a trial id
    never repeats; after `_REDRAWS` repeats in a row the study ends with fewer settings."""

    def __init__(self, searcher: Searcher, study: Study) -> None:
        self.searcher, self.study = searcher, study
        self._inner: dict[str, str] = {}  # Tune's trial id -> the id the searcher knows
        self._seen: set[str] = set()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def suggest(self, trial_id: str) -> dict | str | None:
        for k in range(_REDRAWS):
            inner = trial_id if k == 0 else f"{trial_id}~{k}"
            config = self.searcher.suggest(inner)
            if not isinstance(config, dict):
                return config
            key = self.study.trial(config, 0).trial_id
            if key not in self._seen:
                self._seen.add(key)
                self._inner[trial_id] = inner
                return config
            self.searcher.on_trial_complete(inner, result=None)  # pruned: it learns nothing
        _log.warning("optuna: %s has no new setting after %d draws; it ends with %d settings",
                     self.study.name, _REDRAWS, len(self._seen))
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.searcher.on_trial_complete(self._inner.pop(trial_id, trial_id), result=result,
                                        error=error)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def get_state(self) -> dict:
        return {"_inner": self._inner, "_seen": self._seen}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


class _SeedRepeater(Repeater):
    """Ray Tune's Repeater with repeat i run on sweep seed `seeds[i]`: the searcher sees the
    mean of OBJECTIVE over a setting's seeds (nanmean: a failed seed leaves it out). A trial's
    config is its Trial's dict, trial id included, so it is tracked like a grid trial."""

    def __init__(self, searcher: Searcher, study: Study, seeds: list[int]) -> None:
        super().__init__(searcher, repeat=len(seeds))
        self.study, self.seeds = study, list(seeds)

    def suggest(self, trial_id: str) -> dict | str | None:
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        seed = self.seeds[config.pop(TRIAL_INDEX)]
        return self.study.trial(config, seed).to_dict()


def optuna_searcher(sweep: SweepConfig, study: Study) -> Searcher:
    """The search algorithm of one study: Optuna's TPE (seeded by sweep and study) over the
    study's ranges, temperature uniform, teacher_lr log-uniform, exam_every integers, each
    suggested setting repeated on every seed of `search.seeds`."""
    from optuna.distributions import FloatDistribution, IntDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = {h: IntDistribution(int(lo), int(hi)) if h == "exam_every"
             else FloatDistribution(lo, hi, log=h == "teacher_lr")
             for h, lo, hi in study.ranges}
    seed = zlib.crc32(f"{sweep.name}/{study.name}/{sweep.train.seed_base}".encode())
    inner = OptunaSearch(space=space, metric=OBJECTIVE, mode="max", seed=seed)
    return _SeedRepeater(_Distinct(inner, study), study, sweep.search.seeds)


def _keep_suggested(tracker: SweepTracker, parent: str, planned: list[Trial]) -> list[dict]:
    """`planned` as trials.json entries, plus the suggested trials recorded so far, which a
    rewrite of the plan must not forget."""
    ids = {t.trial_id for t in planned}
    kept = [d for d in tracker.expected_trials(parent)
            if d.get(SUGGESTED) and d["trial_id"] not in ids]
    return [t.to_dict() for t in planned] + kept


class _SuggestedTracking(TrackingCallback):
    """TrackingCallback for trials a searcher chooses: each is added to trials.json (the
    report's plan) and gets its MLflow run when it starts."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.config["trial_id"]
        if tid not in self.trials:
            self.trials[tid] = Trial.from_dict(trial.config)
            entries = self.tracker.expected_trials(self.parent)
            if tid not in {d.get("trial_id") for d in entries}:
                self.tracker.set_expected_trials(
                    self.parent, [*entries, {**self.trials[tid].to_dict(), SUGGESTED: True}])
        super().on_trial_start(iteration, trials, trial, **info)


def _run_studies(sweep: SweepConfig, home: Path, storage: Path, tracker: SweepTracker,
                 parent: str, out: SweepOutcome, verbose: int, attempt: str) -> None:
    splits: dict[str, dict] = {}
    for study in optuna_studies(sweep):
        if out.interrupted:
            return
        if study.task not in splits:
            splits[study.task] = _tokenized(sweep, study.task, str(home))
        _run_tuner(sweep, [], home, storage / study.name, tracker, parent, out, verbose,
                   splits[study.task], False, attempt, study=study)
