"""The `ikd-sweep` command line: validate, train, run, status, report, plan, export, ui.

Exit codes: 0 success, 2 bad input (every `errors.UserError`, one policy: `_Group`), 3 a sweep
that finished with failed trials, 130 Ctrl-C. What the commands print about a plan and an
outcome is `show.py`'s; `train`'s one trial is `single.py`'s.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape

from ikd_sweep.config import (
    ConfigError,
    SweepConfig,
    check_search_value,
    load_sweep,
    parse_overrides,
)
from ikd_sweep.errors import UserError
from ikd_sweep.home import Home
from ikd_sweep.trials import PickError, SweepPlan, pick_trial

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
            if _debug() or e.errno not in _USER_ERRNOS or not (
                    e.filename or e.errno == errno.ENOSPC):
                _bug_hint(e)
                raise
            err.print(f"[red]error:[/red] {escape(str(e.filename or 'disk'))}: {e.strerror}; "
                      "choose a folder you can write (--home, --out) or free some space (a "
                      "sweep resumes where it stopped)", highlight=False, soft_wrap=True)
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
    return (home or Home.default().root).resolve()


@app.command(epilog="Example: ikd-sweep validate sweeps/demo.yaml --set train.epochs=1")
def validate(sweep: SweepArg, set_: SetOpt = None) -> None:
    """Check a sweep file; print its trial count and the expanded search space."""
    from ikd_sweep.show import plan_table, warn_unconfirmed

    plan = SweepPlan.of(_load(sweep, set_))
    if (table := plan_table(plan)) is not None:
        console.print(table)
    if note := plan.studies_note():
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    if confirm := plan.confirm_slots():
        seeds = plan.cfg.search.confirm_seeds
        console.print(f"confirmation phase: {len(confirm)} trials, the selected setting of each "
                      f"(task, method) x {len(seeds)} seeds {seeds}", highlight=False,
                      soft_wrap=True)
    warn_unconfirmed(plan.cfg, err)
    console.print(f"{sweep}: valid, {plan.n_search} trials")


TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
    "sqlite:///<home>/mlflow.db)")]


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
    from ikd_sweep.preflight import preflight
    from ikd_sweep.single import train_one

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
    uri = _tracking_uri(tracking_uri, cfg.tracking.uri, root) if track else None
    preflight(cfg, root, [trial], tracking_uri=uri, source=sweep)
    try:
        out = train_one(cfg, trial, root, device=device, resume=resume, tracking_uri=uri,
                        err=err)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print_json(json.dumps(out))
    if out["status"] != "FINISHED":
        raise typer.Exit(1)


def _tracking_uri(uri: str | None, cfg_uri: str | None, root: Path) -> str:
    from ikd_sweep.store import resolve_tracking_uri

    return resolve_tracking_uri(uri or cfg_uri, root)


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
    from ikd_sweep.show import print_dry_run, print_outcome, summary_table

    plan = SweepPlan.of(_load(sweep, set_))  # the trials of both phases, worked out once
    cfg = plan.cfg
    if dry_run:
        print_dry_run(plan)
        return
    from ikd_sweep.preflight import preflight
    from ikd_sweep.progress import SweepView
    from ikd_sweep.sweep.driver import run_sweep
    from ikd_sweep.tracking import SweepTracker, quiet_mlflow

    if not verbose:
        quiet_mlflow()
    root = _home(home)
    root.mkdir(parents=True, exist_ok=True)
    uri = _tracking_uri(tracking_uri, cfg.tracking.uri, root)
    disk = preflight(cfg, root, list(plan.search), tracking_uri=uri,  # before Ray starts
                     source=sweep)
    confirm = (f" + confirmation on seeds {cfg.search.confirm_seeds}"
               if cfg.search.confirm_seeds else "")
    err.print(f"sweep {cfg.name}: {plan.n_search} trials{confirm}; working folder {root} "
              f"(checkpoints: about {disk}); tracking {uri}")
    t0 = time.time()
    view = SweepView(cfg.name, plan.total, console=err)
    view.expect(plan.search)  # every task and method has its row and column from the start
    try:
        with view:
            out = run_sweep(plan, home=root, tracker=SweepTracker(uri, cfg.experiment),
                            listeners=[view], address=address, restart=restart,
                            verbose=verbose, tracebacks=_debug())
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: re-run the same command to resume")
        raise typer.Exit(130) from None
    if out.finished:
        try:
            console.print(summary_table(cfg.name, uri, time.time() - t0))
        except Exception as e:  # e.g. the tracking server went away: the runs are recorded
            err.print(f"[yellow]no summary[/yellow] ({type(e).__name__}: {e}); "
                      f"later: ikd-sweep report --sweep {cfg.name}")
    print_outcome(console, out, plan, "ikd-sweep ui" + (
        f" --tracking-uri {uri}" if tracking_uri else f" --home {root}" if home else ""))
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
    console.print(render(snapshot_from_store(sweep_progress(uri, sweep))))


def _read_store(uri: str | None, root: Path) -> str:
    """The store a reader reads: never created here (opening a missing SQLite file would)."""
    from ikd_sweep.store import require_store

    return require_store(_tracking_uri(uri, None, root) if uri or
                         os.environ.get("MLFLOW_TRACKING_URI") else Home(root).store_uri)


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
    from analysis.report import make_report
    from ikd_sweep.tracking import quiet_mlflow

    quiet_mlflow()

    formats = ("md", "csv", "latex", "html") if format_ == "all" else tuple(format_.split(","))
    bad = [f for f in formats if f not in ("md", "csv", "latex", "html")]
    if bad:
        raise typer.BadParameter(f"unknown format(s) {bad}; use md, csv, latex, html or all",
                                 param_hint="--format")
    root = _home(home)
    uri = _read_store(tracking_uri, root)
    if out is not None:
        from ikd_sweep.preflight import writable

        writable(out, "--out", "pass a folder you can write", create=False)
    text, files = make_report(sweep, uri, formats, out)
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
    """How many confirmation seeds a sweep needs to detect --effect, from the spread of its
    search seeds (its confirmation seeds where the search pairs fewer than 2)."""
    from analysis.collect import collect
    from analysis.plan import plan_seeds, plan_text
    from ikd_sweep.tracking import quiet_mlflow

    quiet_mlflow()  # no artifact download bars (trials.json) in the plan

    name, cfg_uri = sweep, None
    if sweep.endswith((".yaml", ".yml")) or Path(sweep).is_file():
        cfg = _load(Path(sweep))
        name, cfg_uri = cfg.name, cfg.tracking.uri
    data = collect(name, _read_store(tracking_uri or cfg_uri, _home(home)))
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
    from ikd_sweep.export import export_student
    from ikd_sweep.tracking import quiet_mlflow

    quiet_mlflow()  # the student's download bar is MLflow's, not the CLI's output

    uri = _tracking_uri(tracking_uri, None, _home(home))
    got = export_student(sweep, task, method, seed, out, uri, register)
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
    from ikd_sweep.store import default_artifact_root

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
