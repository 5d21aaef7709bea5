"""KD-vs-IKD tables from a sweep's runs (pure pandas/numpy/scipy; no MLflow here).

The protocol (DESIGN.md, "Splits and the comparison protocol"); nothing here chooses on dev:

- **Selection** uses search-phase runs and the validation split only. Per (task, method) each
  hyperparameter setting is ranked by its mean ``sel_val_main`` over its seed slots; a slot that
  did not finish (FAILED, KILLED, still running, or expected but missing) is scored as the worst
  finished ``sel_val_main`` of that task, so a setting is not ranked on the seeds that survived.
  Only settings with at least one finished seed can be selected; ties go to the first setting in
  hyperparameter order.
- **Reported number**: the selected setting's ``sel_dev_main`` (GLUE dev, held out) mean ±
  sample std over its confirmation seeds when it has finished confirmation-phase runs, else over
  its finished search seeds (``source`` says which; search seeds are selection-biased).
  ``best_dev_main`` (max over dev) is a diagnostic: never used here.
- ``ikd`` runs with ``teacher_lr == 0`` are a control (the teacher never moves): method
  ``ikd-control``, selected separately.
- **a − b**: ``analysis.compare`` (paired t-interval and test, Holm, power, probability of
  improvement; the Avg row's interval from the per-task variances).
- **Budget-fair view** (Dodge et al., 2019, "Show Your Work"): the expected dev score of the
  val-selected setting among n settings drawn without replacement, n = 1 … settings tried, exact
  over the val ranks.

Every step is a vectorised group-by over all tasks at once, so simulations can report thousands
of tasks in one call (tests/test_aa.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import special

from analysis import knobs
from analysis.compare import COLUMNS as COMPARISON_COLUMNS
from analysis.compare import EFFECT_PT, compare
from analysis.frames import (
    AVG,
    KEYS,
    Index,
    codes,
    display_scale,
    finished,
    method_order,
    setting_index,
    sort_rows,
    task_order,
)
from analysis.status import status_by_method, trial_status
from ikd_sweep.names import CONFIRM, CONTROL, HPARAMS, SEARCH, base_method

#: Marks a reported cell with fewer finished seeds than expected.
INCOMPLETE_MARK = "†"


@dataclass
class Report:
    """All tables of one sweep. Every frame is tidy (one observation per row)."""

    sweep: str
    #: Every search-phase (task, method, setting): slots (seeds planned or run), n (finished),
    #: val_mean, val_score (failures scored worst; ranks the settings), mean/std (dev), n_expected.
    candidates: pd.DataFrame
    #: Per (task, method): the selected setting (task, method, base_method, temperature,
    #: exam_every, teacher_lr, val_score), its reported dev mean, std, n, n_expected, incomplete,
    #: source ("confirm" or "search"), seeds, n_settings (settings tried).
    selected: pd.DataFrame
    #: The reported runs: task, method, seed, phase, run_id, score (``sel_dev_main``).
    scores: pd.DataFrame
    #: a − b per task (and ``Avg``): ``analysis.compare.COLUMNS`` (mean_a, mean_b, diff, the
    #: t-interval ci_low/ci_high, se, df, n_pairs, t, p_value, p_holm, mde, seeds_for_effect,
    #: p_improve with its interval, n_settings_a/b, source).
    comparisons: pd.DataFrame
    #: Per method: the mean over ``avg_tasks`` of the per-task reported means.
    average: pd.DataFrame
    #: Tasks in the average: those with a result for every method.
    avg_tasks: list[str]
    #: Expected dev score of the val-selected setting among n settings drawn without
    #: replacement: task, method, n, expected_dev, n_settings.
    budget: pd.DataFrame
    #: ``budget`` at n = the smallest number of settings a (tuned) method had on the task:
    #: task, method, n, expected_dev, n_settings (and ``Avg`` rows over ``avg_tasks``).
    budget_at: pd.DataFrame
    #: The finished search run with the best ``sel_val_main`` per (task, method).
    best_runs: pd.DataFrame
    #: Per (task, method): expected, finished, failed, killed, running, missing, failure_rate,
    #: stop_rate (rates over the trials that ended).
    status: pd.DataFrame
    #: ``status`` summed per method.
    status_by_method: pd.DataFrame
    #: Display scale of the scores: 100 for GLUE fractions (shown as points), else 1.
    scale: float = 1.0
    #: What each swept knob does to the val score (search phase, val split; no dev):
    #: task, method, hparam, value, n, n_seeds, mean, ci_low, ci_high (``analysis.knobs``).
    sensitivity: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=knobs.SENSITIVITY_COLUMNS))
    #: Per task, method and swept knob: p_value (seed-blocked ANOVA), p_holm (across the knobs
    #: of a task and method), importance (Optuna fANOVA share), note (``analysis.knobs``).
    importance: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=knobs.IMPORTANCE_COLUMNS))
    tasks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)

    @property
    def has_results(self) -> bool:
        return not self.selected.empty


# ------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------


def _candidates(ix: Index) -> pd.DataFrame:
    """Search-phase settings, indexed by setting id (see :func:`candidate_settings`)."""
    runs, exp = ix.runs, ix.expected
    r_search = runs["phase"].eq(SEARCH).to_numpy(dtype=bool)
    e_search = exp["phase"].eq(SEARCH).to_numpy(dtype=bool)
    present = ix.per_setting(ix.run_sid[r_search]) + ix.per_setting(ix.exp_sid[e_search]) > 0
    # Seed slots: distinct (setting, seed) pairs planned or run.
    sids = np.concatenate([ix.run_sid[r_search], ix.exp_sid[e_search]])
    seeds = pd.concat([runs["seed"][r_search], exp["seed"][e_search]], ignore_index=True)
    pairs = np.unique(codes([pd.Series(sids), seeds]), return_index=True)[1]
    slots = ix.per_setting(sids[pairs])

    ok = r_search & finished(runs, "sel_val_main")
    val = runs["sel_val_main"].to_numpy(dtype=float)
    n = ix.per_setting(ix.run_sid[ok])
    val_sum = ix.per_setting(ix.run_sid[ok], val[ok])
    task_code = codes([ix.settings["task"]]) if ix.size else np.empty(0, dtype=np.int64)
    worst = np.full(task_code.max() + 1 if ix.size else 0, np.nan)
    run_task = task_code[ix.run_sid[ok]]
    if ok.any():
        lowest = pd.Series(val[ok]).groupby(run_task).min()
        worst[lowest.index.to_numpy()] = lowest.to_numpy()
    unfinished = slots - n
    with np.errstate(invalid="ignore", divide="ignore"):
        penalty = np.where(unfinished > 0, unfinished * worst[task_code], 0.0)
        val_score = np.where(n > 0, (val_sum + penalty) / np.maximum(slots, 1), np.nan)
        val_mean = np.where(n > 0, val_sum / np.maximum(n, 1), np.nan)

    dev_ok = r_search & finished(runs, "sel_dev_main")
    dev = runs["sel_dev_main"].to_numpy(dtype=float)
    n_dev = ix.per_setting(ix.run_sid[dev_ok])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = ix.per_setting(ix.run_sid[dev_ok], dev[dev_ok]) / n_dev
        sq = (dev[dev_ok] - mean[ix.run_sid[dev_ok]]) ** 2
        std = np.where(n_dev > 1, ix.per_setting(ix.run_sid[dev_ok], sq) / (n_dev - 1), np.nan)
    n_exp = ix.per_setting(ix.exp_sid[e_search])
    cand = ix.settings[list(KEYS)].assign(
        slots=slots,
        n=n,
        # Without a plan (trials.json) the expected counts are unknown, not zero.
        n_expected=pd.array(n_exp if len(exp) else [pd.NA] * ix.size, dtype="Int64"),
        val_mean=val_mean,
        val_score=val_score,
        mean=np.where(n_dev > 0, mean, np.nan),
        std=np.sqrt(std),
    )
    return cand[present & cand["task"].notna().to_numpy()]



def _pick(candidates: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method): the selectable setting with the best val_score (ties: the first in
    hyperparameter order), with n_settings = settings tried. Keeps the setting-id index."""
    counts = candidates.groupby(["task", "method"], sort=False).size().rename("n_settings")
    able = candidates[candidates["n"] > 0]
    able = able.sort_values(
        ["task", "method", "val_score", *HPARAMS],
        ascending=[True, True, False, True, True, True],
        na_position="first",
        kind="stable",
    )
    best = able[~able.duplicated(["task", "method"])]
    return best.join(counts, on=["task", "method"])


def select_settings(runs: pd.DataFrame, expected: pd.DataFrame | None = None) -> pd.DataFrame:
    """The val-selected setting per (task, method): task, method, base_method, temperature,
    exam_every, teacher_lr (NaN where unused), val_score, n_settings. Search phase only: what the
    sweep driver re-runs on the confirmation seeds (``ikd-control`` is an ``ikd`` trial with
    teacher_lr 0, hence ``base_method``). No statistics: cheap."""
    ix = setting_index(runs, expected)
    best = _pick(_candidates(ix)).reset_index(drop=True)
    best["base_method"] = best["method"].map(base_method)
    return best[["task", "method", "base_method", *HPARAMS, "val_score", "n_settings"]]


def _reported(ix: Index, picked: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selected with its reported statistics, the per-seed scores behind them)."""
    runs, exp = ix.runs, ix.expected
    is_picked = np.zeros(ix.size, dtype=bool)
    is_picked[picked.index.to_numpy()] = True
    confirm = runs["phase"].eq(CONFIRM).to_numpy(dtype=bool)
    rows = finished(runs, "sel_dev_main") & is_picked[ix.run_sid]
    # Finished confirmation runs replace the search seeds of their setting.
    confirmed = ix.per_setting(ix.run_sid[rows & confirm]) > 0
    keep = np.flatnonzero(rows & (confirm == confirmed[ix.run_sid]))
    hits = pd.DataFrame(
        {
            "sid": ix.run_sid[keep],
            "seed": runs["seed"].to_numpy()[keep],
            "phase": runs["phase"].to_numpy()[keep],
            "run_id": runs["run_id"].to_numpy()[keep],
            "score": runs["sel_dev_main"].to_numpy(dtype=float)[keep],
        }
    )
    scores = (
        hits.groupby(["sid", "seed"], sort=True)
        .agg(phase=("phase", "first"), run_id=("run_id", "first"), score=("score", "mean"))
        .reset_index()
    )
    per = scores.groupby("sid", sort=False)["score"]
    # Seed lists without a Python call per group: scores is sorted by (sid, seed).
    sid_of, first = np.unique(scores["sid"].to_numpy(), return_index=True)
    lists = np.split(scores["seed"].to_numpy(dtype=np.int64), first[1:]) if len(first) else []
    seeds = pd.Series([a.tolist() for a in lists], index=sid_of, dtype=object)
    e_confirm = exp["phase"].eq(CONFIRM).to_numpy(dtype=bool)
    n_exp = np.where(
        confirmed,
        ix.per_setting(ix.exp_sid[e_confirm]),
        ix.per_setting(ix.exp_sid[~e_confirm]),
    )
    sel = picked[[*KEYS, "val_score", "n_settings"]].copy()
    sid = sel.index
    sel["source"] = np.where(confirmed[sid], CONFIRM, SEARCH)
    sel["mean"] = per.mean().reindex(sid).to_numpy()
    sel["std"] = per.std(ddof=1).reindex(sid).to_numpy()
    sel["n"] = per.size().reindex(sid).fillna(0).astype(int).to_numpy()
    sel["n_expected"] = pd.array(n_exp[sid] if len(exp) else [pd.NA] * len(sid), dtype="Int64")
    sel["incomplete"] = (sel["n"] < sel["n_expected"]).fillna(False).astype(bool)
    sel["seeds"] = [s if isinstance(s, list) else [] for s in seeds.reindex(sid)]
    sel["base_method"] = sel["method"].map(base_method)
    sel["n_settings"] = sel["n_settings"].astype(int)
    columns = [
        "task",
        "method",
        "base_method",
        *HPARAMS,
        "val_score",
        "source",
        "mean",
        "std",
        "n",
        "n_expected",
        "incomplete",
        "n_settings",
        "seeds",
    ]
    scores = scores.join(ix.settings[["task", "method"]], on="sid")
    columns_s = ["task", "method", "seed", "phase", "run_id", "score"]
    return sel[columns].reset_index(drop=True), scores[columns_s]



def glue_average(selected: pd.DataFrame, methods: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per method, the mean of its per-task reported means over the tasks every method (the
    control aside) has; the control gets an average only when it has all of them."""
    columns = ["method", "mean", "n_tasks"]
    have = selected[selected["n"] > 0] if not selected.empty else selected
    if have.empty or not methods:
        return pd.DataFrame(columns=columns), []
    tasks_of = {m: set(have.loc[have["method"].eq(m), "task"]) for m in methods}
    # A control run on a few tasks only must not shrink everyone's average.
    core = [m for m in methods if m != CONTROL] or methods
    shared = task_order(list(set.intersection(*(tasks_of[m] for m in core))))
    if not shared:
        return pd.DataFrame(columns=columns), []
    means = have[have["task"].isin(shared)].groupby("method")["mean"].mean()
    rows = [[m, float(means[m]), len(shared)] for m in methods if set(shared) <= tasks_of[m]]
    return pd.DataFrame(rows, columns=columns), shared



# ------------------------------------------------------------------------------------------
# Budget-fair view (Dodge et al., 2019)
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _max_rank_weights(n_total: int) -> np.ndarray:
    """W[n-1, i-1] = P(the best of n settings drawn without replacement from N is the i-th
    lowest) = C(i-1, n-1) / C(N, n), for i >= n (else 0)."""
    n = np.arange(1, n_total + 1)[:, None]
    i = np.arange(1, n_total + 1)[None, :]
    with np.errstate(invalid="ignore"):
        log_w = (
            special.gammaln(i)
            - special.gammaln(n)
            - special.gammaln(np.maximum(i - n + 1, 1))
            - (
                special.gammaln(n_total + 1)
                - special.gammaln(n + 1)
                - special.gammaln(n_total - n + 1)
            )
        )
    weights = np.where(i >= n, np.exp(log_w), 0.0)
    weights.setflags(write=False)
    return weights




def budget_curves(candidates: pd.DataFrame) -> pd.DataFrame:
    """``expected_dev`` at n = 1 … settings per (task, method), over the settings that have
    both a val score and a dev score, and ``sd_dev``: the sd of the selected setting's dev
    score over the draws of n settings (Dodge et al.'s band; 0 once every setting is drawn)."""
    columns = ["task", "method", "n", "expected_dev", "sd_dev", "n_settings"]
    able = candidates[(candidates["n"] > 0) & candidates["mean"].notna()]
    if able.empty:
        return pd.DataFrame(columns=columns)
    # Ascending val, ties ordered so that the setting the selection prefers comes last.
    able = able.sort_values(
        ["task", "method", "val_score", *HPARAMS],
        ascending=[True, True, True, False, False, False],
        na_position="last",
        kind="stable",
    )
    sizes = able.groupby(["task", "method"], sort=False).size().to_numpy()
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    dev = able["mean"].to_numpy(dtype=float)
    curve, second = np.empty(len(able)), np.empty(len(able))
    # Groups of equal size share one weight matrix: one matrix product per size.
    for size in np.unique(sizes):
        rows = starts[sizes == size][:, None] + np.arange(size)
        curve[rows] = dev[rows] @ _max_rank_weights(int(size)).T
        second[rows] = dev[rows] ** 2 @ _max_rank_weights(int(size)).T
    return pd.DataFrame(
        {
            "task": able["task"].to_numpy(),
            "method": able["method"].to_numpy(),
            "n": np.concatenate([np.arange(1, k + 1) for k in sizes]),
            "expected_dev": curve,
            "sd_dev": np.sqrt(np.clip(second - curve**2, 0.0, None)),
            "n_settings": np.repeat(sizes, sizes),
        }
    )[columns]


def budget_table(budget: pd.DataFrame, avg_tasks: list[str]) -> pd.DataFrame:
    """Each method's expected dev score at the task's budget: n = the smallest number of
    settings any method tuned (more than one setting) had on that task; methods with fewer
    settings (fine-tuning: one) at their own count. ``Avg`` rows average ``avg_tasks``."""
    columns = ["task", "method", "n", "expected_dev", "n_settings"]
    if budget.empty:
        return pd.DataFrame(columns=columns)
    sizes = budget.drop_duplicates(["task", "method"])[["task", "method", "n_settings"]]
    tuned = sizes[sizes["n_settings"] > 1].groupby("task")["n_settings"].min()
    sizes = sizes.assign(
        n=np.minimum(sizes["task"].map(tuned).fillna(1).astype(int), sizes["n_settings"])
    )
    at = budget.merge(sizes[["task", "method", "n"]], on=["task", "method", "n"])[columns]
    if avg_tasks:
        avg = at[at["task"].isin(avg_tasks)].groupby("method", sort=False)
        rows = avg.agg(expected_dev=("expected_dev", "mean"), count=("task", "size"))
        rows = rows[rows["count"] == len(avg_tasks)].reset_index()
        rows = rows.assign(task=AVG, n=pd.NA, n_settings=pd.NA)[columns]
        at = pd.concat([at, rows], ignore_index=True)
    return at


# ------------------------------------------------------------------------------------------
# Single runs
# ------------------------------------------------------------------------------------------


def _best_runs(ix: Index) -> pd.DataFrame:
    """The finished search run with the highest ``sel_val_main`` per (task, method) (its dev
    scores are shown, never used to choose)."""
    columns = [
        "task",
        "method",
        "trial_id",
        "run_id",
        "seed",
        *HPARAMS,
        "sel_val_main",
        "sel_dev_main",
        "final_dev_main",
        "best_dev_main",
    ]
    runs = ix.runs
    ok = np.flatnonzero(runs["phase"].eq(SEARCH).to_numpy(dtype=bool) & finished(
        runs, "sel_val_main"
    ))
    if not ok.size:
        return pd.DataFrame(columns=columns)
    tm = ix.settings["tm"].to_numpy()[ix.run_sid[ok]]
    val = runs["sel_val_main"].to_numpy(dtype=float)[ok]
    order = np.lexsort((-val, tm))  # stable: the first run wins a tie
    first = np.unique(tm[order], return_index=True)[1]
    return runs.iloc[ok[order[first]]][columns].reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def build_report(
    runs: pd.DataFrame, expected: pd.DataFrame | None, sweep: str = "", stats: bool = True,
    effect_pt: float = EFFECT_PT, knob_stats: bool = False,
) -> Report:
    """All tables of a sweep from its runs (``collect.SweepRuns.runs``) and expected trials
    (``collect.SweepRuns.expected``; may be empty). See the module docstring for the protocol.
    ``stats=False`` skips the comparisons and the budget-fair view (left empty): the selection
    and its reported numbers alone, for callers that need just ``selected`` or ``scores``.
    ``effect_pt``: the effect (displayed points) that ``comparisons.seeds_for_effect`` plans for.
    ``knob_stats``: also fill ``sensitivity`` and ``importance`` (``analysis.knobs``; off by
    default: the Optuna study per task and method costs a second, and the sweep driver, ``plan``
    and the A/A simulations of thousands of tasks do not need it)."""
    ix = setting_index(runs, expected)
    candidates = _candidates(ix)
    selected, scores = _reported(ix, _pick(candidates))
    tasks = task_order(selected["task"]) if not selected.empty else []
    methods = method_order(selected["method"]) if not selected.empty else []
    selected = sort_rows(selected, tasks, methods)
    scale = display_scale(pd.concat([candidates["mean"], selected["mean"]], ignore_index=True))
    average, avg_tasks = glue_average(selected, methods)
    comparisons = pd.DataFrame(columns=COMPARISON_COLUMNS)
    budget = pd.DataFrame(columns=["task", "method", "n", "expected_dev", "sd_dev", "n_settings"])
    if stats:
        comparisons = compare(scores, selected, average, avg_tasks, tasks, scale, effect_pt)
        budget = budget_curves(candidates)
    status = trial_status(ix)
    knob_frames = {}
    if knob_stats:
        knob_frames = {"sensitivity": knobs.sensitivity(runs), "importance": knobs.knob_tests(runs)}
    return Report(
        sweep=sweep,
        candidates=candidates.reset_index(drop=True),
        selected=selected,
        scores=scores,
        comparisons=comparisons,
        average=average,
        avg_tasks=avg_tasks,
        budget=sort_rows(budget, tasks, methods),
        budget_at=sort_rows(budget_table(budget, avg_tasks), tasks, methods),
        best_runs=sort_rows(_best_runs(ix), tasks, methods),
        status=status,
        status_by_method=status_by_method(status),
        scale=scale,
        tasks=tasks,
        methods=methods,
        **knob_frames,
    )
