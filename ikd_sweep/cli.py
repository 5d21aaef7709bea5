"""The `ikd-sweep` command line: validate, train, run, report, plan, export, ui.

Exit codes: 0 success, 2 bad input, 3 a sweep that finished with failed trials, 130 Ctrl-C.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ikd_sweep.config import (
    ConfigError,
    SweepConfig,
    check_search_value,
    default_home,
    load_sweep,
    parse_overrides,
)
from ikd_sweep.errors import StoreError, UserError
from ikd_sweep.trials import (
    HPARAMS,
    PickError,
    Trial,
    expand_trials,
    flat_params,
    optuna_studies,
    pick_trial,
    planned_trial_count,
    trial_record,
)

console = Console()
err = Console(stderr=True)

# OS errors that mean "this path cannot be used here" (a read-only or full disk, a file where a
# folder should be): the user's to fix, so one line and exit 2 rather than a traceback.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


_DEBUG = False  # set by the app's callback on every invocation (--debug)


def _debug() -> bool:
    return _DEBUG or os.environ.get("IKD_SWEEP_DEBUG", "") not in ("", "0")


class _Group(typer.core.TyperGroup):
    """The one place where errors become messages: a user's error is one or two lines and exit
    2; a bug keeps its traceback (`--debug` shows the traceback of both)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException,
                click.exceptions.Abort):
            raise
        except UserError as e:
            if _debug():
                raise
            lines = str(e).strip().splitlines() or [type(e).__name__]
            err.print(f"[red]error:[/red] {escape(lines[0])}", highlight=False, soft_wrap=True)
            for line in lines[1:]:
                err.print(line, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if _debug() or e.errno not in _USER_ERRNOS or not e.filename:
                _bug_hint(e)
                raise
            err.print(f"[red]error:[/red] {escape(str(e.filename))}: {e.strerror}; choose a "
                      "folder you can write (--home, --out) or free some space",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as e:
            _bug_hint(e)
            raise


def _bug_hint(e: BaseException) -> None:
    err.print(f"[red]unexpected error[/red] ({type(e).__name__}): this is a bug in ikd-sweep or "
              "an input it does not check yet; please report it with the traceback below",
              highlight=False)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="Sweeps of Interactive Knowledge Distillation (IKD) vs KD.",
                  epilog="Example: ikd-sweep run sweeps/demo.yaml, then ikd-sweep report")


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", envvar="IKD_SWEEP_DEBUG",
        help="show the traceback of every error (also IKD_SWEEP_DEBUG=1)")] = False) -> None:
    """Sweeps of Interactive Knowledge Distillation (IKD) vs KD."""
    global _DEBUG
    _DEBUG = debug

SweepArg = Annotated[Path, typer.Argument(help="sweep YAML file, e.g. sweeps/demo.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override key=value, e.g. "
                                                   "train.epochs=1 (repeatable)")]
HomeOpt = Annotated[Path | None, typer.Option(help="working folder (default $IKD_SWEEP_HOME or "
                                                  "./ikd-runs)")]


def _load(path: Path, overrides: list[str] | None = None) -> SweepConfig:
    try:
        return load_sweep(path, parse_overrides(overrides or []))
    except (ConfigError, ValueError) as e:
        if _debug():
            raise
        if isinstance(e, ConfigError):  # every problem of the file, one per line
            err.print(f"[red]error:[/red] {escape(e.path)}: {e.what}", highlight=False)
            for line in e.errors:
                err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        else:
            err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None


def _home(home: Path | None) -> Path:
    return (home or default_home()).resolve()


def _fmt(v) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _optuna_note(cfg: SweepConfig) -> str | None:
    """The trials of an optuna sweep that are not known up front, in one line."""
    studies = optuna_studies(cfg)
    if not studies:
        return None
    spaces = dict.fromkeys(
        f"{st.method}{'-control' if st.name.endswith('-control') else ''} "
        + ", ".join(f"{h} {lo:g}..{hi:g}" for h, lo, hi in st.ranges) for st in studies)
    return (f"optuna: {cfg.search.num_samples} settings x {len(cfg.search.seeds)} seeds per "
            f"(task, method), chosen during the run ({len(studies)} searches: "
            f"{'; '.join(spaces)})")


@app.command(epilog="Example: ikd-sweep validate sweeps/demo.yaml --set train.epochs=1")
def validate(sweep: SweepArg, set_: SetOpt = None) -> None:
    """Check a sweep file; print its trial count and the expanded search space."""
    cfg = _load(sweep, set_)
    trials = expand_trials(cfg)
    table = Table(title=f"{cfg.name}: {planned_trial_count(cfg)} trials")
    for col in ("task", "method", "trials", *HPARAMS, "seeds"):
        table.add_column(col)
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.task, t.method), []).append(t)
    def vals(ts: list[Trial], attr: str) -> str:
        return ", ".join(_fmt(v) for v in sorted({getattr(t, attr) for t in ts},
                                                 key=lambda x: (x is None, x)))

    for (task, method), ts in groups.items():
        table.add_row(task, method, str(len(ts)), *(vals(ts, h) for h in HPARAMS),
                      vals(ts, "seed"))
    if trials:
        console.print(table)
    if note := _optuna_note(cfg):
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    if confirm := _confirm_plan(cfg):
        seeds = cfg.search.confirm_seeds
        console.print(f"confirmation phase: {len(confirm)} trials, the selected setting of each "
                      f"(task, method) x {len(seeds)} seeds {seeds}", highlight=False,
                      soft_wrap=True)
    _warn_unconfirmed(cfg)
    console.print(f"{sweep}: valid, {planned_trial_count(cfg)} trials")


def _warn_unconfirmed(cfg: SweepConfig) -> None:
    if {"kd", "ikd"} <= set(cfg.methods) and not cfg.search.confirm_seeds:
        err.print("[yellow]warning:[/yellow] compares methods without search.confirm_seeds: the "
                  "headline will be the search seeds (selection-biased); add fresh "
                  "confirm_seeds (ikd-sweep plan tells how many)", highlight=False,
                  soft_wrap=True)


TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
    "sqlite:///<home>/mlflow.db)")]


class _ProgressCallback:
    """Trainer callback for `ikd-sweep train`: a progress bar, a JSON-lines metrics log and,
    unless --no-track, the tracker's run."""

    def __init__(self, progress: Progress, task_id, log_path: Path,
                 track: Callable[[dict, int], None] | None = None):
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
        if "dev/main" in metrics:
            self.progress.console.print(f"step {step}: dev/main {metrics['dev/main']:.4f}"
                                        f" (best {metrics.get('best/dev_main', 0):.4f})")


@app.command(epilog="Example: ikd-sweep train sweeps/demo.yaml --task sst2 --method ikd")
def train(
    sweep: SweepArg,
    task: Annotated[str, typer.Option(help="task of the sweep, e.g. rte")],
    method: Annotated[str, typer.Option(help="finetune | kd | ikd")],
    seed: Annotated[int | None, typer.Option(help="default: the sweep's first seed")] = None,
    temperature: Annotated[float | None, typer.Option(help="default: first in search")] = None,
    exam_every: Annotated[int | None, typer.Option(help="default: first in search")] = None,
    teacher_lr: Annotated[float | None, typer.Option(help="default: first in search")] = None,
    set_: SetOpt = None,
    home: HomeOpt = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda if present)")]
    = None,
    resume: Annotated[bool, typer.Option(help="continue from this trial's last checkpoint")]
    = False,
    track: Annotated[bool, typer.Option(help="record the trial in MLflow (run <sweep>-train "
                                        "of the sweep's experiment)")] = True,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run one trial of a sweep without Ray; print its final metrics as JSON."""
    from ikd_sweep.trainer import NonFiniteLoss
    from ikd_sweep.trial import run_trial

    cfg = _load(sweep, set_)
    # The flags obey the sweep file's rules (search.<name>), not looser ones of their own.
    for name, flag, value in (("seeds", "--seed", seed), ("temperature", "--temperature",
                              temperature), ("exam_every", "--exam-every", exam_every),
                              ("teacher_lr", "--teacher-lr", teacher_lr)):
        if value is not None:
            try:
                check_search_value(name, value)
            except ValueError as e:
                raise typer.BadParameter(f"{value}: {e} (as search.{name} in a sweep file)",
                                         param_hint=flag) from None
    try:
        trial = pick_trial(cfg, task, method, seed, temperature=temperature,
                           exam_every=exam_every, teacher_lr=teacher_lr)
    except PickError as e:
        raise typer.BadParameter(str(e), param_hint=e.option) from None
    root = _home(home)
    from ikd_sweep.preflight import preflight

    preflight(cfg, root, [trial], tracking_uri=_tracking_uri(tracking_uri, cfg.tracking.uri, root)
              if track else None, source=sweep)
    run_dir = root / "single" / cfg.name / trial.trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint"
    resume_from = ckpt if resume and (ckpt / "state.pt").exists() else None
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "trial.json").write_text(json.dumps(
        {**trial.to_dict(), "sweep": cfg.model_dump(mode="json")}, indent=1))
    err.print(f"trial {trial.trial_id} → {run_dir}")
    tracker = run_id = None
    if track:  # imported here: `train --no-track` runs where mlflow is not installed
        from ikd_sweep.tracking import SweepTracker, trial_tags

        tracker = SweepTracker(_tracking_uri(tracking_uri, cfg.tracking.uri, root),
                               cfg.experiment)
        parent = tracker.start_sweep(f"{cfg.name}-train", cfg.model_dump(mode="json"))
        run_id = tracker.trial_run(parent, trial.trial_id, tags=trial_tags(cfg, trial),
                                   params=flat_params(cfg, trial))
        err.print(f"tracking: run {run_id} in experiment {cfg.experiment} at "
                  f"{tracker.tracking_uri}")
        from ikd_sweep.tracking import device_tags
        from ikd_sweep.trainer import describe_device, pick_device

        tracker.set_tags(run_id, device_tags(describe_device(pick_device(device))))

    def finish(status: str, **kw) -> None:
        if tracker is not None and run_id is not None:
            tracker.finish_trial(run_id, status, trial_config=trial_record(cfg, trial), **kw)

    status, result, error = "FINISHED", {}, None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                  "/{task.total}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=err) as progress:
        bar = progress.add_task(trial.trial_id, total=None, info="")
        cb = _ProgressCallback(progress, bar, run_dir / "metrics.jsonl", track=None if
                               tracker is None else partial(tracker.log_metrics, run_id))
        try:
            total, splits = _train_steps(cfg, trial, root)
            progress.update(bar, total=total)
            result = run_trial(cfg, trial, home=root, callback=cb, checkpoint_dir=ckpt,
                               resume_from=resume_from, device=device, splits=splits,
                               student_dir=run_dir / "student")
        except NonFiniteLoss as e:
            status, error = "FAILED", str(e)
        except KeyboardInterrupt:
            finish("KILLED")
            err.print(f"interrupted; resume with --resume (checkpoint: {ckpt})")
            raise typer.Exit(130) from None
        except Exception as e:
            finish("FAILED", error=f"{type(e).__name__}: {e}\n\n{traceback.format_exc(limit=8)}")
            raise
    if status == "FINISHED":
        # The resumable state is for an unfinished trial only; the student folder stays.
        shutil.rmtree(ckpt, ignore_errors=True)
    if tracker is not None and status == "FINISHED":
        tracker.log_metrics(run_id, result, int(result.get("steps", 0)))
        if (run_dir / "student").is_dir():
            tracker.log_student(run_id, run_dir / "student")
    finish(status, error=error, final_metrics=result if status == "FINISHED" else None)
    out = {"trial_id": trial.trial_id, "status": status, **({"error": error} if error else {}),
           **result}
    (run_dir / "final_metrics.json").write_text(json.dumps(out, indent=1))
    console.print_json(json.dumps(out))
    if status != "FINISHED":
        raise typer.Exit(1)


def _train_steps(cfg: SweepConfig, trial: Trial, root: Path) -> tuple[int, dict]:
    """The trial's number of optimizer steps (the bar's total), and its tokenized splits, which
    the trial then reuses instead of reading the cache again."""
    from ikd_sweep.data import prepare_data, tokenize_splits
    from ikd_sweep.models import load_tokenizer
    from ikd_sweep.tasks import get_task
    from ikd_sweep.trainer import FitSettings, total_steps
    from ikd_sweep.trials import trial_seed

    cache, tok = root / "cache" / "data", load_tokenizer(cfg.teacher.model)
    splits = tokenize_splits(get_task(trial.task), cfg.data, tok, cache)
    data = prepare_data(trial.task, cfg.data, tok, cache, trial_seed(cfg, trial), splits,
                        method=trial.method)
    return total_steps(FitSettings.for_trial(cfg, trial), len(data.train)), splits


def _tracking_uri(uri: str | None, cfg_uri: str | None, root: Path) -> str:
    from ikd_sweep.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri or cfg_uri, root)


def _existing_store(uri: str | None, root: Path) -> str:
    """The store to read from; never creates one (opening a new SQLite file creates it)."""
    from ikd_sweep.tracking import resolve_tracking_uri, sqlite_path

    if uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        if not (root / "mlflow.db").is_file():
            raise StoreError(f"no tracking store at {root / 'mlflow.db'}; run a sweep first or "
                             "pass --tracking-uri (or --home)")
        return f"sqlite:///{root / 'mlflow.db'}"
    resolved = resolve_tracking_uri(uri, root)
    db = sqlite_path(resolved)
    if db is not None and not db.is_file():
        raise StoreError(f"no tracking store at {db}; run a sweep first or pass --tracking-uri")
    return resolved


def _confirm_plan(cfg: SweepConfig) -> list[tuple[str, str, int]]:
    """(task, method, seed) of each confirmation trial to come."""
    # The confirmation phase re-runs the setting the report selects per (task, method), which
    # the search decides: list it as "selected setting x confirm seeds".
    labels = list(cfg.methods)
    if "ikd" in labels and 0 in cfg.search.teacher_lr and cfg.search.algorithm != "random":
        labels.append("ikd-control")
    return [(task, m, seed) for task in cfg.tasks for m in labels
            for seed in cfg.search.confirm_seeds]


def _print_trials(cfg: SweepConfig) -> None:
    # Plain aligned lines, not a table: a long sweep stays greppable and never wraps.
    trials = expand_trials(cfg)
    confirm = _confirm_plan(cfg)
    width = max((len(t.trial_id) for t in trials), default=24)
    n_search = planned_trial_count(cfg)
    phases = (f" ({n_search} search, {len(confirm)} confirm)" if confirm else "")
    print(f"{cfg.name}: {n_search + len(confirm)} trials{phases} "
          "(dry run: nothing was started)")
    if note := _optuna_note(cfg):
        print(note)
    _warn_unconfirmed(cfg)
    print(f"{'trial_id':<{width}}  {'task':<8} {'method':<8} {'seed':>4} {'T':>6} {'E':>4} "
          f"{'teacher_lr':>10}  phase")
    for t in trials:
        print(f"{t.trial_id:<{width}}  {t.task:<8} {t.method:<8} {t.seed:>4} "
              f"{_fmt(t.temperature):>6} {_fmt(t.exam_every):>4} {_fmt(t.teacher_lr):>10}  search")
    for task, method, seed in confirm:
        name = f"{task}-{method}-s{seed}"
        print(f"{name:<{width}}  {task:<8} {method:<8} {seed:>4} {'selected setting':>22}  "
              "confirm")


def _summary(cfg: SweepConfig, uri: str, seconds: float) -> Table:
    """Per (task, method) the report's own number: the selected setting's mean dev score."""
    from analysis.collect import collect
    from analysis.display import headline_warning
    from analysis.tables import build_report

    runs = collect(cfg.name, uri)
    report = build_report(runs.runs, runs.expected, cfg.name, stats=False)
    selected = report.selected
    methods = list(dict.fromkeys(selected["method"]))
    warning = headline_warning(report)
    table = Table(title=f"{cfg.name}: dev score of the selected setting, mean over seeds, as in "
                        f"the report ({seconds:.0f} s)",
                  caption=f"[yellow]{warning}[/yellow]" if warning else None)
    for col in ("task", *methods):
        table.add_column(col)
    for task in dict.fromkeys(selected["task"]):
        rows = selected[selected["task"].eq(task)].set_index("method")
        table.add_row(task, *[f"{rows.at[m, 'mean']:.4f} (n={rows.at[m, 'n']})"
                              if m in rows.index else "-" for m in methods])
    return table


@app.command(epilog="Example: ikd-sweep run sweeps/demo.yaml    (again after Ctrl-C: it resumes)")
def run(
    sweep: SweepArg,
    tracking_uri: TrackingOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join, e.g. auto or "
                                                "HOST:6379 (default: a local Ray)")] = None,
    restart: Annotated[bool, typer.Option(help="start over: new parent run, fresh Tune state")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="print the expanded trials and exit")] = False,
    set_: SetOpt = None,
    home: HomeOpt = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="show Ray Tune's "
                                         "own output (trial tables, worker logs) too")] = 0,
) -> None:
    """Run a sweep with Ray Tune, logging every trial to MLflow (resumes if interrupted).

    Shows one live view: trials done/running/failed/stopped/pending, the best selected score
    per task and method, and an ETA (plain lines when the output is not a terminal).
    """
    cfg = _load(sweep, set_)
    if dry_run:
        _print_trials(cfg)
        return
    from ikd_sweep import tune as ikd_tune
    from ikd_sweep.preflight import preflight
    from ikd_sweep.progress import SweepView
    from ikd_sweep.tracking import SweepTracker, quiet_mlflow
    from ikd_sweep.tune import run_sweep

    if not verbose:
        quiet_mlflow()

    root = _home(home)
    root.mkdir(parents=True, exist_ok=True)
    uri = _tracking_uri(tracking_uri, cfg.tracking.uri, root)
    disk = preflight(cfg, root, expand_trials(cfg), tracking_uri=uri,  # before Ray starts
                     source=sweep)
    tracker = SweepTracker(uri, cfg.experiment)
    search = expand_trials(cfg)
    n = planned_trial_count(cfg)
    confirm = (f" + confirmation on seeds {cfg.search.confirm_seeds}"
               if cfg.search.confirm_seeds else "")
    err.print(f"sweep {cfg.name}: {n} trials{confirm}; working folder {root} (checkpoints: "
              f"about {disk}); tracking {uri}")
    t0 = time.time()
    from ikd_sweep.files import SweepBusy
    from ikd_sweep.tune import ResourceError

    view = SweepView(cfg.name, n + len(_confirm_plan(cfg)), console=err)
    view.expect(search)  # every task and method has its row and column from the start
    ikd_tune._listeners.append(view)
    try:
        with view:
            out = run_sweep(cfg, home=root, tracker=tracker, address=address, restart=restart,
                            verbose=verbose)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: re-run the same command to resume")
        raise typer.Exit(130) from None
    except (SweepBusy, ResourceError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        err.print(f"[red]error:[/red] no space left on device ({e.filename or root}); free "
                  "space and re-run the same command to resume", highlight=False)
        raise typer.Exit(1) from None
    finally:
        ikd_tune._listeners.remove(view)
    if out.finished:
        try:
            console.print(_summary(cfg, uri, time.time() - t0))
        except Exception as e:  # e.g. the tracking server went away: the runs are recorded
            err.print(f"[yellow]no summary[/yellow] ({type(e).__name__}: {e}); "
                      f"later: ikd-sweep report --sweep {cfg.name}")
    n += len(out.confirm)
    console.print(f"finished {len(out.finished)}, failed {len(out.failed)}, "
                  f"stopped early {len(out.stopped)} of {n} trials"
                  + (f" ({len(out.confirm)} confirmation)" if out.confirm else ""))
    for trial_id, error in sorted(out.failed.items()):
        first = error.strip().splitlines()[0] if error.strip() else "unknown error"
        console.print(f"  [red]FAILED[/red] {trial_id}: {first}", highlight=False)
    ui_hint = "ikd-sweep ui" + (f" --tracking-uri {uri}" if tracking_uri else
                                f" --home {root}" if home else "")
    console.print(f"browse the runs: {ui_hint}    tables: ikd-sweep report --sweep {cfg.name}")
    if out.interrupted:
        err.print("[yellow]interrupted[/yellow]: state saved; re-run the same command to resume")
        raise typer.Exit(130)
    if out.failed:
        raise typer.Exit(3)


@app.command(epilog="Example: ikd-sweep status --sweep demo")
def status(
    sweep: Annotated[str | None, typer.Option(help="sweep name (default: the latest)")] = None,
    tracking_uri: TrackingOpt = None,
    home: HomeOpt = None,
) -> None:
    """Where a sweep stands (from another shell): run's live view, from the tracking store."""
    from ikd_sweep.progress import render, snapshot_from_store
    from ikd_sweep.tracking import quiet_mlflow, sweep_progress

    quiet_mlflow()

    uri = _tracking_uri(tracking_uri, None, _home(home))
    try:
        progress = sweep_progress(uri, sweep)
    except LookupError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    console.print(render(snapshot_from_store(progress)))


@app.command(epilog="Example: ikd-sweep report --sweep demo --format all")
def report(
    sweep: Annotated[str | None, typer.Option(help="sweep name (default: the latest)")] = None,
    tracking_uri: TrackingOpt = None,
    format_: Annotated[str, typer.Option("--format", help="md | csv | latex | html | all")]
    = "md",
    out: Annotated[Path | None, typer.Option(help="folder for the files (default: "
                                             "<home>/reports/<sweep>)")] = None,
    home: HomeOpt = None,
) -> None:
    """Compile KD-vs-IKD tables and plots from a sweep's MLflow runs."""
    from analysis.report import NoFinishedRuns, make_report

    formats = ("md", "csv", "latex", "html") if format_ == "all" else tuple(format_.split(","))
    bad = [f for f in formats if f not in ("md", "csv", "latex", "html")]
    if bad:
        raise typer.BadParameter(f"unknown format(s) {bad}; use md, csv, latex, html or all",
                                 param_hint="--format")
    root = _home(home)
    uri = _existing_store(tracking_uri, root)
    if out is not None:
        from ikd_sweep.preflight import writable

        writable(out, "--out", "pass a folder you can write", create=False)
    try:
        text, files = make_report(sweep, uri, formats, out)
    except (NoFinishedRuns, LookupError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    for f in files:
        err.print(f"wrote {f}")


@app.command(epilog="Example: ikd-sweep plan sweeps/glue.yaml --effect 0.5")
def plan(
    sweep: Annotated[str, typer.Argument(help="sweep YAML file or sweep name in the store")],
    effect: Annotated[float, typer.Option(help="difference to detect, in the report's points "
                                          "(x100 for GLUE)")] = 0.5,
    tracking_uri: TrackingOpt = None,
    home: HomeOpt = None,
) -> None:
    """How many confirmation seeds a sweep needs to detect --effect, from its search phase."""
    from analysis.collect import collect
    from analysis.plan import plan_seeds, plan_text

    name, cfg_uri = sweep, None
    if sweep.endswith((".yaml", ".yml")) or Path(sweep).is_file():
        cfg = _load(Path(sweep))
        name, cfg_uri = cfg.name, cfg.tracking.uri
    uri = _existing_store(tracking_uri or cfg_uri, _home(home))
    try:
        data = collect(name, uri)
    except LookupError as e:
        raise UserError(str(e)) from None
    frame, scale = plan_seeds(data.runs, data.expected, effect)
    console.print(plan_text(data.sweep, frame, scale, effect), markup=False, highlight=False,
                  soft_wrap=True)


@app.command()
def export(
    sweep: Annotated[str, typer.Option(help="sweep name, e.g. demo")],
    task: Annotated[str, typer.Option(help="task of the sweep, e.g. sst2")],
    method: Annotated[str, typer.Option(help="finetune | kd | ikd | ikd-control")],
    out: Annotated[Path, typer.Option(help="folder to write the student to (new or empty)")],
    seed: Annotated[int | None, typer.Option(help="seed of the selected setting (default: "
                                             "its run with the best sel/val_main)")] = None,
    register: Annotated[str | None, typer.Option(help="also register it as a version of this "
                                                 "MLflow registered model")] = None,
    tracking_uri: TrackingOpt = None,
    home: HomeOpt = None,
) -> None:
    """Write the selected student of a sweep (the report's selection) as a Hugging Face folder.

    Example: ikd-sweep export --sweep demo --task sst2 --method ikd --out students/sst2-ikd
    """
    from ikd_sweep.export import ExportError, export_student

    uri = _tracking_uri(tracking_uri, None, _home(home))
    try:
        got = export_student(sweep, task, method, seed, out, uri, register)
    except (ExportError, LookupError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(
        f"{got.task}/{got.method}: selected setting {got.setting}; {got.phase} run "
        f"{got.trial_id} (seed {got.seed}, chosen by {got.seed_chosen}; run {got.run_id}): "
        f"sel/val_main {got.sel_val_main:.4f}, sel/dev_main {got.sel_dev_main:.4f}",
        highlight=False, soft_wrap=True)
    console.print(f"wrote {got.out}", highlight=False, soft_wrap=True)
    if got.registered:
        console.print(f"registered {got.registered}", highlight=False, soft_wrap=True)


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """argv that serves this (resolved) store in the MLflow UI. For SQLite the artifact root is
    explicit: ``mlflow ui`` would resolve ``./mlartifacts`` against its own working directory."""
    from ikd_sweep.tracking import default_artifact_root

    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    root = default_artifact_root(tracking_uri)
    if root is not None:
        argv += ["--default-artifact-root", root, "--artifacts-destination", root]
    return [*argv, "--host", host, "--port", str(port)]


@app.command(epilog="Example: ikd-sweep ui --port 5000")
def ui(
    port: Annotated[int, typer.Option(help="port")] = 5000,
    host: Annotated[str, typer.Option(help="interface; 0.0.0.0 exposes it to the network")]
    = "127.0.0.1",
    tracking_uri: TrackingOpt = None,
    home: HomeOpt = None,
) -> None:
    """Browse the runs in the MLflow UI (bound to localhost unless told otherwise)."""
    uri = _tracking_uri(tracking_uri, None, _home(home))
    with socket.socket() as s:  # mlflow would start, fail to bind, and still exit 0
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port}: {e.strerror}; another program "
                            "(another `ikd-sweep ui`?) uses it; pick one with --port") from None
    cmd = ui_command(uri, host=host, port=port)
    err.print(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C to stop)")
    try:
        raise typer.Exit(subprocess.call(cmd))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


if __name__ == "__main__":
    app()
