"""What `validate`, `run --dry-run` and the end of `run` print about a sweep: its plan (both
phases, from `trials.SweepPlan`) and its outcome (the report's selection, the failed trials)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ikd_sweep.config import SweepConfig
from ikd_sweep.names import HPARAMS
from ikd_sweep.sweep.events import error_line
from ikd_sweep.trials import SweepPlan, Trial

if TYPE_CHECKING:
    from ikd_sweep.sweep.driver import SweepOutcome


def fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def plan_table(plan: SweepPlan) -> Table | None:
    """Per (task, method): the number of search trials and the values they take (None when
    no trial is known up front: an optuna sweep without fixed settings)."""
    if not plan.search:
        return None
    table = Table(title=f"{plan.cfg.name}: {plan.n_search} trials")
    for col in ("task", "method", "trials", *HPARAMS, "seeds"):
        table.add_column(col)
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in plan.search:
        groups.setdefault((t.task, t.method), []).append(t)

    def vals(ts: list[Trial], attr: str) -> str:
        return ", ".join(fmt(v) for v in sorted({getattr(t, attr) for t in ts},
                                                key=lambda x: (x is None, x)))

    for (task, method), ts in groups.items():
        table.add_row(task, method, str(len(ts)), *(vals(ts, h) for h in HPARAMS),
                      vals(ts, "seed"))
    return table


def print_dry_run(plan: SweepPlan) -> None:
    """Every trial of both phases, one plain aligned line each: a long sweep stays greppable
    and never wraps."""
    width = max((len(t.trial_id) for t in plan.search), default=24)
    print(f"{plan.cfg.name}: {plan.headline()} (dry run: nothing was started)")
    if note := plan.studies_note():
        print(note)
    warn_unconfirmed(plan.cfg, Console(stderr=True))
    print(f"{'trial_id':<{width}}  {'task':<8} {'method':<8} {'seed':>4} {'T':>6} {'E':>4} "
          f"{'teacher_lr':>10}  phase")
    for t in plan.search:
        print(f"{t.trial_id:<{width}}  {t.task:<8} {t.method:<8} {t.seed:>4} "
              f"{fmt(t.temperature):>6} {fmt(t.exam_every):>4} {fmt(t.teacher_lr):>10}  search")
    for task, method, seed in plan.confirm_slots():
        name = f"{task}-{method}-s{seed}"
        print(f"{name:<{width}}  {task:<8} {method:<8} {seed:>4} {'selected setting':>22}  "
              "confirm")


def warn_unconfirmed(cfg: SweepConfig, err: Console) -> None:
    """One line when a sweep compares kd and ikd without confirmation seeds: its headline
    would come from the search seeds, which favour the method given more settings."""
    if {"kd", "ikd"} <= set(cfg.methods) and not cfg.search.confirm_seeds:
        err.print("[yellow]warning:[/yellow] compares methods without search.confirm_seeds: the "
                  "headline will be the search seeds (selection-biased); add fresh "
                  "confirm_seeds (ikd-sweep plan tells how many)", highlight=False,
                  soft_wrap=True)


def summary_table(sweep: str, uri: str, seconds: float) -> Table:
    """Per (task, method) the report's own number: the selected setting's mean dev score,
    labelled when it comes from search seeds (selection-biased)."""
    from ikd_sweep.selection import selection

    chosen = selection(sweep, uri)
    selected = chosen.selected
    methods = list(dict.fromkeys(selected["method"]))
    table = Table(title=f"{sweep}: dev score of the selected setting, mean over seeds, as in "
                        f"the report ({seconds:.0f} s)",
                  caption=f"[yellow]{chosen.warning}[/yellow]" if chosen.warning else None)
    for col in ("task", *methods):
        table.add_column(col)
    for task in dict.fromkeys(selected["task"]):
        rows = selected[selected["task"].eq(task)].set_index("method")
        table.add_row(task, *[f"{rows.at[m, 'mean']:.4f} (n={rows.at[m, 'n']})"
                              if m in rows.index else "-" for m in methods])
    return table


def print_outcome(console: Console, out: SweepOutcome, plan: SweepPlan, ui_hint: str) -> None:
    """The end of `run`: the counts, one line per failed trial, where to look next."""
    n = plan.n_search + len(out.confirm)
    console.print(f"finished {len(out.finished)}, failed {len(out.failed)}, "
                  f"stopped early {len(out.stopped)} of {n} trials"
                  + (f" ({len(out.confirm)} confirmation)" if out.confirm else ""))
    for trial_id, error in sorted(out.failed.items()):
        console.print(f"  [red]FAILED[/red] {trial_id}: {error_line(error)}", highlight=False,
                      soft_wrap=True)
    console.print(f"browse the runs: {ui_hint}    tables: ikd-sweep report --sweep "
                  f"{plan.cfg.name}")
