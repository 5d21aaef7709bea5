"""a − b per task and over tasks (the ``comparisons`` table of a report), from the reported runs.

Per task: the mean paired difference over the seeds both methods share, its standard error,
df, t-interval and t-test, Holm's correction across tasks, the minimum detectable effect with
the seeds run, the seeds needed to detect :data:`EFFECT_PT`, and the probability of
improvement (share of seed pairs where a beats b). The Avg row: the mean of the per-task
differences, with a t-interval from the per-task variances (Welch-Satterthwaite df). See
``analysis.stats`` for why.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import stats
from analysis.frames import AVG, rank
from ikd_sweep.names import CONFIRM, CONTROL, SEARCH

#: (a, b): the tables report a − b.
COMPARISONS = (("ikd", "kd"), ("ikd", CONTROL), ("ikd", "finetune"), ("kd", "finetune"))
#: The effect, in displayed points, that ``seeds_for_effect`` plans for.
EFFECT_PT = 0.5
COLUMNS = [
    "task", "comparison", "a", "b", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "se", "df",
    "n_pairs", "t", "p_value", "p_holm", "mde", "seeds_for_effect", "p_improve", "p_improve_low",
    "p_improve_high", "n_settings_a", "n_settings_b", "source",
]


def _per_task(diffs: pd.Series, tasks: list[str], effect: float) -> pd.DataFrame:
    """Statistics of the paired differences ``diffs`` (index level ``task``) per task."""
    grouped = diffs.groupby(level="task", sort=False)
    frame = pd.DataFrame({
        "n": grouped.size(), "mean": grouped.mean(), "sd": grouped.std(ddof=1),
        "span": grouped.max() - grouped.min(), "size": diffs.abs().groupby(
            level="task", sort=False).max(),
        "wins": (diffs > 0).groupby(level="task", sort=False).sum()
        + 0.5 * (diffs == 0).groupby(level="task", sort=False).sum(),
    }).reindex(tasks)
    n = frame["n"].fillna(0).to_numpy(dtype=int)
    # Identical differences: their sd is rounding noise, and so would be any t from it.
    same = (frame["span"] <= 1e-12 * np.maximum(1.0, frame["size"])).to_numpy()
    sd = np.where(same, 0.0, frame["sd"].to_numpy(dtype=float))
    test = stats.paired(n, frame["mean"].to_numpy(dtype=float), sd)
    return pd.DataFrame({
        "diff": frame["mean"].to_numpy(dtype=float), "n_pairs": n, "sd": sd,
        "se": test["se"], "df": test["df"], "ci_low": test["ci_low"],
        "ci_high": test["ci_high"], "t": test["t"], "p_value": test["p"],
        "p_holm": stats.holm(test["p"]), "mde": stats.mde(test["se"], test["df"]),
        "seeds_for_effect": stats.seeds_needed(effect, np.where(n >= 2, sd, np.nan)),
        "wins": frame["wins"].fillna(0).to_numpy(dtype=float),
        **stats.prob_improvement(frame["wins"].fillna(0).to_numpy(dtype=float), n),
    }, index=tasks)


def _average(per: pd.DataFrame, effect: float) -> dict[str, float]:
    """The Avg row's statistics over the tasks of ``per`` (one row each)."""
    mean, se, df = stats.welch_average(per["diff"], per["se"], per["df"])
    test = stats.t_tests(np.array([mean]), np.array([se]), np.array([df]))
    # A task with fewer than 2 pairs has no spread (its sd of 0 is a placeholder): then the
    # average has none either, and planning it from the other tasks would understate it.
    var = np.where(per["n_pairs"].to_numpy() >= 2, per["sd"].to_numpy(dtype=float), np.nan) ** 2
    # An average over k tasks of n seeds each: sd of a seed's average difference, and the
    # Welch-Satterthwaite df per seed, (sum var)^2 / sum var^2.
    sd_seed = np.sqrt(var.sum()) / len(per)
    df_per_seed = var.sum() ** 2 / np.sum(var**2) if var.sum() > 0 else 1.0
    wins, n = float(per["wins"].sum()), int(per["n_pairs"].sum())
    return {
        "diff": mean, "se": se, "df": df, "n_pairs": n, "t": test["t"][0], "p_value": test["p"][0],
        "p_holm": np.nan, "ci_low": test["ci_low"][0], "ci_high": test["ci_high"][0],
        "mde": stats.mde(np.array([se]), np.array([df]))[0],
        "seeds_for_effect": stats.seeds_needed(effect, np.array([sd_seed]), df_per_seed)[0],
        **{k: v[0] for k, v in stats.prob_improvement(np.array([wins]), np.array([n])).items()},
    }


def compare(scores: pd.DataFrame, selected: pd.DataFrame, average: pd.DataFrame,
            avg_tasks: list[str], tasks: list[str], scale: float = 1.0,
            effect_pt: float = EFFECT_PT) -> pd.DataFrame:
    """a − b for each pair in :data:`COMPARISONS` on every task where both have a result.
    ``scale`` is the display scale (100 for GLUE fractions): ``effect_pt``, the effect that
    ``seeds_for_effect`` plans for, is in its points. ``source`` is ``confirm`` where both
    methods' cells come from confirmation seeds."""
    if scores.empty:
        return pd.DataFrame(columns=COLUMNS)
    wide = scores.set_index(["task", "seed", "method"])["score"].unstack("method")
    sel = selected.set_index(["task", "method"])[["mean", "n_settings", "source"]]
    by_method = {m: sel.xs(m, level="method") for m in sel.index.unique("method")}
    avg = average.set_index("method")["mean"] if not average.empty else pd.Series(dtype=float)
    effect = effect_pt / scale
    frames = []
    for a, b in COMPARISONS:
        if a not in wide.columns or b not in wide.columns:
            continue
        sel_a, sel_b = by_method[a], by_method[b]
        both = [t for t in tasks if t in sel_a.index and t in sel_b.index]
        if not both:
            continue
        per = _per_task((wide[a] - wide[b]).dropna(), both, effect)
        confirmed = sel_a["source"].reindex(both).eq(CONFIRM) & sel_b["source"].reindex(
            both).eq(CONFIRM)
        frame = per.assign(
            task=both, comparison=f"{a}-{b}", a=a, b=b,
            mean_a=sel_a["mean"].reindex(both).to_numpy(dtype=float),
            mean_b=sel_b["mean"].reindex(both).to_numpy(dtype=float),
            n_settings_a=sel_a["n_settings"].reindex(both).to_numpy(dtype=int),
            n_settings_b=sel_b["n_settings"].reindex(both).to_numpy(dtype=int),
            source=np.where(confirmed.to_numpy(), CONFIRM, SEARCH),
        )
        if a in avg.index and b in avg.index and avg_tasks:
            mine = frame.loc[avg_tasks]
            row = {**_average(mine, effect), "task": AVG, "comparison": f"{a}-{b}", "a": a,
                   "b": b, "mean_a": float(avg[a]), "mean_b": float(avg[b]),
                   "n_settings_a": int(mine["n_settings_a"].max()),
                   "n_settings_b": int(mine["n_settings_b"].max()),
                   "source": CONFIRM if mine["source"].eq(CONFIRM).all() else SEARCH}
            frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
        frames.append(frame[COLUMNS])
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    result = pd.concat(frames, ignore_index=True)
    result["n_pairs"] = result["n_pairs"].astype(int)
    names = [f"{a}-{b}" for a, b in COMPARISONS]
    order = np.lexsort((rank(result["task"], [*tasks, AVG]), rank(result["comparison"], names)))
    return result.iloc[order].reset_index(drop=True)
