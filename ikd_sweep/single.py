"""`ikd-sweep train`: one trial of a sweep without Ray, with a progress bar, a JSON-lines
metrics log under `<home>/single/<sweep>/<trial>/` and, unless --no-track, its MLflow run
(parent run `<sweep>-train`, recorded through the same `TrialRecorder` as a sweep's trials)."""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ikd_sweep.config import SweepConfig
from ikd_sweep.home import Home
from ikd_sweep.names import BEST_DEV, DEV
from ikd_sweep.trials import Trial, trial_seed


class _ProgressCallback:
    """Trainer callback: a progress bar, a JSON-lines metrics log and, when tracked, the
    trial's run."""

    def __init__(self, progress: Progress, task_id: Any, log_path: Path,
                 track: Callable[[dict, int], None] | None) -> None:
        self.progress, self.task_id, self.log_path = progress, task_id, log_path
        self.track = track

    def _write(self, metrics: dict, step: int) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.track is not None:
            self.track(metrics, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._write(metrics, step)
        loss = metrics.get("train/loss")
        self.progress.update(self.task_id, completed=step,
                             info="" if loss is None else f"loss {loss:.4f}")

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        self._write(metrics, step)
        if DEV in metrics:
            self.progress.console.print(f"step {step}: {DEV} {metrics[DEV]:.4f}"
                                        f" (best {metrics.get(BEST_DEV, 0):.4f})")


def _train_steps(cfg: SweepConfig, trial: Trial, root: Path) -> tuple[int, dict]:
    """The trial's number of optimizer steps (the bar's total), and its tokenized splits, which
    the trial then reuses instead of reading the cache again."""
    from ikd_sweep.data import prepare_data, tokenize_splits
    from ikd_sweep.models import load_tokenizer
    from ikd_sweep.tasks import get_task
    from ikd_sweep.trainer import FitSettings, total_steps

    cache, tok = Home(root).data_cache, load_tokenizer(cfg.teacher.model)
    splits = tokenize_splits(get_task(trial.task), cfg.data, tok, cache)
    data = prepare_data(trial.task, cfg.data, tok, cache, trial_seed(cfg, trial), splits,
                        method=trial.method)
    return total_steps(FitSettings.for_trial(cfg, trial), len(data.train)), splits


def _recorder(cfg: SweepConfig, trial: Trial, uri: str, device: str | None,
              err: Console) -> Any:
    """The recorder of the trial's run, started (imported here: `train --no-track` runs where
    mlflow is not installed)."""
    from ikd_sweep.tracking import SweepTracker, TrialRecorder
    from ikd_sweep.trainer import describe_device, pick_device

    tracker = SweepTracker(uri, cfg.experiment)
    parent = tracker.start_sweep(f"{cfg.name}-train", cfg.model_dump(mode="json"))
    recorder = TrialRecorder(tracker, parent, cfg)
    run_id = recorder.start(trial)
    err.print(f"tracking: run {run_id} in experiment {cfg.experiment} at {tracker.tracking_uri}")
    recorder.device(trial, describe_device(pick_device(device)))
    return recorder


def train_one(cfg: SweepConfig, trial: Trial, root: Path, *, device: str | None, resume: bool,
              tracking_uri: str | None, err: Console) -> dict[str, Any]:
    """Train `trial`; return what `train` prints (trial_id, status, error, final metrics).
    `tracking_uri` None: no MLflow. Raises KeyboardInterrupt after recording it."""
    from ikd_sweep.trainer import NonFiniteLoss
    from ikd_sweep.trial import run_trial

    run_dir = Home(root).single(cfg.name, trial.trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint"
    resume_from = ckpt if resume and (ckpt / "state.pt").exists() else None
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "trial.json").write_text(json.dumps(
        {**trial.to_dict(), "sweep": cfg.model_dump(mode="json")}, indent=1))
    err.print(f"trial {trial.trial_id} → {run_dir}")
    recorder = None if tracking_uri is None else _recorder(cfg, trial, tracking_uri, device,
                                                           err)
    status, result, error = "FINISHED", {}, None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                  "/{task.total}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=err) as progress:
        bar = progress.add_task(trial.trial_id, total=None, info="")
        track = None if recorder is None else (
            lambda metrics, step: recorder.metrics(trial, metrics, step))
        cb = _ProgressCallback(progress, bar, run_dir / "metrics.jsonl", track)
        try:
            total, splits = _train_steps(cfg, trial, root)
            progress.update(bar, total=total)
            result = run_trial(cfg, trial, home=root, callback=cb, checkpoint_dir=ckpt,
                               resume_from=resume_from, device=device, splits=splits,
                               student_dir=run_dir / "student")
        except NonFiniteLoss as e:
            status, error = "FAILED", str(e)
        except KeyboardInterrupt:
            if recorder is not None:
                recorder.finish(trial, "KILLED")
            err.print(f"interrupted; resume with --resume (checkpoint: {ckpt})")
            raise
        except Exception as e:
            if recorder is not None:
                recorder.finish(trial, "FAILED", error=f"{type(e).__name__}: {e}\n\n"
                                f"{traceback.format_exc(limit=8)}")
            raise
    if status == "FINISHED":
        # The resumable state is for an unfinished trial only; the student folder stays.
        shutil.rmtree(ckpt, ignore_errors=True)
    if recorder is not None:
        if status == "FINISHED":
            recorder.keep_student(trial, run_dir / "student")
        recorder.finish(trial, status, error=error,
                        final=result if status == "FINISHED" else None)
    out = {"trial_id": trial.trial_id, "status": status, **({"error": error} if error else {}),
           **result}
    (run_dir / "final_metrics.json").write_text(json.dumps(out, indent=1))
    return out
