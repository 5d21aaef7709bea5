"""Ray Tune: sweep -> param space, the trainable, Tuner build/restore, resources.

The only module that imports Ray. One Tuner per task (stored under
`<home>/ray/<sweep>/<task>`): a scheduler such as ASHA then compares trials of one task only,
and a task's teachers are fine-tuned (one Ray task per seed, in parallel) before its trials
start, so no trial waits on another trial's teacher. Re-running the same sweep restores each
Tuner: finished trials are not run again, unfinished ones continue from their last checkpoint.
The tokenized data and the sweep config travel once through Ray's object store
(`tune.with_parameters`), not pickled into every trial.

Every trial records itself in MLflow through `tracking.SweepTracker`: a trial whose MLflow run
is already FINISHED (e.g. it finished just before the driver was killed, after Tune's last
state save) reports its recorded metrics instead of training again.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ikd_sweep.config import SweepConfig
from ikd_sweep.tracking import SweepTracker
from ikd_sweep.trials import Trial, expand_trials, trial_seed

DONE_KEY = "ikd_done"  # present in a trial's last report only when the trial completed


def flat_params(cfg: SweepConfig, trial: Trial) -> dict[str, Any]:
    """The trial's flattened config: what MLflow records as params."""
    out: dict[str, Any] = {k: v for k, v in trial.to_dict().items() if v is not None}
    for section in ("data", "teacher", "student", "train", "ikd"):
        for k, v in getattr(cfg, section).model_dump(mode="json").items():
            if v is not None and v != {}:
                out[f"{section}.{k}"] = v
    out["sweep"] = cfg.name
    return out


def trial_tags(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    return {"ikd.sweep": cfg.name, "ikd.task": trial.task, "ikd.method": trial.method,
            "ikd.seed": str(trial.seed), "ikd.trial_id": trial.trial_id, "ikd.role": "trial"}


class _TuneCallback:
    """Trainer callback inside a Ray trial: MLflow for every metric, Tune at evaluations."""

    def __init__(self, tracker: SweepTracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)
        ckpt = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        tune.report({**metrics, "step": step}, checkpoint=ckpt)


def trainable(config: dict, *, sweep: SweepConfig, home: str, tracker: SweepTracker,
              parent_run_id: str, trials: dict[str, dict], splits: dict | None = None) -> None:
    """One Ray Tune trial: run the trainer, record it in MLflow, report to Tune."""
    from ikd_sweep.trial import run_trial

    trial = Trial.from_dict(trials[config["trial_id"]])
    done = tracker.finished_metrics(parent_run_id, trial.trial_id)
    if done is not None:  # already recorded as finished: never train (or record) it twice
        tune.report({**done, DONE_KEY: 1})
        return
    run_id = tracker.trial_run(parent_run_id, trial.trial_id, tags=trial_tags(sweep, trial),
                               params=flat_params(sweep, trial))
    ckpt = tune.get_checkpoint()
    work = Path(tempfile.mkdtemp(prefix=f"ikd-{trial.trial_id}-"))
    try:
        with (ckpt.as_directory() if ckpt else nullcontext()) as resume_dir:
            final = run_trial(sweep, trial, home=Path(home), callback=_TuneCallback(tracker,
                              run_id), checkpoint_dir=work / "checkpoint",
                              resume_from=Path(resume_dir) if resume_dir else None,
                              splits=splits)
    except Exception as e:
        tracker.finish_trial(run_id, "FAILED", error=f"{type(e).__name__}: {e}\n\n"
                             f"{traceback.format_exc(limit=8)}",
                             trial_config={**trial.to_dict(), "sweep": sweep.name})
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tracker.log_metrics(run_id, final, int(final.get("steps", 0)))
    tracker.finish_trial(run_id, "FINISHED", final_metrics=final,
                         trial_config={**trial.to_dict(), "sweep": sweep.name,
                                       "seed_used": trial_seed(sweep, trial)})
    tune.report({**final, "dev/main": final.get("final/dev_main"), DONE_KEY: 1})


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
    best: dict[tuple[str, str], float] = field(default_factory=dict)  # (task, method) -> dev
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


def run_sweep(sweep: SweepConfig, *, home: Path, tracker: SweepTracker,
              address: str | None = None, restart: bool = False, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) every trial of `sweep`; return what happened to each."""
    trials = expand_trials(sweep)
    home = home.resolve()
    # Checkpoints are small and frequent by design (one per evaluation); Ray's hint is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage = home / "ray" / sweep.name
    if restart and storage.exists():
        shutil.rmtree(storage)
    parent = tracker.start_sweep(sweep.name, sweep.model_dump(mode="json"),
                                 [t.to_dict() for t in trials], restart=restart)
    out = SweepOutcome(parent_run_id=parent)
    init_ray(address)
    res = {"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}
    prep = ray.remote(_prepare_teacher).options(num_cpus=res["CPU"], num_gpus=res["GPU"],
                                                max_retries=sweep.max_failures)
    for task in sweep.tasks:
        task_trials = [t for t in trials if t.task == task]
        # Teachers first, one Ray task per seed, in parallel.
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
                _record_failed(tracker, parent, sweep, t, bad_seeds[t.seed])
                out.failed[t.trial_id] = bad_seeds[t.seed]
            else:
                runnable.append(t)
        if runnable:
            _run_task(sweep, task, runnable, home, storage, tracker, parent, out, verbose)
        if out.interrupted:
            break
    if out.interrupted:
        tracker.mark_unfinished(parent, "KILLED")
    tracker.end_sweep(parent, "KILLED" if out.interrupted else
                      "FAILED" if out.failed else "FINISHED")
    return out


def _record_failed(tracker: SweepTracker, parent: str, sweep: SweepConfig, t: Trial,
                   error: str) -> None:
    run_id = tracker.trial_run(parent, t.trial_id, tags=trial_tags(sweep, t),
                               params=flat_params(sweep, t))
    tracker.finish_trial(run_id, "FAILED", error=error, trial_config=t.to_dict())


def _run_task(sweep: SweepConfig, task: str, trials: list[Trial], home: Path, storage: Path,
              tracker: SweepTracker, parent: str, out: SweepOutcome, verbose: int) -> None:
    by_id = {t.trial_id: t.to_dict() for t in trials}
    fn = tune.with_parameters(trainable, sweep=sweep, home=str(home), tracker=tracker,
                              parent_run_id=parent, trials=by_id,
                              splits=_tokenized(sweep, task, str(home)))
    fn = tune.with_resources(fn, {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    path = storage / task
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), fn, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = None
        if sweep.search.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=2,
                                      reduction_factor=2)
        tuner = tune.Tuner(
            fn,
            # The trial id is the only parameter: the trial table shows it, and the trainable
            # looks the trial up; grid_search over the expanded list never repeats a trial.
            param_space={"trial_id": tune.grid_search(list(by_id))},
            tune_config=tune.TuneConfig(
                metric="dev/main" if scheduler else None, mode="max" if scheduler else None,
                scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent_trials,
                reuse_actors=True, trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=task, storage_path=str(storage), verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    # Ray swaps in its own SIGINT handler during fit and puts the previous one back after the
    # first Ctrl-C; finding our sentinel back afterwards means the user interrupted the sweep.
    previous = signal.signal(signal.SIGINT, _interrupt_sentinel)
    try:
        grid = tuner.fit()
    finally:
        interrupted = signal.getsignal(signal.SIGINT) is _interrupt_sentinel
        signal.signal(signal.SIGINT, previous)
    runs = {r["trial_id"]: r for r in tracker.child_runs(parent)}
    for result in grid:
        t = Trial.from_dict(by_id[result.config["trial_id"]])
        m = result.metrics or {}
        if result.error is not None:
            out.failed[t.trial_id] = runs.get(t.trial_id, {}).get("error") or str(result.error)
        elif m.get(DONE_KEY):
            out.finished.append(t.trial_id)
            key = (t.task, t.method)
            out.best[key] = max(out.best.get(key, float("-inf")), m.get("best/dev_main", 0.0))
        elif not interrupted and sweep.search.scheduler != "none":
            out.stopped.append(t.trial_id)  # early-stopped: record it as such, not as running
            run = runs.get(t.trial_id)
            if run and run["status"] == "RUNNING":
                tracker.finish_trial(run["run_id"], "KILLED",
                                     error=f"stopped early by the {sweep.search.scheduler} "
                                     "scheduler")
        else:
            interrupted = True
    out.interrupted = out.interrupted or interrupted

