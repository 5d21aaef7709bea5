"""KD-vs-IKD tables from a sweep's runs (pure pandas/scipy; no MLflow here).

Model selection follows the paper's protocol: for each task and method, every hyperparameter
setting (temperature, exam_every, teacher_lr) is scored by its mean dev score (``best_dev_main``)
over the seeds that FINISHED; the setting with the best mean is selected and reported as
mean ± sample std (ddof=1) over its seeds. Failed, killed and running trials never enter a mean;
a selected cell with fewer finished seeds than the sweep expected for that setting is flagged.
Differences between methods are paired by seed (``scipy.stats.ttest_rel``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from ikd_sweep.trials import HPARAMS

METHOD_ORDER = ("finetune", "kd", "ikd")
#: (a, b): the table reports a − b.
COMPARISONS = (("ikd", "kd"), ("ikd", "finetune"), ("kd", "finetune"))
#: Marks a selected cell with fewer finished seeds than expected.
INCOMPLETE_MARK = "†"
GLUE_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
AVG = "Avg"


@dataclass
class Report:
    """All tables of one sweep. Every frame is tidy (one observation per row)."""

    sweep: str
    #: Every (task, method, setting) with finished seeds: mean, std, n, n_expected, seeds.
    candidates: pd.DataFrame
    #: The selected setting per (task, method): its hyperparameters, mean, std, n, n_expected,
    #: incomplete (n < n_expected), n_settings (how many settings competed).
    selected: pd.DataFrame
    #: a − b per task (and ``Avg``): diff of selected means, paired_diff, n_pairs, t, p_value.
    comparisons: pd.DataFrame
    #: Per method: the mean over ``avg_tasks`` of the per-task selected means.
    average: pd.DataFrame
    #: Tasks in the average: those with a selected result for every method.
    avg_tasks: list[str]
    #: Best single finished run per (task, method).
    best_runs: pd.DataFrame
    #: Per (task, method): expected, finished, failed, killed, running, missing.
    status: pd.DataFrame
    tasks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)

    @property
    def has_results(self) -> bool:
        return not self.selected.empty


def display_scale(values: pd.Series | list[float]) -> float:
    """100 when every score lies in [-1, 1] (GLUE metrics as fractions, shown as points the way
    papers print them), else 1 (the trainer already reports percentages)."""
    arr = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    arr = arr[np.isfinite(arr)]
    return 100.0 if arr.size and np.all(np.abs(arr) <= 1.0) else 1.0


def task_order(tasks: list[str] | pd.Series) -> list[str]:
    """GLUE's order for GLUE tasks, then the others alphabetically."""

    def key(task: str) -> tuple[int, str]:
        norm = re.sub(r"[^a-z0-9]", "", str(task).lower())
        norm = {"mnlim": "mnli", "mnlimatched": "mnli"}.get(norm, norm)
        return (GLUE_ORDER.index(norm) if norm in GLUE_ORDER else len(GLUE_ORDER), str(task))

    return sorted({str(t) for t in tasks if isinstance(t, str) or not pd.isna(t)}, key=key)


def method_order(methods: list[str] | pd.Series) -> list[str]:
    present = {str(m) for m in methods if isinstance(m, str) or not pd.isna(m)}
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def _ensure_columns(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    frame = frame.copy()
    for col in columns:
        if col not in frame.columns:
            frame[col] = math.nan
    return frame


def setting_mask(frame: pd.DataFrame, setting: pd.Series | dict) -> pd.Series:
    """Rows of ``frame`` with the hyperparameters of ``setting`` (NaN equals NaN)."""
    mask = pd.Series(True, index=frame.index)
    for h in HPARAMS:
        value = setting[h]
        col = frame[h].astype(float)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            mask &= col.isna()
        else:
            mask &= np.isclose(col, float(value), rtol=1e-9, atol=0.0) & col.notna()
    return mask


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """FINISHED runs with a dev score: the only runs that enter means."""
    runs = _ensure_columns(runs, ("task", "method", "seed", "status", "best_dev_main", *HPARAMS))
    ok = runs["status"].eq("FINISHED") & runs["best_dev_main"].astype(float).notna()
    return runs[ok]


def candidate_settings(runs: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    """Mean/std/n of the dev score for every (task, method, setting) with finished seeds."""
    keys = ["task", "method", *HPARAMS]
    columns = [*keys, "mean", "std", "n", "n_expected", "seeds", "run_ids"]
    fin = finished_runs(runs)
    if fin.empty:
        return pd.DataFrame(columns=columns)
    fin = fin.assign(**{h: fin[h].astype(float) for h in HPARAMS})
    grouped = fin.groupby(keys, dropna=False, sort=False)
    out = grouped["best_dev_main"].agg(mean="mean", std=lambda s: s.std(ddof=1), n="count")
    out["seeds"] = grouped["seed"].agg(lambda s: sorted(int(x) for x in s if not pd.isna(x)))
    out["run_ids"] = grouped["run_id"].agg(list) if "run_id" in fin else [[]] * len(out)
    out = out.reset_index()
    counts = [_count_expected(expected, row) for _, row in out.iterrows()]
    out["n_expected"] = pd.array([None if pd.isna(c) else int(c) for c in counts], dtype="Int64")
    return out[columns]


def _count_expected(expected: pd.DataFrame, row: pd.Series) -> float:
    if expected is None or expected.empty:
        return math.nan
    exp = _ensure_columns(expected, ("task", "method", *HPARAMS))
    mask = exp["task"].eq(row["task"]) & exp["method"].eq(row["method"]) & setting_mask(exp, row)
    return float(mask.sum())


def select_settings(candidates: pd.DataFrame) -> pd.DataFrame:
    """The best setting (highest mean dev score) per (task, method)."""
    columns = [
        "task",
        "method",
        *HPARAMS,
        "mean",
        "std",
        "n",
        "n_expected",
        "incomplete",
        "n_settings",
        "seeds",
    ]
    if candidates.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (_task, _method), group in candidates.groupby(["task", "method"], sort=False):
        # Deterministic tie-break: the first setting in hyperparameter order wins.
        group = group.sort_values(list(HPARAMS), na_position="first", kind="stable")
        best = group.loc[group["mean"].idxmax()].copy()
        best["n_settings"] = len(group)
        n_exp = best["n_expected"]
        best["incomplete"] = bool(not pd.isna(n_exp) and best["n"] < n_exp)
        rows.append(best)
    selected = pd.DataFrame(rows)[columns].reset_index(drop=True)
    selected["n"] = selected["n"].astype(int)
    selected["n_expected"] = pd.array(
        [None if pd.isna(c) else int(c) for c in selected["n_expected"]], dtype="Int64"
    )
    selected["n_settings"] = selected["n_settings"].astype(int)
    selected["incomplete"] = selected["incomplete"].astype(bool)
    return selected


def selected_scores(
    runs: pd.DataFrame, selected: pd.DataFrame, task: str, method: str
) -> pd.Series:
    """Dev scores of the selected setting's finished seeds, indexed by seed."""
    pick = selected[selected["task"].eq(task) & selected["method"].eq(method)]
    if pick.empty:
        return pd.Series(dtype=float)
    fin = finished_runs(runs)
    fin = fin[fin["task"].eq(task) & fin["method"].eq(method)]
    fin = fin[setting_mask(fin, pick.iloc[0])]
    return fin.groupby("seed")["best_dev_main"].mean().astype(float)


def paired_test(a: pd.Series, b: pd.Series) -> tuple[int, float, float, float]:
    """(n_pairs, mean of paired differences, t, p) over the seeds both have; NaN if < 2."""
    shared = sorted(set(a.index) & set(b.index))
    if not shared:
        return 0, math.nan, math.nan, math.nan
    x = a.loc[shared].to_numpy(dtype=float)
    y = b.loc[shared].to_numpy(dtype=float)
    paired = float(np.mean(x - y))
    if len(shared) < 2:
        return len(shared), paired, math.nan, math.nan
    diffs = x - y
    if np.ptp(diffs) <= 1e-12 * max(1.0, float(np.abs(diffs).max())):
        # Identical differences: the t statistic is undefined (scipy would return ±inf, p=0,
        # from rounding noise), so report no test rather than a spurious p < 0.001.
        return len(shared), paired, math.nan, math.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Identical differences give t = ±inf or NaN; scipy warns, the table shows NaN.
        warnings.simplefilter("ignore")
        result = stats.ttest_rel(x, y)
    return len(shared), paired, float(result.statistic), float(result.pvalue)


def compare(
    runs: pd.DataFrame,
    selected: pd.DataFrame,
    average: pd.DataFrame,
    tasks: list[str],
) -> pd.DataFrame:
    """a − b for each comparison in :data:`COMPARISONS` where both methods have results."""
    columns = [
        "task",
        "comparison",
        "a",
        "b",
        "mean_a",
        "mean_b",
        "diff",
        "paired_diff",
        "n_pairs",
        "t",
        "p_value",
    ]
    rows = []
    for a, b in COMPARISONS:
        for task in tasks:
            sel_a = selected[selected["task"].eq(task) & selected["method"].eq(a)]
            sel_b = selected[selected["task"].eq(task) & selected["method"].eq(b)]
            if sel_a.empty or sel_b.empty:
                continue
            scores_a = selected_scores(runs, selected, task, a)
            scores_b = selected_scores(runs, selected, task, b)
            n_pairs, paired, t, p = paired_test(scores_a, scores_b)
            mean_a, mean_b = float(sel_a["mean"].iloc[0]), float(sel_b["mean"].iloc[0])
            rows.append(
                [task, f"{a}-{b}", a, b, mean_a, mean_b, mean_a - mean_b, paired, n_pairs, t, p]
            )
        avg = average.set_index("method")["mean"] if not average.empty else pd.Series()
        if a in avg.index and b in avg.index:
            # No test on the average: its spread over tasks is not a seed-level spread.
            mean_a, mean_b = float(avg[a]), float(avg[b])
            rows.append(
                [AVG, f"{a}-{b}", a, b, mean_a, mean_b, mean_a - mean_b, math.nan, 0]
                + [math.nan, math.nan]
            )
    frame = pd.DataFrame(rows, columns=columns)
    frame["n_pairs"] = frame["n_pairs"].astype(int)
    return frame


def glue_average(selected: pd.DataFrame, methods: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per method, the mean of its per-task selected means, over the tasks every method has."""
    columns = ["method", "mean", "n_tasks"]
    if selected.empty or not methods:
        return pd.DataFrame(columns=columns), []
    per_method = [set(selected.loc[selected["method"].eq(m), "task"]) for m in methods]
    shared = task_order(list(set.intersection(*per_method)))
    if not shared:
        return pd.DataFrame(columns=columns), []
    rows = []
    for method in methods:
        means = selected[selected["method"].eq(method) & selected["task"].isin(shared)]["mean"]
        rows.append([method, float(means.mean()), len(shared)])
    return pd.DataFrame(rows, columns=columns), shared


def best_single_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished run with the highest dev score per (task, method)."""
    columns = [
        "task",
        "method",
        "trial_id",
        "run_id",
        "seed",
        *HPARAMS,
        "best_dev_main",
        "final_dev_main",
    ]
    fin = _ensure_columns(finished_runs(runs), ("trial_id", "run_id", "final_dev_main"))
    if fin.empty:
        return pd.DataFrame(columns=columns)
    idx = fin.groupby(["task", "method"], sort=False)["best_dev_main"].idxmax()
    return fin.loc[idx.to_numpy(), columns].reset_index(drop=True)


def status_table(runs: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method): how many trials were expected, finished, failed, killed, still
    running, and missing (expected but without any run)."""
    columns = ["task", "method", "expected", "finished", "failed", "killed", "running", "missing"]
    runs = _ensure_columns(runs, ("task", "method", "trial_id", "status"))
    expected = (
        _ensure_columns(expected, ("task", "method", "trial_id"))
        if expected is not None
        else pd.DataFrame(columns=["task", "method", "trial_id"])
    )
    pairs = pd.concat([runs[["task", "method"]], expected[["task", "method"]]]).dropna()
    pairs = pairs.drop_duplicates()
    seen = set(runs["trial_id"].dropna())
    rows = []
    for task in task_order(pairs["task"]):
        for method in method_order(pairs.loc[pairs["task"].eq(task), "method"]):
            mine = runs[runs["task"].eq(task) & runs["method"].eq(method)]
            exp = expected[expected["task"].eq(task) & expected["method"].eq(method)]
            status = mine["status"]
            rows.append(
                [
                    task,
                    method,
                    len(exp),
                    int(status.eq("FINISHED").sum()),
                    int(status.eq("FAILED").sum()),
                    int(status.eq("KILLED").sum()),
                    int(status.isin(["RUNNING", "SCHEDULED"]).sum()),
                    int((~exp["trial_id"].isin(seen)).sum()),
                ]
            )
    return pd.DataFrame(rows, columns=columns)


def build_report(runs: pd.DataFrame, expected: pd.DataFrame, sweep: str = "") -> Report:
    """All tables of a sweep from its runs (``collect.SweepRuns.runs``) and expected trials."""
    runs = _ensure_columns(
        runs, ("run_id", "trial_id", "task", "method", "seed", "status", "best_dev_main", *HPARAMS)
    )
    if expected is None:
        expected = pd.DataFrame(columns=["trial_id", "task", "method", "seed", *HPARAMS])
    candidates = candidate_settings(runs, expected)
    selected = select_settings(candidates)
    tasks = task_order(selected["task"]) if not selected.empty else []
    methods = method_order(selected["method"]) if not selected.empty else []
    if not selected.empty:
        # Rows in the order of the tables: GLUE task order, then finetune, kd, ikd.
        rank_t = {t: i for i, t in enumerate(tasks)}
        rank_m = {m: i for i, m in enumerate(methods)}
        selected = selected.sort_values(
            ["task", "method"],
            key=lambda s: s.map(rank_t if s.name == "task" else rank_m),
            kind="stable",
        ).reset_index(drop=True)
    best = best_single_runs(runs)
    if not best.empty:
        rank_t = {t: i for i, t in enumerate(task_order(best["task"]))}
        rank_m = {m: i for i, m in enumerate(method_order(best["method"]))}
        best = best.sort_values(
            ["task", "method"],
            key=lambda s: s.map(rank_t if s.name == "task" else rank_m),
            kind="stable",
        ).reset_index(drop=True)
    average, avg_tasks = glue_average(selected, methods)
    comparisons = compare(runs, selected, average, tasks)
    return Report(
        sweep=sweep,
        candidates=candidates,
        selected=selected,
        comparisons=comparisons,
        average=average,
        avg_tasks=avg_tasks,
        best_runs=best,
        status=status_table(runs, expected),
        tasks=tasks,
        methods=methods,
    )
