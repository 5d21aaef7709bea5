"""On the driver: Tune's trial events into the store (through `tracking.TrialRecorder`) and to
the listeners the caller passed in (the CLI's live view).

Tune pickles a Tuner's callbacks with its state and hands them back on restore, so the callback
it holds (`Forward`) is stateless; `forwarding(targets)` names, for the duration of one
`Tuner.fit`, the live objects it hands each event to. A failure of a target is a warning: it
never ends the sweep.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from ikd_sweep.home import Home
from ikd_sweep.sweep.events import (
    DEVICE,
    ERROR,
    FINAL,
    RECORDED,
    TEACHER,
    describe_error,
    report_of,
)
from ikd_sweep.tracking import TrialRecorder, load_trials
from ikd_sweep.trials import Trial

_log = logging.getLogger(__name__)

SUGGESTED = "suggested"  # marks a trial in trials.json that a searcher chose during the run


def keep_suggested(recorder: TrialRecorder, planned: Sequence[Trial]) -> list[dict]:
    """`planned` as trials.json entries, plus the suggested trials recorded so far, which a
    rewrite of the plan must not forget."""
    ids = {t.trial_id for t in planned}
    kept = [d for d in load_trials(recorder.tracker.client, recorder.parent)
            if d.get(SUGGESTED) and d["trial_id"] not in ids]
    return [t.to_dict() for t in planned] + kept


def drop_checkpoints(trial_path: Path) -> None:
    """Empty a finished trial's Tune checkpoints: resumable state (optimizer states of student
    and teacher, RNG) that only an unfinished trial needs. The folders and Tune's own dotfiles
    stay: a driver killed before Tune saved the trial as finished restores it from there on the
    next run, and the trainable then finds it FINISHED in MLflow and trains nothing."""
    for ckpt in trial_path.glob("checkpoint_*"):
        for item in ckpt.iterdir() if ckpt.is_dir() else ():
            if not item.name.startswith("."):
                shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)


class Recording:
    """One Tuner's trials into the store: a run per trial, every report at its own step, the
    kept student and the end. `done`: trials FINISHED in the store before this Tuner (the
    trainable skips them; nothing is recorded again). Trials a searcher chooses (not in
    `trials`) are added to trials.json as they start."""

    def __init__(self, recorder: TrialRecorder, home: Path, trials: dict[str, Trial],
                 done: frozenset[str]) -> None:
        self.recorder, self.home, self.trials, self.done = recorder, home, trials, done
        self.final: dict[str, dict] = {}
        self.errors: dict[str, str] = {}  # trial_id -> its error, as the worker described it

    def _trial(self, trial: Any) -> Trial:
        tid = trial.config["trial_id"]
        if tid not in self.trials:  # chosen by a searcher: its config is its Trial
            self.trials[tid] = Trial.from_dict(trial.config)
            entries = load_trials(self.recorder.tracker.client, self.recorder.parent)
            if tid not in {d.get("trial_id") for d in entries}:
                self.recorder.tracker.set_expected_trials(
                    self.recorder.parent, [*entries, {**self.trials[tid].to_dict(),
                                                      SUGGESTED: True}])
        return self.trials[tid]

    def on_trial_start(self, trial: Any, **_: Any) -> None:
        if trial.config["trial_id"] not in self.done:
            self.recorder.start(self._trial(trial))

    def on_trial_result(self, trial: Any, result: dict, **_: Any) -> None:
        rep = report_of(result)
        kind = rep.get("kind")
        if trial.config["trial_id"] in self.done or kind in (None, RECORDED, TEACHER):
            return
        t = self._trial(trial)
        if kind == DEVICE:
            self.recorder.device(t, rep["device"])
        elif kind == ERROR:
            self.errors[t.trial_id] = rep["error"]
        elif kind == FINAL:  # recorded with the trial's end
            self.final[t.trial_id] = rep["metrics"]
        else:
            self.recorder.metrics(t, rep["metrics"], rep["step"], rep["time_ms"])

    def on_trial_complete(self, trial: Any, **_: Any) -> None:
        # Without a final result the trial was stopped (scheduler or Ctrl-C): the driver decides.
        tid = trial.config["trial_id"]
        if tid in self.final and tid not in self.done:
            self.finished(self._trial(trial), self.final[tid])
        if tid in self.final and trial.path:
            drop_checkpoints(Path(trial.path))

    def on_trial_error(self, trial: Any, **_: Any) -> None:
        tid = trial.config["trial_id"]
        if tid in self.done:
            return
        error = trial.get_error()
        self.errors[tid] = self.errors.get(tid) or (describe_error(error) if error
                                                    else "trial failed")
        self.recorder.finish(self._trial(trial), "FAILED", error=self.errors[tid])

    def finished(self, trial: Trial, final: dict[str, Any]) -> None:
        """Record a finished trial: its student (logged, then its local copy deleted: the bytes
        exist once, in the artifact store), its final metrics, FINISHED."""
        folder = Home(self.home).student(self.recorder.cfg.name, trial.trial_id)
        if self.recorder.keep_student(trial, folder):
            shutil.rmtree(folder, ignore_errors=True)
        self.recorder.finish(trial, "FINISHED", final=final)


_targets: list[Any] = []  # what Forward hands events to, during one fit (see the module doc)


@contextmanager
def forwarding(targets: Sequence[Any]) -> Iterator[None]:
    """Hand Tune's trial events to `targets` (objects with any of on_trial_start / _result /
    _complete / _error) while the block runs."""
    _targets[:] = targets
    try:
        yield
    finally:
        _targets.clear()


class Forward(tune.Callback):
    """What the Tuner stores with its state: a stateless stand-in for the targets."""

    def _call(self, hook: str, kw: dict) -> None:
        for target in list(_targets):
            if hasattr(target, hook):
                try:
                    getattr(target, hook)(**kw)
                except Exception as exc:  # recording or display: never ends the sweep
                    _log.warning("%s.%s of %s failed: %s", type(target).__name__, hook,
                                 (kw["trial"].config or {}).get("trial_id"), exc)

    def on_trial_start(self, **kw: Any) -> None:
        self._call("on_trial_start", kw)

    def on_trial_result(self, **kw: Any) -> None:
        self._call("on_trial_result", kw)

    def on_trial_complete(self, **kw: Any) -> None:
        self._call("on_trial_complete", kw)

    def on_trial_error(self, **kw: Any) -> None:
        self._call("on_trial_error", kw)
