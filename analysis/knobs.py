"""What each swept knob does (temperature, exam_every, teacher_lr): ``Report.sensitivity`` and
``Report.importance``. Pure pandas/numpy/scipy, plus Optuna for the importance shares.

Search phase and val split only (``sel_val_main`` of FINISHED search runs): nothing here reads
dev, so nothing here can be tuned on it.

- **sensitivity**: per task, method, knob and value: ``n`` finished runs, ``mean`` val score
  over the other knobs and seeds (the mean of the per-seed means) and its 95 % t-interval over
  seeds (runs of one seed share that seed's luck, so the seed is the unit). With one seed there
  is nothing to pool over: the interval is over that seed's runs, conditional on its luck.
- **importance**: per task, method and knob: ``p_value`` of "this knob changes the val score",
  from an additive ANOVA with the seed as a block and the other swept knobs as factors (Type II
  F-test: the model without the knob against the full one). Chosen by simulation
  (benchmarks/knob_simulation.py, numbers in benchmarks/README.md): under the shared-luck noise
  model it rejects 4-6 % of A/A cells; a one-way ANOVA that ignores the seeds leaves the seeds'
  shared luck in its error term and is conservative (rejects below 4 %), and Friedman's test on
  seed-blocked means has too few blocks (3 seeds) to find a +1 pt/step temperature effect
  reliably and none at all with one seed. ``p_holm``: Holm across the knobs of a (task, method).
  ``importance``: Optuna's fANOVA share of each knob, from a study built of the finished runs
  (val centred within seed, so a seed's luck is not a knob's).

A knob counts as swept for a method when the method uses it (``METHOD_HPARAMS``) and its
finished runs have at least two values. ``ikd`` with teacher_lr 0 is the control
(``ikd-control``): ``ikd``'s teacher_lr is swept over its positive values only.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis.frames import finished, method_order, prepare, task_order
from analysis.stats import ALPHA, holm
from ikd_sweep.names import HPARAMS, METHOD_HPARAMS, SEARCH, base_method

#: What every knob table is computed from (said in every format).
SOURCE = "search phase, val split (sel/val_main); dev is not read"
SENSITIVITY_COLUMNS = ["task", "method", "hparam", "value", "n", "n_seeds", "mean", "ci_low",
                       "ci_high"]
IMPORTANCE_COLUMNS = ["task", "method", "hparam", "n_values", "n", "n_seeds", "p_value",
                      "p_holm", "importance", "note"]
#: Knobs on a log axis (and in the Optuna study on a log scale).
LOG_KNOBS = ("teacher_lr",)


def knob_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[tuple[str, str], list[str]]]:
    """Finished search runs with a val score (task, method, seed, knobs, val) and, per (task,
    method), its swept knobs in ``HPARAMS`` order."""
    runs = prepare(runs)
    keep = runs["phase"].eq(SEARCH).to_numpy(dtype=bool) & finished(runs, "sel_val_main")
    frame = runs.loc[keep, ["task", "method", "seed", *HPARAMS, "sel_val_main"]]
    frame = frame.rename(columns={"sel_val_main": "val"}).reset_index(drop=True)
    swept: dict[tuple[str, str], list[str]] = {}
    for (task, method), g in frame.groupby(["task", "method"], sort=False, observed=True):
        used = METHOD_HPARAMS.get(base_method(str(method)), ())
        knobs = [h for h in HPARAMS if h in used and g[h].dropna().nunique() >= 2]
        if knobs:
            swept[(str(task), str(method))] = knobs
    return frame, swept


def _order(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=columns)
    tasks, methods = task_order(frame["task"]), method_order(frame["method"])
    key = np.lexsort((frame["value"] if "value" in frame else np.zeros(len(frame)),
                      frame["hparam"].map(HPARAMS.index),
                      frame["method"].map(methods.index), frame["task"].map(tasks.index)))
    return frame.iloc[key][columns].reset_index(drop=True)


def _long(frame: pd.DataFrame, swept: dict[tuple[str, str], list[str]]) -> pd.DataFrame:
    """One row per (run, swept knob of its task and method): task, method, hparam, value,
    seed, val."""
    pairs = pd.DataFrame([(t, m, h) for (t, m), knobs in swept.items() for h in knobs],
                         columns=["task", "method", "hparam"])
    if pairs.empty:
        return pd.DataFrame(columns=["task", "method", "hparam", "value", "seed", "val"])
    long = frame.melt(id_vars=["task", "method", "seed", "val"], value_vars=list(HPARAMS),
                      var_name="hparam", value_name="value")
    long = long.astype({"task": str, "method": str})
    return long.merge(pairs, on=["task", "method", "hparam"])


def sensitivity(runs: pd.DataFrame, level: float = 1 - ALPHA) -> pd.DataFrame:
    """Per task, method, swept knob and value: n, n_seeds, mean val score (mean of the per-seed
    means over the other knobs) and its ``level`` t-interval over seeds (over runs with one
    seed). One group-by over every task at once, so simulations of thousands run fast."""
    frame, swept = knob_runs(runs)
    long = _long(frame, swept)
    if long.empty:
        return pd.DataFrame(columns=SENSITIVITY_COLUMNS)
    cell = ["task", "method", "hparam", "value"]
    per_seed = long.groupby([*cell, "seed"], sort=False)["val"].agg(["mean", "size"])
    by = per_seed.groupby(level=cell, sort=False)
    out = pd.DataFrame({"n": by["size"].sum(), "n_seeds": by.size(), "mean": by["mean"].mean(),
                        "sd": by["mean"].std(ddof=1)})
    over_runs = long.groupby(cell, sort=False)["val"].agg(["std", "size"])
    # One seed: its runs are the only replicates (an interval conditional on its luck).
    one = out["n_seeds"].lt(2)
    sd = out["sd"].where(~one, over_runs["std"]).to_numpy(dtype=float)
    count = np.where(one, over_runs["size"], out["n_seeds"]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = scipy_stats.t.ppf(0.5 + level / 2, np.where(count >= 2, count - 1, np.nan))
        half = t * sd / np.sqrt(count)
    out = out.assign(ci_low=out["mean"] - half, ci_high=out["mean"] + half).reset_index()
    return _order(out, SENSITIVITY_COLUMNS)


# ------------------------------------------------------------------------------------------
# The knob test: additive ANOVA with the seed as a block
# ------------------------------------------------------------------------------------------


def _dummies(values: np.ndarray) -> np.ndarray:
    """Treatment-coded columns of a factor (its first level dropped)."""
    code = pd.factorize(values, use_na_sentinel=False)[0]
    return np.eye(code.max() + 1)[code][:, 1:]


def _rss(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return float(resid @ resid), int(rank)


def blocked_anova(y: np.ndarray, factors: dict[str, np.ndarray], block: np.ndarray | None
                  ) -> dict[str, tuple[float, str]]:
    """Per factor: (p of its Type II F-test in the additive model y ~ factors + block, why it is
    NaN). ``block=None`` leaves the seed out (the one-way/ignore-seeds alternative)."""
    parts = {k: _dummies(v) for k, v in factors.items()}
    if block is not None:
        parts["__block"] = _dummies(block)
    ones = np.ones((len(y), 1))
    full = np.hstack([ones, *parts.values()])
    rss, rank = _rss(full, y)
    df_res = len(y) - rank
    out: dict[str, tuple[float, str]] = {}
    for name in factors:
        reduced = np.hstack([ones, *(v for k, v in parts.items() if k != name)])
        rss_red, rank_red = _rss(reduced, y)
        df_k = rank - rank_red
        if df_k < 1:
            out[name] = (np.nan, "confounded with the other knobs or the seed")
        elif df_res < 1:
            out[name] = (np.nan, "needs more runs: none left over to estimate the noise")
        elif rss <= 1e-20 * max(1.0, float(y @ y)):
            out[name] = (np.nan, "no residual variation")
        else:
            f = ((rss_red - rss) / df_k) / (rss / df_res)
            out[name] = (float(scipy_stats.f.sf(f, df_k, df_res)), "")
    return out


def _note(n_seeds: int) -> str:
    return "" if n_seeds >= 2 else "one seed: tested within that seed's luck"


def knob_tests(runs: pd.DataFrame, shares: bool = True, block: bool = True) -> pd.DataFrame:
    """Per task, method and swept knob: n_values, n runs, n_seeds, ``p_value`` (blocked ANOVA;
    ``block=False``: the seeds ignored, for the simulation that chose it), ``p_holm`` across the
    knobs of the (task, method), and (``shares``) Optuna's fANOVA ``importance`` share."""
    frame, swept = knob_runs(runs)
    rows = []
    for (task, method), knobs in swept.items():
        g = frame[frame["task"].eq(task) & frame["method"].eq(method)]
        y = g["val"].to_numpy(dtype=float)
        seeds = g["seed"].to_numpy()
        n_seeds = int(pd.Series(seeds).nunique())
        factors = {h: g[h].to_numpy(dtype=float) for h in knobs}
        tests = blocked_anova(y, factors, seeds if block and n_seeds >= 2 else None)
        share = importance_shares(g, knobs) if shares else {}
        p = np.array([tests[h][0] for h in knobs])
        for h, p_holm in zip(knobs, holm(p), strict=True):
            note = tests[h][1] or _note(n_seeds)
            rows.append({"task": task, "method": method, "hparam": h,
                         "n_values": int(pd.Series(factors[h]).nunique()), "n": len(y),
                         "n_seeds": n_seeds, "p_value": tests[h][0], "p_holm": p_holm,
                         "importance": share.get(h, np.nan), "note": note})
    if not rows:
        return pd.DataFrame(columns=IMPORTANCE_COLUMNS)
    return _order(pd.DataFrame(rows), IMPORTANCE_COLUMNS)


# ------------------------------------------------------------------------------------------
# Importance shares: Optuna's fANOVA over a study built from the finished runs
# ------------------------------------------------------------------------------------------


def importance_shares(group: pd.DataFrame, knobs: list[str], seed: int = 0) -> dict[str, float]:
    """{knob: share} from ``optuna.importance.FanovaImportanceEvaluator`` on one (task,
    method)'s finished runs, val centred within seed; {} when Optuna cannot say."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if len(knobs) == 1:
        return {knobs[0]: 1.0}  # the only knob explains all that the knobs explain
    centred = group["val"] - group.groupby("seed")["val"].transform("mean") + group["val"].mean()
    dists = {
        h: optuna.distributions.FloatDistribution(
            float(group[h].min()), float(group[h].max()), log=h in LOG_KNOBS)
        for h in knobs
    }
    trials = [
        optuna.trial.create_trial(params={h: float(getattr(r, h)) for h in knobs},
                                  distributions=dists, value=float(v))
        for r, v in zip(group.itertuples(index=False), centred, strict=True)
    ]
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API warnings are not the user's
            got = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                normalize=True)
    except (RuntimeError, ValueError) as exc:  # e.g. every value equal
        logging.getLogger(__name__).warning("No importance for %s: %s", knobs, exc)
        return {}
    return {h: float(got.get(h, np.nan)) for h in knobs}
