"""What a user watches: one compact view of a sweep (counts, best selected score per task and
method, ETA), live on the driver during `ikd-sweep run`, and once from the tracking store for
`ikd-sweep status`.

`SweepView` is a driver-side listener with the Tune callback hooks (the sweep driver hands it
every event; it never imports Ray). On a terminal it redraws in place (rich `Live`); otherwise
it prints one plain line when the counts or a best score change, or every `interval_s` while
trials report. A failed attempt of a trial is one line (its error's type and message; the whole
traceback is in the run's tag ikd.error). A trial's reports are read as the worker writes them
(`sweep.events`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ikd_sweep.names import SEL_DEV, SEL_VAL
from ikd_sweep.sweep.events import (
    ERROR,
    EVAL,
    FINAL,
    RECORDED,
    TEACHER,
    describe_error,
    error_line,
    report_of,
)

STATES = ("done", "running", "failed", "stopped", "pending")
# MLflow run status -> the view's state (KILLED: stopped early, or interrupted)
MLFLOW_STATES = {"FINISHED": "done", "RUNNING": "running", "SCHEDULED": "running",
                 "FAILED": "failed", "KILLED": "stopped"}


@dataclass
class TrialState:
    task: str | None = None
    method: str | None = None
    state: str = "pending"
    started: float | None = None  # seconds, on the view's clock
    seconds: float | None = None  # duration of a trial that ran to its end here
    sel_val: float | None = None  # sel/val_main: the trial's selected checkpoint's val score
    sel_dev: float | None = None  # ... and its dev score


@dataclass
class Snapshot:
    """A sweep's progress, however it was observed (live events or the tracking store)."""

    sweep: str
    trials: dict[str, TrialState] = field(default_factory=dict)
    total: int = 0
    eta_s: float | None = None
    status: str | None = None  # the parent run's status (status command only)

    def counts(self) -> dict[str, int]:
        n = {s: 0 for s in STATES}
        for t in list(self.trials.values()):  # a copy: the live view draws from its own thread
            n[t.state] += 1
        n["pending"] += max(0, self.total - len(self.trials))
        return n

    def best(self) -> dict[tuple[str, str], TrialState]:
        """Per (task, method), the trial with the highest sel/val_main so far."""
        out: dict[tuple[str, str], TrialState] = {}
        for t in list(self.trials.values()):
            if t.sel_val is not None and t.task and t.method:
                key = (t.task, t.method)
                if key not in out or t.sel_val > (out[key].sel_val or float("-inf")):
                    out[key] = t
        return out


def estimate_eta(durations: list[float], running_for: list[float], pending: int,
                 concurrency: int) -> float | None:
    """Seconds until the last trial ends: the mean finished trial's duration for each pending
    trial and for what a running one has left, shared by `concurrency` slots. None until a
    trial has finished."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    work = pending * mean + sum(max(0.0, mean - s) for s in running_for)
    return work / max(1, concurrency)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def summary_line(snap: Snapshot, eta: bool = True) -> str:
    """`demo: 3/10 done, 2 running, 1 failed, 0 stopped, 4 pending; ETA 4m10s`"""
    n = snap.counts()
    state = f" [{snap.status}]" if snap.status else ""
    eta = eta and snap.status in (None, "RUNNING")  # a sweep that ended has none
    eta = f"; ETA {_duration(snap.eta_s)}" if eta else ""
    return (f"{snap.sweep}{state}: {n['done']}/{snap.total} done, {n['running']} running, "
            f"{n['failed']} failed, {n['stopped']} stopped, {n['pending']} pending{eta}")


def _score(t: TrialState | None) -> str:
    if t is None or t.sel_val is None:
        return "-"
    dev = "-" if t.sel_dev is None else f"{t.sel_dev:.4f}"
    return f"{t.sel_val:.4f} (dev {dev})"


def best_table(snap: Snapshot) -> Table:
    """Task x method: the best sel/val_main so far and that trial's sel/dev_main."""
    best = snap.best()
    trials = list(snap.trials.values())
    tasks = list(dict.fromkeys(t.task for t in trials if t.task))
    methods = list(dict.fromkeys(t.method for t in trials if t.method))
    table = Table(title="best sel/val_main so far (its sel/dev_main)", title_justify="left",
                  box=None, pad_edge=False)
    table.add_column("task")
    for m in methods:
        table.add_column(m, justify="right")
    for task in tasks:
        table.add_row(task, *(_score(best.get((task, m))) for m in methods))
    return table


def render(snap: Snapshot) -> Group:
    return Group(Text(summary_line(snap)), best_table(snap))


def snapshot_from_store(progress: dict[str, Any], now_ms: float | None = None) -> Snapshot:
    """The view of `tracking.sweep_progress`'s answer: expected trials and their runs."""
    snap = Snapshot(progress["sweep"], status=progress["status"])
    for d in progress["expected"]:
        snap.trials[d["trial_id"]] = TrialState(task=d.get("task"), method=d.get("method"))
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    durations, running_for = [], []
    for r in progress["runs"]:
        t = snap.trials.setdefault(r["trial_id"], TrialState())
        t.task, t.method = r["task"] or t.task, r["method"] or t.method
        t.state = MLFLOW_STATES.get(r["status"], "running")
        t.sel_val, t.sel_dev = r["sel_val_main"], r["sel_dev_main"]
        if t.state == "done" and r["start_ms"] and r["end_ms"]:
            durations.append((r["end_ms"] - r["start_ms"]) / 1000)
        elif t.state == "running" and r["start_ms"]:
            running_for.append((now_ms - r["start_ms"]) / 1000)
    snap.total = len(snap.trials)
    snap.eta_s = estimate_eta(durations, running_for, snap.counts()["pending"],
                              len(running_for))
    return snap


class SweepView:
    """Driver-side listener: Tune's callback hooks in, the live view out.

    `expect(trials)` (the driver calls it before each Tuner) names the trials to come, with
    their task and method; `total` counts the sweep's trials of all phases
    (`trials.SweepPlan.total`)."""

    def __init__(self, sweep: str, total: int, *, console: Console | None = None,
                 interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console or Console(stderr=True)
        self.snap = Snapshot(sweep, total=total)
        self.interval_s, self.clock = interval_s, clock
        self.live: Live | None = None
        self._counts, self._bests, self._last_at = "", {}, float("-inf")
        self._printed = ""
        self._concurrency = 1
        self._failures: dict[str, str] = {}  # trial_id -> the failure line printed last

    # -- lifetime -----------------------------------------------------------------------------

    def __enter__(self) -> SweepView:
        if self.console.is_terminal:  # redraw in place; elsewhere (a log file) print lines
            self.live = Live(get_renderable=lambda: render(self._refresh()), console=self.console,
                             refresh_per_second=1, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        else:
            self._line(force=True)

    # -- what the sweep driver calls ---------------------------------------------------------

    def expect(self, trials: Iterable[Any]) -> None:
        for t in trials:
            st = self.snap.trials.setdefault(t.trial_id, TrialState())
            st.task, st.method = t.task, t.method
        self.snap.total = max(self.snap.total, len(self.snap.trials))

    def _trial(self, trial: Any) -> TrialState:
        return self.snap.trials.setdefault(trial.config["trial_id"], TrialState())

    def on_trial_start(self, trial: Any, **_: Any) -> None:
        t = self._trial(trial)
        if t.state not in ("done", "failed"):
            t.state = "running"
            t.started = t.started if t.started is not None else self.clock()
        running = sum(s.state == "running" for s in self.snap.trials.values())
        self._concurrency = max(self._concurrency, running)
        self._line()

    def on_trial_result(self, trial: Any, result: dict, **_: Any) -> None:
        t, rep = self._trial(trial), report_of(result)
        kind, m = rep.get("kind"), rep.get("metrics") or {}
        if kind == ERROR:
            self._failed(trial, rep.get("error"))
        elif kind == TEACHER:
            self._print(f"teacher {m.get('task')} seed {m.get('seed')}: epoch "
                        f"{m.get('epoch')}/{m.get('epochs')}, dev {m.get('dev_main', 0):.4f}")
        elif kind == RECORDED:  # finished by an earlier run of the command
            t.state, t.started = "done", None
        elif kind in (EVAL, FINAL):
            if math.isfinite(m.get(SEL_VAL, math.nan)):
                t.sel_val, t.sel_dev = m[SEL_VAL], m.get(SEL_DEV)
            if kind == FINAL:
                t.state = "done"
                if t.started is not None:
                    t.seconds = self.clock() - t.started
        self._line()

    def on_trial_complete(self, trial: Any, **_: Any) -> None:
        t = self._trial(trial)
        if t.state == "running":  # ended without its final report: stopped early
            t.state = "stopped"
        self._line()

    def on_trial_error(self, trial: Any, **_: Any) -> None:
        self._trial(trial).state = "failed"
        if trial.config["trial_id"] not in self._failures:  # died without reporting its error
            error = trial.get_error()
            self._failed(trial, describe_error(error) if error else None)
        self._line()

    def _failed(self, trial: Any, error: str | None) -> None:
        """One line per failure; a retry that fails the same way prints nothing new."""
        tid, line = trial.config["trial_id"], error_line(error)
        if self._failures.get(tid) != line:
            self._failures[tid] = line
            self._print(f"FAILED {tid}: {line}")

    # -- output --------------------------------------------------------------------------------

    def _refresh(self) -> Snapshot:
        now = self.clock()
        trials = list(self.snap.trials.values())
        self.snap.eta_s = estimate_eta(
            [t.seconds for t in trials if t.seconds is not None],
            [now - t.started for t in trials if t.state == "running" and t.started is not None],
            self.snap.counts()["pending"], self._concurrency)
        return self.snap

    def _print(self, line: str) -> None:
        # Above the live view on a terminal; a plain line otherwise. No markup: names are data.
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _line(self, force: bool = False) -> None:
        if self.live is not None:
            return
        snap = self._refresh()
        counts = summary_line(snap, eta=False)
        bests = {k: _score(t) for k, t in snap.best().items()}
        new = {k: v for k, v in bests.items() if self._bests.get(k) != v}
        due = self.clock() - self._last_at >= self.interval_s
        if force or new or due or counts != self._counts:
            self._counts, self._bests, self._last_at = counts, bests, self.clock()
            best = ", ".join(f"{task}/{m} {s}" for (task, m), s in new.items())
            line = summary_line(snap) + (f" | new best {best}" if best else "")
            if line != self._printed:  # e.g. the closing line, when nothing moved since
                self._printed = line
                self._print(line)
