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
  its finished search seeds. ``best_dev_main`` (max over dev) is a diagnostic: never used here.
- ``ikd`` runs with ``teacher_lr == 0`` are a control (the teacher never moves): method
  ``ikd-control``, selected separately.
- **a − b**: mean paired difference over the seeds both share; paired t-test; percentile
  bootstrap 95 % CI (seeds resampled, random stream seeded by task and comparison, so a report is
  reproducible); Holm's correction across tasks. The Avg row: mean over tasks of the per-task
  differences, bootstrap CI resampling seeds within each task.
- **Budget-fair view** (Dodge et al., 2019, "Show Your Work"): the expected dev score of the
  val-selected setting among n settings drawn without replacement, n = 1 … settings tried, exact
  over the val ranks.

Every step is a vectorised group-by over all tasks at once, so simulations can report thousands
of tasks in one call (tests/test_aa.py).
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import special, stats

from ikd_sweep.trials import HPARAMS

KEYS = ("task", "method", *HPARAMS)
CONTROL = "ikd-control"
METHOD_ORDER = ("finetune", "kd", "ikd", CONTROL)
#: (a, b): the tables report a − b.
COMPARISONS = (("ikd", "kd"), ("ikd", CONTROL), ("ikd", "finetune"), ("kd", "finetune"))
PHASES = ("search", "confirm")
#: Marks a reported cell with fewer finished seeds than expected.
INCOMPLETE_MARK = "†"
GLUE_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
AVG = "Avg"
N_BOOT = 2000
RUN_COLUMNS = (
    "run_id",
    "trial_id",
    "task",
    "method",
    "seed",
    "status",
    "phase",
    "sel_val_main",
    "sel_dev_main",
    "final_dev_main",
    "best_dev_main",
    *HPARAMS,
)
EXPECTED_COLUMNS = ("trial_id", "task", "method", "seed", "phase", *HPARAMS)


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
    #: a − b per task (and ``Avg``): mean_a, mean_b, diff (paired mean difference), ci_low,
    #: ci_high, n_pairs, t, p_value, p_holm, n_settings_a, n_settings_b.
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
    tasks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)

    @property
    def has_results(self) -> bool:
        return not self.selected.empty


# ------------------------------------------------------------------------------------------
# Ordering and small helpers
# ------------------------------------------------------------------------------------------


def display_scale(values: pd.Series | list[float]) -> float:
    """100 when every score lies in [-1, 1] (GLUE metrics as fractions, shown as points the way
    papers print them), else 1 (the trainer already reports percentages)."""
    arr = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    arr = arr[np.isfinite(arr)]
    return 100.0 if arr.size and np.all(np.abs(arr) <= 1.0) else 1.0


def task_order(tasks: list[str] | pd.Series) -> list[str]:
    """GLUE's order for GLUE tasks, then the others alphabetically."""

    def key(task: str) -> tuple[int, str]:
        norm = re.sub(r"[^a-z0-9]", "", str(task).lower())
        norm = {"mnlim": "mnli", "mnlimatched": "mnli"}.get(norm, norm)
        return (GLUE_ORDER.index(norm) if norm in GLUE_ORDER else len(GLUE_ORDER), str(task))

    return sorted({str(t) for t in pd.unique(pd.Series(tasks)) if not pd.isna(t)}, key=key)


def method_order(methods: list[str] | pd.Series) -> list[str]:
    present = {str(m) for m in pd.unique(pd.Series(methods)) if not pd.isna(m)}
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def _ensure_columns(frame: pd.DataFrame | None, columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame() if frame is None else frame.copy()
    for col in columns:
        if col not in frame.columns:
            frame[col] = math.nan
    return frame


def _sort_rows(frame: pd.DataFrame, tasks: list[str], methods: list[str]) -> pd.DataFrame:
    """Rows in table order: tasks (GLUE order), then methods (finetune, kd, ikd, control)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    order = np.lexsort((_rank(frame["method"], methods), _rank(frame["task"], [*tasks, AVG])))
    return frame.iloc[order].reset_index(drop=True)


def _rank(values: pd.Series, order: list[str]) -> np.ndarray:
    """Position of each value in ``order`` (unknown values last)."""
    rank = pd.Index(order, dtype=object).get_indexer(values.astype(object))
    return np.where(rank < 0, len(order), rank)


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


def prepare(frame: pd.DataFrame | None, columns: tuple[str, ...] = RUN_COLUMNS) -> pd.DataFrame:
    """A new frame with just ``columns`` (NaN where absent): hyperparameters as floats, ``phase``
    "search" where unset, and ``ikd`` with ``teacher_lr == 0`` relabelled ``ikd-control``.
    Raises ``ValueError`` for a phase other than search or confirm."""
    frame = pd.DataFrame() if frame is None else frame
    nan = pd.Series(np.nan, index=frame.index, dtype=float)
    out = pd.DataFrame({c: frame[c] if c in frame.columns else nan for c in columns})
    out = out.reset_index(drop=True)
    for h in HPARAMS:
        if h in out.columns:
            out[h] = pd.to_numeric(out[h], errors="coerce").astype(float)
    if "phase" in out.columns:
        if out["phase"].isna().any():
            phase = out["phase"].astype(object)
            out["phase"] = phase.where(phase.notna(), "search").astype("str")
        bad = sorted(str(v) for v in pd.unique(out["phase"]) if v not in PHASES)
        if bad:
            raise ValueError(f"column 'phase' has {bad}; valid values: {', '.join(PHASES)}")
    if "method" in out.columns and "teacher_lr" in out.columns:
        control = (out["method"].eq("ikd") & out["teacher_lr"].eq(0.0)).to_numpy()
        if control.any():
            out["method"] = out["method"].astype(object).where(~control, CONTROL).astype("str")
    return out


def _finished(frame: pd.DataFrame, metric: str) -> np.ndarray:
    values = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float)
    return frame["status"].eq("FINISHED").to_numpy(dtype=bool) & np.isfinite(values)


def finished_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """FINISHED runs with a dev score at their val-selected checkpoint (``sel_dev_main``)."""
    runs = _ensure_columns(runs, ("task", "method", "seed", "status", "sel_dev_main", *HPARAMS))
    return runs[_finished(runs, "sel_dev_main")]


def holm(p_values: np.ndarray | list[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN stays NaN and is not counted as a test."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        adj = np.maximum.accumulate((m - np.arange(m)) * q[order]).clip(max=1.0)
        res = np.empty(m)
        res[order] = adj
        out[ok] = res
    return out


# ------------------------------------------------------------------------------------------
# Index: one integer id per setting, for runs and expected trials alike
# ------------------------------------------------------------------------------------------


def _codes(columns: list[pd.Series]) -> np.ndarray:
    """Dense int codes of the row tuples of ``columns`` (NaN is a value like any other)."""
    code = np.zeros(len(columns[0]), dtype=np.int64)
    for col in columns:
        part, uniques = pd.factorize(col, use_na_sentinel=False)
        # Re-densify after each column so the running code can never overflow.
        code = pd.factorize(code * len(uniques) + part)[0].astype(np.int64)
    return code


@dataclass
class _Index:
    runs: pd.DataFrame
    expected: pd.DataFrame
    #: One row per setting id: task, method, hyperparameters, and ``tm`` ((task, method) id).
    settings: pd.DataFrame
    run_sid: np.ndarray
    exp_sid: np.ndarray

    @property
    def size(self) -> int:
        return len(self.settings)

    def per_setting(self, sid: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(sid, weights=weights, minlength=self.size)


def _index(runs: pd.DataFrame, expected: pd.DataFrame) -> _Index:
    keys = list(KEYS)
    both = {c: pd.concat([runs[c], expected[c]], ignore_index=True) for c in keys}
    sid = _codes([both[c] for c in keys])
    first = np.unique(sid, return_index=True)[1] if len(sid) else np.empty(0, dtype=int)
    settings = pd.DataFrame({c: both[c].iloc[first].to_numpy() for c in keys})
    settings["tm"] = _codes([settings["task"], settings["method"]]) if len(settings) else 0
    return _Index(runs, expected, settings, sid[: len(runs)], sid[len(runs) :])


# ------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------


def _candidates(ix: _Index) -> pd.DataFrame:
    """Search-phase settings, indexed by setting id (see :func:`candidate_settings`)."""
    runs, exp = ix.runs, ix.expected
    r_search = runs["phase"].eq("search").to_numpy(dtype=bool)
    e_search = exp["phase"].eq("search").to_numpy(dtype=bool)
    present = ix.per_setting(ix.run_sid[r_search]) + ix.per_setting(ix.exp_sid[e_search]) > 0
    # Seed slots: distinct (setting, seed) pairs planned or run.
    sids = np.concatenate([ix.run_sid[r_search], ix.exp_sid[e_search]])
    seeds = pd.concat([runs["seed"][r_search], exp["seed"][e_search]], ignore_index=True)
    pairs = np.unique(_codes([pd.Series(sids), seeds]), return_index=True)[1]
    slots = ix.per_setting(sids[pairs])

    ok = r_search & _finished(runs, "sel_val_main")
    val = runs["sel_val_main"].to_numpy(dtype=float)
    n = ix.per_setting(ix.run_sid[ok])
    val_sum = ix.per_setting(ix.run_sid[ok], val[ok])
    task_code = _codes([ix.settings["task"]]) if ix.size else np.empty(0, dtype=np.int64)
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

    dev_ok = r_search & _finished(runs, "sel_dev_main")
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


def candidate_settings(runs: pd.DataFrame, expected: pd.DataFrame | None) -> pd.DataFrame:
    """Every search-phase (task, method, setting) with its val ranking score and dev summary.

    ``slots``: distinct seeds planned (``expected``) or run; ``n``: finished with a val score;
    ``val_score``: mean ``sel_val_main`` with the ``slots − n`` unfinished seeds scored as the
    worst finished ``sel_val_main`` of the task; ``mean``/``std``: ``sel_dev_main`` over the
    finished seeds (the search-phase dev score of the setting).
    """
    ix = _index(prepare(runs), prepare(expected, EXPECTED_COLUMNS))
    return _candidates(ix).reset_index(drop=True)


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
    teacher_lr 0, hence ``base_method``)."""
    ix = _index(prepare(runs), prepare(expected, EXPECTED_COLUMNS))
    best = _pick(_candidates(ix)).reset_index(drop=True)
    best["base_method"] = best["method"].where(best["method"].ne(CONTROL), "ikd")
    return best[["task", "method", "base_method", *HPARAMS, "val_score", "n_settings"]]


def _reported(ix: _Index, picked: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selected with its reported statistics, the per-seed scores behind them)."""
    runs, exp = ix.runs, ix.expected
    is_picked = np.zeros(ix.size, dtype=bool)
    is_picked[picked.index.to_numpy()] = True
    confirm = runs["phase"].eq("confirm").to_numpy(dtype=bool)
    rows = _finished(runs, "sel_dev_main") & is_picked[ix.run_sid]
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
    e_confirm = exp["phase"].eq("confirm").to_numpy(dtype=bool)
    n_exp = np.where(
        confirmed,
        ix.per_setting(ix.exp_sid[e_confirm]),
        ix.per_setting(ix.exp_sid[~e_confirm]),
    )
    sel = picked[[*KEYS, "val_score", "n_settings"]].copy()
    sid = sel.index
    sel["source"] = np.where(confirmed[sid], "confirm", "search")
    sel["mean"] = per.mean().reindex(sid).to_numpy()
    sel["std"] = per.std(ddof=1).reindex(sid).to_numpy()
    sel["n"] = per.size().reindex(sid).fillna(0).astype(int).to_numpy()
    sel["n_expected"] = pd.array(n_exp[sid] if len(exp) else [pd.NA] * len(sid), dtype="Int64")
    sel["incomplete"] = (sel["n"] < sel["n_expected"]).fillna(False).astype(bool)
    sel["seeds"] = [s if isinstance(s, list) else [] for s in seeds.reindex(sid)]
    sel["base_method"] = sel["method"].where(sel["method"].ne(CONTROL), "ikd")
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


# ------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------


def _resample_indices(keys: np.ndarray, n_boot: int, size: int) -> np.ndarray:
    """Bootstrap indices in [0, size), shape (len(keys), n_boot, size): a counter-based random
    stream (SplitMix64) per key. Each task's draws depend on its key alone, not on which other
    tasks the report holds, and all tasks are drawn in one array operation."""
    counter = np.arange(n_boot * size, dtype=np.uint64).reshape(1, n_boot, size)
    x = (keys.astype(np.uint64)[:, None, None] << np.uint64(32)) + counter
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    # Top 53 bits as a uniform in [0, 1), scaled to an index.
    return ((x >> np.uint64(11)).astype(np.float64) * (size / 2.0**53)).astype(np.int64)


def _bootstrap_means(
    parts: dict[str, np.ndarray], tasks: list[str], a: str, b: str, n_boot: int
) -> dict[str, np.ndarray]:
    """Per task with 2+ pairs: ``n_boot`` means of its differences resampled with replacement,
    seeded by the task and comparison names. Tasks with the same number of pairs are resampled
    together."""
    by_size: dict[int, list[str]] = {}
    for task in tasks:
        d = parts.get(task)
        if n_boot > 0 and d is not None and d.size >= 2:
            by_size.setdefault(d.size, []).append(task)
    out: dict[str, np.ndarray] = {}
    for size, names in by_size.items():
        for lo in range(0, len(names), 256):  # bounded memory: 256 × n_boot × size
            chunk = names[lo : lo + 256]
            data = np.stack([parts[t] for t in chunk])
            keys = np.array([zlib.crc32(f"{t}\0{a}\0{b}".encode()) for t in chunk])
            idx = _resample_indices(keys, n_boot, size)
            means = data[np.arange(len(chunk))[:, None, None], idx].mean(axis=2)
            out.update(zip(chunk, means, strict=True))
    return out


def _paired_stats(diffs: pd.Series, tasks: list[str]) -> pd.DataFrame:
    """Per task: n, mean, t and two-sided p of a paired t-test on ``diffs`` (index level
    ``task``). t and p are NaN with fewer than 2 pairs or when every difference is the same
    (t undefined: scipy would return ±inf from rounding noise)."""
    grouped = diffs.groupby(level="task", sort=False)
    frame = pd.DataFrame(
        {
            "n": grouped.size(),
            "mean": grouped.mean(),
            "sd": grouped.std(ddof=1),
            "span": grouped.max() - grouped.min(),
            "size": grouped.agg(lambda s: 0.0) if diffs.empty else diffs.abs().groupby(
                level="task", sort=False
            ).max(),
        }
    ).reindex(tasks)
    n = frame["n"].fillna(0).to_numpy(dtype=float)
    usable = (n >= 2) & (frame["span"] > 1e-12 * np.maximum(1.0, frame["size"])).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(usable, frame["mean"] / (frame["sd"] / np.sqrt(n)), np.nan)
        p = np.where(usable, 2 * stats.t.sf(np.abs(t), np.maximum(n - 1, 1)), np.nan)
    return pd.DataFrame({"n": n.astype(int), "mean": frame["mean"], "t": t, "p": p}, index=tasks)


def compare(
    scores: pd.DataFrame,
    selected: pd.DataFrame,
    average: pd.DataFrame,
    avg_tasks: list[str],
    tasks: list[str],
    n_boot: int = N_BOOT,
) -> pd.DataFrame:
    """a − b for each pair in :data:`COMPARISONS` on every task where both have a result."""
    columns = [
        "task",
        "comparison",
        "a",
        "b",
        "mean_a",
        "mean_b",
        "diff",
        "ci_low",
        "ci_high",
        "n_pairs",
        "t",
        "p_value",
        "p_holm",
        "n_settings_a",
        "n_settings_b",
    ]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    wide = scores.set_index(["task", "seed", "method"])["score"].unstack("method")
    sel = selected.set_index(["task", "method"])[["mean", "n_settings"]]
    by_method = {m: sel.xs(m, level="method") for m in sel.index.unique("method")}
    avg = average.set_index("method")["mean"] if not average.empty else pd.Series(dtype=float)
    frames = []
    for a, b in COMPARISONS:
        if a not in wide.columns or b not in wide.columns:
            continue
        sel_a, sel_b = by_method[a], by_method[b]
        both = [t for t in tasks if t in sel_a.index and t in sel_b.index]
        if not both:
            continue
        diffs = (wide[a] - wide[b]).dropna()
        paired = _paired_stats(diffs, both)
        # Bootstrap: per task, resample its seeds (pairs) with replacement.
        owner = diffs.index.get_level_values("task").to_numpy()
        order = np.argsort(owner, kind="stable")
        names, start = np.unique(owner[order], return_index=True)
        chunks = np.split(diffs.to_numpy(dtype=float)[order], start[1:]) if len(names) else []
        parts = dict(zip(names, chunks, strict=True))
        draws = _bootstrap_means(parts, both, a, b, n_boot)
        ci = np.full((len(both), 2), np.nan)
        if draws:
            rows = [i for i, t in enumerate(both) if t in draws]
            stacked = np.stack([draws[both[i]] for i in rows])
            ci[rows] = np.percentile(stacked, [2.5, 97.5], axis=1).T
        frame = pd.DataFrame(
            {
                "task": both,
                "comparison": f"{a}-{b}",
                "a": a,
                "b": b,
                "mean_a": sel_a["mean"].reindex(both).to_numpy(dtype=float),
                "mean_b": sel_b["mean"].reindex(both).to_numpy(dtype=float),
                "diff": paired["mean"].to_numpy(dtype=float),
                "ci_low": ci[:, 0],
                "ci_high": ci[:, 1],
                "n_pairs": paired["n"].to_numpy(),
                "t": paired["t"].to_numpy(),
                "p_value": paired["p"].to_numpy(),
                "p_holm": holm(paired["p"].to_numpy()),
                "n_settings_a": sel_a["n_settings"].reindex(both).to_numpy(dtype=int),
                "n_settings_b": sel_b["n_settings"].reindex(both).to_numpy(dtype=int),
            }
        )
        if a in avg.index and b in avg.index and avg_tasks:
            frame = pd.concat(
                [frame, _average_row(frame, draws, avg_tasks, a, b, avg, columns)],
                ignore_index=True,
            )
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=columns)
    result = pd.concat(frames, ignore_index=True)
    result["n_pairs"] = result["n_pairs"].astype(int)
    return result[columns]


def _average_row(
    frame: pd.DataFrame,
    draws: dict[str, np.ndarray],
    avg_tasks: list[str],
    a: str,
    b: str,
    avg: pd.Series,
    columns: list[str],
) -> pd.DataFrame:
    """The Avg row of a − b: mean over ``avg_tasks`` of the per-task differences; its CI from
    the per-task bootstrap draws averaged over tasks (seeds resampled within each task)."""
    per_task = frame.set_index("task").reindex(avg_tasks)
    diff = float(per_task["diff"].mean()) if per_task["diff"].notna().all() else math.nan
    lo = hi = math.nan
    if all(t in draws for t in avg_tasks):
        lo, hi = np.percentile(np.mean([draws[t] for t in avg_tasks], axis=0), [2.5, 97.5])
    row = [AVG, f"{a}-{b}", a, b, float(avg[a]), float(avg[b]), diff, lo, hi]
    row += [int(per_task["n_pairs"].sum()), math.nan, math.nan, math.nan]
    row += [int(per_task["n_settings_a"].max()), int(per_task["n_settings_b"].max())]
    return pd.DataFrame([row], columns=columns)


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


def expected_max_curve(val: np.ndarray, dev: np.ndarray) -> np.ndarray:
    """E[dev of the setting with the best val among n drawn without replacement], n = 1 … N.

    ``val`` must break ties already (the order of :func:`candidate_settings`' selection): the
    settings are ranked by ``val`` with a stable sort, later ones winning ties.
    """
    order = np.argsort(np.asarray(val, dtype=float), kind="stable")
    return _max_rank_weights(len(order)) @ np.asarray(dev, dtype=float)[order]


def budget_curves(candidates: pd.DataFrame) -> pd.DataFrame:
    """``expected_dev`` at n = 1 … settings per (task, method), over the settings that have
    both a val score and a dev score."""
    columns = ["task", "method", "n", "expected_dev", "n_settings"]
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
    curve = np.empty(len(able))
    # Groups of equal size share one weight matrix: one matrix product per size.
    for size in np.unique(sizes):
        rows = starts[sizes == size][:, None] + np.arange(size)
        curve[rows] = dev[rows] @ _max_rank_weights(int(size)).T
    return pd.DataFrame(
        {
            "task": able["task"].to_numpy(),
            "method": able["method"].to_numpy(),
            "n": np.concatenate([np.arange(1, k + 1) for k in sizes]),
            "expected_dev": curve,
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
# Status and single runs
# ------------------------------------------------------------------------------------------


def _best_runs(ix: _Index) -> pd.DataFrame:
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
    ok = np.flatnonzero(runs["phase"].eq("search").to_numpy(dtype=bool) & _finished(
        runs, "sel_val_main"
    ))
    if not ok.size:
        return pd.DataFrame(columns=columns)
    tm = ix.settings["tm"].to_numpy()[ix.run_sid[ok]]
    val = runs["sel_val_main"].to_numpy(dtype=float)[ok]
    order = np.lexsort((-val, tm))  # stable: the first run wins a tie
    first = np.unique(tm[order], return_index=True)[1]
    return runs.iloc[ok[order[first]]][columns].reset_index(drop=True)


def best_single_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished search run with the highest ``sel_val_main`` per (task, method)."""
    return _best_runs(_index(prepare(runs), prepare(None, EXPECTED_COLUMNS)))


def _rates(frame: pd.DataFrame) -> pd.DataFrame:
    ended = frame["finished"] + frame["failed"] + frame["killed"]
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["failure_rate"] = np.where(ended > 0, frame["failed"] / ended.clip(lower=1), np.nan)
        frame["stop_rate"] = np.where(ended > 0, frame["killed"] / ended.clip(lower=1), np.nan)
    return frame


STATUS_COUNTS = ("expected", "finished", "failed", "killed", "running", "missing")


def _status(ix: _Index) -> pd.DataFrame:
    columns = ["task", "method", *STATUS_COUNTS, "failure_rate", "stop_rate"]
    runs, exp = ix.runs, ix.expected
    status = runs["status"]
    ids = pd.concat([runs["trial_id"], exp["trial_id"]], ignore_index=True)
    codes = pd.factorize(ids)[0]  # -1 for a missing trial id
    seen = np.zeros(codes.max(initial=-1) + 2, dtype=bool)
    seen[codes[: len(runs)]] = True
    seen[-1] = False
    counts = {
        "expected": ix.per_setting(ix.exp_sid),
        "finished": ix.per_setting(ix.run_sid[status.eq("FINISHED").to_numpy(dtype=bool)]),
        "failed": ix.per_setting(ix.run_sid[status.eq("FAILED").to_numpy(dtype=bool)]),
        "killed": ix.per_setting(ix.run_sid[status.eq("KILLED").to_numpy(dtype=bool)]),
        "running": ix.per_setting(
            ix.run_sid[status.isin(["RUNNING", "SCHEDULED"]).to_numpy(dtype=bool)]
        ),
        "missing": ix.per_setting(ix.exp_sid[~seen[codes[len(runs) :]]]),
    }
    frame = ix.settings[["task", "method"]].assign(**counts).dropna(subset=["task", "method"])
    if frame.empty:
        return pd.DataFrame(columns=columns)
    table = frame.groupby(["task", "method"], sort=False)[list(STATUS_COUNTS)].sum()
    table = table.astype(int).reset_index()
    table = _sort_rows(table, task_order(table["task"]), method_order(table["method"]))
    return _rates(table)[columns]


def status_table(runs: pd.DataFrame, expected: pd.DataFrame | None) -> pd.DataFrame:
    """Per (task, method): trials expected, finished, failed, killed (early-stopped), still
    running, missing (expected, no run); failure_rate and stop_rate over the trials that ended."""
    return _status(_index(prepare(runs), prepare(expected, EXPECTED_COLUMNS)))


def status_by_method(status: pd.DataFrame) -> pd.DataFrame:
    """``status`` summed over tasks, per method, with the rates recomputed."""
    counts = list(STATUS_COUNTS)
    if status.empty:
        return pd.DataFrame(columns=["method", *counts, "failure_rate", "stop_rate"])
    frame = status.groupby("method", sort=False)[counts].sum()
    frame = frame.reindex(method_order(frame.index.to_series())).reset_index()
    return _rates(frame)


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def build_report(
    runs: pd.DataFrame,
    expected: pd.DataFrame | None,
    sweep: str = "",
    n_boot: int = N_BOOT,
) -> Report:
    """All tables of a sweep from its runs (``collect.SweepRuns.runs``) and expected trials
    (``collect.SweepRuns.expected``; may be empty). See the module docstring for the protocol."""
    ix = _index(prepare(runs), prepare(expected, EXPECTED_COLUMNS))
    candidates = _candidates(ix)
    selected, scores = _reported(ix, _pick(candidates))
    tasks = task_order(selected["task"]) if not selected.empty else []
    methods = method_order(selected["method"]) if not selected.empty else []
    selected = _sort_rows(selected, tasks, methods)
    average, avg_tasks = glue_average(selected, methods)
    comparisons = compare(scores, selected, average, avg_tasks, tasks, n_boot)
    budget = budget_curves(candidates)
    status = _status(ix)
    return Report(
        sweep=sweep,
        candidates=candidates.reset_index(drop=True),
        selected=selected,
        scores=scores,
        comparisons=_sort_comparisons(comparisons, tasks),
        average=average,
        avg_tasks=avg_tasks,
        budget=_sort_rows(budget, tasks, methods),
        budget_at=_sort_rows(budget_table(budget, avg_tasks), tasks, methods),
        best_runs=_sort_rows(_best_runs(ix), tasks, methods),
        status=status,
        status_by_method=status_by_method(status),
        tasks=tasks,
        methods=methods,
    )


def _sort_comparisons(frame: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    names = [f"{a}-{b}" for a, b in COMPARISONS]
    order = np.lexsort((_rank(frame["task"], [*tasks, AVG]), _rank(frame["comparison"], names)))
    return frame.iloc[order].reset_index(drop=True)
